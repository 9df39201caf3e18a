"""Tiny real models, tokenizers and texts, built in seconds with no network: what the tests and
``scripts/compat_matrix.py`` check every family on. Not used by the stages."""
