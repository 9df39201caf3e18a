"""Distillation algorithms: gate-level imitation on stored states, model-level distillation against the model's
next-token distribution.
"""
