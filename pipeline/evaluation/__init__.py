"""Measurement: load metrics, held-out routing and cross-entropy, routing variants, lm-eval tasks, the report's
content and plots.
"""
