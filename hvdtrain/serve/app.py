"""The Ray Serve application: an HTTP ingress speaking TensorFlow Serving's REST API, in front of the model's
deployment (or of P chained stage deployments), whose replicas batch concurrent requests into one model call and are
added and removed by Ray Serve's autoscaler.

  HTTP -> Ray's proxy -> Ingress (parses, checks, answers 400s; no TensorFlow) -> Model, or Stage1 -> ... -> StageP

Every answer to a predict request carries two headers counted where it happened: `x-hvdtrain-batch`, how many
requests the model call that scored it held (one number per stage), and `x-hvdtrain-replica`, which replica scored
it. A request that meets a replica that died (its process killed) is sent again until a replica answers, for up to
REPLACEMENT_WAIT_S: Ray starts a replacement meanwhile.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import json
import time

import numpy as np
import ray
from ray import serve
from starlette.requests import Request
from starlette.responses import Response

from hvdtrain.errors import first_line
from hvdtrain.serve import Settings, protocol
from hvdtrain.serve.model import Source

REPLACEMENT_WAIT_S = 120.0   # a replacement replica loads TensorFlow and the model: ~10-20 s on a busy machine
READY_TIMEOUT_S = 2.0


@serve.deployment
class Scorer:
    """A replica of the model or of one stage: batches of concurrent requests scored in one model call."""

    def __init__(self, source: dict, threads: int, max_batch_size: int, batch_wait_s: float):
        from hvdtrain.serve.model import load
        self.served = load(Source(**source), threads)
        self.score.set_max_batch_size(max_batch_size)
        self.score.set_batch_wait_timeout_s(batch_wait_s)
        self.replica = serve.get_replica_context().replica_id.unique_id
        # TensorFlow runs in one thread of its own, so requests keep arriving (and the next batch fills) meanwhile.
        self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=1)

    def signature(self) -> dict:
        return self.served.signature.to_dict()

    def ready(self) -> bool:
        return True

    def describe(self) -> dict:
        return {"replica": self.replica, "held_parameters": self.served.held_parameters}

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)   # replaced in __init__ by the settings
    async def score(self, batches: list[np.ndarray]) -> list[tuple]:
        sizes = [len(b) for b in batches]
        joined = batches[0] if len(batches) == 1 else np.concatenate(batches)
        outputs = await asyncio.get_running_loop().run_in_executor(self.executor, self.served, joined)
        return [(part, len(batches), self.replica) for part in np.split(np.asarray(outputs), np.cumsum(sizes)[:-1])]


@serve.deployment
class Ingress:
    """TensorFlow Serving's REST API, /healthz (the server answers), /readyz (every deployment has a replica that
    answers within READY_TIMEOUT_S) and /stages (each deployment: a replica's id and the parameters it holds)."""

    def __init__(self, name: str, deployments: list, scorers: list, max_request_instances: int):
        self.name, self.deployments, self.scorers, self.limit = name, deployments, scorers, max_request_instances
        self.signature: protocol.Signature | None = None

    async def __call__(self, request: Request) -> Response:
        path = request.url.path
        if path == "/healthz":
            return _json({"status": "alive"})
        if path == "/readyz":
            return await self._ready()
        if path == "/stages":
            return _json({"stages": [{"deployment": name, **await _again_if_lost(scorer.describe.remote)}
                                     for name, scorer in zip(self.deployments, self.scorers)]})
        try:
            endpoint = protocol.endpoint(request.method, path, self.name)
            if endpoint.kind == "status":
                return _json(protocol.status_body())
            if endpoint.kind == "metadata":
                return _json(protocol.metadata_body(self.name, await self._signature()))
            batch = protocol.parse_predict(await request.body(), await self._signature(), self.limit)
            outputs, batched, replicas = await self._through_stages(batch.examples)
        except protocol.BadRequest as exc:
            return _json(protocol.error_body(str(exc)), exc.status)
        except Exception as exc:   # the model failed on checked input: the server's fault, said in one line
            return _json(protocol.error_body(f"scoring failed: {first_line(exc)}"), 500)
        return _json(protocol.predict_body(outputs, batch.columnar),
                     headers={"x-hvdtrain-batch": ",".join(map(str, batched)),
                              "x-hvdtrain-replica": ",".join(replicas)})

    async def _signature(self) -> protocol.Signature:
        if self.signature is None:
            first = await _again_if_lost(self.scorers[0].signature.remote)
            last = await _again_if_lost(self.scorers[-1].signature.remote)
            self.signature = protocol.Signature(protocol.Signature.from_dict(first).input,
                                                protocol.Signature.from_dict(last).output)
        return self.signature

    async def _through_stages(self, x: np.ndarray):
        batched, replicas = [], []
        for scorer in self.scorers:
            x, n, replica = await _again_if_lost(lambda s=scorer, x=x: s.score.remote(x))
            batched.append(n)
            replicas.append(replica)
        return x, batched, replicas

    async def _ready(self) -> Response:
        try:
            await asyncio.wait_for(asyncio.gather(*(s.ready.remote() for s in self.scorers)), READY_TIMEOUT_S)
        except asyncio.TimeoutError:
            return _json({"status": "not ready", "error": f"no replica answered within {READY_TIMEOUT_S:g} s"}, 503)
        except ray.exceptions.RayError as exc:
            return _json({"status": "not ready", "error": first_line(exc)}, 503)
        return _json({"status": "ready"})


async def _again_if_lost(call):
    """`await call()`, made again while the replica it reached has died (until REPLACEMENT_WAIT_S)."""
    deadline = time.monotonic() + REPLACEMENT_WAIT_S
    while True:
        try:
            return await call()
        except ray.exceptions.RayActorError:   # its process died (ActorDiedError), or is unreachable for now
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


def _json(body: dict, status: int = 200, headers: dict | None = None) -> Response:
    return Response(json.dumps(body), status_code=status, media_type="application/json", headers=headers)


def application(settings: Settings):
    """The bound application: the ingress holding a handle to each of the model's deployments."""
    cfg = settings.serve
    autoscaling = {"min_replicas": cfg.min_replicas, "initial_replicas": cfg.min_replicas,
                   "max_replicas": cfg.max_replicas, "target_ongoing_requests": cfg.target_ongoing_requests,
                   "upscale_delay_s": cfg.upscale_delay_s, "downscale_delay_s": cfg.downscale_delay_s,
                   # The load is averaged over 2 s (Ray's default: 30 s) of reports every 0.5 s (default 10 s), so
                   # the delays above are what the user waits.
                   "look_back_period_s": 2.0, "metrics_interval_s": 0.5}
    threads = max(1, round(cfg.replica_cpus))
    scorers = [Scorer.options(name=name, autoscaling_config=autoscaling, ray_actor_options={"num_cpus": cfg.replica_cpus},
                              # room for one batch being scored and the next one filling
                              max_ongoing_requests=max(2 * cfg.max_batch_size, 4),
                              health_check_period_s=1.0, health_check_timeout_s=30.0,
                              # a model that does not load will not load the next time either: say so at once
                              max_constructor_retry_count=1)
               .bind(settings.source.for_stage(s).to_dict(), threads, cfg.max_batch_size, cfg.batch_wait_ms / 1e3)
               for s, name in enumerate(settings.deployments)]
    # The ingress only parses JSON: no core of its own, and many requests in flight (they wait on the model).
    return Ingress.options(name="Ingress", ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000) \
        .bind(settings.name, settings.deployments, scorers, cfg.max_request_instances)
