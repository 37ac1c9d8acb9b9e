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
times the same steps without communication; exposed_ms = step_ms - local_step_ms is the communication the step
waits for. A way whose buckets put every gradient in one (a bucket larger than the model) sends exactly what one
group sends: such rows measure the run's noise, and one group's speed is the best of them all. ResNet-50 (64x64,
batch 16) runs in a launch of its own with a quarter of the steps. Last, one launch per way on the MLP with a
Horovod timeline shows whether all-reduce work starts before the backward pass ends (timeline.overlap).
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
EXACT = tuple(way for way, flags in WAYS.items() if "--optim.fp16_compression=true" not in flags)   # lossless
# The models of each launch and their own workload flags: ResNet-50's steps are ~40x the MLP's.
LAUNCHES = (("mlp,cnn", []), ("resnet50", ["--batch", "16", "--image-size", "64"]))
COLUMNS = ["model", "way", "same_as_one_group", "step_ms", "local_step_ms", "exposed_ms", "exposed_vs_one_group",
           "speed_vs_one_group", "samples_per_sec"]
TIMELINE_COLUMNS = ["way", "step_ms", "timeline_overlapped_ms", "timeline_overlapped_max_ms",
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
    if args.np < 2:
        raise UserError("bench averaging: --np must be at least 2 (one rank does not communicate)")
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
    """Each (model, way)'s best round, with exposed_ms = step_ms - local_step_ms (both from that launch, seconds
    apart), whether the way sends exactly what one group sends (its buckets hold every gradient in one), and its
    ratios to one group's best: the fastest launch that sent one group, under whichever way's name (the same
    configuration measured more often; the least disturbed round is the fairest, as everywhere in these benchmarks)."""
    best = [_slim(r) for r in harness.best_by(rows, ("model", "way"), "samples_per_sec")]
    best.sort(key=lambda r: (r["model"], list(WAYS).index(r["way"])))
    layout = {r["model"]: r.get("bucket_layout") for r in best if r["way"] == "one-group"}
    ref: dict = {}
    for row in best:
        row["exposed_ms"] = max(0.0, row["step_ms"] - row["local_step_ms"])
        row["same_as_one_group"] = (row["way"] != "one-group" and row["way"] in EXACT and row["model"] in layout
                                    and row.get("bucket_layout") == layout[row["model"]])
        if (row["way"] == "one-group" or row["same_as_one_group"]) and \
                row["step_ms"] < ref.get(row["model"], {}).get("step_ms", float("inf")):
            ref[row["model"]] = row
    for row in best:
        one = ref.get(row["model"])
        if one:
            row["speed_vs_one_group"] = one["step_ms"] / row["step_ms"]
            # Below a millisecond of exposed communication the ratio is the machine's noise, not the way's.
            row["exposed_vs_one_group"] = row["exposed_ms"] / one["exposed_ms"] if one["exposed_ms"] >= 1.0 else None
    return best


def summarize(rows: list[dict], traced: list[dict]) -> dict:
    """Per model: the fastest exact way among those that send something other than one group (and one group
    itself): the default's evidence; the speed range of the launches that sent one group (the run's noise); each
    way's speed and exposed communication against one group's best. On the MLP's timeline: each way's overlap bounds."""
    out = {}
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = {r["way"]: r for r in rows if r["model"] == model}
        candidates = [r for w, r in mine.items() if w in EXACT and not r.get("same_as_one_group")]
        controls = [r["speed_vs_one_group"] for w, r in mine.items() if w == "one-group" or r.get("same_as_one_group")]
        out[model] = {"fastest_exact": min(candidates, key=lambda r: r["step_ms"])["way"] if candidates else None,
                      "noise_band": [min(controls), max(controls)] if len(controls) > 1 else None,
                      **{f"{way}_speed_vs_one_group": r.get("speed_vs_one_group") for way, r in mine.items()},
                      **{f"{way}_exposed_vs_one_group": r.get("exposed_vs_one_group") for way, r in mine.items()}}
    if traced:
        out["mlp_timeline"] = {r["way"]: {k: r.get(f"timeline_{k}") for k in
                                          ("overlapped_ms", "overlapped_max_ms", "steps_overlapped")} for r in traced}
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
                      "request, i.e. while the backward pass was still running, certainly / at most):",
                  harness.text_table(doc["timeline"], TIMELINE_COLUMNS)]
    return "\n".join(lines)
