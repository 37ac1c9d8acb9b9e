"""Tensor parallelism for real, under horovodrun --mpi: each split layer against the unsplit layer (Megatron's test,
2 ranks); `hvdtrain train --parallel.tensor_parallel=2` against data-parallel training of the same model, seed and
global batches with SGD + momentum and Adam (2 ranks: T = 2 against D = 2; 4 ranks: D = 2 x T = 2 and P = 2 x T = 2
against D = 4, in one launch each); the digits transformer to the config's accuracy with model.keras a plain Keras
model scoring the same; a stop mid-epoch resumed bit for bit; evaluate and predict of a tensor-parallel run; bad
layouts and plans refused with one line, exit 2, nothing created; a killed rank of a tensor group ending the job."""
import json
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import BIN, REPO, env, horovodrun, output, printed, run_commands, start_horovodrun, wait_for

pytestmark = pytest.mark.keras3   # tensor parallelism needs the Keras 3 stack

WORKER = str(REPO / "tests/parallel/workers/tensor_layers_worker.py")
CONFIG = str(REPO / "configs/digits-transformer.yaml")


def test_each_split_layer_computes_the_unsplit_layer_megatrons_way(tmp_path):
    proc = horovodrun(2, ["python", WORKER, str(tmp_path)], "mpi")
    assert proc.returncode == 0, output(proc)[-5000:]
    for rank in range(2):
        cases = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert set(cases) == {"column+row", "heads (self-attention)", "heads (cross-attention)", "vocab"}
        for name, c in cases.items():
            assert c["kept_slices"], (name, rank)   # every rank's slice of the one whole layer
            errors = [c["output"], *c["inputs"], *(w["error"] for w in c["weights"].values())]
            assert max(errors) <= 1e-6, (name, rank, c)
            # g after: one all-reduce of the output (batch x tokens x width) forward; f before: one all-reduce of
            # each distinct input's gradient backward (self-attention's query, key and value read one tensor; the
            # embedding's integer ids have none)
            inputs = {"column+row": 1, "heads (self-attention)": 1, "heads (cross-attention)": 2, "vocab": 0}
            assert len(c["input_bytes"]) == inputs[name]
            assert c["tensor_bytes"] == c["output_bytes"] + sum(c["input_bytes"]) == \
                4 * (4 * 6 * 16 + {"column+row": 4 * 6 * 16, "heads (self-attention)": 4 * 6 * 16,
                                   "heads (cross-attention)": 4 * 6 * 16 + 4 * 8 * 16, "vocab": 0}[name]), (name, c)
        # what each rank holds of the split layers: half of every split weight, the row/output biases whole
        mlp, attention = cases["column+row"], cases["heads (self-attention)"]
        assert mlp["weights"]["column/kernel"]["axis"] == 1 and mlp["weights"]["row/kernel"]["axis"] == 0
        assert mlp["weights"]["row/bias"]["axis"] is None and mlp["split_parameters"] == (16 * 64 + 64) // 2 + \
            64 * 16 // 2 + 16
        assert attention["weights"]["attention/query/kernel"]["axis"] == 1
        assert attention["weights"]["attention/attention_output/kernel"]["axis"] == 0
        assert cases["vocab"]["weights"]["embedding/embeddings"]["axis"] == 0
        assert cases["vocab"]["split_parameters"] == cases["vocab"]["whole_parameters"] // 2


def train_job(name: str, run, *args, epochs: int = 1) -> dict:
    return {"name": name, "argv": ["train", "--config", CONFIG, f"--trainer.run_dir={run}", f"--trainer.epochs={epochs}",
                                   "--trainer.progress=epoch", *args]}


# The exactness runs: one encoder block, 11 steps of 128 (what is compared is the arithmetic, not the accuracy)
SHORT = ["--model.blocks=1", "--trainer.global_batch_size=128"]
SGD = ["--optim.name=sgd", "--optim.lr=0.01", "--optim.momentum=0.9"]
T2 = ["--parallel.tensor_parallel=2"]

