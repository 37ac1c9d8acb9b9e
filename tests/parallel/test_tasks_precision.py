"""Under horovodrun -np 2: the three tasks end to end (train on 2 ranks, then `hvdtrain evaluate` and `predict` on 2
ranks equal to one process), a user's model by import path, and mixed precision: bfloat16 keeps the replicas
bit-identical; float16 loss scaling skips the same steps on every rank when only one rank's gradients overflow.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, horovodrun, output, printed, run_commands

PRECISION = str(REPO / "tests/parallel/workers/precision_worker.py")
FIXTURES = str(REPO / "tests" / "fixtures")      # user_models.py: a user's own model package
PYTHONPATH = os.pathsep.join(filter(None, [FIXTURES, os.environ.get("PYTHONPATH")]))   # keep a tree put first
TIMEOUT = 1500
USER_MODELS = ("env", f"PYTHONPATH={PYTHONPATH}")   # every rank can import the user's model package


def score_jobs(index: int, spec: str, out: Path) -> list[dict]:
    """`hvdtrain evaluate` and `predict` of one run (RUN_DIR[=FIELDS]): out/eval-<index>.json, out/pred-<index>.npy."""
    run, _, fields = spec.partition("=")
    return [{"name": f"eval-{index}", "argv": ["evaluate", "--run", run, "--batch-size", "50", "--report",
                                               str(out / f"eval-{index}.json")]},
            {"name": f"pred-{index}", "argv": ["predict", "--run", run, "--batch-size", "50", "--output",
                                               str(out / f"pred-{index}.npy"), *(["--fields", fields] if fields else [])]}]


def regression_npz(path: Path, n: int, seed: int) -> None:
    """Two real targets from a fixed linear teacher plus a little noise."""
    teacher = np.random.default_rng(7).standard_normal((8, 2)).astype(np.float32)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 8)).astype(np.float32)
    np.savez(path, x=x, y=(x @ teacher + 0.05 * rng.standard_normal((n, 2))).astype(np.float32))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A regression run (user model by import path, .npz data) and a multilabel run (synthetic), both on 2 ranks."""
    root = tmp_path_factory.mktemp("tasks")
    regression_npz(root / "train.npz", 640, 0)
    regression_npz(root / "test.npz", 150, 1)
    common = ["--trainer.tensorboard=false", "--optim.name=adam", "--optim.lr=0.01", "--trainer.global_batch_size=32"]
    runs = {
        "regression": ["--data.source=npz", f"--data.path={root / 'train.npz'}", f"--data.test_path={root / 'test.npz'}",
                       "--data.task=regression", "--data.num_classes=2", "--model.name=user_models:tiny_regressor",
                       "--model.options={units: 24}", "--trainer.epochs=15"],
        "multilabel": ["--data.source=synthetic", "--data.input_shape=[12]", "--data.task=multilabel",
                       "--data.num_classes=5", "--data.synthetic_samples=1024", "--model.hidden=[32]",
                       "--trainer.epochs=6"],
    }
    # Both trainings, then evaluate and predict on 2 ranks, in one launch; then the same scoring in one process.
    specs = [str(root / "regression"), f"{root / 'multilabel'}=labels,probs"]
    trains = [{"name": name, "argv": ["train", *args, *common, f"--trainer.run_dir={root / name}"]}
              for name, args in runs.items()]
    scored, jobs = {}, {}
    for ranks in (1, 2):
        scored[ranks] = root / f"scored-{ranks}"
        scored[ranks].mkdir()
        jobs[ranks] = [job for i, spec in enumerate(specs) for job in score_jobs(i, spec, scored[ranks])]
    results = {2: run_commands(2, [*trains, *jobs[2]], root, timeout=TIMEOUT, prefix=USER_MODELS),
               1: run_commands(1, jobs[1], scored[1], timeout=TIMEOUT, prefix=USER_MODELS)}
    for ranks, per_rank in results.items():
        for rank in per_rank:
            assert {name: r["code"] for name, r in rank.items()} == {name: 0 for name in rank}, \
                {name: r["stderr"][-2000:] for name, r in rank.items() if r["code"]}
    texts = {name: printed(results[2], name) for name in runs}
    return root, texts, scored


def summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def test_regression_with_a_user_model_by_import_path_trains_on_two_ranks(trained):
    root, texts, _ = trained
    s = summary(root / "regression")
    assert s["status"] == "completed" and s["num_ranks"] == 2 and s["test_examples"] == 150
    # predicting zero would give an MAE of about 2; the teacher is linear, the noise 0.05
    assert s["test_mae"] < 0.25, s
    assert "test mae " in texts["regression"] and "accuracy" not in texts["regression"].split("epoch 15/15")[1]
    meta = json.loads(next((root / "regression" / "checkpoints").glob("ckpt-*/meta.json")).read_text())
    assert meta["signature"]["model"] == "user_models:tiny_regressor"
    assert [24] in [shape for _, shape in meta["signature"]["weights"]]       # model.options reached the builder


@pytest.mark.parametrize("index, kind", [(0, "regression"), (1, "multilabel")])
def test_evaluate_on_two_ranks_equals_one_process_and_the_training_summary(trained, index, kind):
    root, _, scored = trained
    one, two = (json.loads((scored[r] / f"eval-{index}.json").read_text()) for r in (1, 2))
    assert one["ranks"] == 1 and two["ranks"] == 2 and one["examples"] == two["examples"]
    headline = "mae" if kind == "regression" else "accuracy"
    assert two[headline] == pytest.approx(one[headline], rel=1e-6) and two["loss"] == pytest.approx(one["loss"], rel=1e-6)
    assert two[headline] == pytest.approx(summary(root / kind)[f"test_{headline}"], rel=1e-6)
    if kind == "multilabel":
        assert one["examples"] == 256 and one["accuracy"] > 0.85      # 5 labels, chance about 0.5 each
        assert "correct" not in one and "top5_accuracy" not in one


def test_predict_on_two_ranks_equals_one_process(trained):
    root, _, scored = trained
    regression = [np.load(scored[r] / "pred-0.npy") for r in (1, 2)]
    assert regression[0].shape == (150, 2) and regression[0].dtype == np.float32
    assert np.array_equal(regression[0], regression[1])   # bit for bit: the ranks score one process's batches
    y = np.load(root / "test.npz")["y"]
    assert np.abs(regression[1] - y).mean() == pytest.approx(summary(root / "regression")["test_mae"], rel=1e-5)
    multilabel = [np.load(scored[r] / "pred-1.npy") for r in (1, 2)]
    assert multilabel[0].dtype.names == ("labels", "probs") and multilabel[0].shape == (256,)
    assert multilabel[0]["labels"].shape == (256, 5) and multilabel[0]["labels"].dtype == np.int64
    assert np.array_equal(multilabel[0]["labels"], multilabel[1]["labels"])
    assert np.array_equal(multilabel[0]["probs"], multilabel[1]["probs"])
    assert np.array_equal(multilabel[1]["labels"], (multilabel[1]["probs"] > 0.5).astype(np.int64))


def read_ranks(out: Path) -> tuple[list[dict], list[list[np.ndarray]]]:
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    weights = []
    for r in range(2):
        with np.load(out / f"weights-rank{r}.npz") as w:
            weights.append([w[k] for k in sorted(w.files, key=lambda k: int(k.split("_")[1]))])
    return ranks, weights


