"""All-reduce latency and bandwidth: hvdtrain's Horovod path (MPI and Gloo) against raw MPI_Allreduce.

Run without a launcher, it launches itself twice (`horovodrun --mpi`, then `--gloo`: one horovodrun launch
has one controller) and merges both into one JSON file and one plot:
    hvdtrain bench allreduce --np 2 --output bench/allreduce.json
Under a launcher it measures that launch only (add --merge to keep another launch's rows in the file):
    horovodrun -np 2 --mpi hvdtrain bench allreduce --output bench/allreduce.json

Per float32 size (4 KB .. 256 MB): time per all-reduce, algbw = S/t and busbw = algbw * 2(n-1)/n (the
nccl-tests definitions). Horovod runs inside a tf.function, each collective waiting for the previous one;
under MPI the same processes also time MPI_Allreduce on numpy buffers through mpi4py, taking turns with
Horovod size by size (Horovod's background thread is alive but idle meanwhile). Every result is checked
against the exact sum; a wrong result fails the command. Each time is the best of --repeats, each the mean
over many back-to-back calls on the slowest rank.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from benchmarks import harness as report

HELP = "all-reduce latency and bus bandwidth: hvdtrain (Horovod over MPI and Gloo) vs raw MPI_Allreduce"
KB, MB = 1024, 1024 * 1024
COLUMNS = ["impl", "size", "iters", "time_us", "algbw_gbps", "busbw_gbps", "max_abs_error"]
BASELINE = "mpi4py"
RATIO_SIZES = (1 * MB, 4 * MB, 16 * MB)   # where the bandwidth target applies
LATENCY_SIZE = 4 * KB
RAW_ROUNDS = 4


def add_arguments(p) -> None:
    p.add_argument("--output", default="bench/allreduce.json", metavar="FILE.json",
                   help="results (a plot is written next to it as FILE.png)")
    p.add_argument("--np", type=int, default=2, help="ranks per launch when started without a launcher (default 2)")
    p.add_argument("--controllers", default="mpi,gloo", help="launches to run without a launcher (default mpi,gloo)")
    p.add_argument("--min-size", type=_size, default=4 * KB, help="smallest message, e.g. 4KB (default)")
    p.add_argument("--max-size", type=_size, default=256 * MB, help="largest message, e.g. 256MB (default)")
    p.add_argument("--budget-mb", type=float, default=1024.0,
                   help="bytes reduced per size and repeat: iterations = budget / size, within [3, 1000]")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per size; the best one counts (default 3)")
    p.add_argument("--eager", action="store_true", help="also time eager hvd.allreduce (no tf.function)")
    p.add_argument("--merge", action="store_true", help="keep rows of other implementations already in --output")
    p.add_argument("--raw-only", action="store_true",
                   help="under horovodrun --mpi: time only MPI_Allreduce (mpi4py), with OpenMPI's own defaults")


def _size(text: str) -> int:
    text = text.strip().upper()
    for unit, factor in (("KB", KB), ("MB", MB), ("K", KB), ("M", MB), ("B", 1)):
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)


def sizes(lo: int, hi: int) -> list[int]:
    """Message sizes in bytes, x4 apart (4 KB, 16 KB, ... 256 MB), rounded to whole float32 elements."""
    out, s = [], max(4, lo - lo % 4)
    while s <= hi:
        out.append(s)
        s *= 4
    return out


def iterations(size: int, budget_mb: float) -> int:
    """The same on every rank (a rank that runs one collective more than the others would hang)."""
    return int(min(1000, max(3, round(budget_mb * MB / size))))


def run(args) -> int:
    from hvdtrain import dist
    if dist.under_launcher():
        return _measure_this_launch(args)
    return _drive(args)


# ---------------------------------------------------------------- driver: one launch per controller

def _drive(args) -> int:
    own = ["--output", args.output, "--min-size", str(args.min_size), "--max-size", str(args.max_size),
           "--budget-mb", str(args.budget_mb), "--repeats", str(args.repeats), *(["--eager"] if args.eager else [])]
    controllers = [c.strip() for c in args.controllers.split(",") if c.strip()]
    # The baseline gets a launch of its own with OpenMPI's defaults: hvdtrain's MPI settings (yield while waiting)
    # suit training, and must not make the transport it is compared with look slower than it is.
    launches = [("mpi", ["--raw-only"])] * ("mpi" in controllers) + [(c, []) for c in controllers]
    for i, (controller, extra) in enumerate(launches):
        merge = ["--merge"] if (i or args.merge) else []
        print(f"[bench] all-reduce: {'raw MPI' if extra else controller}, {args.np} ranks ...", flush=True)
        report.horovodrun(args.np, controller,
                          report.hvdtrain_cmd("bench", "allreduce", *own, *extra, *merge, *args.overrides), timeout=1800)
    doc = report.read_json(args.output)
    print(render(doc))
    print(f"[bench] wrote {args.output} and {report.png_path(args.output)}")
    return 0


# ---------------------------------------------------------------- one launch

@dataclass
class Impl:
    """One way to all-reduce: `reduce(x, iters)` runs `iters` back-to-back sums of x and returns the last result."""
    name: str
    prepare: Callable[[np.ndarray], object]
    reduce: Callable[[object, int], object]
    to_numpy: Callable[[object], np.ndarray]
    barrier: Callable[[], None]
    slowest: Callable[[float], float]       # the max of a number over ranks


def _measure_this_launch(args) -> int:
    from hvdtrain import dist
    from hvdtrain.config import load_config
    before = report.loadavg()
    if args.raw_only:
        impls, (rank, n), launch, settings = [_mpi4py_impl(BASELINE)], _mpi_rank_size(), "mpi-raw", _openmpi_settings()
    else:
        cfg = load_config(None, args.overrides)
        dist.apply_comm_environment(cfg.runtime)   # before MPI_Init: some settings are OpenMPI's
        # Raw MPI again, in these processes and with these settings, taking turns with Horovod (MPI is initialised
        # first; Horovod then shares it).
        raw = _mpi4py_impl(f"{BASELINE}-hvdtrain-env") if dist.launched_by_mpi() else None
        from hvdtrain import world
        topo = world.start(cfg.runtime, configure=False)
        impls = [impl for impl in (raw, _horovod_impl(topo.controller, dist),
                                   _horovod_eager_impl(topo.controller, dist) if args.eager else None) if impl]
        (rank, n), launch, settings = (topo.rank, topo.size), topo.controller, dist.active_comm_settings()
    # The baseline sweeps all sizes RAW_ROUNDS times, seconds apart, keeping each size's best: a burst of load
    # from other processes must not make the transport look slow (it is cheap: no TensorFlow in the way).
    rounds = RAW_ROUNDS if args.raw_only else 1
    rows = _fastest([row for _ in range(rounds) for row in _measure(impls, args, rank, n)])
    if rank == 0:
        run_info = {"launch": launch, "impls": [impl.name for impl in impls], "loadavg_before": before,
                    "loadavg_after": report.loadavg(), "settings": settings}
        doc = _merged(args, n, rows, run_info)
        report.write_json(args.output, doc)
        plot(doc, report.png_path(args.output))
        print(render(doc), flush=True)
    return 0 if all(r["correct"] for r in rows) else _wrong(rows)


def _mpi_rank_size() -> tuple[int, int]:
    from mpi4py import MPI
    return MPI.COMM_WORLD.Get_rank(), MPI.COMM_WORLD.Get_size()


def _openmpi_settings() -> dict:
    import os
    return {k: v for k, v in os.environ.items() if k.startswith("OMPI_MCA_") and "yield" in k} or {"OpenMPI": "defaults"}


def _wrong(rows) -> int:
    from hvdtrain.errors import UserError
    bad = [f"{r['impl']} at {r['size']}" for r in rows if not r["correct"]]
    raise UserError(f"all-reduce returned wrong sums: {', '.join(bad)}")


def _measure(impls: list[Impl], args, rank: int, n: int) -> list[dict]:
    """Per size, the implementations take turns repeat after repeat, so a burst of load from other processes
    on this shared machine hits them alike; each keeps its best repeat."""
    rows = []
    for size in sizes(args.min_size, args.max_size):
        pattern = (np.arange(size // 4) % 7 + 1).astype(np.float32)   # small integers: float32 sums are exact
        expected = pattern * (n * (n + 1) / 2)
        inputs = [impl.prepare(pattern * (rank + 1)) for impl in impls]
        errors = [impl.slowest(float(np.max(np.abs(impl.to_numpy(impl.reduce(x, 1)) - expected))))  # + warm-up
                  for impl, x in zip(impls, inputs)]
        iters = iterations(size, args.budget_mb)
        best = [float("inf")] * len(impls)
        for _ in range(args.repeats):
            best = [min(b, _timed(impl, x, iters)) for b, impl, x in zip(best, impls, inputs)]
        for impl, t, error in zip(impls, best, errors):
            rows.append({"impl": impl.name, "size": report.human_bytes(size), "size_bytes": size, "np": n,
                         "iters": iters, "time_us": t * 1e6, "algbw_gbps": report.algbw_gbps(size, t),
                         "busbw_gbps": report.busbw_gbps(size, t, n), "max_abs_error": error, "correct": error == 0.0})
    return rows


def _fastest(rows: list[dict]) -> list[dict]:
    """One row per (impl, size): the fastest; a wrong result anywhere stays visible."""
    best: dict = {}
    for row in rows:
        key = (row["impl"], row["size_bytes"])
        seen = best.get(key, row)
        error = max(row["max_abs_error"], seen["max_abs_error"])
        fastest = row if row["time_us"] <= seen["time_us"] else seen
        best[key] = {**fastest, "max_abs_error": error, "correct": error == 0.0}
    return list(best.values())


def _timed(impl: Impl, x, iters: int) -> float:
    impl.barrier()
    start = time.perf_counter()
    impl.reduce(x, iters)
    return impl.slowest((time.perf_counter() - start) / iters)


def _mpi4py_impl(name: str) -> Impl:
    """MPI_Allreduce straight on numpy buffers: the transport underneath, with nothing of Horovod or TensorFlow."""
    from mpi4py import MPI
    comm = MPI.COMM_WORLD

    def reduce(x, iters):
        out = np.empty_like(x)
        for _ in range(iters):
            comm.Allreduce(x, out, op=MPI.SUM)
        return out
    return Impl(name, lambda a: a, reduce, lambda out: out, comm.Barrier,
                lambda v: comm.allreduce(v, op=MPI.MAX))


def _horovod_impl(controller: str, dist) -> Impl:
    """hvdtrain's configured Horovod path: collectives inside a tf.function, back to back."""
    import tensorflow as tf
    loops: dict = {}

    def reduce(x, iters):
        key = int(x.shape[0])
        if key not in loops:   # one name per size: Horovod caches the negotiation of a name it has seen
            loops[key] = _allreduce_loop(dist, f"hvdtrain.bench.allreduce.{key}")
        return loops[key](x, tf.constant(iters))
    return Impl(f"hvdtrain-{controller}", tf.constant, reduce, lambda t: t.numpy(), dist.barrier,
                lambda v: max(dist.allgather_object(v, "hvdtrain.bench.slowest")))


