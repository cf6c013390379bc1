"""Logging to console and to a file in the experiment folder."""
from __future__ import annotations

import logging
import sys
from typing import Optional

_INITIALISED = set()


def get_root_logger(name: str = 'dalpsr', log_file: Optional[str] = None,
                    level: int = logging.INFO, main_process: bool = True) -> logging.Logger:
    """Return the project logger; the first call with ``log_file`` adds a file handler.

    Only the main process logs at ``level``; other ranks log errors only.
    """
    logger = logging.getLogger(name)
    if name not in _INITIALISED:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter('%(asctime)s %(levelname)s: %(message)s', '%H:%M:%S'))
        logger.addHandler(handler)
        logger.propagate = False
        _INITIALISED.add(name)
    logger.setLevel(level if main_process else logging.ERROR)
    if log_file is not None and main_process:
        if not any(isinstance(h, logging.FileHandler) and h.baseFilename == log_file for h in logger.handlers):
            fh = logging.FileHandler(log_file, mode='a')
            fh.setFormatter(logging.Formatter('%(asctime)s %(levelname)s: %(message)s'))
            logger.addHandler(fh)
    return logger
