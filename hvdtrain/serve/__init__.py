"""`hvdtrain serve`: a trained model over HTTP with TensorFlow Serving's REST API, on Ray Serve (the `[serve]` extra).

  protocol  the REST API as plain functions: endpoints, a predict request read and checked, the answers' bodies
  model     what a replica serves (the whole model, or one pipeline stage with only its weights) and loading it
  app       the Ray Serve application: the ingress and the batching, autoscaled model (or stage) deployments
  server    the driver: the port, Ray (local, or a cluster), deployment, replica counts, a clean shutdown

Only `app` and `server` import Ray, and only once the command runs: `hvdtrain --help` stays fast without it.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from hvdtrain.config import ServeConfig
from hvdtrain.serve.model import Source, find


@dataclass(frozen=True)
class Settings:
    """What the application is made of: the command line and the `serve` config section (its max_replicas 0 until
    the server knows the cluster's cores: server.max_replicas)."""
    name: str
    source: Source
    serve: ServeConfig

    @property
    def deployments(self) -> list[str]:
        """The model's deployments, in the order a request passes them."""
        stages = self.source.stages
        return ["Model"] if stages == 1 else [f"Stage{s + 1}" for s in range(stages)]


def settings_for(model: str, serve_cfg: ServeConfig, stages: int = 1, name: str | None = None) -> Settings:
    """Settings for serving MODEL (see model.find) with a config's `serve` section; the name defaults to the run
    directory's (the one holding the model file, for a file inside a run)."""
    return Settings(name or default_name(model), find(model, stages), serve_cfg)


def default_name(model: str) -> str:
    """The run directory's name: MODEL itself, or the nearest directory above it holding a config.yaml; else the
    file's own stem."""
    path = Path(model).resolve()
    for folder in (path, *path.parents):
        if (folder / "config.yaml").is_file():
            return folder.name
    return path.stem
