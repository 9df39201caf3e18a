"""lpr-distill: turn the router of a pretrained MoE model into a balanced Latent Prototype Router."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("lpr-distill")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+source"