def huge_label_npz(path: Path) -> None:
    """A linear regression set in which one example (index 17) has a label of 1e6."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((256, 8)).astype(np.float32)
    y = (x @ rng.standard_normal((8, 1))).astype(np.float32)
    y[17] = 1e6
    np.savez(path, x=x, y=y)


@pytest.fixture(scope="module")
def precision_runs(tmp_path_factory):
    """The bfloat16 and float16 runs of the two tests below, one after another in one launch (gloo)."""
    root = tmp_path_factory.mktemp("precision")
    huge_label_npz(root / "huge.npz")
    common = ["--trainer.epochs=3", "--optim.name=adam", "--trainer.tensorboard=false"]
    jobs = {"bfloat16": ["--runtime.precision=mixed_bfloat16", "--model.name=cnn", "--model.width=8",
                         "--optim.lr=0.003"],
            "float16": ["--runtime.precision=mixed_float16", "--data.source=npz", f"--data.path={root / 'huge.npz'}",
                        "--data.task=regression", "--data.num_classes=1", "--model.hidden=[16]",
                        "--trainer.global_batch_size=32", "--optim.lr=0.01"]}
    spec = {}
    for name, overrides in jobs.items():
        (root / name).mkdir()
        spec[str(root / name)] = [*overrides, *common, f"--trainer.run_dir={root / name / 'run'}"]
    (root / "jobs.json").write_text(json.dumps(spec))
    proc = horovodrun(2, ["python", PRECISION, str(root / "jobs.json")], "gloo", timeout=TIMEOUT)
    assert proc.returncode == 0, output(proc)[-4000:]
    return root


@pytest.mark.stacks
def test_bfloat16_trains_on_two_ranks_with_bit_identical_replicas(precision_runs):
    ranks, weights = read_ranks(precision_runs / "bfloat16")
    for r in ranks:
        assert r["compute_dtypes"] == ["bfloat16"] and r["variable_dtypes"] == ["float32"]
        assert r["scaler"] == {}                       # bfloat16 has float32's range: no loss scaling
        assert r["summary"]["global_step"] == r["summary"]["optimizer_steps"] == 3 * (1437 // 64)
    for a, b in zip(*weights):
        assert a.dtype == b.dtype == np.float32 and np.array_equal(a, b), "replicas diverged"
    assert ranks[0]["summary"]["weights_sha256"] == ranks[1]["summary"]["weights_sha256"]
    assert ranks[0]["summary"]["test_accuracy"] >= 0.9, ranks[0]["summary"]
    losses = [h["loss"] for h in ranks[0]["history"]]
    assert losses[-1] < losses[0] / 2


@pytest.mark.stacks
def test_float16_loss_scaling_skips_the_same_steps_on_every_rank(precision_runs):
    """One training example has a label of 1e6: on the rank whose batch holds it, the scaled gradient overflows
    float16 (the loss itself stays finite in float32), on the other rank it does not. The loss scaler's 'finite?'
    is agreed over the ranks, so both skip that step and halve their scale; a local decision would leave one rank
    in the gradient all-reduce and the other not (a hang) and the replicas would diverge."""
    ranks, weights = read_ranks(precision_runs / "float16")
    huge = [set(r["huge_steps"]) for r in ranks]
    assert not huge[0] & huge[1] and len(huge[0] | huge[1]) == 3, "the example is in one rank's batch, once per epoch"
    total = 3 * (256 // 32)
    # Every skipped step halves the scale (it only grows after 2,000 good steps): 2**15 / scale = 2**skipped.
    skipped = [int(np.log2(32768.0 / r["scaler"]["scale"])) for r in ranks]
    for r in ranks:
        assert r["compute_dtypes"] == ["float16"] and r["summary"]["global_step"] == total
        assert r["scaler"]["class"].startswith("LossScaleOptimizer")
        assert 32768.0 / r["scaler"]["scale"] == 2 ** skipped[0]
        if r["keras"] >= 3:   # Keras 3 counts only the steps applied (Keras 2 counts skipped ones too)
            assert r["summary"]["optimizer_steps"] == r["scaler"]["applied_steps"] == total - skipped[0]
    assert skipped[0] == skipped[1] >= 3, skipped          # at least the three overflowing steps, on both ranks
    assert ranks[0]["scaler"]["scale"] == ranks[1]["scaler"]["scale"]
    for a, b in zip(*weights):
        assert np.array_equal(a, b), "replicas diverged"
    assert all(np.isfinite(w).all() for w in weights[0])