def _allreduce_loop(dist, name: str):
    """A tf.function (x, iters) -> the all-reduce of x over ranks, run `iters` times back to back in one graph.

    Each collective waits for the previous one (a control dependency), so the loop measures Horovod's own latency
    and bandwidth with no Python between collectives, the way a training step issues them.
    """
    import tensorflow as tf

    @tf.function
    def loop(x, iters):
        def body(i, previous):
            with tf.control_dependencies([previous]):
                return i + 1, dist.allreduce(x, "sum", name)
        return tf.while_loop(lambda i, _: i < iters, body, (tf.constant(0), tf.zeros_like(x)), parallel_iterations=1)[1]
    return loop


def _horovod_eager_impl(controller: str, dist) -> Impl:
    """The same collective called eagerly from Python, one at a time: what a loop without tf.function pays."""
    import tensorflow as tf

    def reduce(x, iters):
        for _ in range(iters):
            out = dist.allreduce(x, "sum", f"hvdtrain.bench.eager.{int(x.shape[0])}")
        return out
    return Impl(f"hvdtrain-{controller}-eager", tf.constant, reduce, lambda t: t.numpy(), dist.barrier,
                lambda v: max(dist.allgather_object(v, "hvdtrain.bench.slowest")))


# ---------------------------------------------------------------- the file, the summary, the plot

