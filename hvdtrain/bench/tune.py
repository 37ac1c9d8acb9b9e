"""The evidence behind hvdtrain's communication defaults: the benchmarks again, one setting changed at a time.

    hvdtrain bench tune --np 2 --output docs/bench/tuning.json

Each variant runs `hvdtrain bench train --impls hvdtrain` (both models) and, where the setting matters for
the collective itself, `hvdtrain bench allreduce --controllers mpi` (4 KB to 16 MB). Variants take turns,
round after round, and each keeps its best round: the machine is shared, and a burst of load then hits every
variant alike. `default` is hvdtrain's defaults; the others differ from it in one respect only.
"""
from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from hvdtrain.bench import harness
from hvdtrain.errors import UserError

HELP = "tuning sweep: training and all-reduce speed with one communication setting changed at a time"


@dataclass(frozen=True)
class Variant:
    name: str
    what: str
    env: dict = field(default_factory=dict)
    overrides: tuple = ()
    train_args: tuple = ()
    allreduce: bool = False     # also time the collective (settings that change its latency or bandwidth)


VARIANTS = (
    Variant("default", "hvdtrain defaults", allreduce=True),
    Variant("no-yield", "OpenMPI spins while waiting (mpi_yield_when_idle off)",
            overrides=("--runtime.mpi_yield_when_idle=false",), allreduce=True),
    Variant("cycle-0.01", "HOROVOD_CYCLE_TIME 0.01 ms", overrides=("--runtime.cycle_time_ms=0.01",), allreduce=True),
    Variant("cycle-0.5", "HOROVOD_CYCLE_TIME 0.5 ms", overrides=("--runtime.cycle_time_ms=0.5",), allreduce=True),
    Variant("cycle-5", "HOROVOD_CYCLE_TIME 5 ms", overrides=("--runtime.cycle_time_ms=5",), allreduce=True),
    Variant("fusion-off", "no tensor fusion (HOROVOD_FUSION_THRESHOLD 0)", overrides=("--runtime.fusion_threshold_mb=0",)),
    Variant("fusion-4mb", "fusion buffer 4 MB", overrides=("--runtime.fusion_threshold_mb=4",)),
    Variant("gloo", "Gloo controller and operations (horovodrun --gloo)", train_args=("--controller", "gloo")),
    Variant("fp16", "fp16 gradient compression", overrides=("--optim.fp16_compression=true",)),
    Variant("bpps-2", "backward_passes_per_step 2 (one all-reduce per 2 batches)",
            overrides=("--optim.backward_passes_per_step=2",)),
    Variant("threads-2", "2 intra-op threads per rank (4 on 2 cores)", train_args=("--threads", "2")),
    Variant("autotune", "Horovod autotune (HOROVOD_AUTOTUNE=1)", env={"HOROVOD_AUTOTUNE": "1"}),
)


def add_arguments(p) -> None:
    harness.add_common(p, "tuning", rounds=2)
    p.add_argument("--variants", default=",".join(v.name for v in VARIANTS), help="comma list (default: all)")
    p.add_argument("--steps", type=int, default=20, help="timed training steps per model (default 20)")


def run(args) -> int:
    import os
    chosen = [v for v in VARIANTS if v.name in args.variants.split(",")]
    work = Path(tempfile.mkdtemp(prefix="hvdtrain-bench-tune-"))
    rows = []
    for round_ in range(args.rounds):
        for v in chosen:
            print(f"[bench] tune: {v.name} (round {round_ + 1}/{args.rounds}) ...", flush=True)
            saved = dict(os.environ)
            os.environ.update(v.env)   # the benchmark's ranks inherit it; HOROVOD_* in the environment win
            try:
                rows.append(_measure(args, v, work / f"{v.name}-{round_}"))
            except UserError as exc:   # one broken setting must not cost the whole sweep; the table says so
                rows.append({"variant": v.name, "what": v.what, "failed": str(exc).splitlines()[0]})
            finally:
                os.environ.clear()
                os.environ.update(saved)
    shutil.rmtree(work, ignore_errors=True)
    doc = harness.new_document("tuning", args.np, {})
    doc["description"] = (f"Each row changes one thing from `default` (best of {args.rounds} alternating rounds, "
                          f"{args.np} ranks, `hvdtrain bench train --impls hvdtrain` and, for settings of the "
                          "collective, `hvdtrain bench allreduce --controllers mpi`). Lower step_ms is better.")
    doc["rows"] = harness.best_by(rows, ("variant",), _score, higher=False)
    harness.write_json(args.output, doc)
    print(harness.text_table(doc["rows"], harness.scalar_columns(doc["rows"])))
    return 0


def _score(row: dict) -> float:
    """The sum of the models' step times (lower is better); a failed round loses to any completed one."""
    return float("inf") if "failed" in row else sum(v for k, v in row.items() if k.endswith("_step_ms"))


def _measure(args, v: Variant, base: Path) -> dict:
    train_json = base.parent / f"{base.name}.train.json"   # not with_suffix: names like cycle-0.05 hold dots
    harness.run_checked(harness.hvdtrain_cmd(
        "bench", "train", "--np", args.np, "--impls", "hvdtrain", "--steps", args.steps, "--warmup", "5",
        "--output", train_json, *v.train_args, *v.overrides), timeout=3600)
    row = {"variant": v.name, "what": v.what, "loadavg": harness.loadavg()[0]}
    for r in harness.read_json(train_json)["rows"]:
        row[f"{r['model']}_step_ms"] = r["step_ms"]
        row[f"{r['model']}_comm_share"] = r.get("comm_share")
    if v.allreduce:
        ar_json = base.parent / f"{base.name}.allreduce.json"
        harness.run_checked(harness.hvdtrain_cmd(
            "bench", "allreduce", "--np", args.np, "--controllers", "mpi", "--max-size", "16MB", "--budget-mb", "256",
            "--repeats", "2", "--output", ar_json, *v.overrides), timeout=3600)
        summary = harness.read_json(ar_json)["summary"]["hvdtrain-mpi"]
        row.update(latency_4kb_us=summary["latency_4kb_us"], busbw_vs_mpi_1_16mb=summary["busbw_vs_mpi_1_16mb_mean"])
    return row
