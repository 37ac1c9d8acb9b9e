"""The ranks of `hvdtrain bench allreduce`: time the all-reduce in this launch and write (or merge into) the file.

    horovodrun -np 2 --mpi python -m hvdtrain.bench.allreduce_worker --output ar.json [--raw-only] [--merge] ...

--raw-only times only MPI_Allreduce through mpi4py, with OpenMPI's own defaults (no Horovod, no hvdtrain settings), or
with --hvdtrain-mpi-settings under the OMPI_* settings hvdtrain starts its ranks with; --merge keeps the rows of the
other launches already in --output. See hvdtrain/bench/allreduce.py for what is measured.
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from hvdtrain.bench import harness

KB, MB = 1024, 1024 * 1024
RAW_ROUNDS = 4
MEASURE_ARGS = ("min_size", "max_size", "budget_mb", "repeats", "eager")


def add_measure_arguments(p) -> None:
    """What to measure (shared with the driver, which forwards these to its ranks)."""
    p.add_argument("--min-size", type=_size, default=4 * KB, help="smallest message, e.g. 4KB (default %(default)s bytes)")
    p.add_argument("--max-size", type=_size, default=256 * MB, help="largest message, e.g. 256MB (default %(default)s bytes)")
    p.add_argument("--budget-mb", type=float, default=1024.0,
                   help="MB reduced per size and repeat: iterations = budget / size, within [3, 1000] (default %(default)s)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per size; the best one counts (default %(default)s)")
    p.add_argument("--eager", action="store_true", help="also time eager hvd.allreduce (no tf.function)")


def add_arguments(p) -> None:
    p.add_argument("--output", required=True, metavar="FILE.json")
    add_measure_arguments(p)
    p.add_argument("--raw-only", action="store_true", help="time only MPI_Allreduce (mpi4py), OpenMPI's defaults")
    p.add_argument("--hvdtrain-mpi-settings", action="store_true",
                   help="with --raw-only: under hvdtrain's OMPI_* settings instead of OpenMPI's defaults")
    p.add_argument("--merge", action="store_true", help="keep the other launches' rows already in --output")


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


def measure(args, *, raw_only: bool, merge: bool) -> int:
    from hvdtrain import backend
    from hvdtrain.config import load_config
    before = harness.loadavg()
    if raw_only:
        name, launch = "mpi4py", "mpi-raw"
        if args.hvdtrain_mpi_settings:   # read by OpenMPI at MPI_Init, so set before mpi4py starts it
            runtime = load_config(None, args.overrides).runtime
            os.environ.update({k: v for k, v in backend.comm_environment(runtime).items() if k.startswith("OMPI_")})
            name, launch = "mpi4py-hvdtrain-settings", "mpi-raw-hvdtrain"
        MPI = backend.mpi()
        impls, rank, n = [_mpi4py_impl(name)], MPI.COMM_WORLD.Get_rank(), MPI.COMM_WORLD.Get_size()
        settings, stack = _openmpi_settings(), None
    else:
        cfg = load_config(None, args.overrides)
        backend.apply_comm_environment(cfg.runtime)   # before MPI_Init: some settings are OpenMPI's
        # Raw MPI again, in these processes and with these settings, taking turns with Horovod (MPI is initialised
        # first; Horovod then shares it).
        raw = _mpi4py_impl("mpi4py-hvdtrain-env") if backend.launched_by_mpi() else None
        from hvdtrain import world
        w = world.start(cfg.runtime)   # threads and TensorFlow settings as training has them
        impls = [impl for impl in (raw, _horovod_impl(w.controller, backend),
                                   _horovod_eager_impl(w.controller, backend) if args.eager else None) if impl]
        rank, n, launch, settings, stack = w.rank, w.size, w.controller, backend.active_comm_settings(), harness.rank_stack()
    # The baseline sweeps all sizes RAW_ROUNDS times, seconds apart, keeping each size's best: a burst of load
    # from other processes must not make the transport look slow (it is cheap: no TensorFlow in the way).
    rows = _fastest([row for _ in range(RAW_ROUNDS if raw_only else 1) for row in _measure(impls, args, rank, n)])
    if rank == 0:
        from hvdtrain.bench import allreduce
        run_info = {"launch": launch, "impls": [impl.name for impl in impls], "loadavg_before": before,
                    "loadavg_after": harness.loadavg(), "settings": settings}
        doc = _merged(args.output if merge else None, n, rows, run_info, stack)
        harness.write_json(args.output, doc)
        allreduce.plot(doc, harness.png_path(args.output))
        print(allreduce.render(doc), flush=True)
    return 0 if all(r["correct"] for r in rows) else _wrong(rows)


def _openmpi_settings() -> dict:
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
            rows.append({"impl": impl.name, "size": harness.human_bytes(size), "size_bytes": size, "np": n,
                         "iters": iters, "time_us": t * 1e6, "algbw_gbps": harness.algbw_gbps(size, t),
                         "busbw_gbps": harness.busbw_gbps(size, t, n), "max_abs_error": error, "correct": error == 0.0})
    return rows


def _fastest(rows: list[dict]) -> list[dict]:
    """One row per (impl, size): the fastest; a wrong result in any round stays visible."""
    worst: dict = {}
    for row in rows:
        key = (row["impl"], row["size_bytes"])
        worst[key] = max(worst.get(key, 0.0), row["max_abs_error"])
    return [{**row, "max_abs_error": worst[(row["impl"], row["size_bytes"])],
             "correct": worst[(row["impl"], row["size_bytes"])] == 0.0}
            for row in harness.best_by(rows, ("impl", "size_bytes"), "time_us", higher=False)]


def _timed(impl: Impl, x, iters: int) -> float:
    impl.barrier()
    start = time.perf_counter()
    impl.reduce(x, iters)
    return impl.slowest((time.perf_counter() - start) / iters)


def _mpi4py_impl(name: str) -> Impl:
    """MPI_Allreduce straight on numpy buffers: the transport underneath, with nothing of Horovod or TensorFlow."""
    from hvdtrain import backend
    MPI = backend.mpi()
    comm = MPI.COMM_WORLD

    def reduce(x, iters):
        out = np.empty_like(x)
        for _ in range(iters):
            comm.Allreduce(x, out, op=MPI.SUM)
        return out
    return Impl(name, lambda a: a, reduce, lambda out: out, comm.Barrier,
                lambda v: comm.allreduce(v, op=MPI.MAX))


def _horovod_impl(controller: str, backend) -> Impl:
    """hvdtrain's configured Horovod path: collectives inside a tf.function, back to back, with no Python between
    them (each waits for the previous one), the way a training step issues them."""
    import tensorflow as tf
    loops: dict = {}

    def loop_for(name: str):
        @tf.function
        def loop(x, iters):
            def body(i, previous):
                with tf.control_dependencies([previous]):
                    return i + 1, backend.allreduce(x, "sum", name)
            return tf.while_loop(lambda i, _: i < iters, body, (tf.constant(0), tf.zeros_like(x)),
                                 parallel_iterations=1)[1]
        return loop

    def reduce(x, iters):
        key = int(x.shape[0])
        if key not in loops:   # one name per size: Horovod caches the negotiation of a name it has seen
            loops[key] = loop_for(f"hvdtrain.bench.allreduce.{key}")
        return loops[key](x, tf.constant(iters))
    return _tf_impl(f"hvdtrain-{controller}", reduce, backend)


def _horovod_eager_impl(controller: str, backend) -> Impl:
    """The same collective called eagerly from Python, one at a time: what a loop without tf.function pays."""
    def reduce(x, iters):
        for _ in range(iters):
            out = backend.allreduce(x, "sum", f"hvdtrain.bench.eager.{int(x.shape[0])}")
        return out
    return _tf_impl(f"hvdtrain-{controller}-eager", reduce, backend)


def _tf_impl(name: str, reduce, backend) -> Impl:
    import tensorflow as tf
    return Impl(name, tf.constant, reduce, lambda t: t.numpy(), backend.barrier,
                lambda v: max(backend.allgather_object(v, "hvdtrain.bench.slowest")))


def _merged(merge_from: str | None, n: int, rows: list[dict], run_info: dict, stack: dict | None) -> dict:
    """This launch's rows, plus the rows of other implementations from earlier launches in `merge_from`. The stack
    is the one a Horovod rank saw (the raw launch has no TensorFlow in it)."""
    from hvdtrain.bench import allreduce
    doc = harness.new_document("allreduce", n, {}, stack)
    if merge_from and os.path.exists(merge_from):
        old = harness.read_json(merge_from)
        if old.get("benchmark") == "allreduce" and old.get("np") == n:
            mine = {r["impl"] for r in rows}
            rows = [r for r in old["rows"] if r["impl"] not in mine] + rows
            doc["runs"] = [run for run in old.get("runs", []) if run["launch"] != run_info["launch"]]
            if stack is None and "stack" in old:
                doc["stack"] = old["stack"]
    doc["runs"].append(run_info)
    doc["settings"] = {run["launch"]: run["settings"] for run in doc["runs"]}
    doc["rows"] = rows
    doc["summary"] = allreduce.summarize(rows)
    return doc


def main(argv=None) -> int:
    return harness.worker_main(__doc__, add_arguments,
                               lambda args: measure(args, raw_only=args.raw_only, merge=args.merge), argv)


if __name__ == "__main__":
    sys.exit(main())
