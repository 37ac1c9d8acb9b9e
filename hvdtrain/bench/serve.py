"""Online serving under rising load: `hvdtrain serve`'s server on this machine, a bounded load generator on
loopback, dynamic batching on against off, replicas over time.

    hvdtrain bench serve --output bench/serve.json

Needs a model: --run RUN_DIR, or else it trains a throw-away digits run first (configs/digits.yaml, 2 epochs, one
process: the weights do not matter for speed). For each batching setting (on: serve.max_batch_size=32,
serve.batch_wait_ms=5; off: serve.max_batch_size=1) a server is started in this process (the library behind
`hvdtrain serve`) with autoscaling between 1 replica and as many as the cores hold (one CPU each), adding one after
the load has stayed above serve.target_ongoing_requests (2) for 2 s and removing one after it has stayed below for
10 s. The load is closed-loop clients on loopback, each sending one digit (a single-instance predict request),
waiting for the answer and sending the next, at each of --clients in turn; a phase ends after --requests answers or
--phase-s seconds, whichever comes first. Then the clients stop and the server is watched for up to --idle-s seconds
while the autoscaler removes replicas. Per phase: answers/s, p50/p99 latency, errors, the replicas running (Ray
Serve's status, sampled every 0.5 s) and the requests the model call that scored each answer held (its
x-hvdtrain-batch header, counted in the replica). The settings take turns over --rounds rounds (the one going first
alternating); each phase keeps its best round, the replicas-over-time trace is the last round's. The clients run in
this process, on the same cores as the replicas: the numbers are the machine's, not the server's alone.
"""
from __future__ import annotations

import http.client
import json
import os
import socket
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from hvdtrain.bench import harness

HELP = "online serving: throughput, p50/p99 latency and replicas over time at rising load, batching on vs off"
COLUMNS = ["batching", "clients", "answers", "seconds", "answers_per_sec", "p50_ms", "p99_ms", "errors",
           "mean_batch", "replicas_max", "replicas_end"]
# Where the CPU goes, per answer: the processes of this machine's Ray cluster by their title, and this process (the
# clients and the driver).
PARTS = {"proxy": "ray::ProxyActor", "ingress": ":Ingress", "model": ":Model", "clients": None}
CPU_COLUMNS = ["batching", "clients", *(f"cpu_{part}_ms" for part in PARTS), "cpu_rest_ms", "cpu_total_ms"]
SETTINGS = {"on": ["--serve.max_batch_size=32", "--serve.batch_wait_ms=5"], "off": ["--serve.max_batch_size=1"]}
AUTOSCALING = ["--serve.upscale_delay_s=2", "--serve.downscale_delay_s=10", "--serve.replica_cpus=1"]
REPO = Path(__file__).resolve().parents[2]


def add_arguments(p) -> None:
    harness.add_common(p, "serve", np_=False, rounds=2)
    p.add_argument("--run", metavar="RUN_DIR", help="serve this run's model.keras (default: a throw-away digits run)")
    p.add_argument("--clients", default="1,2,4,8,16", help="concurrent clients of each phase, comma-separated")
    p.add_argument("--requests", type=int, default=2000, help="a phase ends after this many answers (default 2000)")
    p.add_argument("--phase-s", type=float, default=15.0, help="... or after this many seconds (default 15)")
    p.add_argument("--idle-s", type=float, default=40.0,
                   help="after the load, watch the scale-down for at most this long (default 40)")


def run(args) -> int:
    with tempfile.TemporaryDirectory(prefix="hvdtrain-bench-serve-") as work:
        run_dir = args.run or _tiny_run(Path(work) / "digits")
        x = _digits()
        rows, runs, timelines = [], [], {}
        for round_ in range(args.rounds):
            order = list(SETTINGS) if round_ % 2 == 0 else list(SETTINGS)[::-1]
            for batching in order:
                print(f"[bench] serve: batching {batching}, round {round_ + 1}/{args.rounds} ...", flush=True)
                before = harness.loadavg()
                got, timeline = _measure(args, run_dir, batching, x)
                rows += got
                timelines[batching] = timeline
                runs.append({"batching": batching, "round": round_, "loadavg_before": before,
                             "loadavg_after": harness.loadavg()})
    doc = harness.new_document("serve", 1, {"batching": SETTINGS, "autoscaling": AUTOSCALING, "requests": args.requests,
                                            "phase_s": args.phase_s, "idle_s": args.idle_s,
                                            "run": str(args.run or "digits, 2 epochs")})
    doc["runs"] = runs
    doc["rows"] = harness.best_by(rows, ("batching", "clients"), "answers_per_sec")
    doc["timeline"] = timelines
    doc["summary"] = summarize(doc["rows"], timelines)
    return harness.finish(args.output, doc, plot, render)


