"""Training throughput and weak scaling: hvdtrain on 1 and N ranks, against MultiWorkerMirroredStrategy.

    hvdtrain bench train --np 2 --output bench/train.json

Started without a launcher, it runs three measurements one after the other, each in fresh processes:
  single    one process, plain Keras (no Horovod), one intra-op thread: the 1-rank baseline T(1)
  hvdtrain  `horovodrun -np N --mpi`: hvdtrain's data pipeline, model, optimizer and tuned settings
  mwms      N TensorFlow workers on localhost (TF_CONFIG) under tf.distribute.MultiWorkerMirroredStrategy
Every rank gets the same per-rank batch (weak scaling) and --threads intra-op threads; efficiency is
T(N) / (N * T(1)) in samples/s. Models (synthetic data, 10 classes):
  mlp  1024-2048-2048-10 (6.3M parameters: communication-heavy)
  cnn  a small ResNet on 32x32x3 (compute-heavy)
Inside the hvdtrain run each rank also times (a) the same steps without the all-reduce, run on all ranks at
once, so comm_share = 1 - t_local / t_step is the share of step time spent communicating, and (b) its input
pipeline alone, so pipeline_ratio = what tf.data delivers / what training consumes.
"""
from __future__ import annotations

import json
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks import harness as report

HELP = "training throughput and weak-scaling efficiency: 1 vs N ranks, hvdtrain vs MultiWorkerMirroredStrategy"
COLUMNS = ["model", "impl", "np", "global_batch", "step_ms", "samples_per_sec", "efficiency", "comm_share",
           "pipeline_ratio"]


@dataclass(frozen=True)
class Workload:
    model: dict                 # ModelConfig fields
    input_shape: tuple
    per_rank_batch: int
    samples: int = 2048         # synthetic training set (per epoch); the stream repeats epochs
    notes: str = ""


WORKLOADS = {
    "mlp": Workload({"name": "mlp", "hidden": (2048, 2048)}, (1024,), 64, notes="1024-2048-2048-10, communication-heavy"),
    "cnn": Workload({"name": "resnet", "width": 16, "blocks": 1}, (32, 32, 3), 32, notes="small ResNet, compute-heavy"),
}


def add_arguments(p) -> None:
    p.add_argument("--output", default="bench/train.json", metavar="FILE.json", help="results (and FILE.png)")
    p.add_argument("--np", type=int, default=2, help="ranks of the distributed runs (default 2)")
    p.add_argument("--models", default="mlp,cnn", help=f"comma list of {', '.join(WORKLOADS)}")
    p.add_argument("--impls", default="single,hvdtrain,mwms", help="comma list of single, hvdtrain, mwms")
    p.add_argument("--steps", type=int, default=40, help="timed steps per model (default 40)")
    p.add_argument("--warmup", type=int, default=8, help="untimed steps first (tracing, allocation; default 8)")
    p.add_argument("--threads", type=int, default=1, help="TensorFlow intra-op threads per rank (default 1)")
    p.add_argument("--batch", type=int, default=0, help="per-rank batch for every model (0: each model's own)")
    p.add_argument("--controller", default="mpi", choices=("mpi", "gloo"), help="horovodrun controller (default mpi)")
    p.add_argument("--rounds", type=int, default=1, help="repeat all runs, keeping each one's best (default 1)")
    p.add_argument("--timeline", action="store_true",
                   help="record a Horovod timeline in the hvdtrain run and break its communication time down per step")
    p.add_argument("--role", choices=("single", "hvdtrain", "mwms"), help="internal: run one measurement here")
    p.add_argument("--part", help="internal: where a worker writes its rows")


def run(args) -> int:
    from hvdtrain import dist
    if args.role or dist.under_launcher():
        return _worker(args, args.role or "hvdtrain")
    return _drive(args)


# ---------------------------------------------------------------- driver

def _drive(args) -> int:
    with tempfile.TemporaryDirectory(prefix="hvdtrain-bench-train-") as parts:
        runs, rows = _run_all(args, Path(parts))
    doc = report.new_document("train", args.np, {r["impl"]: r["settings"] for r in runs})
    doc["runs"], doc["rows"] = runs, _best(rows)
    doc["summary"] = summarize(doc["rows"], args.np)
    report.write_json(args.output, doc)
    plot(doc, report.png_path(args.output))
    print(render(doc))
    print(f"[bench] wrote {args.output} and {report.png_path(args.output)}")
    return 0