BAD = {   # case: (arguments, the one line); the plan's other refusals: tests/unit/test_tensor_plan.py
    "tensor_parallel above the ranks": (["--parallel.tensor_parallel=3"],
                                               "parallel.tensor_parallel=3: a tensor group of 3 ranks needs at "
                                               "least 3 ranks; 2 are running"),
    "unknown layer": (T2 + ["--parallel.tensor_plan={block1_atention: heads}"],
                      "parallel.tensor_plan: model 'transformer' has no layer 'block1_atention' (did you mean "
                      "'block1_attention'?)"),
    "column without its row": (T2 + ["--parallel.tensor_plan={block1_mlp1: column}"],
                               "parallel.tensor_plan: column layer 'block1_mlp1' has no row partner (its partner "
                               "'block1_mlp2' is not planned as row)"),
    "heads not divided": (T2 + ["--model.heads=1", "--parallel.tensor_plan={block1_attention: heads}"],
                          "parallel.tensor_plan: layer 'block1_attention' has 1 heads, which "
                          "parallel.tensor_parallel=2 does not divide"),
    "mixed precision": (T2 + ["--runtime.precision=mixed_float16"],
                        "parallel.tensor_parallel=2 trains in float32 only (runtime.precision=mixed_float16)"),
    "local SGD": (T2 + ["--trainer.sync=local_sgd"],
                  "trainer.sync=local_sgd averages whole models, not tensor-parallel slices"),
}


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """One launch of 2 ranks (MPI) running every 2-rank command; (per-rank results, the directory)."""
    out = tmp_path_factory.mktemp("tensor-2")
    (out / "stopped").mkdir()
    (out / "stopped" / "STOP").touch()   # seen at the first agreement step (10) by both ranks
    jobs = [train_job("tensor, SGD", out / "tp-sgd", *SHORT, *T2, *SGD),
            train_job("data, SGD", out / "dp-sgd", *SHORT, *SGD),
            train_job("tensor, Adam", out / "tp-adam", *SHORT, *T2), train_job("data, Adam", out / "dp-adam", *SHORT),
            train_job("stopped", out / "stopped", *SHORT, *T2), train_job("resumed", out / "stopped", *SHORT, *T2),
            train_job("30 epochs", out / "accuracy", *T2, epochs=30)]
    jobs += [{"name": f"evaluate{' T=2' if split else ''}",
              "argv": ["evaluate", "--run", str(out / "accuracy"), "--report", str(out / f"evaluate{len(split)}.json"),
                       *split]} for split in ([], T2)]
    jobs += [{"name": f"predict{' T=2' if split else ''}",
              "argv": ["predict", "--run", str(out / "accuracy"), "--output", str(out / f"predict{len(split)}.csv"),
                       "--batch-size", "100", *split]} for split in ([], T2)]
    jobs += [train_job(case, out / "bad" / case.replace(" ", "-"), *args) for case, (args, _) in BAD.items()]
    jobs += [train_job("resume without the split", out / "tp-adam", *SHORT)]
    return run_commands(2, jobs, out, "mpi", timeout=1500), out


def summary(run) -> dict:
    return json.loads((run / "summary.json").read_text())


def weights(run) -> dict:
    import keras
    model = keras.saving.load_model(run / "model.keras")
    return {w.path: w.numpy() for w in model.weights}


def metrics(run) -> list[dict]:
    import csv
    return list(csv.DictReader((run / "metrics.csv").open()))


NO_GRADIENT = "attention/key/bias"   # a bias added to every key's score, which softmax ignores


def assert_trains_as(split_run, reference, steps: int) -> None:
    """The same whole model and the same logged losses, within 1e-5 relative: each weight within 1e-5 of the model's
    largest, the losses of their own. (Each key projection's bias gets no gradient at all, so its values are float
    rounding noise, which Adam's normalised steps grow to its learning rate: two runs hold two draws of that noise.
    Left out.)"""
    ours, theirs = weights(split_run), weights(reference)
    assert list(ours) == list(theirs) and sum(NO_GRADIENT in name for name in ours) == 1
    largest = max(np.max(np.abs(w)) for w in theirs.values())
    for name, expected in theirs.items():
        if NO_GRADIENT not in name:
            assert np.max(np.abs(ours[name] - expected)) <= 1e-5 * largest, name
    assert any(not np.array_equal(ours[n], theirs[n]) for n in ours)   # two trainings, not one file twice
    for mine, expected in zip(metrics(split_run), metrics(reference)):
        for key in ("loss", "val_loss", "accuracy", "val_accuracy"):
            assert abs(float(mine[key]) - float(expected[key])) <= 1e-5 * abs(float(expected[key])), key
    assert summary(split_run)["optimizer_steps"] == summary(reference)["optimizer_steps"] == steps


PLAN = {"block1_attention": "heads", "block1_mlp1": "column", "block1_mlp2": "row"}
# parameters of the one-block transformer (the two-block one less a block: split layers, two layer norms), and of
# them in the split layers (attention 16,640, MLP 16,576)
WHOLE, SPLIT = 78474 - 33216 - 2 * 128, 33216


