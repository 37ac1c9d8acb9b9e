"""Communicating less (trainer.sync): federated averaging's rounds and local SGD's bytes, on digits, in one run.

    hvdtrain bench sync --output bench/sync.json

FedAvg (McMahan et al., 2017, Table 2 in small): configs/digits-fedavg.yaml's 100 clients, 10 sampled a round, for
FedSGD (E = 1, B = all of a client's examples: one gradient step per client and round) and FedAvg with B = 10 and
E = 1 and 5, each on IID and on labels:2 clients, for --rounds rounds each; the table gives the communication rounds
until the global model first reaches --target test accuracy (evaluated after every round), and the speed-up in rounds
against FedSGD on the same clients. Local SGD: the digits job (configs/digits.yaml, 30 epochs) averaging every step
and with H = 1, 4, 16 local steps between weight averages: test accuracy against the bytes each rank all-reduced
(summary.json's communicated_bytes) and samples/s. Every run is `hvdtrain train` on --np ranks (Gloo), as a user
runs it.
"""
from __future__ import annotations

import csv
import json
import tempfile
from pathlib import Path

from hvdtrain.bench import harness

HELP = "fewer bytes: FedAvg vs FedSGD rounds to a target accuracy, local SGD accuracy vs bytes (JSON + PNG + table)"
FEDAVG_COLUMNS = ["method", "E", "B", "partition", "rounds_to_target", "speedup", "final_accuracy", "mb_to_target"]
LOCAL_COLUMNS = ["sync", "H", "test_accuracy", "communicated_mb", "bytes_vs_every_step", "samples_per_sec"]
METHODS = (("FedSGD", 1, 0), ("FedAvg", 1, 10), ("FedAvg", 5, 10))   # (name, E, B)
REPO = Path(__file__).resolve().parents[2]


def add_arguments(p) -> None:
    harness.add_common(p, "sync")
    p.add_argument("--target", type=float, default=0.95, help="test accuracy the rounds are counted to (default 0.95)")
    p.add_argument("--rounds", type=int, default=150, help="communication rounds of each FedAvg run (default 150)")
    p.add_argument("--partitions", default="iid,labels:2", help="client partitions, comma-separated")
    p.add_argument("--periods", default="1,4,16", help="local SGD periods H, comma-separated (empty: skip)")


def run(args) -> int:
    fedavg, local = [], []
    with tempfile.TemporaryDirectory(prefix="hvdtrain-bench-sync-") as work:
        for partition in args.partitions.split(","):
            for method, epochs, batch in METHODS:
                print(f"[bench] sync: {method} E={epochs} B={batch or 'all'} on {partition} clients ...", flush=True)
                run_dir = Path(work) / f"{method}-{epochs}-{batch}-{partition.replace(':', '')}"
                train(args, run_dir, "configs/digits-fedavg.yaml", f"--trainer.epochs={args.rounds}",
                      f"--data.partition={partition}", f"--fedavg.local_epochs={epochs}",
                      f"--fedavg.local_batch_size={batch}")
                fedavg.append(fedavg_row(method, epochs, batch, partition, run_dir, args.target))
        for period in [None, *(int(h) for h in args.periods.split(",") if h)]:
            print(f"[bench] sync: {'every step' if period is None else f'local SGD, H={period}'} ...", flush=True)
            run_dir = Path(work) / f"local-{period}"
            sync = [] if period is None else ["--trainer.sync=local_sgd", f"--trainer.sync_period={period}"]
            train(args, run_dir, "configs/digits.yaml", *sync)
            local.append(local_row(period, run_dir))
    add_ratios(fedavg, local)
    doc = harness.new_document("sync", args.np, {"target": args.target, "rounds": args.rounds,
                                                 "controller": "gloo", "clients": 100, "per_round": 10})
    doc["rows"], doc["local_sgd"] = fedavg, local
    doc["summary"] = summarize(fedavg, local)
    return harness.finish(args.output, doc, plot, render)


def train(args, run_dir: Path, config: str, *overrides: str) -> None:
    harness.horovodrun(args.np, "gloo", harness.hvdtrain_cmd(
        "train", "--config", str(REPO / config), f"--trainer.run_dir={run_dir}", "--trainer.progress=none",
        "--trainer.tensorboard=false", *overrides, *args.overrides))


def fedavg_row(method: str, epochs: int, batch: int, partition: str, run_dir: Path, target: float) -> dict:
    rows = list(csv.DictReader((run_dir / "metrics.csv").open()))
    reached = next((int(r["global_step"]) for r in rows if float(r["val_accuracy"]) >= target), None)
    per_round = float(rows[0]["communicated_bytes"])
    return {"method": method, "E": epochs, "B": batch or "all", "partition": partition, "rounds_to_target": reached,
            "rounds_run": len(rows), "final_accuracy": float(rows[-1]["val_accuracy"]),
            "accuracy": [float(r["val_accuracy"]) for r in rows],
            "mb_to_target": reached * per_round / 2**20 if reached else None}


def local_row(period: int | None, run_dir: Path) -> dict:
    s = json.loads((run_dir / "summary.json").read_text())
    return {"sync": "every_step" if period is None else "local_sgd", "H": period or 1,
            "test_accuracy": s["test_accuracy"], "communicated_mb": s["communicated_bytes"] / 2**20,
            "samples_per_sec": s["samples_per_sec"]}


def add_ratios(fedavg: list[dict], local: list[dict]) -> None:
    """FedAvg's speed-up in rounds against FedSGD on the same clients; local SGD's bytes against every-step's."""
    for row in fedavg:
        base = next(r for r in fedavg if r["partition"] == row["partition"] and r["method"] == "FedSGD")
        row["speedup"] = base["rounds_to_target"] / row["rounds_to_target"] \
            if base["rounds_to_target"] and row["rounds_to_target"] else None
    every = next((r for r in local if r["sync"] == "every_step"), None)
    for row in local:
        row["bytes_vs_every_step"] = row["communicated_mb"] / every["communicated_mb"] \
            if every and every["communicated_mb"] else None   # one rank sends nothing


def summarize(fedavg: list[dict], local: list[dict]) -> dict:
    out = {f"{r['method']}_E{r['E']}_B{r['B']}_{r['partition']}_rounds": r["rounds_to_target"] for r in fedavg}
    out.update({f"local_sgd_H{r['H']}_bytes_vs_every_step": r["bytes_vs_every_step"] for r in local
                if r["sync"] == "local_sgd"})
    return out


def plot(doc: dict, path) -> None:
    series = {}
    for r in doc["rows"]:
        label = f"{r['method']} E={r['E']} B={r['B']}, {r['partition']}"
        series[label] = (list(range(1, len(r["accuracy"]) + 1)), r["accuracy"])
    harness.plot(path, series, xlabel="communication rounds", ylabel="test accuracy",
                 title="FedAvg vs FedSGD on digits (100 clients, 10 a round)", reference=doc["settings"]["target"])


def render(doc: dict) -> str:
    lines = [harness.text_table(doc["rows"], FEDAVG_COLUMNS), "", harness.text_table(doc["local_sgd"], LOCAL_COLUMNS)]
    return "\n".join(lines)
