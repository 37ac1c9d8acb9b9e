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


def overlap(path, step_ends_us: list[float]) -> dict:
    """Does communication start before the backward pass ends? Per step (between consecutive `step_ends_us`), the
    last all-reduce request marks the end of the backward pass (the first layers' gradients are the last a step asks
    to average); all-reduce work before that moment ran while the backward pass was still computing.
    overlapped_ms: that work per step; steps_overlapped: the share of steps with any."""
    spans = intervals(path)
    requests = sorted(a for a, _ in spans.get("NEGOTIATE_ALLREDUCE", []))
    work = spans.get("ALLREDUCE", [])
    overlapped = []
    for lo, hi in zip(step_ends_us, step_ends_us[1:]):
        last = max((t for t in requests if lo < t <= hi), default=None)
        if last is not None:
            overlapped.append(_union_length([(max(a, lo), min(b, last)) for a, b in work if a < last and b > lo]))
    if not overlapped:
        return {}
    return {"overlapped_ms": sum(overlapped) / len(overlapped) / 1e3,
            "steps_overlapped": sum(1 for x in overlapped if x > 0) / len(overlapped)}


def annotate(rows: list[dict], path) -> None:
    """Add the timeline's breakdown (timeline_*) and overlap (timeline_overlapped_ms, ...) of its timed steps to each
    row train_worker wrote."""
    for row in rows:
        ends = row["step_ends_epoch_us"]
        found = {**breakdown(path, (ends[0], ends[-1]), row["steps"]), **overlap(path, ends)}
        row.update({f"timeline_{k}": v for k, v in found.items()})
