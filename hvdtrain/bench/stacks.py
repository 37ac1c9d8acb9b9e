"""The two supported stacks side by side, in one run on one machine: TensorFlow 2.21 + Keras 3 with hvdtrain's own
Horovod layer (new) against TensorFlow 2.15 + Keras 2 with Horovod's own DistributedOptimizer (old).

    hvdtrain bench stacks --old-venv .venv-tf2.15 --np 2 --rounds 3 --output bench/stacks.json

Each round runs, under each virtualenv's own `hvdtrain` and `horovodrun` (the same hvdtrain source; each picks its
Keras layer from the Keras installed there), `hvdtrain bench train --impls hvdtrain` and `hvdtrain bench allreduce
--controllers mpi`. The stacks take turns, and the one that goes first changes every round. Each side keeps its
best round; the summary gives new / old speed per model (samples/s) and per message size (all-reduce time), with
the per-round ratios. Two controls that neither stack's Keras layer touches show how much of a difference is the
machine: the same training steps without the all-reduce (`local_step_ms`) and raw MPI_Allreduce.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

from hvdtrain.bench import allreduce, allreduce_worker, harness, train

HELP = "the TF 2.21 stack (hvdtrain's Keras 3 layer) vs TF 2.15 (Horovod's Keras 2 layer), side by side"
STACKS = ("new", "old")
COLUMNS = ["measure", "unit", "new", "old", "new_vs_old", "per_round", "control_new_vs_old"]


def add_arguments(p) -> None:
    harness.add_common(p, "stacks", rounds=3)
    p.add_argument("--old-venv", default=".venv-tf2.15", help="virtualenv of the old stack (default .venv-tf2.15)")
    p.add_argument("--new-venv", default=str(harness.BIN.parent), help="virtualenv of the new stack (default: this one)")
    train.add_workload_arguments(p)
    allreduce_worker.add_measure_arguments(p)
    p.set_defaults(max_size=16 * allreduce.MB, budget_mb=256.0, repeats=2)


def run(args) -> int:
    from hvdtrain.errors import UserError
    venvs = {"new": Path(args.new_venv), "old": Path(args.old_venv)}
    for label, venv in venvs.items():
        if not (venv / "bin" / "hvdtrain").is_file():
            raise UserError(f"--{label}-venv {venv}: no bin/hvdtrain there (install that stack with scripts/install.sh)")
    runs, rows, stacks = [], [], {}
    with tempfile.TemporaryDirectory(prefix="hvdtrain-bench-stacks-") as work:
        for round_ in range(args.rounds):
            for label in STACKS if round_ % 2 == 0 else STACKS[::-1]:
                print(f"[bench] stacks: {label} stack ({venvs[label]}), round {round_ + 1}/{args.rounds} ...", flush=True)
                before = harness.loadavg()
                trained, reduced = _measure(args, venvs[label], Path(work) / f"{label}-{round_}")
                stacks[label] = {"venv": str(venvs[label]), "stack": trained["stack"], "versions": trained["versions"],
                                 "settings": trained["settings"]}
                runs.append({"stack": label, "round": round_, "loadavg_before": before, "loadavg_after": harness.loadavg()})
                rows += [{"benchmark": "train", "stack": label, "round": round_, **_pick(r, TRAIN_FIELDS)}
                         for r in trained["rows"]]
                rows += [{"benchmark": "allreduce", "stack": label, "round": round_, **_pick(r, ALLREDUCE_FIELDS)}
                         for r in reduced["rows"] if r["impl"] in ("mpi4py", "hvdtrain-mpi")]
    doc = harness.new_document("stacks", args.np, {label: s.pop("settings") for label, s in stacks.items()})
    doc["stacks"], doc["runs"], doc["rows"] = stacks, runs, rows
    doc["summary"] = summarize(rows)
    return harness.finish(args.output, doc, plot, render)


TRAIN_FIELDS = ("model", "np", "params", "global_batch", "step_ms", "samples_per_sec", "local_step_ms", "comm_share")
ALLREDUCE_FIELDS = ("impl", "size", "size_bytes", "time_us", "busbw_gbps", "correct")


def _pick(row: dict, fields) -> dict:
    return {k: row.get(k) for k in fields}


def _measure(args, venv: Path, base: Path) -> tuple[dict, dict]:
    """`bench train --impls hvdtrain` and `bench allreduce --controllers mpi` under one virtualenv's hvdtrain."""
    out = {name: base.with_name(f"{base.name}.{name}.json") for name in ("train", "allreduce")}
    for name, own in (("train", ["--impls", "hvdtrain", *harness.forward(args, train.WORKLOAD_ARGS)]),
                      ("allreduce", ["--controllers", "mpi", *harness.forward(args, allreduce_worker.MEASURE_ARGS)])):
        harness.run_checked(harness.hvdtrain_cmd("bench", name, "--np", args.np, *own, "--output", out[name],
                                                 *args.overrides, bin_dir=venv / "bin"))
    return harness.read_json(out["train"]), harness.read_json(out["allreduce"])


