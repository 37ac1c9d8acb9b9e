"""Training throughput and weak scaling: hvdtrain on 1 and N ranks, against plain Horovod and
MultiWorkerMirroredStrategy.

    hvdtrain bench train --np 2 --output bench/train.json
    hvdtrain bench train --np 2 --models resnet50 --impls single,hvdtrain --image-size 64 --batch 16 --steps 10

It runs each implementation in fresh processes, one after the other (and again for every --rounds, keeping each
one's best round):
  single    one process, plain Keras (no Horovod): the 1-rank baseline T(1)          hvdtrain/bench/train_worker.py
  hvdtrain  `horovodrun -np N --mpi`: hvdtrain's data pipeline, model, optimizer and settings   (the same module)
  horovod   `horovodrun -np N --mpi`: plain horovod.tensorflow, Horovod's defaults, the custom training loop a
            Keras 3 user must write (hvd.grouped_allreduce of the gradients)       hvdtrain/bench/horovod_worker.py
  horovod-tuned  the same loop started with hvdtrain's HOROVOD_*/OMPI_* settings: what is left is the code path
  mwms      N TensorFlow workers on localhost (TF_CONFIG), tf.distribute.MultiWorkerMirroredStrategy
                                                                                      hvdtrain/bench/mwms_worker.py
On Keras 3, stock model.fit fails under MultiWorkerMirroredStrategy: the mwms run works around it, and records
first, in its rows' stock_fit column and its settings, how 2 steps of stock model.fit on mlp fail.
Every rank gets the same per-rank batch (weak scaling) and --threads intra-op threads; efficiency is
T(N) / (N * T(1)) in samples/s (images/s for resnet50). Models (synthetic data):
  mlp       1024-2048-2048-10 (6.3M parameters: communication-heavy)
  cnn       a small ResNet on 32x32x3, 10 classes (compute-heavy)
  resnet50  keras.applications ResNet50 on --image-size square RGB images, 1000 classes (25.6M parameters at any
            image size): the "ResNet-50 synthetic" reference of Horovod's own benchmark
Inside the hvdtrain run each rank also times (a) the same steps without the all-reduce, run on all ranks at
once, so comm_share = 1 - t_local / t_step is the share of step time spent communicating, and (b) its input
pipeline alone, so pipeline_ratio = what tf.data delivers / what training consumes.
"""
from __future__ import annotations

import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from hvdtrain.bench import harness, mwms_worker

HELP = ("training throughput and weak-scaling efficiency: 1 vs N ranks, hvdtrain vs plain Horovod and "
        "MultiWorkerMirroredStrategy")
COLUMNS = ["model", "impl", "np", "input", "global_batch", "step_ms", "samples_per_sec", "per_rank_samples_per_sec",
           "efficiency", "comm_share", "pipeline_ratio"]
IMPLS = ("single", "hvdtrain", "horovod", "horovod-tuned", "mwms")
PEERS = ("horovod", "horovod-tuned", "mwms")   # what hvdtrain is compared with
STOCK_FIT_TIMEOUT = 300       # seconds: a stock fit that hangs in a collective must not stall the benchmark


@dataclass(frozen=True)
class Workload:
    model: dict                 # ModelConfig fields
    input_shape: tuple          # for image workloads: the default, --image-size changes height and width
    per_rank_batch: int
    samples: int = 2048         # synthetic training set (per epoch); the stream repeats epochs
    classes: int = 10
    images: bool = False


WORKLOADS = {
    "mlp": Workload({"name": "mlp", "hidden": (2048, 2048)}, (1024,), 64),
    "cnn": Workload({"name": "resnet", "width": 16, "blocks": 1}, (32, 32, 3), 32),
    "resnet50": Workload({"name": "ResNet50"}, (64, 64, 3), 16, samples=256, classes=1000, images=True),
}
# The flags a driver passes on to its ranks unchanged.
WORKLOAD_ARGS = ("models", "steps", "warmup", "threads", "batch", "image_size")