def _run_all(args, parts: Path) -> tuple[list, list]:
    """Every implementation once per round, in turn; each launch writes its rows to a part file."""
    impls = [i.strip() for i in args.impls.split(",") if i.strip()]
    runs, rows = [], []
    for round_ in range(args.rounds):
        for impl in impls:
            print(f"[bench] train: {impl}{'' if impl == 'single' else f' on {args.np} ranks'} "
                  f"(round {round_ + 1}/{args.rounds}) ...", flush=True)
            part = parts / f"{impl}-{round_}.json"
            before = report.loadavg()
            _LAUNCH[impl](args, part)
            got = report.read_json(part)
            runs.append({"impl": impl, "round": round_, "loadavg_before": before, "loadavg_after": report.loadavg(),
                         "settings": got["settings"]})
            rows += got["rows"]
    return runs, rows


def _worker_args(args, role: str, part: Path) -> list[str]:
    return ["bench", "train", "--role", role, "--part", str(part), "--models", args.models, "--steps", str(args.steps),
            "--warmup", str(args.warmup), "--threads", str(args.threads), "--batch", str(args.batch),
            "--np", str(args.np), *args.overrides]


def _launch_single(args, part: Path) -> None:
    cmd = report.hvdtrain_cmd(*_worker_args(args, "single", part))
    report.check(subprocess.run(cmd, env=report.rank_env(), capture_output=True, text=True, timeout=1800), cmd)


def _launch_hvdtrain(args, part: Path) -> None:
    trace = part.with_suffix(".timeline.json")
    env = {"HOROVOD_TIMELINE": str(trace)} if args.timeline else {}
    report.horovodrun(args.np, args.controller, report.hvdtrain_cmd(*_worker_args(args, "hvdtrain", part)),
                      timeout=1800, env=env)
    if args.timeline:   # add the breakdown of the timed steps to the rows the ranks wrote
        from benchmarks import timeline
        doc = report.read_json(part)
        for row in doc["rows"]:
            row.update({f"timeline_{k}": v for k, v in
                        timeline.breakdown(trace, row["timed_window_epoch_us"], row["steps"]).items()})
        report.write_json(part, doc)


def _launch_mwms(args, part: Path) -> None:
    """N TensorFlow workers on localhost, told about each other through TF_CONFIG (the tf.distribute way)."""
    workers = [f"localhost:{_free_port()}" for _ in range(args.np)]
    procs = []
    for index in range(args.np):
        config = {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}
        cmd = report.hvdtrain_cmd(*_worker_args(args, "mwms", part if index == 0 else part.with_suffix(f".{index}")))
        procs.append((cmd, subprocess.Popen(cmd, env=report.rank_env({"TF_CONFIG": json.dumps(config)}),
                                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)))
    for cmd, proc in procs:
        out, _ = proc.communicate(timeout=1800)
        report.check(subprocess.CompletedProcess(cmd, proc.returncode, out, ""), cmd)


_LAUNCH = {"single": _launch_single, "hvdtrain": _launch_hvdtrain, "mwms": _launch_mwms}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _best(rows: list[dict]) -> list[dict]:
    """With several rounds, keep each (model, impl)'s fastest run (the least disturbed by other users)."""
    best: dict = {}
    for row in rows:
        key = (row["model"], row["impl"])
        if key not in best or row["samples_per_sec"] > best[key]["samples_per_sec"]:
            best[key] = row
    return list(best.values())


def summarize(rows: list[dict], n: int) -> dict:
    """Per model: weak-scaling efficiency T(n)/(n*T(1)) of each distributed impl, and hvdtrain / mwms."""
    out = {}
    for model in sorted({r["model"] for r in rows}):
        by_impl = {r["impl"]: r for r in rows if r["model"] == model}
        single = by_impl.get("single")
        for impl, row in by_impl.items():
            if single and impl != "single":
                row["efficiency"] = row["samples_per_sec"] / (row["np"] * single["samples_per_sec"])
        entry = {f"efficiency_{impl}": by_impl[impl].get("efficiency") for impl in ("hvdtrain", "mwms") if impl in by_impl}
        if "hvdtrain" in by_impl and "mwms" in by_impl:
            entry["hvdtrain_vs_mwms"] = by_impl["hvdtrain"]["samples_per_sec"] / by_impl["mwms"]["samples_per_sec"]
        if "hvdtrain" in by_impl:
            entry.update(comm_share=by_impl["hvdtrain"].get("comm_share"),
                         pipeline_ratio=by_impl["hvdtrain"].get("pipeline_ratio"))
        out[model] = entry
    return out