def _tiny_run(run_dir: Path) -> str:
    print("[bench] serve: training a throw-away digits run (2 epochs) ...", flush=True)
    harness.run_checked(harness.hvdtrain_cmd("train", "--config", REPO / "configs/digits.yaml",
                                             f"--trainer.run_dir={run_dir}", "--trainer.epochs=2",
                                             "--trainer.progress=none", "--trainer.tensorboard=false"))
    return str(run_dir)


def _digits() -> np.ndarray:
    """The 1,797 digits as the model reads them ([0, 1]), each flat: 64 values."""
    from hvdtrain.data import digits
    return digits.load()[0].reshape(-1, 64) / 16.0


def _measure(args, run_dir: str, batching: str, x: np.ndarray) -> tuple[list[dict], list[dict]]:
    """One server: every phase of load, then the idle watch. (rows, the replicas-over-time samples)."""
    from hvdtrain import config
    from hvdtrain.log import get_logger
    from hvdtrain.serve import settings_for
    from hvdtrain.serve.server import Server
    cfg = config.load_config(None, [*AUTOSCALING, *SETTINGS[batching], *args.overrides])
    server = Server(settings_for(run_dir, cfg.serve), "127.0.0.1", _free_port(), None, get_logger(0))
    try:
        server.start()
        watch = Watch(server)
        rows = []
        for clients in (int(c) for c in args.clients.split(",") if c):
            watch.clients = clients
            before = cpu_seconds()
            answers, seconds = _phase(server.port, server.settings.name, x, clients, args.requests, args.phase_s)
            cpu = {part: used - before.get(part, 0.0) for part, used in cpu_seconds().items()}
            rows.append(_row(batching, clients, answers, seconds, watch.since(seconds), cpu))
        watch.clients = 0
        deadline = time.monotonic() + args.idle_s
        while time.monotonic() < deadline and watch.replicas() > server.settings.serve.min_replicas:
            time.sleep(0.5)
        return rows, watch.stop()
    finally:
        server.stop()


class Watch:
    """Running replicas of the model, sampled every 0.5 s from Ray Serve's status, with the clients at the time."""

    def __init__(self, server):
        self.server, self.clients, self.samples = server, 0, []
        self.started, self._stop = time.monotonic(), threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.samples.append({"t": round(time.monotonic() - self.started, 2), "clients": self.clients,
                                 "replicas": sum(self.server.replicas().values())})
            self._stop.wait(0.5)

    def replicas(self) -> int:
        return self.samples[-1]["replicas"] if self.samples else 0

    def since(self, seconds: float) -> list[int]:
        """The replica counts sampled in the last `seconds`."""
        now = time.monotonic() - self.started
        return [s["replicas"] for s in self.samples if s["t"] >= now - seconds] or [self.replicas()]

    def stop(self) -> list[dict]:
        self._stop.set()
        self._thread.join()
        return self.samples


def _phase(port: int, name: str, x: np.ndarray, clients: int, requests: int, seconds: float):
    """Closed-loop clients until `requests` answers or `seconds`: [(latency s, status, batch)], the phase's length."""
    answers, lock = [], threading.Lock()
    issued = iter(range(requests))
    started = time.monotonic()
    deadline = started + seconds

    def client(k: int) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        path = f"/v1/models/{name}:predict"
        while time.monotonic() < deadline:
            with lock:
                i = next(issued, None)
            if i is None:
                return
            body = json.dumps({"instances": [x[(i * 7 + k) % len(x)].tolist()]})
            sent = time.perf_counter()
            connection.request("POST", path, body, {"Content-Type": "application/json"})
            answer = connection.getresponse()
            answer.read()
            batch = answer.getheader("x-hvdtrain-batch")
            with lock:
                answers.append((time.perf_counter() - sent, answer.status, int(batch) if batch else None))
    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    return answers, time.monotonic() - started