def add_workload_arguments(p) -> None:
    """What each rank measures (shared by the driver and hvdtrain/bench/train_worker.py)."""
    p.add_argument("--models", default="mlp,cnn", help=f"comma list of {', '.join(WORKLOADS)} (default mlp,cnn)")
    p.add_argument("--steps", type=int, default=40, help="timed steps per model (default 40)")
    p.add_argument("--warmup", type=int, default=8, help="untimed steps first (tracing, allocation; default 8)")
    p.add_argument("--threads", type=int, default=1, help="TensorFlow intra-op threads per rank (default 1)")
    p.add_argument("--batch", type=int, default=0, help="per-rank batch for every model (0: each model's own)")
    p.add_argument("--image-size", type=int, default=0,
                   help="height and width of the synthetic images of image models (0: 64)")


def add_arguments(p) -> None:
    harness.add_common(p, "train", rounds=1, controller=True)
    add_workload_arguments(p)
    p.add_argument("--impls", default=",".join(IMPLS), help=f"comma list of {', '.join(IMPLS)}")
    p.add_argument("--timeline", action="store_true",
                   help="record a Horovod timeline in the hvdtrain run and break its communication time down per step")


def input_shape(work: Workload, image_size: int) -> tuple:
    return (image_size, image_size, work.input_shape[-1]) if work.images and image_size else work.input_shape


def run(args) -> int:
    from hvdtrain.errors import UserError
    impls = [i.strip() for i in args.impls.split(",") if i.strip()]
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = sorted(set(impls) - set(IMPLS)) + sorted(set(models) - set(WORKLOADS))
    if unknown or not impls or not models:
        raise UserError(f"bench train: unknown or missing --impls/--models {unknown}; impls are {', '.join(IMPLS)}, "
                        f"models {', '.join(WORKLOADS)}")
    runs, rows, parts = [], [], {}
    with tempfile.TemporaryDirectory(prefix="hvdtrain-bench-train-") as work:
        findings = {"mwms": {"stock_fit": _stock_fit(args, Path(work))}} if "mwms" in impls and harness.keras_major(harness.versions()) >= 3 else {}
        for round_ in range(args.rounds):
            for impl in impls:
                print(f"[bench] train: {impl}{'' if impl == 'single' else f' on {args.np} ranks'} "
                      f"(round {round_ + 1}/{args.rounds}) ...", flush=True)
                before, part = harness.loadavg(), Path(work) / f"{impl}-{round_}.json"
                _launch(args, impl, part)
                parts[impl] = got = harness.read_json(part)
                _add_findings(got, findings.get(impl, {}))
                runs.append({"impl": impl, "round": round_, "loadavg_before": before,
                             "loadavg_after": harness.loadavg(), "settings": got["settings"]})
                # The per-step end times are for the timeline (launch_hvdtrain), not for the table.
                rows += [{k: v for k, v in r.items() if k != "step_ends_epoch_us"} for r in got["rows"]]
    stack = parts.get("hvdtrain", next(iter(parts.values())))["stack"]
    doc = harness.new_document("train", args.np, {impl: part["settings"] for impl, part in parts.items()}, stack)
    doc["runs"], doc["rows"] = runs, harness.best_by(rows, ("model", "impl"), "samples_per_sec")
    doc["summary"] = summarize(doc["rows"])
    return harness.finish(args.output, doc, plot, render)


def _launch(args, impl: str, part: Path) -> None:
    own = ["--output", part, *harness.forward(args, WORKLOAD_ARGS), *args.overrides]
    if impl == "mwms":
        return mwms_worker.launch(args.np, own)
    if impl in ("horovod", "horovod-tuned"):
        tuned = ["--hvdtrain-settings"] if impl == "horovod-tuned" else []
        return harness.horovodrun(args.np, args.controller, harness.worker_cmd("horovod_worker", *tuned, *own))
    cmd = harness.worker_cmd("train_worker", "--role", impl, *own)
    if impl == "single":
        return harness.run_checked(cmd)
    launch_hvdtrain(args.np, args.controller, cmd, part, trace=args.timeline)


def launch_hvdtrain(np_: int, controller: str, cmd: list, part: Path, *, trace: bool = False) -> None:
    """hvdtrain's ranks (train_worker); with `trace`, under a Horovod timeline whose breakdown and overlap of the
    timed steps (timeline.py) are added to the rows they wrote to `part`."""
    from hvdtrain.bench import timeline
    path = part.with_suffix(".timeline.json")
    harness.horovodrun(np_, controller, cmd, env={"HOROVOD_TIMELINE": str(path)} if trace else None)
    if trace:
        doc = harness.read_json(part)
        timeline.annotate(doc["rows"], path)
        harness.write_json(part, doc)