def plot(doc: dict, path) -> None:
    """Speed-up over one rank per model and implementation (ideal: np)."""
    rows = doc["rows"]
    single = {r["model"]: r["samples_per_sec"] for r in rows if r["impl"] == "single"}
    series = {}
    for impl in ("single", "hvdtrain", "mwms"):
        mine = [r for r in rows if r["impl"] == impl and r["model"] in single]
        if mine:
            series[impl if impl == "single" else f"{impl} ({mine[0]['np']} ranks)"] = (
                [r["model"] for r in mine], [r["samples_per_sec"] / single[r["model"]] for r in mine])
    report.plot(path, series, xlabel="model", ylabel="throughput / 1-rank throughput", bar=True,
                title=f"training throughput vs 1 rank (ideal {doc['np']}), {doc['machine']['cpus']} CPUs")


def render(doc: dict) -> str:
    rows = sorted(doc["rows"], key=lambda r: (r["model"], r["np"], r["impl"]))
    lines = [report.text_table(rows, COLUMNS), ""]
    for model, s in doc["summary"].items():
        parts = [f"{k} {v:.2f}" for k, v in s.items() if isinstance(v, float)]
        lines.append(f"{model}: {', '.join(parts)}")
    return "\n".join(lines)


# ---------------------------------------------------------------- worker: runs inside each rank

@dataclass
class StepTimer:
    """Time at the end of every batch; the steps after the warm-up are the timed ones."""
    warmup: int
    ends: list = field(default_factory=list)
    epoch_ends: list = field(default_factory=list)    # wall clock, to find the timed steps in a Horovod timeline

    def callback(self):
        import tensorflow as tf

        def mark(batch, logs):
            self.ends.append(time.perf_counter())
            self.epoch_ends.append(time.time())
        import keras
        return keras.callbacks.LambdaCallback(on_train_batch_end=mark)

    def step_seconds(self) -> float:
        timed = self.ends[self.warmup - 1:]
        return (timed[-1] - timed[0]) / (len(timed) - 1)

    def window_epoch_us(self) -> list[float]:
        return [self.epoch_ends[self.warmup - 1] * 1e6, self.epoch_ends[-1] * 1e6]


def _worker(args, role: str) -> int:
    from hvdtrain import dist, runtime
    from hvdtrain.config import load_config
    cfg = load_config(None, args.overrides)
    threads = dict(intra_op_threads=args.threads)
    if role == "mwms":
        session = _MwmsSession(args.threads)
    else:
        session = _HorovodSession(role, dist, cfg.runtime)
    runtime.configure(cfg.replace(runtime=threads).runtime, session.topo.local_size)
    rows = [_measure_model(args, cfg, name, WORKLOADS[name], session)
            for name in (m.strip() for m in args.models.split(",") if m.strip())]
    if session.topo.rank == 0:
        settings = {**dist.active_comm_settings(), "intra_op_threads": args.threads} if role == "hvdtrain" \
            else {"intra_op_threads": args.threads}
        doc = report.new_document("train", session.topo.size, settings)
        doc["rows"] = rows
        report.write_json(args.part or args.output, doc)
        if not args.part:  # run by hand under a launcher: print what this launch measured
            print(render({**doc, "summary": {}}), flush=True)
    return 0


class _HorovodSession:
    """single: plain Keras in one process; hvdtrain: Horovod started with hvdtrain's settings."""

    def __init__(self, role: str, dist, runtime_cfg):
        self.role, self.dist = role, dist
        from hvdtrain import world
        self.topo = world.start(runtime_cfg, configure=False) if role == "hvdtrain" else world.World()

    def scope(self):
        import contextlib
        return contextlib.nullcontext()

    def distribute(self, optimizer, optim_cfg):
        if self.role != "hvdtrain":
            return optimizer
        return self.dist.distributed_optimizer(optimizer, fp16_compression=optim_cfg.fp16_compression,
                                               backward_passes_per_step=optim_cfg.backward_passes_per_step,
                                               sparse_as_dense=optim_cfg.sparse_as_dense)

    def callbacks(self) -> list:
        from hvdtrain.callbacks import StartCheck
        return [StartCheck(self.topo)] if self.role == "hvdtrain" else []

    def slowest(self, value: float) -> float:
        return max(self.dist.allgather_object(value, "hvdtrain.bench.slowest")) if self.topo.size > 1 else value

    def barrier(self) -> None:
        if self.topo.size > 1:
            self.dist.barrier()

    def dataset(self, make):
        return make(self.topo)


