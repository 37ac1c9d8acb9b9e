"""Tensor parallelism: what each rank holds, what it sends, and what it costs, in one run.

    hvdtrain bench tensor --output bench/tensor.json

The transformer of configs/digits-transformer.yaml at a width where splitting matters (--width, default 256: 1.1 M
parameters) on random 8 x 8 images, trained with the same global batch as D x T layouts: 1 x 1 (one process),
T = 2 against D = 2 on 2 ranks, and D = 2 x T = 2, T = 4 and D = 4 on 4 ranks (oversubscribing a 2-core machine),
rounds taking turns within a launch, the best round kept. Per layout: the parameters one rank holds against the
whole model's (the sliced weights of the split layers at 1/T; their row and output biases are held whole), the
activations its forward pass keeps, the step time (the slowest rank's) and samples/s, and the bytes it hands to
Horovod per step: the split layers' all-reduces (measured, traffic.py's `tensor`) against the formula (per encoder
block 4 all-reduces of replica batch x tokens x width float32 values: attention and MLP, forward and backward), and
the gradients it averages over its replicas.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

from hvdtrain.bench import harness

HELP = "tensor parallelism: parameters and activations per rank, split-layer bytes vs formula, D x T vs D (JSON + PNG)"
COLUMNS = ["layout", "ranks", "params_per_rank", "split_params_per_rank", "sliced_share", "activation_mb_per_rank",
           "step_ms", "samples_per_sec", "tensor_mb_per_step", "formula_mb_per_step", "gradient_mb_per_step"]
LAUNCHES = {1: "1x1", 2: "1x2,2x1", 4: "2x2,1x4,4x1"}   # ranks -> layouts (those needing process sets first)


def add_arguments(p) -> None:
    harness.add_common(p, "tensor", np_=False)
    p.add_argument("--ranks", default="1,2,4", help="launches by their ranks, comma-separated (of 1, 2, 4)")
    p.add_argument("--width", type=int, default=256, help="model width (default 256; each MLP is twice as wide)")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--blocks", type=int, default=2)
    p.add_argument("--batch", type=int, default=64, help="global batch (default 64)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per layout and round (default 20)")
    p.add_argument("--rounds", type=int, default=3, help="rounds, taking turns; the fastest is kept (default 3)")


def run(args) -> int:
    rows = []
    settings = ["--width", args.width, "--heads", args.heads, "--blocks", args.blocks, "--batch", args.batch,
                "--steps", args.steps, "--rounds", args.rounds]
    with tempfile.TemporaryDirectory(prefix="hvdtrain-bench-tensor-") as work:
        for ranks in (int(n) for n in args.ranks.split(",")):
            print(f"[bench] tensor: {LAUNCHES[ranks]} on {ranks} rank(s) ...", flush=True)
            out = Path(work) / f"np{ranks}.json"
            command = harness.worker_cmd("tensor_worker", "--layouts", LAUNCHES[ranks], "--output", out, *settings,
                                         *args.overrides)
            if ranks == 1:
                harness.run_checked(command)
            else:
                harness.horovodrun(ranks, "mpi", command, env={"HOROVOD_CYCLE_TIME": "0.1"})
            got = harness.read_json(out)
            stack = got["stack"]
            rows += harness.best_by(got["rows"], ["layout"], "samples_per_sec")
    doc = harness.new_document("tensor", max(r["ranks"] for r in rows),
                               {"width": args.width, "heads": args.heads, "blocks": args.blocks, "batch": args.batch,
                                "steps": args.steps, "rounds": args.rounds, "intra_op_threads": 1, "tokens": 16,
                                "whole_params": rows[0]["whole_params"]}, stack)
    doc["rows"] = [{k: v for k, v in r.items() if k != "round"} for r in rows]
    doc["summary"] = summarize(doc["rows"])
    return harness.finish(args.output, doc, plot, render)


def summarize(rows: list[dict]) -> dict:
    """Per T: the sliced weights' share per rank and measured / formula bytes; D x T against pure D on the same ranks."""
    by = {r["layout"]: r for r in rows}
    out = {}
    for r in rows:
        if r["tensor"] > 1:
            key = f"d{r['replicas']}_t{r['tensor']}"
            out[f"{key}_sliced_share"] = r["sliced_share"]
            out[f"{key}_tensor_bytes_vs_formula"] = r["tensor_mb_per_step"] / r["formula_mb_per_step"]
            out[f"{key}_params_vs_whole"] = r["params_per_rank"] / r["whole_params"]
            out[f"{key}_activations_vs_one_rank"] = r["activation_mb_per_rank"] / \
                by["D=1 x T=1"]["activation_mb_per_rank"] * r["replicas"] if "D=1 x T=1" in by else None
    for r in rows:
        pure = by.get(f"D={r['ranks']} x T=1")
        if r["tensor"] > 1 and pure:
            out[against_data_parallel(r)] = r["samples_per_sec"] / pure["samples_per_sec"]
    return out


def against_data_parallel(row: dict) -> str:
    """The summary key of a D x T layout's samples/s against pure data parallelism on the same ranks."""
    return f"d{row['replicas']}_t{row['tensor']}_vs_d{row['ranks']}_samples_per_sec"


def plot(doc: dict, path) -> None:
    series = {"samples/s": ([r["layout"] for r in doc["rows"]], [r["samples_per_sec"] for r in doc["rows"]])}
    harness.plot(path, series, xlabel="layout (ranks = D x T)", ylabel="samples/s (global batch, slowest rank)",
                 title=f"tensor parallelism, transformer of width {doc['settings']['width']}", bar=True)


def render(doc: dict) -> str:
    lines = [harness.text_table(doc["rows"], COLUMNS), ""]
    lines += [f"{key}: {value:.3g}" if value is not None else f"{key}: -" for key, value in doc["summary"].items()]
    return "\n".join(lines)