@pytest.mark.parametrize("optimizer", ["SGD", "Adam"])
def test_t2_trains_as_one_rank_would_on_the_same_global_batches(two_ranks, optimizer):
    ranks, out = two_ranks
    for job in (f"tensor, {optimizer}", f"data, {optimizer}"):
        assert [r[job]["code"] for r in ranks] == [0, 0], printed(ranks, job)[-3000:]
    split_run, reference = out / f"tp-{optimizer.lower()}", out / f"dp-{optimizer.lower()}"
    assert_trains_as(split_run, reference, 11)
    s = summary(split_run)
    # each rank holds half of every split weight, and the row and output projections' biases whole (2 x 64 values)
    held = SPLIT // 2 + 64
    assert s["tensor"] == {"degree": 2, "plan": PLAN, "replicas": 1, "split_parameters": [held] * 2,
                           "parameters": [WHOLE - SPLIT + held] * 2,
                           "built_parameters": [WHOLE + held, WHOLE - SPLIT + held]}
    # per step: an all-reduce of batch x tokens x width forward and one backward, in the attention and in the MLP
    assert s["communicated"][0]["tensor"] == {"float32": 11 * 2 * 2 * (128 * 16 * 64 * 4)}
    assert "gradients" not in s["communicated"][0]   # one replica: nothing to average
    parts = sorted(p.name for p in (split_run / "checkpoints" / "ckpt-00000011").iterdir())
    assert parts == ["meta.json", "tensor-0", "tensor-1"]   # each slice, written by its first replica


def test_a_stop_mid_epoch_resumes_bit_for_bit(two_ranks):
    ranks, out = two_ranks
    for job in ("stopped", "resumed"):
        assert [r[job]["code"] for r in ranks] == [0, 0], printed(ranks, job)[-3000:]
    assert "stopped at epoch 1, step 10 on request" in printed(ranks, "stopped")
    resumed = summary(out / "stopped")
    assert resumed["status"] == "completed" and resumed["global_step"] == 11
    assert resumed["weights_sha256"] == summary(out / "tp-adam")["weights_sha256"]


PLAIN_KERAS = """
import sys, numpy as np, keras
assert "hvdtrain" not in sys.modules and "horovod" not in sys.modules
model = keras.saving.load_model(sys.argv[1])
data = np.load(sys.argv[2])
print(model.count_params(), int(np.sum(np.argmax(model.predict(data["x"], verbose=0), axis=-1) == data["y"])))
"""


def test_the_transformer_reaches_the_configs_accuracy_and_exports_the_whole_model(two_ranks):
    from hvdtrain import data
    from hvdtrain.config import DataConfig
    ranks, out = two_ranks
    assert [r["30 epochs"]["code"] for r in ranks] == [0, 0], printed(ranks, "30 epochs")[-3000:]
    s = summary(out / "accuracy")
    assert s["status"] == "completed" and s["test_accuracy"] >= 0.95, s
    test = data.open_source(DataConfig()).arrays("test")
    np.savez(out / "test.npz", x=test.x, y=test.y)
    plain = subprocess.run([sys.executable, "-c", PLAIN_KERAS, str(out / "accuracy" / "model.keras"),
                            str(out / "test.npz")], env=env(), capture_output=True, text=True, timeout=300)
    assert plain.returncode == 0, plain.stderr[-3000:]
    assert plain.stdout.split()[-2:] == ["78474", str(s["test_correct"])]   # the whole model, scoring the same
    # `hvdtrain evaluate` split over the 2 ranks computes what training's evaluation computed, bit for bit; with the
    # whole model (data-parallel) the same within float32 rounding (the split layers add partial sums)
    split, whole = (json.loads((out / f"evaluate{i}.json").read_text()) for i in (1, 0))
    assert (split["loss"], split["accuracy"], split["ranks"]) == (s["test_loss"], s["test_accuracy"], 2)
    assert whole["correct"] == s["test_correct"] and abs(whole["loss"] - s["test_loss"]) <= 1e-6 * s["test_loss"]
    import csv
    whole, split = (list(csv.reader((out / f"predict{i}.csv").open())) for i in (0, 1))   # the same, split
    assert len(whole) == len(split) == len(test.y) + 1 and whole[0] == split[0]
    for a, b in zip(whole[1:], split[1:]):
        assert a[:2] == b[:2] and max(abs(float(x) - float(y)) for x, y in zip(a[2:], b[2:])) <= 1e-6


