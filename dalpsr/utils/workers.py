"""A multiprocessing pool whose workers run OpenCV and torch with a set number of threads.

Used by the triplet writer (``scripts/generate_lq.py``) and the LR cache builder.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator


@contextmanager
def worker_pool(workers: int, initializer, initargs: tuple, threads: int = 1) -> Iterator[Any]:
    """A multiprocessing Pool whose workers run OpenCV with ``threads`` threads (0: leave as is).

    Calling ``cv2.setNumThreads`` inside a *forked* child can deadlock (pthread_cond_destroy on
    the thread pool state copied from a parent that had used OpenCV threads), so with fork the
    parent sets the count before forking (children inherit it) and restores it afterwards; a
    spawned child (no fork on the platform) sets it itself in :func:`apply_threads`.
    ``initializer(*initargs)`` runs in each child first.
    """
    import multiprocessing as mp

    import cv2
    import torch  # noqa: F401 - loaded once here: forked workers inherit it (each would import it again: seconds)
    method = 'fork' if 'fork' in mp.get_all_start_methods() else 'spawn'
    prev = cv2.getNumThreads()
    if threads > 0:
        cv2.setNumThreads(int(threads))
    try:
        with mp.get_context(method).Pool(int(workers), initializer=_pool_init,
                                         initargs=(method, int(threads), initializer, initargs)) as pool:
            yield pool
    finally:
        cv2.setNumThreads(prev)


def _pool_init(method: str, threads: int, initializer, initargs: tuple) -> None:
    apply_threads(threads, cv2_too=method != 'fork')
    initializer(*initargs)


def apply_threads(threads: int, cv2_too: bool = True) -> None:
    """Cap torch (and OpenCV, unless in a forked child) threads of this process (0: no change)."""
    if threads <= 0:
        return
    if cv2_too:
        import cv2
        cv2.setNumThreads(threads)
    try:
        import torch
        torch.set_num_threads(threads)
    except ImportError:  # pragma: no cover
        pass
