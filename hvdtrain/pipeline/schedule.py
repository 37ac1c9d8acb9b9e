"""Pipeline schedules: the order in which one stage runs the forward (F) and backward (B) passes of a batch's
micro-batches. Pure data, so the order, the activations kept and the idle bubble are checked without running a model
(`simulate`). Both schedules end in one optimizer step and give the same update.

GPipe (Huang et al., 2019): all M forwards, then all M backwards; M micro-batches' activations alive at once.
1F1B, PipeDream-flush (Narayanan et al., 2021; Megatron-LM's non-interleaved schedule): stage s runs
min(P - s - 1, M) warm-up forwards, then alternates one forward and one backward, then the remaining backwards; at
most P - s micro-batches' activations alive. Same bubble, (P - 1) / (M + P - 1), far less memory.
"""
from __future__ import annotations

SCHEDULES = ("1f1b", "gpipe")


def stage_ops(schedule: str, stage: int, stages: int, microbatches: int) -> list[tuple[str, int]]:
    """[("F", m) | ("B", m), ...] for one stage."""
    M = microbatches
    if schedule == "gpipe":
        return [("F", m) for m in range(M)] + [("B", m) for m in range(M)]
    if schedule != "1f1b":
        raise ValueError(f"unknown schedule {schedule!r}")
    warmup = min(stages - stage - 1, M)
    ops = [("F", m) for m in range(warmup)]
    forward, backward = warmup, 0
    while forward < M:
        ops += [("F", forward), ("B", backward)]
        forward, backward = forward + 1, backward + 1
    return ops + [("B", m) for m in range(backward, M)]


def peak_alive(ops) -> int:
    """The most micro-batches whose activations a stage keeps at once (forward done, backward not yet)."""
    alive = peak = 0
    for kind, _ in ops:
        alive += 1 if kind == "F" else -1
        peak = max(peak, alive)
    return peak


def simulate(schedule: str, stages: int, microbatches: int, forward: float = 1.0, backward: float = 1.0) -> dict:
    """Run every stage's ops against their dependencies with fixed costs (a forward needs the previous stage's
    forward of that micro-batch, a backward the next stage's backward) and zero transfer time. Returns the makespan
    and the idle fraction of a stage (each is busy M * (forward + backward)); raises if the schedule can deadlock. With
    equal costs the idle fraction is GPipe's bubble, (P - 1) / (M + P - 1)."""
    ops = [stage_ops(schedule, s, stages, microbatches) for s in range(stages)]
    done, clock, position = {}, [0.0] * stages, [0] * stages
    remaining = sum(len(o) for o in ops)
    while remaining:
        progressed = False
        for s in range(stages):
            if position[s] == len(ops[s]):
                continue
            kind, m = ops[s][position[s]]
            needs = (s - 1, "F", m) if kind == "F" and s > 0 else (s + 1, "B", m) if kind == "B" and s < stages - 1 \
                else None
            if kind == "B" and (s, "F", m) not in done:
                raise ValueError(f"stage {s} runs the backward of micro-batch {m} before its forward")
            if needs is not None and needs not in done:
                continue
            start = max(clock[s], done[needs] if needs else 0.0)
            clock[s] = start + (forward if kind == "F" else backward)
            done[(s, kind, m)] = clock[s]
            position[s] += 1
            remaining -= 1
            progressed = True
        if not progressed:
            raise ValueError(f"schedule {schedule} deadlocks with {stages} stages and {microbatches} micro-batches")
    makespan = max(clock)
    return {"makespan": makespan, "idle": 1.0 - microbatches * (forward + backward) / makespan}


def bubble(stages: int, microbatches: int) -> float:
    """GPipe's idle fraction per stage: (P - 1) / (M + P - 1)."""
    return (stages - 1) / (microbatches + stages - 1)