class _MwmsSession:
    """tf.distribute.MultiWorkerMirroredStrategy: TensorFlow's own collective all-reduce across TF_CONFIG workers."""

    def __init__(self, threads: int):
        import tensorflow as tf
        from hvdtrain.world import World as Topology
        tf.config.threading.set_intra_op_parallelism_threads(threads)   # before the strategy starts the runtime
        self.strategy = tf.distribute.MultiWorkerMirroredStrategy()
        resolver = self.strategy.cluster_resolver
        self.topo = Topology(rank=resolver.task_id, size=self.strategy.num_replicas_in_sync)

    def scope(self):
        return self.strategy.scope()

    def distribute(self, optimizer, optim_cfg):
        return optimizer

    def callbacks(self) -> list:
        return []

    def slowest(self, value: float) -> float:
        return value

    def barrier(self) -> None:
        pass

    def dataset(self, make):
        """Each worker builds its own shard, batched per replica (what DatasetCreator asks for)."""
        import tensorflow as tf
        from hvdtrain.world import World as Topology
        return tf.keras.utils.experimental.DatasetCreator(
            lambda ctx: make(Topology(rank=ctx.input_pipeline_id, size=ctx.num_input_pipelines)))


def _measure_model(args, cfg, name: str, work: Workload, session) -> dict:
    import keras
    from hvdtrain import data, models, optim
    from hvdtrain.config import DataConfig, ModelConfig
    topo = session.topo
    per_rank = args.batch or work.per_rank_batch
    global_batch = per_rank * topo.size
    data_cfg = DataConfig(source="synthetic", input_shape=work.input_shape, synthetic_samples=max(work.samples, global_batch))
    steps_total = args.warmup + args.steps
    epochs = 2 + steps_total * global_batch // data_cfg.synthetic_samples
    source = data.open_source(data_cfg)
    steps = source.local_steps(topo, global_batch)
    make = lambda t: source.train_batches(t, global_batch, steps, 0, epochs)  # noqa: E731

    def compiled(distributed: bool):
        with session.scope():
            model = models.build_model(ModelConfig(**work.model), work.input_shape, data_cfg.num_classes)
            optimizer = optim.build_optimizer(cfg.optim, topo.size, 100, epochs)
            if distributed:
                optimizer = session.distribute(optimizer, cfg.optim)
            model.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                          jit_compile=False)
        return model

    def timed_fit(model, callbacks) -> StepTimer:
        timer = StepTimer(args.warmup)
        session.barrier()
        model.fit(session.dataset(make), epochs=1, steps_per_epoch=steps_total, verbose=0,
                  callbacks=[*callbacks, timer.callback()])
        return timer

    model = compiled(True)
    timer = timed_fit(model, session.callbacks())
    step = timer.step_seconds()
    row = {"model": name, "impl": args.role or "hvdtrain", "np": topo.size, "params": model.count_params(),
           "per_rank_batch": per_rank, "global_batch": global_batch, "steps": args.steps,
           "step_ms": step * 1e3, "samples_per_sec": global_batch / step, "loadavg": report.loadavg(),
           "timed_window_epoch_us": timer.window_epoch_us()}
    if isinstance(session, _HorovodSession):
        row.update(_extras(args, session, make, compiled, timed_fit, step, per_rank))
    return row


def _extras(args, session, make, compiled, timed_fit, step: float, per_rank: int) -> dict:
    """The same steps without communication (all ranks at once), and the input pipeline on its own."""
    out = {}
    if session.topo.size > 1:
        local = session.slowest(timed_fit(compiled(False), []).step_seconds())
        out.update(local_step_ms=local * 1e3, comm_share=max(0.0, 1.0 - local / step))
    pipeline = session.slowest(_pipeline_seconds(make(session.topo), args.warmup, args.steps))
    out["pipeline_samples_per_sec"] = per_rank / pipeline
    out["pipeline_ratio"] = out["pipeline_samples_per_sec"] / (per_rank / step)
    return out


def _pipeline_seconds(dataset, warmup: int, steps: int) -> float:
    """Seconds per batch that tf.data needs on its own."""
    it = iter(dataset)
    for _ in range(warmup):
        next(it)
    start = time.perf_counter()
    for _ in range(steps):
        next(it)
    return (time.perf_counter() - start) / steps
