"""The ways to average gradients, side by side in one run: one group, buckets, one request per tensor, fp16.

    hvdtrain bench averaging --np 2 --rounds 2 --output bench/averaging.json

Each way is `bench train`'s hvdtrain ranks (hvdtrain/bench/train_worker.py) with one setting changed:
  one-group    runtime.bucket_mb=0: every gradient of the step in one grouped all-reduce, sent when the last exists
  bucket-<N>MB runtime.bucket_mb=N: buckets filled in the order the backward pass produces gradients (the last
               layers' first), one grouped all-reduce each, free to start while earlier layers are still computed
  per-tensor   runtime.bucket_mb=1e-6: one request per gradient, as Horovod's own Keras layer sends them (Horovod
               fuses the requests that arrive within one cycle)
  fp16         one group, gradients sent as float16 (optim.fp16_compression; lossy, so never the default)
The ways take turns, the order reversed every round, each keeping its best round. In every launch each rank also
times the same steps without communication; exposed_ms = step_ms - local_step_ms (the fastest of those local steps in
the whole run) is the communication the step waits for. ResNet-50 (64x64, batch 16) runs in a launch of its own with
a quarter of the steps. Last, one launch per way on the MLP with a Horovod timeline shows whether all-reduce work
starts before the backward pass ends (timeline.overlap).
"""
from __future__ import annotations

import tempfile
from pathlib import Path

from hvdtrain.bench import harness, train

HELP = "one group vs buckets vs one request per tensor vs fp16: step time and exposed communication (JSON + PNG)"
WAYS = {"one-group": ["--runtime.bucket_mb=0"],
        "bucket-1MB": ["--runtime.bucket_mb=1"],
        "bucket-4MB": ["--runtime.bucket_mb=4"],
        "bucket-25MB": ["--runtime.bucket_mb=25"],   # PyTorch DDP's default bucket
        "per-tensor": ["--runtime.bucket_mb=0.000001"],
        "fp16": ["--runtime.bucket_mb=0", "--optim.fp16_compression=true"]}
EXACT = ("one-group", "bucket-1MB", "bucket-4MB", "bucket-25MB", "per-tensor")   # candidates for the default
# The models of each launch and their own workload flags: ResNet-50's steps are ~40x the MLP's.
LAUNCHES = (("mlp,cnn", []), ("resnet50", ["--batch", "16", "--image-size", "64"]))
COLUMNS = ["model", "way", "step_ms", "local_step_ms", "exposed_ms", "exposed_vs_one_group", "speed_vs_one_group",
           "samples_per_sec"]
TIMELINE_COLUMNS = ["way", "step_ms", "timeline_overlapped_ms",
                    "timeline_steps_overlapped", "timeline_allreduce_ms", "timeline_negotiate_allreduce_ms"]


def add_arguments(p) -> None:
    harness.add_common(p, "averaging", rounds=2, controller=True)
    p.add_argument("--ways", default=",".join(WAYS), help=f"comma list of {', '.join(WAYS)} (default: all)")
    p.add_argument("--models", default="mlp,cnn,resnet50", help="comma list of mlp, cnn, resnet50 (default: all)")
    p.add_argument("--steps", type=int, default=40, help="timed steps of mlp and cnn (default 40; resnet50: a quarter)")
    p.add_argument("--warmup", type=int, default=8, help="untimed steps first (default 8; resnet50: 3)")
    p.add_argument("--no-timeline", action="store_true", help="skip the timeline launches")


def run(args) -> int:
    from hvdtrain.errors import UserError
    ways = [w.strip() for w in args.ways.split(",") if w.strip()]
    models = {m.strip() for m in args.models.split(",") if m.strip()}
    if not ways or set(ways) - set(WAYS) or not models or models - {"mlp", "cnn", "resnet50"}:
        raise UserError(f"bench averaging: --ways takes {', '.join(WAYS)}; --models mlp, cnn, resnet50")
    launches = [(",".join(m for m in group.split(",") if m in models), [*_steps(args, group), *flags])
                for group, flags in LAUNCHES]
    launches = [(group, flags) for group, flags in launches if group]
    runs, rows, traced = [], [], []
    with tempfile.TemporaryDirectory(prefix="hvdtrain-bench-averaging-") as work:
        for round_ in range(args.rounds):
            for way in ways if round_ % 2 == 0 else ways[::-1]:
                print(f"[bench] averaging: {way} on {args.np} ranks (round {round_ + 1}/{args.rounds}) ...", flush=True)
                before = harness.loadavg()
                for group, flags in launches:
                    part = Path(work) / f"{way}-{round_}-{group.replace(',', '-')}.json"
                    rows += [{**r, "way": way, "round": round_} for r in _launch(args, way, group, flags, part)]
                runs.append({"way": way, "round": round_, "loadavg_before": before, "loadavg_after": harness.loadavg()})
        if not args.no_timeline and "mlp" in models:
            for way in ways:
                print(f"[bench] averaging: {way}, MLP with a Horovod timeline ...", flush=True)
                part = Path(work) / f"{way}-timeline.json"
                traced += [{**r, "way": way} for r in _launch(args, way, "mlp", _steps(args, "mlp"), part, trace=True)]
    doc = harness.new_document("averaging", args.np, {way: WAYS[way] for way in ways})
    doc["runs"], doc["rows"], doc["timeline"] = runs, best_rows(rows), [_slim(r) for r in traced]
    doc["summary"] = summarize(doc["rows"], doc["timeline"])
    return harness.finish(args.output, doc, plot, render)


