"""The built-in demo: a corpus made from the Python standard library and a small MoE model trained on it."""
