"""Pipeline stages: the idle bubble against GPipe's formula, and what each rank holds, in one run.

    hvdtrain bench pipeline --output bench/pipeline.json

For P = 2 (2 ranks) and P = 4 (4 ranks, oversubscribed on a 2-core machine), a model of P equal blocks is trained
with both schedules and M = 1, 2, 4, 8, 16 micro-batches of a fixed size (the cost of a micro-batch stays fixed; the
replica batch grows with M). The blocks have a fixed, known cost (`fixed`: each holds its thread for --forward-ms /
--backward-ms per micro-batch, by sleeping, so stages sharing cores still cost exactly that: the formula's setting)
and, for --dense-stages, real compute (`dense`: Dense layers of --width units, which on shared, busy cores do not
cost the same from one pass to the next). Every stage starts each step's schedule together (a barrier) and times
its span; its busy time is the span less the seconds it waited for activations or gradients, and its idle share is
1 - busy / the pipeline's makespan (the longest span), the quantity GPipe's (P - 1) / (M + P - 1) predicts for equal
stages and zero transfer time; `imbalance` is what a stage waits because another is busier ((the busiest stage's
busy time - its own) / makespan), which the formula leaves out. Each configuration keeps its round with the shortest
makespan (the machine is shared). Also per rank: parameter and optimizer bytes (against the whole model's), the
activations a stage keeps at once (1F1B: at most P - s; GPipe: M), the point-to-point bytes it sends per step, and
the gradient bytes it would all-reduce with D replicas per stage against a data-parallel rank's (the whole model's).
Then, on --throughput-ranks ranks (default 4: D = 2 x P = 2), samples/s of the pipelined dense model against data
parallelism of the same model and global batch on the same ranks, rounds alternating, with the point-to-point bytes
it sends against the all-reduce bytes it saves.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

from hvdtrain.bench import harness

FIXED_WIDTH = 64   # the fixed-cost blocks' Dense layers: small, so their compute and messages stay far below the hold
HELP = "pipeline stages: idle bubble vs (P-1)/(M+P-1), memory per rank, point-to-point bytes (JSON + PNG + table)"
THROUGHPUT_COLUMNS = ["impl", "ranks", "global_batch", "samples_per_sec", "p2p_mb_per_step", "allreduce_mb_per_step"]
COLUMNS = ["cost", "stages", "schedule", "micro", "stage", "idle", "formula", "idle_vs_formula", "imbalance", "makespan_ms",
           "busy_ms", "stashed_peak", "param_share", "optimizer_share", "p2p_mb_per_step", "allreduce_mb_per_step",
           "dp_allreduce_mb_per_step"]


def add_arguments(p) -> None:
    harness.add_common(p, "pipeline", np_=False)
    p.add_argument("--stages", default="2,4", help="pipeline stages to measure (one rank each), comma-separated")
    p.add_argument("--dense-stages", default="2",
                   help="stage counts measured again with real Dense compute, comma-separated (empty: none)")
    # Long against a message's ~0.3 ms: 1F1B puts two messages on its critical path per micro-batch, which the
    # formula (zero transfer time) leaves out.
    p.add_argument("--forward-ms", type=float, default=60.0,
                   help="fixed cost of a block's forward per micro-batch (default 60)")
    p.add_argument("--backward-ms", type=float, default=120.0,
                   help="fixed cost of a block's backward per micro-batch (default 120)")
    p.add_argument("--micro", default="1,2,4,8,16", help="micro-batches per step, comma-separated")
    p.add_argument("--micro-batch", type=int, default=256, help="examples per micro-batch (default 256)")
    p.add_argument("--width", type=int, default=1024, help="units of every Dense layer (default 1024)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per configuration and round (default 5)")
    p.add_argument("--rounds", type=int, default=2, help="rounds, taking turns; the shortest makespan is kept")
    p.add_argument("--throughput-ranks", type=int, default=4,
                   help="ranks of the D x 2 against data parallelism comparison (0: skip it; default 4)")


def run(args) -> int:
    rows, plans = [], {}
    runs = [("fixed", int(n)) for n in args.stages.split(",")] + \
        [("dense", int(n)) for n in args.dense_stages.split(",") if n]
    with tempfile.TemporaryDirectory(prefix="hvdtrain-bench-pipeline-") as work:
        for cost, stages in runs:
            print(f"[bench] pipeline: {stages} stages on {stages} ranks, {cost} cost ...", flush=True)
            out = Path(work) / f"{cost}-p{stages}.json"
            harness.horovodrun(stages, "mpi", harness.worker_cmd(
                "pipeline_worker", "--stages", stages, "--cost", cost, "--forward-ms", args.forward_ms,
                "--backward-ms", args.backward_ms, "--micro", args.micro, "--micro-batch", args.micro_batch,
                "--width", args.width if cost == "dense" else FIXED_WIDTH, "--steps", args.steps, "--rounds",
                args.rounds, "--output", out, *args.overrides),
                env={"HOROVOD_CYCLE_TIME": "1"})   # Horovod is idle here: its thread need not spin
            got = harness.read_json(out)
            plans[f"{cost} {stages}"] = got["plan"]
            rows += table(got)
        throughput = []
        if args.throughput_ranks:
            print(f"[bench] pipeline: {args.throughput_ranks // 2} x 2 against data parallelism on "
                  f"{args.throughput_ranks} ranks ...", flush=True)
            out = Path(work) / "throughput.json"
            harness.horovodrun(args.throughput_ranks, "mpi", harness.worker_cmd(
                "pipeline_worker", "--stages", 2, "--throughput", "--micro-batch", args.micro_batch, "--width",
                args.width, "--steps", args.steps, "--rounds", args.rounds, "--output", out, *args.overrides),
                env={"HOROVOD_CYCLE_TIME": "1"})
            throughput = throughput_table(harness.read_json(out))
    doc = harness.new_document("pipeline", max(r["stages"] for r in rows),
                               {"micro_batch": args.micro_batch, "width": args.width, "fixed_width": FIXED_WIDTH,
                                "forward_ms": args.forward_ms, "backward_ms": args.backward_ms, "steps": args.steps,
                                "rounds": args.rounds, "intra_op_threads": 1, "inter_op_threads": 1, "plans": plans})
    doc["rows"], doc["throughput"] = rows, throughput
    doc["summary"] = {**summarize(rows), **throughput_summary(throughput)}
    return harness.finish(args.output, doc, plot, render)


def table(got: dict) -> list[dict]:
    """One row per (schedule, micro, stage) of pipeline replica 0, from the round with the shortest makespan."""
    P, whole = got["stages"], got["whole_param_bytes"]
    rows = [r for r in got["rows"] if r["replica"] == 0]
    out = []
    for schedule, micro in sorted({(r["schedule"], r["micro"]) for r in rows}):
        rounds = {}
        for r in rows:
            if (r["schedule"], r["micro"]) == (schedule, micro):
                rounds.setdefault(r["round"], []).append(r)
        best = min(rounds.values(), key=lambda stages: max(s["schedule_ms"] for s in stages))
        makespan, busiest = max(s["schedule_ms"] for s in best), max(s["busy_ms"] for s in best)
        formula = (P - 1) / (micro + P - 1)
        for s in sorted(best, key=lambda s: s["stage"]):
            idle = 1 - s["busy_ms"] / makespan
            out.append({"cost": got.get("cost", "dense"), "stages": P, "schedule": schedule, "micro": micro, "stage": s["stage"] + 1, "idle": idle,
                        "formula": formula, "idle_vs_formula": idle / formula,
                        "imbalance": (busiest - s["busy_ms"]) / makespan, "makespan_ms": makespan,
                        "busy_ms": s["busy_ms"], "stashed_peak": s["stashed_peak"],
                        "param_share": s["param_bytes"] / whole, "optimizer_share": s["optimizer_bytes"] / whole,
                        "p2p_mb_per_step": s["p2p_bytes_per_step"] / 2**20,
                        "allreduce_mb_per_step": s["param_bytes"] / 2**20, "dp_allreduce_mb_per_step": whole / 2**20})
    return out


def throughput_table(got: dict) -> list[dict]:
    """Per implementation, its best round: samples / the slowest rank's seconds; bytes summed over the ranks."""
    best = {}
    for impl, round_ in sorted({(r["impl"], r["round"]) for r in got["rows"]}):
        ranks = [r for r in got["rows"] if (r["impl"], r["round"]) == (impl, round_)]
        row = {"impl": impl, "ranks": len(ranks), "global_batch": ranks[0]["global_batch"],
               "samples_per_sec": ranks[0]["samples"] / max(r["seconds"] for r in ranks),
               "p2p_mb_per_step": sum(r["p2p_bytes_per_step"] for r in ranks) / 2**20,
               "allreduce_mb_per_step": sum(r["allreduce_bytes_per_step"] for r in ranks) / 2**20}
        if impl not in best or row["samples_per_sec"] > best[impl]["samples_per_sec"]:
            best[impl] = row
    return list(best.values())


