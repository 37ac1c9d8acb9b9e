"""The Keras API under horovodrun -np 2: the example script trains and evaluates exactly; an optimizer from
hvdtrain.keras.distribute really averages gradients (ranks with different data and different initial weights end
bit-identical, with every option); a plain optimizer is refused instead of silently training drifting replicas."""
import json
import re

import pytest

from conftest import KERAS_MAJOR, REPO, horovodrun, output

pytestmark = pytest.mark.stacks    # also on the TF 2.15 stack: see docs/testing.md

WORKER = str(REPO / "tests/parallel/workers/keras_api_worker.py")


def test_keras_api_example_trains_on_two_ranks():
    proc = horovodrun(2, ["python", str(REPO / "examples/keras_digits.py"), "--epochs", "15"], "gloo")
    assert proc.returncode == 0, output(proc)
    found = re.findall(r"test accuracy ([0-9.]+) on (\d+) examples from (\d+) ranks", proc.stdout)
    assert len(found) == 1, "exactly one rank (rank 0) reports"
    accuracy, examples, ranks = found[0]
    assert int(examples) == 360 and int(ranks) == 2
    assert float(accuracy) >= 0.9


MODES = ("distributed", "accumulate", "fp16", "sparse", "mixed_float16", "plain", "sharded")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Every mode in one launch (MPI), one after another in the same two processes."""
    out = tmp_path_factory.mktemp("keras-api")
    proc = horovodrun(2, ["python", WORKER, str(out), *MODES], "mpi", timeout=900)
    assert proc.returncode == 0, output(proc)[-5000:]
    return out


def ranks(out, mode):
    return [json.loads((out / f"{mode}-rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.parametrize("mode, steps", [("distributed", 16), ("accumulate", 8), ("fp16", 16), ("sparse", 16),
                                         ("mixed_float16", 16)])
def test_distributed_optimizer_keeps_replicas_identical_although_their_data_differs(trained, mode, steps):
    a, b = ranks(trained, mode)
    assert "error" not in a and "error" not in b, (a, b)
    assert a["digest"] == b["digest"], "the replicas drifted apart: gradients were not averaged"
    if mode == "accumulate" and KERAS_MAJOR < 3:
        steps = 16   # Horovod's Keras 2 layer counts batches in optimizer.iterations (it applies every 2nd one)
    assert a["steps"] == b["steps"] == steps    # backward_passes_per_step=2: one optimizer step per 2 batches
    if mode == "mixed_float16":
        assert a["optimizer"].startswith("LossScaleOptimizer")


@pytest.mark.parametrize("mode, all_reduces, dtype", [("distributed", 16, "float32"), ("accumulate", 8, "float32"),
                                                      ("fp16", 16, "float16"), ("mixed_float16", 16, "float32")])
def test_the_gradient_bytes_counted_where_they_are_sent_follow_the_formula(trained, mode, all_reduces, dtype):
    """16 batches of 8 per rank: one all-reduce of every trainable parameter's gradient per optimizer step (8 with 2
    batches accumulated), in the dtype sent (fp16 compression halves it), counted as the backend hands it over."""
    for rank in ranks(trained, mode):
        size = {"float32": 4, "float16": 2}[dtype]
        assert rank["gradients_sent"] == {dtype: all_reduces * rank["trainable_parameters"] * size}, rank


def test_sharded_state_keeps_replicas_identical_or_is_refused_on_the_old_stack(trained):
    """hk.distribute(shard_state=2), accumulating 2 batches: each rank updates its half of the weights from the
    reduce-scattered gradients, then all-gathers; the TF 2.15 stack refuses it in one line."""
    a, b = ranks(trained, "sharded")
    if KERAS_MAJOR < 3:
        assert a["error"] == b["error"] == ("parallel.shard_state > 0 needs the Keras 3 stack (TensorFlow >= 2.16): "
                                            "the TF 2.15 stack keeps the whole optimizer state; set "
                                            "parallel.shard_state=0")
        return
    assert "error" not in a and a["digest"] == b["digest"] and a["steps"] == b["steps"] == 8
    # one reduce-scatter a batch, each counting half the gradients' bytes (backend/traffic.py)
    assert a["gradients_sent"] == {"float32": 16 * a["trainable_parameters"] * 4 // 2}


def test_a_plain_optimizer_is_refused_on_every_rank(trained):
    a, b = ranks(trained, "plain")
    for rank in (a, b):
        assert rank.get("error", "").startswith("model.optimizer (SGD) does not average gradients over the 2 ranks"), rank
        assert "hvdtrain.keras.distribute(optimizer)" in rank["error"]
