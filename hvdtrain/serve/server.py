"""The driver of `hvdtrain serve`: checks the port, starts Ray (a cluster of this machine alone, or joins a running
one at --address) and Ray Serve's HTTP proxy on host:port, deploys the application, reports replica counts as the
autoscaler changes them, and shuts everything down again: on a cluster it started, no Ray process is left behind.
"""
from __future__ import annotations

import errno
import logging
import math
import os
import re
import signal
import socket
import sys
import time
from dataclasses import replace

from hvdtrain.errors import UserError, first_line, require
from hvdtrain.serve import Settings

# Replicas and handles report their load every 0.5 s (Ray's default: 10 s), so the autoscaler sees a change within
# its look-back period; set in the environment that the cluster's processes inherit.
METRICS_PUSH = {"RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5",
                "RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5"}


def check_port(host: str, port: int) -> None:
    """A clear error now rather than an HTTP proxy that Ray restarts forever."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as exc:
        raise UserError(f"--host {host}: {exc.strerror}; pass an address of this machine, e.g. 127.0.0.1 or 0.0.0.0") from None
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # as the HTTP server will
        try:
            s.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise UserError(f"port {port} on {host} is in use (another server?); choose another with --port, "
                                "or stop the one using it") from None
            raise UserError(f"cannot listen on {host}:{port} ({exc.strerror}); choose another --host or --port") from None


def max_replicas(settings: Settings, cpus: float) -> int:
    """serve.max_replicas, or 0's meaning: as many as the cores hold, cores / (stages x replica_cpus), at least
    min_replicas."""
    cfg = settings.serve
    if cfg.max_replicas:
        return cfg.max_replicas
    fit = math.floor(cpus / (settings.source.stages * cfg.replica_cpus) + 1e-9)
    return max(cfg.min_replicas, fit)


class Server:
    """One `hvdtrain serve`: start(), then replicas() as often as wanted, then stop() (also after a failed start)."""

    def __init__(self, settings: Settings, host: str, port: int, address: str | None, log: logging.Logger):
        self.settings, self.host, self.port, self.address, self.log = settings, host, port, address, log
        self.started_ray = False

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> None:
        check_port(self.host, self.port)
        os.environ["RAY_ENABLE_AUTO_CONNECT"] = "0"   # no Ray call may start a cluster of its own (read at import)
        ray = require("ray", "serve", "hvdtrain serve")
        from ray import serve

        from hvdtrain.serve.app import application
        self._start_ray(ray)
        cores = (os.cpu_count() or 1) if self.started_ray else ray.cluster_resources().get("CPU", 0.0)
        cfg = replace(self.settings.serve, max_replicas=max_replicas(self.settings, cores))
        self.settings = replace(self.settings, serve=cfg)
        if cfg.max_replicas * self.settings.source.stages * cfg.replica_cpus > cores + 1e-9:
            self.log.warning(f"serve.max_replicas={cfg.max_replicas} x {cfg.replica_cpus:g} CPU "
                             f"x {self.settings.source.stages} stage(s) is more than the {cores:g} cores" +
                             (": replicas will share them" if self.started_ray else
                              " of the cluster: replicas that do not fit wait for room"))
        serve.start(http_options={"host": self.host, "port": self.port}, logging_config={"log_level": "WARNING"})
        try:
            serve.run(application(self.settings), name=self.settings.name, route_prefix="/",
                      logging_config={"log_level": "WARNING"})
        except RuntimeError as exc:   # a replica could not start: its own error, in one line
            raise UserError(f"the model's replicas could not start: {self._replica_error(exc)}") from None

    def _start_ray(self, ray) -> None:
        # Ray's own lines stay in its logs (/tmp/ray/session_latest/logs); errors pass.
        logging.getLogger("ray.serve").setLevel(logging.ERROR)
        logging.getLogger("ray._private.authentication").setLevel(logging.ERROR)   # "token auth is on": as it should be
        # ray.init sets a SIGTERM handler of its own: this process's handlers are put back after it.
        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            self._join(ray) if self.address else self._start_local(ray)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _join(self, ray) -> None:
        try:
            ray.init(address=self.address, logging_level=logging.WARNING, log_to_driver=False)
        except (ConnectionError, ValueError, RuntimeError) as exc:
            auth = "" if os.environ.get("RAY_AUTH_MODE") else \
                "; a cluster with token authentication (`ray start`'s default) also needs RAY_AUTH_MODE=token here"
            raise UserError(f"cannot join the Ray cluster at --address {self.address} ({first_line(exc)}); "
                            f"start it with `ray start --head` or check the address{auth}") from None

    def _start_local(self, ray) -> None:
        """A Ray cluster of this machine alone, with its cores (more if serve.max_replicas asks for more)."""
        os.environ.update({k: v for k, v in METRICS_PUSH.items() if k not in os.environ})
        asked = self.settings.serve.max_replicas * self.settings.source.stages * self.settings.serve.replica_cpus
        # The cluster's processes inherit SIGINT ignored, so a Ctrl-C reaches this process only, which then stops
        # Serve and Ray in order (a terminal sends Ctrl-C to the whole process group, Ray's processes included).
        # A Ctrl-C during these seconds is lost; SIGTERM is not.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        ray.init(num_cpus=max(os.cpu_count() or 1, math.ceil(asked)), include_dashboard=False,
                 logging_level=logging.WARNING, log_to_driver=False)
        self.started_ray = True

    def replicas(self) -> dict[str, int]:
        """Running replicas of each of the model's deployments (0 for one not deployed)."""
        from ray import serve
        app = serve.status().applications.get(self.settings.name)
        deployments = app.deployments if app else {}
        return {name: deployments[name].replica_states.get("RUNNING", 0) if name in deployments else 0
                for name in self.settings.deployments}

    def stop(self) -> list[int]:
        """Delete the application and leave Ray (stopping it if this server started it); returns the processes the
        cluster this server started still has 15 s later (none, unless Ray failed to stop them)."""
        ray = sys.modules.get("ray")
        if ray is None or not ray.is_initialized():
            return []
        from ray import serve
        ours = descendants(os.getpid()) if self.started_ray else set()
        try:   # the replicas finish the requests they hold; the rest of Serve goes with Ray (or stays on a cluster)
            serve.delete(self.settings.name)
        except serve.exceptions.RayServeException:
            pass   # Serve never started
        finally:
            ray.shutdown()
        deadline = time.monotonic() + 15
        while (left := sorted(pid for pid in ours if _alive(pid))) and time.monotonic() < deadline:
            time.sleep(0.2)
        return left

    def _replica_error(self, exc: RuntimeError) -> str:
        """The replica's own UserError line, from the deployments' status (which carries its traceback)."""
        from ray import serve
        app = serve.status().applications.get(self.settings.name)
        texts = [str(exc)] + ([d.message for d in app.deployments.values()] if app else [])
        found = re.findall(r"UserError: (.+)", "\n".join(texts))
        return found[-1].strip() if found else first_line(exc)

    def stages(self) -> list[dict]:
        """GET /stages of this server: per deployment, a replica's id and the parameters it holds (asked over HTTP:
        a Serve handle in this process would outlive Ray's shutdown)."""
        import json
        import urllib.request
        host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(self.host, self.host)
        with urllib.request.urlopen(f"http://{host}:{self.port}/stages", timeout=60) as answer:
            return json.loads(answer.read())["stages"]


def descendants(pid: int) -> set[int]:
    """Every process below `pid` (Linux /proc): Ray's processes, their workers and the replicas among them."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parent = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue   # gone meanwhile
            children.setdefault(parent, []).append(int(entry))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"   # a zombie has ended; its parent reaps it
    except OSError:
        return False


def watch(server: Server, log: logging.Logger, period_s: float = 1.0) -> None:
    """Log every change in the replica counts until interrupted (KeyboardInterrupt)."""
    shown: dict = {}
    while True:
        now = server.replicas()
        for name, count in now.items():
            if shown.get(name) != count:
                was = f" (was {shown[name]})" if name in shown else ""
                log.info(f"{name}: {count} replica{'s' if count != 1 else ''} running{was}")
        shown = now
        time.sleep(period_s)