def _steps(args, group: str) -> list[str]:
    if group == "resnet50":
        return ["--steps", str(max(2, args.steps // 4)), "--warmup", str(min(3, args.warmup))]
    return ["--steps", str(args.steps), "--warmup", str(args.warmup)]


def _launch(args, way: str, models: str, flags: list, part: Path, trace: bool = False) -> list[dict]:
    cmd = harness.worker_cmd("train_worker", "--role", "hvdtrain", "--output", part, "--models", models, *flags,
                             *WAYS[way], *args.overrides)
    train.launch_hvdtrain(args.np, args.controller, cmd, part, trace=trace)
    return harness.read_json(part)["rows"]


def _slim(row: dict) -> dict:
    """A row without its per-step lists (the JSON keeps the numbers, not the raw times)."""
    return {k: v for k, v in row.items() if not isinstance(v, list)}


def best_rows(rows: list[dict]) -> list[dict]:
    """Each (model, way)'s best round, with exposed_ms and its ratios to one-group's (same model). The local step a
    row is measured against is the model's fastest step without communication in any launch of the run: every way
    runs the same local step, and the fastest is the least disturbed by the shared machine, as the best round is."""
    local = {}
    for r in rows:
        local[r["model"]] = min(local.get(r["model"], r["local_step_ms"]), r["local_step_ms"])
    best = [_slim(r) for r in harness.best_by(rows, ("model", "way"), "samples_per_sec")]
    for row in best:
        row["launch_local_step_ms"], row["local_step_ms"] = row["local_step_ms"], local[row["model"]]
        row["exposed_ms"] = max(0.0, row["step_ms"] - row["local_step_ms"])
    best.sort(key=lambda r: (r["model"], list(WAYS).index(r["way"])))
    base = {r["model"]: r for r in best if r["way"] == "one-group"}
    for row in best:
        ref = base.get(row["model"])
        if ref:
            row["speed_vs_one_group"] = ref["step_ms"] / row["step_ms"]
            row["exposed_vs_one_group"] = row["exposed_ms"] / ref["exposed_ms"] if ref["exposed_ms"] > 0 else None
    return best


def summarize(rows: list[dict], traced: list[dict]) -> dict:
    """Per model: the fastest exact way (the default's evidence) and each way's speed and exposed communication
    against one group; on the MLP's timeline, whether any way's all-reduce work started before the backward pass
    ended."""
    out = {}
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = {r["way"]: r for r in rows if r["model"] == model}
        exact = [mine[w] for w in EXACT if w in mine]
        out[model] = {"fastest_exact": min(exact, key=lambda r: r["step_ms"])["way"] if exact else None,
                      **{f"{way}_speed_vs_one_group": r.get("speed_vs_one_group") for way, r in mine.items()},
                      **{f"{way}_exposed_vs_one_group": r.get("exposed_vs_one_group") for way, r in mine.items()}}
    if traced:
        out["mlp_timeline"] = {r["way"]: {"overlapped_ms": r.get("timeline_overlapped_ms"),
                                          "steps_overlapped": r.get("timeline_steps_overlapped")} for r in traced}
    return out


def plot(doc: dict, path) -> None:
    """Step time against one group's, per model and way (above 1: faster than one group)."""
    rows = doc["rows"]
    ways = list(dict.fromkeys(r["way"] for r in rows))
    series = {way: ([r["model"] for r in rows if r["way"] == way],
                    [r.get("speed_vs_one_group") or 0 for r in rows if r["way"] == way]) for way in ways}
    harness.plot(path, series, xlabel="model", ylabel="speed / one group's", bar=True, reference=1.0,
                 title=f"ways to average gradients, {doc['np']} ranks, best of {max(r['round'] for r in doc['runs']) + 1} rounds")


def render(doc: dict) -> str:
    lines = [harness.text_table(doc["rows"], COLUMNS)]
    if doc["timeline"]:
        lines += ["", "MLP with a Horovod timeline (ms per step; overlapped: all-reduce work before the step's last "
                      "request, i.e. while the backward pass was still running):",
                  harness.text_table(doc["timeline"], TIMELINE_COLUMNS)]
    return "\n".join(lines)