def throughput_summary(rows: list[dict]) -> dict:
    pipelined = next((r for r in rows if r["impl"].startswith("pipeline")), None)
    parallel = next((r for r in rows if r["impl"].startswith("data parallel")), None)
    if not (pipelined and parallel):
        return {}
    saved = parallel["allreduce_mb_per_step"] - pipelined["allreduce_mb_per_step"]
    return {"pipeline_vs_data_parallel_samples_per_sec": pipelined["samples_per_sec"] / parallel["samples_per_sec"],
            "p2p_mb_vs_allreduce_mb_saved": pipelined["p2p_mb_per_step"] / saved if saved else None}


def summarize(rows: list[dict]) -> dict:
    """Per cost, stage count and schedule: the largest |idle / formula - 1| at M >= 4 (over stages), and the peak
    stash. Fixed-cost keys are bare (p2_1f1b_...), real compute's start with dense_."""
    out = {}
    for cost, P, schedule in sorted({(r["cost"], r["stages"], r["schedule"]) for r in rows}):
        mine = [r for r in rows if (r["cost"], r["stages"], r["schedule"]) == (cost, P, schedule)]
        key = f"{'' if cost == 'fixed' else cost + '_'}p{P}_{schedule}"
        out[f"{key}_max_deviation_m4plus"] = max(abs(r["idle_vs_formula"] - 1) for r in mine if r["micro"] >= 4)
        out[f"{key}_stashed_peak_stage1"] = max(r["stashed_peak"] for r in mine if r["stage"] == 1)
    return out


def plot(doc: dict, path) -> None:
    series = {}
    for r in (r for r in doc["rows"] if r["stage"] == 1):
        measured = f"P={r['stages']} {r['schedule']}, {r.get('cost', 'dense')} cost, stage 1"
        for label, y in ((measured, r["idle"]), (f"P={r['stages']} formula", r["formula"])):
            xs, ys = series.setdefault(label, ([], []))
            if r["micro"] not in xs:
                xs.append(r["micro"])
                ys.append(y)
    harness.plot(path, series, xlabel="micro-batches M", ylabel="idle share of the step",
                 title="pipeline bubble: measured vs (P-1)/(M+P-1)", logx=True)


def render(doc: dict) -> str:
    lines = [harness.text_table(doc["rows"], COLUMNS), ""]
    if doc.get("throughput"):
        lines += [harness.text_table(doc["throughput"], THROUGHPUT_COLUMNS), ""]
    for key, value in doc["summary"].items():
        lines.append(f"{key}: {value:.3g}" if value is not None else f"{key}: -")
    return "\n".join(lines)
