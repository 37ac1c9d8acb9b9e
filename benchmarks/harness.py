"""What every `hvdtrain bench` command shares: machine and version facts, JSON files, tables, plots, launching ranks.

A benchmark file is one JSON document:
    {"benchmark": "allreduce" | "train" | "predict", "created": ISO time, "np": ranks,
     "machine": machine(), "versions": versions(), "settings": {...}, "runs": [{"loadavg": ..., ...}],
     "rows": [{...}, ...], "summary": {...}}
Rows are flat dicts of scalars, so any of them can be printed as a table without knowing the benchmark.
Nothing here imports TensorFlow or Horovod: drivers stay light and start their ranks as subprocesses.
"""
from __future__ import annotations

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


def new_document(benchmark: str, np_: int, settings: dict) -> dict:
    return {"benchmark": benchmark, "created": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "np": np_, "machine": machine(), "versions": versions(), "settings": settings, "runs": [], "rows": []}


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


def plot(path, series: dict, *, xlabel: str, ylabel: str, title: str, logx: bool = False,
         bar: bool = False) -> Path:
    """One line (or one bar group) per series: {label: ([x...], [y...])}. Agg backend: no display needed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=110)
    if bar:
        _bars(ax, series)
    else:
        for label, (xs, ys) in series.items():
            ax.plot(xs, ys, marker="o", markersize=3, label=label)
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
    groups = sorted({x for xs, _ in series.values() for x in xs}, key=str)
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


# ---------------------------------------------------------------- launching ranks

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


def hvdtrain_cmd(*args: str) -> list[str]:
    return [str(BIN / "hvdtrain"), *args]


def horovodrun(np_: int, controller: str, command: list[str], timeout: float, env: dict | None = None) -> None:
    """Run `horovodrun -np N --mpi|--gloo command` and fail loudly (with its output) if a rank fails."""
    cmd = [str(BIN / "horovodrun"), "-np", str(np_), f"--{controller}", *command]
    check(subprocess.run(cmd, env=rank_env(env), capture_output=True, text=True, timeout=timeout), cmd)


def check(proc: subprocess.CompletedProcess, cmd) -> None:
    from hvdtrain.errors import UserError
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-30:])
        raise UserError(f"benchmark step failed (exit {proc.returncode}): {' '.join(map(str, cmd))}\n{tail}")
