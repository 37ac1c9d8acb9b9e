"""Sharded optimizer state (parallel.shard_state = 1 | 2), the strategy side: the optimizer comes from
backend.sharded_optimizer (backend/sharded.py: the layout and the step); here is its checkpoint part.

A checkpoint of a sharded run holds the weights as any data-parallel checkpoint does, written once per replica
group (the group's first rank) into `state` (a pipeline's `stage-<s>/state`), without the optimizer; and beside them
each replica's optimizer state: `optimizer-<i>.npz`, its range of every slot (momentum, Adam's moments, gradient
accumulators), with `optimizer-<i>.json` saying which range ([lo, hi) of the flattened trainable variables) and the
scalars (steps, loss scale). Restoring reads the files whose ranges meet the range this rank holds now: a sharded
run of any number of replicas, or at stage 0 the whole. A stage-0 checkpoint restored into a sharded run is read
once into a twin of the optimizer that holds the whole state, then cut. So every data-parallel checkpoint moves
between stages 0, 1 and 2 and between numbers of ranks.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from hvdtrain import backend, checkpoint
from hvdtrain.errors import UserError
from hvdtrain.rundir import file_mode, write_json
from hvdtrain.variables import GRADIENT_ACCUMULATOR

SHARD = "optimizer-"


def part_name(weights_part: str | None, replica: int) -> str:
    """The part of a checkpoint a replica writes: its optimizer shard (beside the weights part)."""
    return f"{SHARD}{replica}" if weights_part is None else f"{weights_part}/{SHARD}{replica}"


def wrote_shards(meta: dict) -> bool:
    """Was this checkpoint written with sharded optimizer state?"""
    return bool(meta.get("signature", {}).get("optimizer_shards"))


def write(model, directory: Path, weights_part: str | None, writes_weights: bool, replica: int) -> None:
    """This rank's part of a checkpoint in `directory`: its optimizer shard, and the weights if it writes them."""
    state = backend.optimizer_state(model.optimizer, model.trainable_variables)   # first: it may be a collective
    where = Path(directory) / (weights_part or "")
    where.mkdir(parents=True, exist_ok=True)
    if writes_weights:
        checkpoint.write_state(model, checkpoint.state_path(directory, weights_part), optimizer=False)
    np.savez(where / f"{SHARD}{replica}.npz", **state.slots)
    write_json(where / f"{SHARD}{replica}.json", {"range": [state.lo, state.hi], "total": state.total,
                                                   "slots": sorted(state.slots), "scalars": state.scalars})
    for written in where.iterdir():
        if written.is_file():
            os.chmod(written, file_mode())


def restore(ckpt: Path, meta: dict, model, weights_part: str | None) -> None:
    """The weights, then the optimizer state of the range this rank holds, from a sharded or a stage-0 checkpoint."""
    checkpoint.restore(ckpt, model, part=weights_part)
    if wrote_shards(meta):
        scalars, read = _shards(ckpt, Path(ckpt) / (weights_part or ""))
    else:
        scalars, read = _whole(ckpt, model, weights_part)
    backend.load_optimizer_state(model.optimizer, model.trainable_variables, scalars, read)


def _shards(ckpt: Path, where: Path):
    """(scalars, read) over the shard files in `where`."""
    headers = {int(p.stem[len(SHARD):]): json.loads(p.read_text()) for p in where.glob(f"{SHARD}*.json")}
    if not headers:
        raise _incomplete(ckpt, f"no {SHARD}*.json in {where}")
    opened: dict = {}

    def shard(i: int):
        if i not in opened:
            try:
                opened[i] = np.load(where / f"{SHARD}{i}.npz")
            except (OSError, ValueError) as exc:
                raise _incomplete(ckpt, f"{SHARD}{i}.npz: {exc}") from None
        return opened[i]

    def read(slot: str, lo: int, hi: int) -> np.ndarray:
        out, filled = np.zeros(hi - lo, np.float32), []
        for i, header in sorted(headers.items(), key=lambda item: item[1]["range"]):
            a, b = max(lo, header["range"][0]), min(hi, header["range"][1])
            if a >= b:
                continue
            if slot not in header["slots"]:
                if slot == GRADIENT_ACCUMULATOR:   # written between optimizer steps without accumulation
                    return out
                raise UserError(f"checkpoint {ckpt} holds the optimizer slots {', '.join(header['slots'])}, not "
                                f"{slot}: resume with the optimizer that wrote it, or use a fresh --trainer.run_dir")
            out[a - lo:b - lo] = shard(i)[slot][a - header["range"][0]:b - header["range"][0]]
            filled.append((a, b))
        gap = _first_gap(filled, lo, hi)
        if gap is not None:
            raise _incomplete(ckpt, f"no shard holds numbers {gap[0]}..{gap[1] - 1} of {slot}")
        return out
    return next(iter(headers.values()))["scalars"], read


def _first_gap(filled: list, lo: int, hi: int) -> tuple[int, int] | None:
    """The first part of [lo, hi) that the sorted ranges `filled` leave out."""
    at = lo
    for a, b in filled:
        if a > at:
            return at, a
        at = max(at, b)
    return (at, hi) if at < hi else None


def _incomplete(ckpt: Path, what: str) -> UserError:
    return UserError(f"checkpoint {ckpt} lacks part of the optimizer state ({what}): resume from an earlier "
                     "checkpoint (delete this one) or use a fresh --trainer.run_dir")


def _whole(ckpt: Path, model, weights_part: str | None):
    """(scalars, read) of a stage-0 checkpoint: its optimizer read whole into a twin, once."""
    import tensorflow as tf
    twin = backend.whole_twin(model.optimizer)
    backend.build_optimizer(twin, model.trainable_variables)
    try:
        tf.train.Checkpoint(optimizer=twin).read(str(checkpoint.state_path(ckpt, weights_part))).expect_partial()
    except (ValueError, tf.errors.OpError) as exc:
        raise UserError(f"cannot restore checkpoint {ckpt}: {str(exc).splitlines()[0]}") from None
    state = backend.optimizer_state(twin, model.trainable_variables)

    def read(slot: str, lo: int, hi: int) -> np.ndarray:
        if slot not in state.slots:
            if slot == GRADIENT_ACCUMULATOR:
                return np.zeros(hi - lo, np.float32)
            raise UserError(f"checkpoint {ckpt} holds the optimizer slots {', '.join(sorted(state.slots))}, not "
                            f"{slot}: resume with the optimizer that wrote it, or use a fresh --trainer.run_dir")
        return state.slots[slot][lo:hi]
    return state.scalars, read