def _merged(args, n: int, rows: list[dict], run_info: dict) -> dict:
    """This launch's rows, plus (with --merge) the rows of other implementations from an earlier launch."""
    import os
    doc = report.new_document("allreduce", n, {})
    if args.merge and os.path.exists(args.output):
        old = report.read_json(args.output)
        if old.get("benchmark") == "allreduce" and old.get("np") == n:
            mine = {r["impl"] for r in rows}
            rows = [r for r in old["rows"] if r["impl"] not in mine] + rows
            doc["runs"] = [run for run in old.get("runs", []) if run["launch"] != run_info["launch"]]
    doc["runs"].append(run_info)
    doc["settings"] = {run["launch"]: run["settings"] for run in doc["runs"]}
    doc["rows"] = rows
    doc["summary"] = summarize(rows)
    return doc


def summarize(rows: list[dict]) -> dict:
    """Per Horovod implementation: busbw relative to raw MPI at 1-16 MB (the faster raw measurement at each
    size, so the baseline is never weakened), and the 4 KB latency."""
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
    report.plot(path, series, xlabel="message size (bytes)", ylabel="bus bandwidth (GB/s)", logx=True,
                title=f"all-reduce bus bandwidth, {doc['np']} ranks, float32 ({doc['machine']['cpus']} CPUs)")


def render(doc: dict) -> str:
    rows = sorted(doc["rows"], key=lambda r: (r["impl"], r["size_bytes"]))
    lines = [report.text_table(rows, COLUMNS), ""]
    for impl, s in doc["summary"].items():
        ratio = f", busbw vs raw MPI at 1-16 MB: min {s['busbw_vs_mpi_1_16mb_min']:.2f}x mean " \
                f"{s['busbw_vs_mpi_1_16mb_mean']:.2f}x" if "busbw_vs_mpi_1_16mb_min" in s else ""
        latency = f"{s['latency_4kb_us']:.1f} us" if s["latency_4kb_us"] is not None else "n/a"
        lines.append(f"{impl}: 4 KB latency {latency}{ratio}")
    return "\n".join(lines)
