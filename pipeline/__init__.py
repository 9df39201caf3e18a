"""lpr-distill: turn the router of a pretrained MoE model into a balanced Latent Prototype Router."""

from pipeline.version import __version__

__all__ = ["__version__", "load_lpr_model"]


def __getattr__(name: str):
    if name == "load_lpr_model":
        from pipeline.router.load import load_lpr_model

        return load_lpr_model
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
