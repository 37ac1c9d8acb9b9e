"""Shared by the predict/evaluate tests: one tiny trained run per test session, and input files of chosen sizes."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from conftest import REPO, hvdtrain, output

SHAPE = (8, 8, 1)   # the digits run's input shape


def trained_run(tmp_path_factory) -> Path:
    """A digits MLP trained for one epoch; trained once per session (test modules share the directory)."""
    run = tmp_path_factory.getbasetemp() / "predict-run"
    if not (run / "summary.json").is_file():
        proc = hvdtrain(["train", "--config", str(REPO / "configs/digits.yaml"), f"--trainer.run_dir={run}",
                         "--trainer.epochs=1", "--model.hidden=[32]", "--trainer.tensorboard=false"])
        assert proc.returncode == 0, output(proc)
    return run


def inputs(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, *SHAPE), dtype=np.float32)


def tfrecord_order(n: int, files: int) -> list[int]:
    """data.write_tfrecords deals examples round robin; input order is file by file, record by record."""
    return [i for f in range(files) for i in range(f, n, files)]
