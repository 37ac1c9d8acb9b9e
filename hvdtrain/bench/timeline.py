"""Where the communication time of a training step goes, from a Horovod timeline (HOROVOD_TIMELINE, rank 0).

Each tensor's all-reduce shows up as NEGOTIATE_ALLREDUCE (from this rank's request until every rank has asked:
waiting for the cycle tick and for slower ranks) followed by ALLREDUCE, which holds the work itself
(MEMCPY_IN_FUSION_BUFFER, MPI_ALLREDUCE or GLOO_ALLREDUCE, MEMCPY_OUT_FUSION_BUFFER, ...). Tensors overlap, so
each activity's time is the length of the union of its intervals, per training step.
"""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path


def _events(path) -> tuple[int, list[dict]]:
    """The trace events and the epoch (us) their timestamps count from; tolerates a file still being written."""
    text = Path(path).read_text().strip().rstrip(",")
    events = json.loads(text if text.endswith("]") else text + "]")
    start = next((e["args"]["start_time_since_epoch_in_micros"] for e in events
                  if e.get("ph") == "M" and "start_time_since_epoch_in_micros" in e.get("args", {})), 0)
    return start, events


def intervals(path) -> dict[str, list[tuple[int, int]]]:
    """Activity name -> [(start, end)] in microseconds since the epoch, from the nested B/E events of each tensor."""
    start, events = _events(path)
    open_: dict[int, list] = defaultdict(list)
    out: dict[str, list] = defaultdict(list)
    for e in events:
        if e.get("ph") == "B":
            open_[e["pid"]].append((e["name"], e["ts"]))
        elif e.get("ph") == "E" and open_[e["pid"]]:
            name, began = open_[e["pid"]].pop()
            out[name].append((start + began, start + e["ts"]))
    return out


def _union_length(spans: list[tuple[int, int]]) -> int:
    total, end = 0, None
    for a, b in sorted(spans):
        if end is None or a > end:
            total, end = total + (b - a), b
        elif b > end:
            total, end = total + (b - end), b
    return total


def breakdown(path, window_us: tuple[float, float], steps: int) -> dict:
    """Milliseconds per step of each activity inside [start, end] (epoch microseconds), e.g. the timed steps."""
    lo, hi = window_us
    out = {}
    for name, spans in sorted(intervals(path).items()):
        inside = [(max(a, lo), min(b, hi)) for a, b in spans if b > lo and a < hi]
        if inside:
            out[f"{name.lower()}_ms"] = _union_length(inside) / 1e3 / steps
    return out
