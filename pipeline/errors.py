"""The project's one error type, re-exported for the pipeline side.

It lives in ``storage.errors`` because ``storage/`` sits below ``pipeline/`` and imports nothing
from it; stages and components import it from here.
"""

from storage.errors import LprError, storage_error

__all__ = ["LprError", "storage_error"]
