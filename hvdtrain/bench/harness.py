"""What every benchmark shares: facts about the machine and the stack, shared arguments, running ranks and checking
them, keeping the best round, JSON files, tables and plots.

A benchmark file is one JSON document:
    {"benchmark": "allreduce" | "train" | "predict" | "stacks" | "tuning", "created": ISO time, "np": ranks,
     "machine": machine(), "versions": versions(), "stack": {name, tensorflow, keras, integration, source},
     "settings": {...}, "runs": [{"loadavg_before": ..., ...}], "rows": [{...}, ...], "summary": {...}}
Rows are flat dicts of scalars, so any of them can be printed as a table without knowing the benchmark. Summaries
hold measured numbers and ratios only; the goals they are read against are stated in the report's prose.

Drivers (the `hvdtrain bench ...` commands) never import TensorFlow or Horovod: they start ranks as subprocesses,
`python -m hvdtrain.bench.<x>_worker ...` under horovodrun, and read back the file rank 0 wrote.
"""
from __future__ import annotations

import argparse
import datetime
import functools
import importlib.metadata
import json
import os
import platform
import socket
import subprocess
import sys
from pathlib import Path

BIN = Path(sys.executable).parent
PACKAGES = ("tensorflow-cpu", "tensorflow", "keras", "horovod", "mpi4py", "numpy", "matplotlib")
TIMEOUT = 1800   # seconds for one launch of ranks


# ---------------------------------------------------------------- facts

def loadavg() -> list[float]:
    """1, 5 and 15 minute load averages: the machine is shared, so every measurement records how busy it was."""
    return [round(x, 2) for x in os.getloadavg()]