def summarize(rows: list[dict]) -> dict:
    """Per measure: each side's best value, new / old speed (> 1: the new stack is faster) over those and for every
    round, and the control's new / old speed: for a model its steps without the all-reduce, for an all-reduce size
    raw MPI_Allreduce."""
    out = {}
    for model in dict.fromkeys(r["model"] for r in rows if r["benchmark"] == "train"):
        mine = [r for r in rows if r.get("model") == model]
        out[model] = {"unit": "samples/s", **_ratios(mine, "samples_per_sec", higher=True),
                      "control_new_vs_old": _ratios(mine, "local_step_ms", higher=False).get("new_vs_old")}
    for size in sorted({r["size_bytes"] for r in rows if r["benchmark"] == "allreduce"}):
        mine = [r for r in rows if r.get("size_bytes") == size]
        out[f"allreduce {harness.human_bytes(size)}"] = {
            "unit": "us", **_ratios([r for r in mine if r["impl"] == "hvdtrain-mpi"], "time_us", higher=False),
            "control_new_vs_old": _ratios([r for r in mine if r["impl"] == "mpi4py"], "time_us", higher=False).get("new_vs_old")}
    return out


def _ratios(rows: list[dict], column: str, *, higher: bool) -> dict:
    rows = [r for r in rows if r.get(column)]
    best = {r["stack"]: r[column] for r in harness.best_by(rows, ("stack",), column, higher=higher)}
    if set(best) != set(STACKS):
        return {}
    speed = (lambda new, old: new / old) if higher else (lambda new, old: old / new)
    by_round: dict = {}
    for r in rows:
        by_round.setdefault(r["round"], {})[r["stack"]] = r[column]
    return {"new": best["new"], "old": best["old"], "new_vs_old": speed(best["new"], best["old"]),
            "per_round": [speed(pair["new"], pair["old"]) for _, pair in sorted(by_round.items()) if len(pair) == 2]}


def plot(doc: dict, path) -> None:
    s = doc["summary"]
    labels = [k for k, v in s.items() if "new_vs_old" in v]
    harness.plot(path, {"hvdtrain (new / old)": (labels, [s[k]["new_vs_old"] for k in labels]),
                        "control (no all-reduce; raw MPI)": (labels, [s[k].get("control_new_vs_old") or 0 for k in labels])},
                 xlabel="measure", ylabel="new stack speed / old stack speed", bar=True, reference=1.0,
                 title=f"TF {doc['stacks']['new']['stack']['tensorflow']} vs TF {doc['stacks']['old']['stack']['tensorflow']}"
                       f", best of {max(r['round'] for r in doc['runs']) + 1} rounds, {doc['np']} ranks")


def table(doc: dict) -> list[dict]:
    """One row per measure: each side's best (samples/s, or all-reduce time in us) and the ratios."""
    return [{"measure": measure, **{k: v for k, v in s.items() if k != "per_round"},
             "per_round": ", ".join(f"{x:.2f}" for x in s["per_round"])}
            for measure, s in doc["summary"].items() if "new_vs_old" in s]


def render(doc: dict) -> str:
    lines = [f"{label}: {s['venv']}: TensorFlow {s['stack']['tensorflow']}, Keras {s['stack']['keras']}, "
             f"{s['stack']['integration']}" for label, s in doc["stacks"].items()]
    return "\n".join([*lines, "", harness.text_table(table(doc), COLUMNS),
                      "(new_vs_old: new stack speed / old stack speed, > 1 when the new stack is faster)"])