def test_bad_layouts_and_plans_stop_every_rank_with_one_line(two_ranks):
    ranks, out = two_ranks
    cases = {**{case: message for case, (_, message) in BAD.items()},
             "resume without the split": "was written by layers split over 2 ranks (block1_attention: heads, "
                                         "block1_mlp1: column, block1_mlp2: row) and this run has no split layers"}
    for case, message in cases.items():
        text = printed(ranks, case)
        errors = [line for line in text.splitlines() if "hvdtrain: error:" in line]
        assert [r[case]["code"] for r in ranks] == [2, 2] and len(errors) == 1, (case, text[-3000:])
        assert message in errors[0] and "Traceback" not in text, (case, errors)
    assert not (out / "bad").exists()   # no run directory made
    assert sorted(p.name for p in (out / "tp-adam" / "checkpoints").iterdir()) == ["ckpt-00000011"]   # untouched


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory):
    """One launch of 4 ranks (MPI, oversubscribing the 2 cores): D = 2 x T = 2 first (Horovod starts with its process
    sets, the tensor groups of which P = 2 x T = 2 uses too), then P = 2 x T = 2."""
    out = tmp_path_factory.mktemp("tensor-4")
    jobs = [train_job("D=2 x T=2", out / "dxt", *SHORT, *T2),
            train_job("P=2 x T=2", out / "pxt", *SHORT, *T2, "--parallel.pipeline_stages=2",
                      "--parallel.balance=params")]
    return run_commands(4, jobs, out, "mpi", timeout=1500), out


def test_d2_x_t2_and_p2_x_t2_train_as_data_parallel_training_would(four_ranks, two_ranks):
    """Against 2 data-parallel ranks on the same global batches (the examples of a global batch do not depend on the
    number of replicas)."""
    ranks, out = four_ranks
    for job in ("D=2 x T=2", "P=2 x T=2"):
        assert [r[job]["code"] for r in ranks] == [0] * 4, printed(ranks, job)[-3000:]
    reference = two_ranks[1] / "dp-adam"
    assert_trains_as(out / "dxt", reference, 11)
    assert_trains_as(out / "pxt", reference, 11)
    dxt, pxt = summary(out / "dxt"), summary(out / "pxt")
    held = WHOLE - SPLIT // 2 + 64
    assert dxt["num_ranks"] == pxt["num_ranks"] == 4 and dxt["tensor"]["replicas"] == 2 and dxt["tensor"]["parameters"] == [held] * 4
    # each rank averages its slice's gradients over its 2 replicas (ranks t and t + 2), and all-reduces the
    # activations of its replica's 64 examples in its tensor group (ranks 2d and 2d + 1)
    assert dxt["communicated"][0]["gradients"] == {"float32": 11 * 4 * held}
    assert dxt["communicated"][0]["tensor"] == {"float32": 11 * 2 * 2 * (64 * 16 * 64 * 4)}
    assert sorted(p.name for p in (out / "dxt" / "checkpoints" / "ckpt-00000011").iterdir()) == \
        ["meta.json", "tensor-0", "tensor-1"]
    assert pxt["pipeline"]["stages"] == 2 and pxt["tensor"]["plan"] == PLAN
    assert sorted(p.name for p in (out / "pxt" / "checkpoints" / "ckpt-00000011").iterdir()) == \
        ["meta.json", "stage-0-tensor-0", "stage-0-tensor-1", "stage-1-tensor-0", "stage-1-tensor-1"]


def test_a_killed_rank_of_a_tensor_group_ends_the_job_with_one_line(tmp_path):
    """Gloo: the surviving rank's next all-reduce in the split layers fails, and it says so in one line."""
    from conftest import kill_tree, rank_pids
    from hvdtrain import checkpoint
    run = tmp_path / "run"
    job = start_horovodrun(2, [str(BIN / "hvdtrain"), "train", "--config", CONFIG, f"--trainer.run_dir={run}",
                               "--trainer.epochs=500", *SHORT, *T2], "gloo")
    try:
        wait_for(lambda: checkpoint.latest(run), timeout=300, what="the first checkpoint")
        subprocess.run(["kill", "-9", str(rank_pids(job, 2)[1])], check=True)
        killed = time.monotonic()
        text, _ = job.communicate(timeout=120)
        ended_after = time.monotonic() - killed
    finally:
        kill_tree(job)
    errors = [line for line in text.splitlines() if "hvdtrain: error:" in line]
    assert job.returncode != 0 and ended_after < 60, text[-3000:]
    assert len(errors) == 1 and "a collective failed at epoch" in errors[0], text[-3000:]
    latest = checkpoint.latest(run)   # the checkpoints on disk are whole: both slices of the latest
    assert sorted(p.name for p in latest.iterdir()) == ["meta.json", "tensor-0", "tensor-1"]
    assert not [p for p in (run / "checkpoints").iterdir() if not p.name.startswith("ckpt-")]