def cpu_seconds() -> dict[str, float]:
    """CPU seconds (user + system) used so far by each part: Ray's processes below this one, by their title, and
    this process itself. A replica that ended during a phase takes its seconds with it."""
    from hvdtrain.serve.server import descendants
    tick, used = os.sysconf("SC_CLK_TCK"), {}
    for pid in [os.getpid(), *descendants(os.getpid())]:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                title = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue   # ended meanwhile
        part = "clients" if pid == os.getpid() else \
            next((p for p, mark in PARTS.items() if mark and mark in title), "rest")
        used[part] = used.get(part, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return used


def _row(batching: str, clients: int, answers: list, seconds: float, replicas: list[int], cpu: dict) -> dict:
    ok = [a for a in answers if a[1] == 200]
    latency = np.array([a[0] for a in ok]) * 1e3
    per_answer = {f"cpu_{part}_ms": 1e3 * cpu.get(part, 0.0) / max(1, len(ok)) for part in (*PARTS, "rest")}
    return {"batching": batching, "clients": clients, "answers": len(ok), "seconds": seconds,
            "answers_per_sec": len(ok) / seconds, "p50_ms": float(np.percentile(latency, 50)) if ok else None,
            "p99_ms": float(np.percentile(latency, 99)) if ok else None, "errors": len(answers) - len(ok),
            "mean_batch": float(np.mean([a[2] for a in ok])) if ok else None,
            "replicas_max": max(replicas), "replicas_end": replicas[-1], **per_answer,
            "cpu_total_ms": sum(per_answer.values()), "loadavg": harness.loadavg()[0]}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def summarize(rows: list[dict], timelines: dict) -> dict:
    """Batching on / off answers/s at each load; per setting the replicas' path: 1 at the start, the peak under load,
    and where the idle watch ended (with the seconds from the load's end to the last removal)."""
    by = {(r["batching"], r["clients"]): r for r in rows}
    out = {f"on_vs_off_answers_per_sec_{c}_clients": by[("on", c)]["answers_per_sec"] / by[("off", c)]["answers_per_sec"]
           for b, c in by if b == "on" and ("off", c) in by and by[("off", c)]["answers_per_sec"]}
    for batching, samples in timelines.items():
        loaded = [s for s in samples if s["clients"]]
        idle = [s for s in samples if not s["clients"] and s["t"] > (loaded[-1]["t"] if loaded else 0)]
        out[f"{batching}_replicas_start"] = samples[0]["replicas"] if samples else None
        out[f"{batching}_replicas_peak"] = max((s["replicas"] for s in loaded), default=None)
        out[f"{batching}_replicas_after_idle"] = samples[-1]["replicas"] if samples else None
        removed = [s["t"] for prev, s in zip(idle, idle[1:]) if s["replicas"] < prev["replicas"]]
        out[f"{batching}_scale_down_s_after_load"] = removed[-1] - loaded[-1]["t"] if removed and loaded else None
    return out


def plot(doc: dict, path) -> None:
    from hvdtrain.errors import require
    matplotlib = require("matplotlib", "bench", "the benchmark plots")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    fig, (rate, latency, scale) = plt.subplots(1, 3, figsize=(15, 4.5), dpi=110)
    for color, batching in zip(("C0", "C1"), SETTINGS):
        rows = sorted((r for r in doc["rows"] if r["batching"] == batching), key=lambda r: r["clients"])
        clients = [r["clients"] for r in rows]
        rate.plot(clients, [r["answers_per_sec"] for r in rows], marker="o", color=color, label=f"batching {batching}")
        latency.plot(clients, [r["p50_ms"] for r in rows], marker="o", color=color, label=f"p50, batching {batching}")
        latency.plot(clients, [r["p99_ms"] for r in rows], marker="x", linestyle="--", color=color,
                     label=f"p99, batching {batching}")
        samples = doc["timeline"].get(batching, [])
        scale.step([s["t"] for s in samples], [s["replicas"] for s in samples], where="post", color=color,
                   label=f"replicas, batching {batching}")
    samples = next(iter(doc["timeline"].values()), [])
    load = scale.twinx()
    load.step([s["t"] for s in samples], [s["clients"] for s in samples], where="post", color="grey", alpha=0.4)
    load.set_ylabel("clients (grey)")
    peak = max((s["replicas"] for t in doc["timeline"].values() for s in t), default=1)
    scale.set_ylim(0, peak + 0.5)
    scale.yaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    for ax, xlabel, ylabel, title in ((rate, "clients", "answers/s", "throughput"),
                                      (latency, "clients", "latency (ms)", "latency"),
                                      (scale, "seconds since the first request", "running replicas",
                                       "replicas over time (autoscaler)")):
        ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, loc="upper left")
    rate.set_xscale("log", base=2)
    latency.set_xscale("log", base=2)
    fig.suptitle(f"hvdtrain serve, digits MLP, {doc['machine']['cpus']} CPUs (clients on the same cores)")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def render(doc: dict) -> str:
    lines = [harness.text_table(doc["rows"], COLUMNS), "", harness.text_table(doc["rows"], CPU_COLUMNS), ""]
    for key, value in doc["summary"].items():
        lines.append(f"{key}: {value:.3g}" if isinstance(value, float) else f"{key}: {value}")
    return "\n".join(lines)