def machine() -> dict:
    return {"hostname": socket.gethostname(), "cpu": _cpu_model(), "cpus": os.cpu_count(),
            "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "platform": platform.platform(), "loadavg": loadavg()}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


@functools.lru_cache(maxsize=1)
def versions() -> dict:
    """Package versions from their metadata (no imports, so a driver does not start TensorFlow or MPI)."""
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    out["mpi"] = _first_line(["mpirun", "--version"])
    return out


def _first_line(cmd: list[str]) -> str:
    try:
        text = subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "unavailable"
    return text.strip().splitlines()[0] if text.strip() else "unavailable"


def keras_major(versions_: dict) -> int:
    """Keras's major version from package versions (0 if unknown)."""
    from hvdtrain.runtime import major
    return major(versions_.get("keras", "?"))


def stack_of(versions_: dict) -> dict:
    """The stack named by package versions (what a driver knows without importing TensorFlow)."""
    from hvdtrain.runtime import KERAS_LAYERS
    tf = versions_.get("tensorflow-cpu") or versions_.get("tensorflow", "?")
    keras = versions_.get("keras", "?")
    name = "tf2.21" if keras_major(versions_) >= 3 else "tf2.15"
    return {"name": name, "tensorflow": tf, "keras": keras, "integration": KERAS_LAYERS[name], "source": "package metadata"}


def rank_stack() -> dict:
    """The stack as a rank runs it: TensorFlow and Keras as imported, and the Horovod Keras layer hvdtrain chose."""
    import keras
    import tensorflow as tf

    from hvdtrain import backend, runtime
    return {"name": runtime.stack(), "tensorflow": tf.__version__, "keras": keras.__version__,
            "integration": backend.integration(), "source": "rank"}


def new_document(benchmark: str, np_: int, settings: dict, stack: dict | None = None) -> dict:
    return {"benchmark": benchmark, "created": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "np": np_, "machine": machine(), "versions": versions(), "stack": stack or stack_of(versions()),
            "settings": settings, "runs": [], "rows": []}


# ---------------------------------------------------------------- arguments

def add_common(p, name: str, *, np_: bool = True, rounds: int = 0, threads: bool = False,
               controller: bool = False) -> None:
    """The flags benchmarks share: --output (a plot goes next to it), and where asked --np, --rounds, --threads,
    --controller."""
    p.add_argument("--output", default=f"bench/{name}.json", metavar="FILE.json",
                   help="results (a plot is written next to it as FILE.png)")
    if np_:
        p.add_argument("--np", type=int, default=2, help="ranks of the distributed runs (default 2)")
    if rounds:
        p.add_argument("--rounds", type=int, default=rounds,
                       help=f"repeat all runs, taking turns; each keeps its best round (default {rounds})")
    if threads:
        p.add_argument("--threads", type=int, default=1, help="TensorFlow intra-op threads per rank (default 1)")
    if controller:
        p.add_argument("--controller", default="mpi", choices=("mpi", "gloo"), help="horovodrun controller (default mpi)")


def forward(args, names) -> list[str]:
    """The command-line flags that give a worker the same values: forward(args, ["steps"]) -> ["--steps", "40"]."""
    out = []
    for name in names:
        value, flag = getattr(args, name), "--" + name.replace("_", "-")
        out += ([flag] if value else []) if isinstance(value, bool) else [flag, str(value)]
    return out


def worker_main(doc: str, add_arguments, run, argv=None) -> int:
    """The entry point of a rank-side worker module (`python -m hvdtrain.bench.<x>_worker ...`): its arguments plus
    config overrides, TensorFlow imported quietly, and a UserError printed once (by rank 0 when all ranks agree)."""
    from hvdtrain.backend import rank_hint
    from hvdtrain.errors import UserError
    from hvdtrain.runtime import import_tensorflow
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args, rest = parser.parse_known_args(argv)
    args.overrides = [a for a in rest if a.startswith("--") and "=" in a and "." in a.split("=", 1)[0]]
    unknown = [a for a in rest if a not in args.overrides]
    if unknown:
        parser.error(f"unrecognised arguments: {' '.join(unknown)}")
    import_tensorflow()
    try:
        return run(args)
    except UserError as exc:
        if rank_hint() == 0 or not exc.agreed:
            print(f"benchmark worker: error: {exc}", file=sys.stderr, flush=True)
        return exc.exit_code


# ---------------------------------------------------------------- running ranks

def rank_env(extra: dict | None = None) -> dict:
    """The environment for benchmark subprocesses: the virtualenv first on PATH, OpenMPI allowed as root."""
    env = dict(os.environ)
    env["PATH"] = f"{BIN}:{env.get('PATH', '')}"
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env.setdefault("PYTHONUNBUFFERED", "1")
    if os.geteuid() == 0:  # OpenMPI refuses root unless told (containers, CI)
        env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    env.update(extra or {})
    return env


def hvdtrain_cmd(*args: str, bin_dir: Path = BIN) -> list[str]:
    """The `hvdtrain` command of a virtualenv (this one unless told)."""
    return [str(Path(bin_dir) / "hvdtrain"), *map(str, args)]


def worker_cmd(module: str, *args: str) -> list[str]:
    """A rank-side worker of this package, run by this virtualenv's Python: hvdtrain.bench.<module>."""
    return [str(BIN / "python"), "-m", f"hvdtrain.bench.{module}", *map(str, args)]


def run_checked(cmd: list[str], env: dict | None = None, timeout: float = TIMEOUT) -> str:
    """Run a command to its end; fail loudly, with the tail of its output, if it failed. Returns its stdout."""
    proc = subprocess.run(cmd, env=rank_env(env), capture_output=True, text=True, timeout=timeout)
    check(proc, cmd)
    return proc.stdout


def horovodrun(np_: int, controller: str, command: list[str], env: dict | None = None) -> str:
    """`horovodrun -np N --mpi|--gloo command`, checked (see run_checked)."""
    return run_checked([str(BIN / "horovodrun"), "-np", str(np_), f"--{controller}", *command], env)


def check(proc: subprocess.CompletedProcess, cmd) -> None:
    from hvdtrain.errors import UserError
    if proc.returncode != 0:
        tail = "\n".join(((proc.stdout or "") + (proc.stderr or "")).strip().splitlines()[-30:])
        raise UserError(f"benchmark step failed (exit {proc.returncode}): {' '.join(map(str, cmd))}\n{tail}")


# ---------------------------------------------------------------- rounds

def best_by(rows: list[dict], keys, score, *, higher: bool = True) -> list[dict]:
    """One row per distinct value of the `keys` columns, the one with the best `score` (a column name or a function
    of the row); first-seen order. Rounds take turns on a shared machine: the best round is the least disturbed."""
    value = score if callable(score) else (lambda row: row[score])
    best: dict = {}
    for row in rows:
        key = tuple(row.get(k) for k in keys)
        if key not in best or (value(row) > value(best[key]) if higher else value(row) < value(best[key])):
            best[key] = row
    return list(best.values())


# ---------------------------------------------------------------- files

def write_json(path, doc: dict) -> Path:
    """Write atomically (a reader never sees half a file); creates the parent directory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(doc, indent=1, sort_keys=False) + "\n")
    os.replace(tmp, path)
    return path


def read_json(path) -> dict:
    return json.loads(Path(path).read_text())


def png_path(json_path) -> Path:
    """The plot that goes with a JSON file: same name, .png."""
    return Path(json_path).with_suffix(".png")


def finish(path, doc: dict, plot, render) -> int:
    """The end of every driver: the JSON file, its plot next to it, the table on screen."""
    write_json(path, doc)
    plot(doc, png_path(path))
    print(render(doc))
    print(f"[bench] wrote {path} and {png_path(path)}", flush=True)
    return 0


def plot(path, series: dict, *, xlabel: str, ylabel: str, title: str, logx: bool = False,
         bar: bool = False, reference: float | None = None) -> Path:
    """One line (or one bar group) per series: {label: ([x...], [y...])}; `reference` draws a dashed level.
    Agg backend: no display needed."""
    from hvdtrain.errors import require
    matplotlib = require("matplotlib", "bench", "the benchmark plots")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=110)
    if bar:
        _bars(ax, series)
    else:
        for label, (xs, ys) in series.items():
            ax.plot(xs, ys, marker="o", markersize=3, label=label)
    if reference is not None:
        ax.axhline(reference, color="grey", linestyle="--", linewidth=1)
    if logx:
        ax.set_xscale("log", base=2)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(True, alpha=0.3)
    if series:
        ax.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def _bars(ax, series: dict) -> None:
    groups = list(dict.fromkeys(x for xs, _ in series.values() for x in xs))
    width = 0.8 / max(1, len(series))
    for i, (label, (xs, ys)) in enumerate(series.items()):
        where = dict(zip(xs, ys))
        positions = [g + i * width for g in range(len(groups))]
        ax.bar(positions, [where.get(g, 0) for g in groups], width, label=label)
    ax.set_xticks([g + width * (len(series) - 1) / 2 for g in range(len(groups))], [str(g) for g in groups])


# ---------------------------------------------------------------- numbers and tables

def algbw_gbps(size_bytes: int, seconds: float) -> float:
    """nccl-tests algorithm bandwidth S/t in GB/s (1e9 bytes)."""
    return size_bytes / seconds / 1e9


def busbw_gbps(size_bytes: int, seconds: float, n: int) -> float:
    """nccl-tests bus bandwidth of an all-reduce: algbw * 2(n-1)/n, comparable across rank counts."""
    return algbw_gbps(size_bytes, seconds) * 2 * (n - 1) / n


def human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:g} {unit}" if unit == "B" else f"{n:.0f} {unit}"
        n /= 1024
    return str(n)


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:,.3g}" if abs(value) < 100 else f"{value:,.0f}"
    return "" if value is None else str(value)


def text_table(rows: list[dict], columns: list[str]) -> str:
    """Aligned plain-text table for the terminal."""
    cells = [[_cell(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    out = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    out += ["| " + " | ".join(_cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(out)


def scalar_columns(rows: list[dict]) -> list[str]:
    """The columns of a generic table: every key whose values are scalars, in first-seen order."""
    seen: dict[str, None] = {}
    for row in rows:
        for key, value in row.items():
            if not isinstance(value, (dict, list)):
                seen.setdefault(key, None)
    return list(seen)
