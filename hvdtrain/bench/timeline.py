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


def spans(path) -> list[tuple[int, str, int, int]]:
    """(tensor row, activity, start, end) in microseconds since the epoch, in the order they end, from the nested
    B/E events of each tensor's row: what breakdown and overlap read (a trace is parsed once)."""
    start, events = _events(path)
    open_: dict[int, list] = defaultdict(list)
    out = []
    for e in events:
        if e.get("ph") == "B":
            open_[e["pid"]].append((e["name"], e["ts"]))
        elif e.get("ph") == "E" and open_[e["pid"]]:
            name, began = open_[e["pid"]].pop()
            out.append((e["pid"], name, start + began, start + e["ts"]))
    return out


def _union_length(spans: list[tuple[int, int]]) -> int:
    total, end = 0, None
    for a, b in sorted(spans):
        if end is None or a > end:
            total, end = total + (b - a), b
        elif b > end:
            total, end = total + (b - end), b
    return total


def breakdown(trace: list, window_us: tuple[float, float], steps: int) -> dict:
    """Milliseconds per step of each activity of `trace` (spans()) inside [start, end] (epoch microseconds), e.g.
    the timed steps."""
    lo, hi = window_us
    inside: dict[str, list] = defaultdict(list)
    for _, name, a, b in trace:
        if b > lo and a < hi:
            inside[name].append((max(a, lo), min(b, hi)))
    return {f"{name.lower()}_ms": _union_length(found) / 1e3 / steps for name, found in sorted(inside.items())}


def overlap(trace: list, step_ends_us: list[float], idle_us: float = 200.0) -> dict:
    """Does communication start before the backward pass ends? A step's all-reduces are those whose work (ALLREDUCE)
    starts between its end and the previous step's (a step cannot end before its own, nor start them before the
    previous one ended); the last of their requests (NEGOTIATE_ALLREDUCE starts) marks the end of the first rank's
    backward pass, the first layers' gradients being the last a step asks to average. Horovod stamps a request when
    its background thread takes it from the queue, which waits while the thread is reducing: work up to that stamp
    is an upper bound on the overlap (overlapped_max_ms). Work that ended before the thread last sat idle for
    `idle_us` (many cycles: a waiting request would have been taken) before the stamp certainly ran during the
    backward pass: the lower bound (overlapped_ms). steps_overlapped: the share of steps with a lower bound > 0."""
    lower, upper, reduced = [], [], _requested_work(trace)
    for lo, hi in zip(step_ends_us, step_ends_us[1:]):
        work = [(a, b, asked) for a, b, asked in reduced if lo < a <= hi]
        if work:
            last = max(asked for *_, asked in work)
            before = [(a, min(b, last)) for a, b, _ in work if a < last]
            upper.append(_union_length(before))
            lower.append(_union_length([(a, b) for a, b in before if b <= _last_idle(before, last, idle_us)]))
    if not upper:
        return {}
    return {"overlapped_ms": sum(lower) / len(lower) / 1e3, "overlapped_max_ms": sum(upper) / len(upper) / 1e3,
            "steps_overlapped": sum(1 for x in lower if x > 0) / len(lower)}


def _requested_work(trace: list) -> list[tuple[int, int, int]]:
    """(start, end, request time) of every ALLREDUCE: its tensor row's NEGOTIATE_ALLREDUCE start just before."""
    by_row: dict[int, list] = defaultdict(list)
    for row, name, a, b in trace:
        if name in ("NEGOTIATE_ALLREDUCE", "ALLREDUCE"):
            by_row[row].append((a, name, b))
    out = []
    for mine in by_row.values():
        asked = None
        for a, name, b in sorted(mine):
            if name == "NEGOTIATE_ALLREDUCE":
                asked = a
            elif asked is not None:
                out.append((a, b, asked))
    return out


def _last_idle(work: list[tuple[int, int]], until: float, idle_us: float) -> float:
    """The start of the last stretch of at least `idle_us` without work before `until` (-inf if none)."""
    boundary, busy = float("-inf"), None
    for a, b in sorted(work):
        if busy is not None and a - busy >= idle_us:
            boundary = busy
        busy = b if busy is None else max(busy, b)
    return busy if busy is not None and until - busy >= idle_us else boundary


def annotate(rows: list[dict], path) -> None:
    """Add the timeline's breakdown (timeline_*) and overlap (timeline_overlapped_ms, ...) of its timed steps to each
    row train_worker wrote."""
    trace = spans(path)
    for row in rows:
        ends = row["step_ends_epoch_us"]
        found = {**breakdown(trace, (ends[0], ends[-1]), row["steps"]), **overlap(trace, ends)}
        row.update({f"timeline_{k}": v for k, v in found.items()})
