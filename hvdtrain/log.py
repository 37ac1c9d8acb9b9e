"""Rank-aware logging: rank 0 speaks, other ranks only report warnings and errors, tagged with their rank."""
from __future__ import annotations

import logging
import sys


def get_logger(rank: int = 0) -> logging.Logger:
    logger = logging.getLogger("hvdtrain")
    if not getattr(logger, "_hvdtrain_configured", False):
        handler = logging.StreamHandler(sys.stdout if rank == 0 else sys.stderr)
        handler.setFormatter(logging.Formatter(f"[hvdtrain rank {rank}] %(message)s" if rank else "[hvdtrain] %(message)s"))
        logger.handlers[:] = [handler]
        logger.propagate = False
        logger._hvdtrain_configured = True
    logger.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    return logger
