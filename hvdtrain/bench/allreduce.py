"""All-reduce latency and bandwidth: hvdtrain's Horovod path (MPI and Gloo) against raw MPI_Allreduce.

    hvdtrain bench allreduce --np 2 --output bench/allreduce.json

It launches its ranks four times (one horovodrun launch has one controller) and merges them into one JSON file and
one plot: raw MPI_Allreduce alone (`horovodrun --mpi`, the baseline) with OpenMPI's defaults and with hvdtrain's OMPI_*
settings, then hvdtrain's path under `--mpi` and under `--gloo`. Ratios are taken against the faster raw measurement
at each size. Under a launcher (slurm/bench.sbatch) it measures that launch only.

Per float32 size (4 KB .. 256 MB): time per all-reduce, algbw = S/t and busbw = algbw * 2(n-1)/n (the
nccl-tests definitions). Horovod runs inside a tf.function, each collective waiting for the previous one;
under MPI the same processes also time MPI_Allreduce on numpy buffers through mpi4py, taking turns with
Horovod size by size (Horovod's background thread is alive but idle meanwhile). Every result is checked
against the exact sum; a wrong result fails the command. Each time is the best of --repeats, each the mean
over many back-to-back calls on the slowest rank. The rank-side code is hvdtrain/bench/allreduce_worker.py.
"""
from __future__ import annotations

from hvdtrain.bench import allreduce_worker as worker
from hvdtrain.bench import harness

HELP = "all-reduce latency and bus bandwidth: hvdtrain (Horovod over MPI and Gloo) vs raw MPI_Allreduce"
COLUMNS = ["impl", "size", "iters", "time_us", "algbw_gbps", "busbw_gbps", "max_abs_error"]
BASELINE = "mpi4py"
KB, MB = worker.KB, worker.MB
RATIO_SIZES = (1 * MB, 4 * MB, 16 * MB)   # the bandwidth ratio to raw MPI is taken over these sizes
LATENCY_SIZE = 4 * KB


def add_arguments(p) -> None:
    harness.add_common(p, "allreduce")
    p.add_argument("--controllers", default="mpi,gloo", help="launches to run (default mpi,gloo)")
    worker.add_measure_arguments(p)


def run(args) -> int:
    own = ["--output", args.output, *harness.forward(args, worker.MEASURE_ARGS), *args.overrides]
    controllers = [c.strip() for c in args.controllers.split(",") if c.strip()]
    # The baseline gets launches of its own, with OpenMPI's defaults and with hvdtrain's MPI settings (yield while
    # waiting suits training); the faster counts, so neither can make the transport look slower than it is.
    raw = [("mpi", ["--raw-only"]), ("mpi", ["--raw-only", "--hvdtrain-mpi-settings"])] if "mpi" in controllers else []
    launches = raw + [(c, []) for c in controllers]
    for i, (controller, extra) in enumerate(launches):
        what = (("raw MPI, hvdtrain's MPI settings" if len(extra) > 1 else "raw MPI, OpenMPI's defaults") if extra
                else controller)
        print(f"[bench] all-reduce: {what}, {args.np} ranks ...", flush=True)
        harness.horovodrun(args.np, controller, harness.worker_cmd("allreduce_worker", *own, *extra,
                                                                   *(["--merge"] if i else [])))
    return harness.finish(args.output, harness.read_json(args.output), plot, render)


def run_in_rank(args) -> int:
    """Under a launcher (srun, mpirun): measure this launch, raw MPI_Allreduce in the same processes included."""
    return worker.measure(args, raw_only=False, merge=False)


# ---------------------------------------------------------------- the summary, the plot, the table

def summarize(rows: list[dict]) -> dict:
    """Per implementation: the 4 KB latency, and for Horovod busbw relative to raw MPI at 1-16 MB (against the
    faster raw measurement at each size, so the baseline is never weakened)."""
    raw: dict[int, float] = {}
    for r in rows:
        if r["impl"].startswith(BASELINE):
            raw[r["size_bytes"]] = max(raw.get(r["size_bytes"], 0.0), r["busbw_gbps"])
    out = {}
    for impl in sorted({r["impl"] for r in rows}):
        mine = {r["size_bytes"]: r for r in rows if r["impl"] == impl}
        entry = {"latency_4kb_us": mine[LATENCY_SIZE]["time_us"] if LATENCY_SIZE in mine else None}
        ratios = [mine[s]["busbw_gbps"] / raw[s] for s in RATIO_SIZES if s in mine and s in raw]
        if ratios and not impl.startswith(BASELINE):
            entry.update(busbw_vs_mpi_1_16mb_min=min(ratios), busbw_vs_mpi_1_16mb_mean=sum(ratios) / len(ratios))
        out[impl] = entry
    return out


def plot(doc: dict, path) -> None:
    series = {}
    for impl in sorted({r["impl"] for r in doc["rows"]}):
        mine = sorted((r for r in doc["rows"] if r["impl"] == impl), key=lambda r: r["size_bytes"])
        series[impl] = ([r["size_bytes"] for r in mine], [r["busbw_gbps"] for r in mine])
    harness.plot(path, series, xlabel="message size (bytes)", ylabel="bus bandwidth (GB/s)", logx=True,
                 title=f"all-reduce bus bandwidth, {doc['np']} ranks, float32 ({doc['machine']['cpus']} CPUs)")


def render(doc: dict) -> str:
    rows = sorted(doc["rows"], key=lambda r: (r["impl"], r["size_bytes"]))
    lines = [harness.text_table(rows, COLUMNS), ""]
    for impl, s in doc["summary"].items():
        ratio = f", busbw vs raw MPI at 1-16 MB: min {s['busbw_vs_mpi_1_16mb_min']:.2f}x mean " \
                f"{s['busbw_vs_mpi_1_16mb_mean']:.2f}x" if "busbw_vs_mpi_1_16mb_min" in s else ""
        latency = f"{s['latency_4kb_us']:.1f} us" if s["latency_4kb_us"] is not None else "n/a"
        lines.append(f"{impl}: 4 KB latency {latency}{ratio}")
    return "\n".join(lines)
