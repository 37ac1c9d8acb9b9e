"""Data-parallel inference throughput: `hvdtrain predict` on 1 and 2 ranks (one intra-op thread each), in one run.

    hvdtrain bench predict --output bench/predict.json

Started without a launcher, it needs a checkpoint: --run RUN_DIR, or else it trains a throw-away run first (a
small ResNet on synthetic 32x32x3 inputs, one step: the weights do not matter for speed). Then, one after the
other, it runs `horovodrun -np N hvdtrain predict` for every N in --nps on the same --samples synthetic inputs,
with --threads intra-op threads per rank. Each rank times its own share (input batches, forward passes, writing
its part of the output); samples_per_sec is all samples / the slowest rank's time, and speedup is that over the
1-rank figure. The outputs at every N must be byte-identical, or the benchmark fails; each row records the
sha256 of its output, so the file shows what was compared. The machine is shared: every run records the load
average before and after it, and cpu_ms_per_sample (CPU time of all the ranks' threads while scoring) shows whether more ranks cost more CPU per
sample (real overhead) or only got less of the machine (other load).
"""
from __future__ import annotations

import hashlib
import shutil
import tempfile
from pathlib import Path

from hvdtrain.bench import harness

HELP = "inference throughput of `hvdtrain predict` at 1 and 2 ranks and the speed-up (JSON + PNG + table)"
COLUMNS = ["impl", "np", "model", "samples", "batch", "threads", "seconds", "samples_per_sec",
           "slowest_rank_samples_per_sec", "cpu_ms_per_sample", "speedup"]
# The throw-away run when no --run is given: a compute-heavy small ResNet, trained for one step.
TINY_RUN = ["--data.source=synthetic", "--data.input_shape=[32,32,3]", "--data.synthetic_samples=64",
            "--model.name=resnet", "--model.width=16", "--model.blocks=1", "--trainer.epochs=1",
            "--trainer.global_batch_size=64", "--trainer.tensorboard=false", "--trainer.progress=none"]


def add_arguments(p) -> None:
    harness.add_common(p, "predict", np_=False, rounds=1, controller=True)
    p.add_argument("--run", metavar="RUN_DIR", help="score with this run's checkpoint (default: a throw-away ResNet run)")
    p.add_argument("--nps", default="1,2", help="rank counts to measure, comma-separated (default 1,2)")
    p.add_argument("--samples", type=int, default=8192, help="synthetic inputs scored per run (default 8192)")
    p.add_argument("--batch", type=int, default=128, help="examples per batch on each rank (default 128)")
    p.add_argument("--threads", type=int, default=1, help="TensorFlow intra-op threads per rank (default 1)")


