"""The stages: one module per stage, each ``run_<stage>(*, cfg, run, ...) -> Manifest``; the registry lists them
in order.
"""
