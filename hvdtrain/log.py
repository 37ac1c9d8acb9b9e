"""Rank-aware logging: rank 0 speaks, other ranks only report warnings and errors, tagged with their rank."""
from __future__ import annotations

import logging
import sys


def counted(n: int, noun: str) -> str:
    """'1 rank', '2 ranks': messages read right for one process too."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def shown(names, limit: int = 5) -> str:
    """Names joined for a message, with '...' only when some were left out."""
    return ", ".join(map(str, names[:limit])) + (", ..." if len(names) > limit else "")


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
