"""Low CPU priority for the threads that write the states store, so they fill the gaps of the
forward pass instead of stalling it."""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from concurrent.futures import ThreadPoolExecutor

from zarr.core.sync import _get_loop as zarr_loop

IO_NICENESS = 10  # CPU priority of the threads that write the store (higher = lower priority)


def lower_thread_priority() -> None:
    """Lower the calling thread's CPU priority (Linux; elsewhere a no-op).

    The dump writes while the model computes. On a CPU machine every core runs the forward pass,
    and a writer thread that preempts one of torch's worker threads stalls the whole parallel op;
    at low priority the writes fill the gaps instead (benchmarks/dump_overhead.py measures it).
    """
    with contextlib.suppress(AttributeError, OSError):  # no setpriority on this platform, or not allowed
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), IO_NICENESS)


@functools.cache
def lower_zarr_io_priority() -> None:
    """Run zarr's I/O event loop and the threads that write its files at low priority (once per process)."""
    loop = zarr_loop()
    loop.call_soon_threadsafe(lower_thread_priority)
    loop.set_default_executor(ThreadPoolExecutor(initializer=lower_thread_priority, thread_name_prefix="zarr-write"))