def run(args) -> int:
    work = Path(tempfile.mkdtemp(prefix="hvdtrain-bench-predict-"))
    try:
        return _drive(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _drive(args, work: Path) -> int:
    nps = [int(n) for n in args.nps.split(",") if n.strip()]
    run_dir = args.run or _tiny_run(work / "run")
    runs, rows = [], []
    for round_ in range(args.rounds):
        for n in nps:
            print(f"[bench] predict: {args.samples} samples on {n} rank(s) (round {round_ + 1}/{args.rounds}) ...", flush=True)
            before = harness.loadavg()
            got, digest = _measure(args, run_dir, n, work)
            runs.append({"np": n, "round": round_, "loadavg_before": before, "loadavg_after": harness.loadavg(),
                         "per_rank": got["per_rank"]})
            rows.append({**_row(args, n, got), "output_sha256": digest})
    if len({r["output_sha256"] for r in rows}) != 1:
        raise AssertionError(f"predict outputs differ between rank counts {nps}: this is a bug")
    doc = harness.new_document("predict", max(nps), {"controller": args.controller, "intra_op_threads": args.threads,
                                                     "inter_op_threads": 1, "batch": args.batch,
                                                     "run": str(args.run or "tiny resnet")})
    doc["runs"] = runs
    doc["rows"] = sorted(harness.best_by(rows, ("np",), "samples_per_sec"), key=lambda r: r["np"])
    doc["summary"] = summarize(doc["rows"])
    return harness.finish(args.output, doc, plot, render)


def _tiny_run(run_dir: Path) -> str:
    print("[bench] predict: training a throw-away checkpoint (one step) ...", flush=True)
    harness.run_checked(harness.hvdtrain_cmd("train", f"--trainer.run_dir={run_dir}", *TINY_RUN))
    return str(run_dir)


def _measure(args, run_dir: str, n: int, work: Path) -> tuple[dict, str]:
    """One `hvdtrain predict` launch on n ranks: (its --report, the sha256 of its output)."""
    out, rep = work / f"out-np{n}.npy", work / f"report-np{n}.json"
    harness.horovodrun(n, args.controller, harness.hvdtrain_cmd(
        "predict", "--run", run_dir, "--input", "synthetic", "--split", "train", "--fields", "probs",
        f"--data.synthetic_samples={args.samples}", "--batch-size", args.batch, "--output", out,
        "--report", rep, f"--runtime.intra_op_threads={args.threads}", "--runtime.inter_op_threads=1",
        *args.overrides))
    return harness.read_json(rep), hashlib.sha256(out.read_bytes()).hexdigest()


def _row(args, n: int, got: dict) -> dict:
    model = harness.read_json(Path(got["checkpoint"]) / "meta.json")["config"]["model"]["name"]
    return {"impl": "hvdtrain predict", "np": n, "model": model, "samples": got["examples"], "batch": args.batch,
            "threads": args.threads, "seconds": got["seconds"], "samples_per_sec": got["samples_per_sec"],
            "slowest_rank_samples_per_sec": min(r["samples_per_sec"] for r in got["per_rank"]),
            "cpu_ms_per_sample": 1e3 * got["cpu_seconds"] / max(1, got["examples"]),
            "loadavg": harness.loadavg()[0]}


def summarize(rows: list[dict]) -> dict:
    """speedup = samples/s at N ranks over samples/s at 1 rank (added to the rows too)."""
    one = next((r["samples_per_sec"] for r in rows if r["np"] == 1), None)
    for row in rows:
        row["speedup"] = row["samples_per_sec"] / one if one else None
    out = {f"speedup_np{r['np']}": r["speedup"] for r in rows if r["np"] != 1}
    one_cpu = next((r["cpu_ms_per_sample"] for r in rows if r["np"] == 1), None)
    # ~1.0: the ranks spent no extra CPU per sample, so a speed-up below N is CPU time taken by other processes.
    out.update({f"cpu_per_sample_vs_np1_np{r['np']}": r["cpu_ms_per_sample"] / one_cpu
                for r in rows if r["np"] != 1 and one_cpu})
    return out


def plot(doc: dict, path) -> None:
    rows = doc["rows"]
    nps = [r["np"] for r in rows]
    harness.plot(path, {"hvdtrain predict": (nps, [r["speedup"] or 0 for r in rows]), "ideal": (nps, nps)},
                 xlabel="ranks", ylabel="throughput / 1-rank throughput",
                 title=f"inference speed-up, {doc['settings']['intra_op_threads']} thread(s) per rank, "
                       f"{doc['machine']['cpus']} CPUs")


def render(doc: dict) -> str:
    lines = [harness.text_table(doc["rows"], COLUMNS), ""]
    s = doc["summary"]
    if s.get("speedup_np2") is not None:
        lines.append(f"speed-up at 2 ranks: {s['speedup_np2']:.2f}x (CPU per sample "
                     f"{s.get('cpu_per_sample_vs_np1_np2', float('nan')):.2f}x that of 1 rank; load average "
                     f"{doc['machine']['loadavg'][0]} on {doc['machine']['cpus']} CPUs at the start; outputs identical "
                     f"at every rank count, sha256 {doc['rows'][0]['output_sha256'][:12]}...)")
    return "\n".join(lines)
