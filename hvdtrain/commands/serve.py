"""Serve a trained model over HTTP with TensorFlow Serving's REST API, on Ray Serve: requests arriving together are
scored in one model call (dynamic batching), and replicas are added under load and removed when it falls.

Examples:
  hvdtrain serve runs/digits                                   # model.keras on http://127.0.0.1:8501, named digits
  curl -d '{"instances": [[0, 0, 0.3125, 0.8125, ... the 64 values of a digit, in [0, 1]]]}' \
      127.0.0.1:8501/v1/models/digits:predict
  hvdtrain serve runs/digits --serve.max_replicas=4 --serve.max_batch_size=64 --port 9000
  hvdtrain serve runs/digits/export/saved_model --name digits  # an export of `hvdtrain export`
  hvdtrain serve runs/digits-pipe --stages 2                   # a pipeline-trained run as 2 chained stages
  hvdtrain serve runs/digits --address 10.0.0.5:6379 --host 0.0.0.0   # on a running Ray cluster

Endpoints: POST /v1/models/NAME:predict ({"instances": [...]} -> {"predictions": [...]}, {"inputs": ...} ->
{"outputs": ...}), GET /v1/models/NAME (status), GET /v1/models/NAME/metadata (signature), GET /healthz (alive),
GET /readyz (a replica of every deployment answers), GET /stages (the parameters a replica of each deployment
holds). A bad request is answered 400 with {"error": "..."}.

Batching and autoscaling are the `serve` config section (`--serve.KEY=VALUE`, or a serve: section in the run's
config.yaml): max_batch_size, batch_wait_ms, min_replicas, max_replicas, target_ongoing_requests, upscale_delay_s,
downscale_delay_s, replica_cpus, max_request_instances. Without --address, Ray runs on this machine only and stops
with the server (Ctrl-C or SIGTERM). Needs the [serve] extra: pip install "hvdtrain[serve]". docs/serving.md has
the guide.
"""
from __future__ import annotations

import signal

from hvdtrain.commands.common import positive

HELP = "serve a trained model over HTTP (TensorFlow Serving's REST API) with batching and autoscaling, on Ray Serve"


def add_arguments(parser) -> None:
    parser.add_argument("model", metavar="MODEL", help="a run directory of `hvdtrain train` (its model.keras; with "
                                                       "--stages its checkpoint), a .keras file or a SavedModel directory")
    parser.add_argument("--name", help="the model's name in the URLs (default: the run directory's name)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0: every "
                                                            "interface)")
    parser.add_argument("--port", type=positive, default=8501, help="HTTP port (default 8501, TF Serving's)")
    parser.add_argument("--stages", type=positive, default=1, metavar="P",
                        help="serve a run trained with P pipeline stages as P chained deployments, each replica "
                             "holding one stage's weights (default 1: the whole model)")
    parser.add_argument("--address", metavar="HOST:PORT", help="join this running Ray cluster instead of starting one "
                                                                "on this machine (hvdtrain must be installed on its nodes)")


def run(args, overrides) -> int:
    import time

    from hvdtrain.log import get_logger
    from hvdtrain.serve import settings_for
    from hvdtrain.serve.server import Server, watch

    log = get_logger(0)
    settings = settings_for(args.model, _config(args.model, overrides).serve, args.stages, args.name)
    server = Server(settings, args.host, args.port, args.address, log)
    started = time.monotonic()
    _stop_on_signals()
    try:
        log.info(f"starting {settings.source.describe()} as {settings.name!r} on {server.url} ...")
        server.start()
        log.info(_serving(server, time.monotonic() - started))
        log.info("a replica holds " + ", ".join(f"{stage['held_parameters']:,} parameters ({stage['deployment']})"
                                                for stage in server.stages()))
        watch(server, log)
    except KeyboardInterrupt:
        log.info("stopping ...")
    finally:
        _ignore_signals()
        left = server.stop()
    if left:
        log.warning(f"stopped, but Ray left processes running: {', '.join(map(str, left))}; stop them with kill")
    else:
        log.info("stopped" + (": no Ray process of this server is left" if server.started_ray else ""))
    return 0


def _serving(server, seconds: float) -> str:
    s, cfg = server.settings, server.settings.serve
    return (f"serving {server.url}/v1/models/{s.name}:predict (started in {seconds:.0f} s): "
            f"{' -> '.join(s.deployments)}, {cfg.min_replicas}..{cfg.max_replicas} replicas of {cfg.replica_cpus:g} "
            f"CPU each, batches of up to {cfg.max_batch_size} requests ({cfg.batch_wait_ms:g} ms wait); Ctrl-C stops")


def _config(model: str, overrides):
    """The run's config (its serve: section, if any) with the overrides; defaults for a model file alone."""
    from pathlib import Path

    from hvdtrain import config
    run_config = Path(model) / "config.yaml"
    return config.load_config(run_config if run_config.is_file() else None, overrides)


def _stop_on_signals() -> None:
    """Ctrl-C and SIGTERM stop the server, once: a second signal must not cut the shutdown short (and Ray's own
    SIGTERM handler would exit without stopping Serve first)."""
    def interrupt(signum, frame):
        _ignore_signals()
        raise KeyboardInterrupt
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, interrupt)


def _ignore_signals() -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
