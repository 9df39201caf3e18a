"""Writes to the states store on a background thread, so the model's next forward pass overlaps the
write of the last batch."""

from __future__ import annotations

import queue
import threading

import numpy as np
import torch

from storage.errors import LprError
from storage.io_priority import lower_thread_priority, lower_zarr_io_priority
from storage.states import StatesWriter


class BackgroundWriter:
    """Runs ``StatesWriter.append`` on a thread; at most ``depth`` batches wait in memory."""

    def __init__(self, writer: StatesWriter, depth: int = 2) -> None:
        self.writer = writer
        lower_zarr_io_priority()
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="states-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        lower_thread_priority()
        while (item := self._queue.get()) is not None:
            if self._error is None:
                try:
                    self.writer.append(*item)
                except BaseException as err:  # re-raised in the caller's thread
                    self._error = err

    def put(self, shared: dict[str, np.ndarray], layers: list[dict[str, torch.Tensor]], n_seqs: int) -> None:
        self._raise()
        self._queue.put((shared, layers, n_seqs))

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()
        self._raise()

    def _raise(self) -> None:
        if self._error is not None:
            err, self._error = self._error, None
            if isinstance(err, OSError):
                raise LprError(
                    f"writing the states store failed ({err.strerror or err})", "free disk space or check permissions"
                ) from err
            raise err
