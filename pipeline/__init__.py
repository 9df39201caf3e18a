"""lpr-distill: turn the router of a pretrained MoE model into a balanced Latent Prototype Router."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("lpr-distill")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+source"

__all__ = ["__version__", "load_lpr_model"]


def __getattr__(name: str):
    if name == "load_lpr_model":
        from pipeline.export import load_lpr_model

        return load_lpr_model
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
