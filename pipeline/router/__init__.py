"""The Latent Prototype Router: the module, building it from clusters, installing it in a model, calibrating its
bias, loading exported routers.
"""
