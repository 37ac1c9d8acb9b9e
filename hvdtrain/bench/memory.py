"""Sharded optimizer state (parallel.shard_state): what each rank holds, its peak memory and its step time at stages
0, 1 and 2, side by side in one run.

    hvdtrain bench memory --output bench/memory.json

For the 6.3M-parameter MLP (1024-2048-2048-10) and ResNet-50 (64x64 images, 1000 classes, 23.6M trainable), both
with Adam in float32, on D = 2 and 4 ranks (4 share the 2 cores), each stage runs in fresh processes (peak resident
memory is a process's own), the stages taking turns over --rounds. Per rank, from the variables it holds (summary.json's
`memory` entry): optimizer-state bytes against ZeRO's formula (Rajbhandari et al., 2020) with Adam's K = 8 bytes
per parameter (two float32 moments; the weights are float32 already, so no master copy): K x Psi at stage 0, K x Psi
/ D at stages 1 and 2; gradient bytes, 4 x Psi (4 x Psi / D at stage 2). Measured, not computed: each rank's peak
resident memory (getrusage) and its growth from just before the model is built (the memory that the model, its
gradients, its optimizer and the step take), and the step time (the slowest rank's) against stage 0's, each
configuration's best round. Keras's train step computes every local gradient before the optimizer sees any, so at
stage 2 the whole local gradient still exists for a moment in each step: the peak shows what that costs.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

from hvdtrain.bench import harness

HELP = "sharded optimizer state: bytes per rank against ZeRO's formula, peak memory, step time (JSON + PNG + table)"
K = 8   # Adam's bytes of state per float32 parameter: two moments
COLUMNS = ["model", "ranks", "stage", "parameters", "state_mb", "formula_state_mb", "state_vs_formula",
           "gradient_mb", "formula_gradient_mb", "peak_rss_mb", "rss_growth_mb", "rss_growth_vs_stage0", "step_ms",
           "step_vs_stage0"]
WORK = {"mlp": ["--steps", "20", "--warmup", "3"],
        "resnet50": ["--steps", "6", "--warmup", "2", "--batch", "8"]}


def add_arguments(p) -> None:
    harness.add_common(p, "memory", np_=False, rounds=2)
    p.add_argument("--ranks", default="2,4", help="data-parallel ranks D, comma-separated (default 2,4)")
    p.add_argument("--models", default="mlp,resnet50", help="comma list of mlp, resnet50 (default both)")


def run(args) -> int:
    from hvdtrain.errors import UserError
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    ranks = [int(n) for n in args.ranks.split(",") if n.strip()]
    if not models or set(models) - set(WORK) or not ranks or min(ranks) < 2:
        raise UserError("bench memory: --models takes mlp, resnet50; --ranks counts of at least 2")
    rows, runs = [], []
    with tempfile.TemporaryDirectory(prefix="hvdtrain-bench-memory-") as work:
        for round_ in range(args.rounds):
            for model in models:
                for d in ranks:
                    for stage in (0, 1, 2) if round_ % 2 == 0 else (2, 1, 0):
                        print(f"[bench] memory: {model}, stage {stage} on {d} ranks (round {round_ + 1}/"
                              f"{args.rounds}) ...", flush=True)
                        out, before = Path(work) / f"{model}-{d}-{stage}-{round_}.json", harness.loadavg()
                        harness.horovodrun(d, "mpi", harness.worker_cmd(
                            "memory_worker", "--model", model, "--stage", stage, "--output", out, *WORK[model],
                            *args.overrides))
                        rows.append({**harness.read_json(out)["row"], "round": round_})
                        runs.append({"model": model, "ranks": d, "stage": stage, "round": round_,
                                     "loadavg_before": before, "loadavg_after": harness.loadavg()})
    doc = harness.new_document("memory", max(ranks), {"k_bytes_per_parameter": K, "rounds": args.rounds,
                                                      "workloads": WORK})
    doc["runs"], doc["rows"] = runs, table(rows)
    doc["summary"] = summarize(doc["rows"])
    return harness.finish(args.output, doc, plot, render)


def table(rows: list[dict]) -> list[dict]:
    """Each (model, ranks, stage)'s best round (by step time), its largest rank (the bytes it holds, its peak), and
    its ratios to stage 0 of the same model and ranks."""
    best = harness.best_by(rows, ("model", "ranks", "stage"), "step_ms", higher=False)
    out = []
    for r in best:
        psi, d, ranks = r["parameters"], r["ranks"], r["per_rank"]
        shards = 1 if r["stage"] == 0 else d
        out.append({"model": r["model"], "ranks": d, "stage": r["stage"], "parameters": psi,
                    "state_mb": max(x["optimizer_state_bytes"] for x in ranks) / 2**20,
                    "formula_state_mb": K * psi / shards / 2**20,
                    "state_vs_formula": max(x["optimizer_state_bytes"] for x in ranks) / (K * psi / shards),
                    "gradient_mb": max(x["gradient_bytes"] for x in ranks) / 2**20,
                    "formula_gradient_mb": 4 * psi / (d if r["stage"] == 2 else 1) / 2**20,
                    "peak_rss_mb": max(x["peak_rss_bytes"] for x in ranks) / 2**20,
                    "rss_growth_mb": max(x["peak_rss_bytes"] - x["baseline_rss_bytes"] for x in ranks) / 2**20,
                    "step_ms": r["step_ms"], "round": r["round"]})
    for r in out:
        zero = next(z for z in out if (z["model"], z["ranks"], z["stage"]) == (r["model"], r["ranks"], 0))
        r["rss_growth_vs_stage0"] = r["rss_growth_mb"] / zero["rss_growth_mb"]
        r["step_vs_stage0"] = r["step_ms"] / zero["step_ms"]
    return sorted(out, key=lambda r: (r["model"], r["ranks"], r["stage"]))


def summarize(rows: list[dict]) -> dict:
    """Per model and ranks, stages 1 and 2 against stage 0: state bytes, peak-memory growth, step time."""
    out = {}
    for r in rows:
        if r["stage"]:
            zero = next(z for z in rows if (z["model"], z["ranks"], z["stage"]) == (r["model"], r["ranks"], 0))
            key = f"{r['model']}_d{r['ranks']}_stage{r['stage']}"
            out[f"{key}_state_vs_stage0"] = r["state_mb"] / zero["state_mb"]
            out[f"{key}_rss_growth_vs_stage0"] = r["rss_growth_vs_stage0"]
            out[f"{key}_step_vs_stage0"] = r["step_vs_stage0"]
    return out


def plot(doc: dict, path) -> None:
    """Each rank's peak-memory growth, per model and D, by stage (the bars), with its optimizer state beside it."""
    rows = doc["rows"]
    series = {}
    for r in rows:
        group = f"{r['model']} D={r['ranks']}"
        for label, value in ((f"stage {r['stage']}: peak growth", r["rss_growth_mb"]),
                             (f"stage {r['stage']}: optimizer state", r["state_mb"])):
            xs, ys = series.setdefault(label, ([], []))
            xs.append(group)
            ys.append(value)
    harness.plot(path, series, xlabel="model, data-parallel ranks", ylabel="MB per rank (largest rank)", bar=True,
                 title="sharded optimizer state: peak resident memory growth and state per rank")


def render(doc: dict) -> str:
    lines = [harness.text_table(doc["rows"], COLUMNS), ""]
    lines += [f"{key}: {value:.3g}" for key, value in doc["summary"].items()]
    return "\n".join(lines)
