"""The installed package's version, recorded in every manifest and export."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("lpr-distill")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+source"