def _add_findings(part: dict, findings: dict) -> None:
    """What was found about an impl besides its speed goes into its settings and every row of it."""
    part["settings"].update(findings)
    for row in part["rows"]:
        row.update(findings)


def _stock_fit(args, work: Path) -> str:
    """How Keras 3's stock model.fit fares under MultiWorkerMirroredStrategy: "works", "fails: <error>" or "hangs"."""
    from hvdtrain.errors import UserError
    print("[bench] train: mwms, stock model.fit on Keras 3 ...", flush=True)
    part = work / "mwms-stock-fit.json"
    try:
        mwms_worker.launch(args.np, ["--stock-fit-only", "--output", part, "--threads", args.threads, *args.overrides],
                           timeout=STOCK_FIT_TIMEOUT)
    except subprocess.TimeoutExpired:
        return f"hangs: stopped after {STOCK_FIT_TIMEOUT} s"
    except UserError as exc:   # a worker that crashed outright is the finding too
        return f"fails: {str(exc).splitlines()[0]}"
    return harness.read_json(part)["stock_fit"]


def summarize(rows: list[dict]) -> dict:
    """Per model: weak-scaling efficiency T(n)/(n*T(1)) of each distributed impl (added to its row too),
    hvdtrain / each peer in samples/s, and hvdtrain's comm_share, pipeline_ratio, efficiency against the concurrency
    ceiling (local step / step) and exposed communication (step - local step, ms)."""
    out = {}
    for model in sorted({r["model"] for r in rows}):
        by_impl = {r["impl"]: r for r in rows if r["model"] == model}
        single = by_impl.get("single")
        for impl, row in by_impl.items():
            if single and impl != "single":
                row["efficiency"] = row["samples_per_sec"] / (row["np"] * single["samples_per_sec"])
        entry = {f"efficiency_{impl}": by_impl[impl].get("efficiency") for impl in IMPLS[1:] if impl in by_impl}
        for peer in PEERS:
            if "hvdtrain" in by_impl and peer in by_impl:
                entry[f"hvdtrain_vs_{peer}"] = by_impl["hvdtrain"]["samples_per_sec"] / by_impl[peer]["samples_per_sec"]
        mine = by_impl.get("hvdtrain")
        if mine:
            entry.update(comm_share=mine.get("comm_share"), pipeline_ratio=mine.get("pipeline_ratio"))
        if mine and mine.get("local_step_ms"):   # against the same steps without communication: the ceiling
            entry.update(vs_ceiling=min(1.0, mine["local_step_ms"] / mine["step_ms"]),
                         exposed_ms=max(0.0, mine["step_ms"] - mine["local_step_ms"]))
        out[model] = entry
    return out


def plot(doc: dict, path) -> None:
    """Speed-up over one rank per model and implementation (ideal: np)."""
    rows = doc["rows"]
    single = {r["model"]: r["samples_per_sec"] for r in rows if r["impl"] == "single"}
    series = {}
    for impl in IMPLS:
        mine = [r for r in rows if r["impl"] == impl and r["model"] in single]
        if mine:
            series[impl if impl == "single" else f"{impl} ({mine[0]['np']} ranks)"] = (
                [r["model"] for r in mine], [r["samples_per_sec"] / single[r["model"]] for r in mine])
    harness.plot(path, series, xlabel="model", ylabel="throughput / 1-rank throughput", bar=True,
                 reference=doc["np"], title=f"training throughput vs 1 rank (ideal {doc['np']}), "
                                            f"{doc['machine']['cpus']} CPUs")


def render(doc: dict) -> str:
    rows = sorted(doc["rows"], key=lambda r: (r["model"], r["np"], r["impl"]))
    lines = [harness.text_table(rows, COLUMNS), ""]
    for model, s in doc["summary"].items():
        parts = [f"{k} {v:.2f}" for k, v in s.items() if isinstance(v, float)]
        lines.append(f"{model}: {', '.join(parts)}")
    stock_fit = doc["settings"].get("mwms", {}).get("stock_fit")
    if stock_fit:
        lines.append(f"mwms, stock model.fit on Keras 3: {stock_fit}")
    return "\n".join(lines)
