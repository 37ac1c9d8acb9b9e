"""Sharded optimizer state (parallel.shard_state, ZeRO stages 1 and 2) and moving a run to another number of ranks,
for real: 2 ranks (Gloo), a pipeline of 2 stages x 2 replicas (4 ranks, MPI), and a run stopped on 2 ranks resumed
on 1 and on 3 (oversubscribed). Each launch runs its commands one after another (tests/parallel/workers/
sharded_worker.py), the Keras API's resume among them.

Against stage 0 (every replica holding the whole state), on the digits job: weights within 1e-6 relative after 50
steps for Adam and SGD with momentum, with gradient accumulation, with mixed_float16 and fp16 compression, and with
pipeline stages; each rank's state bytes are its range's (the variables it holds, against Adam's 8 bytes per
parameter); the bytes sent are one all-reduce's. A run stopped on 2 ranks resumes on 1 and 3 at the same step with
the optimizer state it saved, bit for bit, and continues within float rounding of the 2-rank continuation (the
ranks average their batches' mean gradients, which on another number of ranks adds the same numbers in another
order). Layouts that cannot move are refused in one line."""
import json
import shutil

import keras
import numpy as np
import pytest

from conftest import REPO, example_digits, printed, run_commands

pytestmark = pytest.mark.keras3   # sharded state needs the Keras 3 stack

WORKER = REPO / "tests/parallel/workers/sharded_worker.py"
PSI = 64 * 256 + 256 + 256 * 128 + 128 + 128 * 10 + 10   # the digits MLP's parameters (64-256-128-10)
ADAM = ["train", "--config", str(REPO / "configs/digits.yaml"), "--optim.name=adam", "--optim.lr=0.001",
        "--optim.warmup_epochs=0"]
FIFTY = ["--trainer.global_batch_size=56", "--trainer.epochs=2"]   # 1437 // 56 = 25 steps an epoch
MOVES = ["--trainer.global_batch_size=48", "--trainer.epochs=2"]   # divisible by 1, 2 and 3 ranks
# The guide's digits job with Adam (10 epochs at 0.003 reach its 0.95), at a learning rate that does not depend on
# the number of epochs: a run of 2 epochs is the first 2 of 10.
DIGITS = ["train", "--config", str(REPO / "configs/digits.yaml"), "--optim.name=adam", "--optim.lr=0.003",
          "--optim.schedule=constant", "--trainer.epochs=10"]
TWO = {   # name: arguments, on 2 ranks
    "adam-0": [*DIGITS, "--parallel.shard_state=0"], "adam-1": [*DIGITS, "--parallel.shard_state=1"],
    "dod-stopped": [*DIGITS, "--parallel.shard_state=1", "--trainer.epochs=2"],
    "sgd-0": ["train", "--config", str(REPO / "configs/digits.yaml"), *FIFTY, "--optim.warmup_epochs=0"],
    "sgd-1": ["train", "--config", str(REPO / "configs/digits.yaml"), *FIFTY, "--optim.warmup_epochs=0",
              "--parallel.shard_state=1"],
    **{f"accumulate-{s}": [*ADAM, *FIFTY, "--optim.backward_passes_per_step=2", f"--parallel.shard_state={s}"]
       for s in (0, 1, 2)},
    **{f"mixed-{s}": [*ADAM, *FIFTY, "--runtime.precision=mixed_float16", "--optim.fp16_compression=true",
                      f"--parallel.shard_state={s}"] for s in (0, 1)},
    "stopped": [*ADAM, *MOVES, "--parallel.shard_state=1"],   # a STOP file waits in its run directory: step 10
    "uninterrupted": [*ADAM, *MOVES, "--parallel.shard_state=1"],
    "local": ["train", "--config", str(REPO / "configs/digits.yaml"), "--trainer.epochs=1", "--trainer.sync=local_sgd",
              "--trainer.global_batch_size=256"],
    "files": ["train", "--trainer.epochs=1", "--data.source=tfrecord", "--data.input_shape=[64]",
              "--model.hidden=[16]"],
}
PIPELINE = {f"pipeline-{s}": [*ADAM, *FIFTY, "--parallel.pipeline_stages=2", "--parallel.balance=params",
                              f"--parallel.shard_state={s}"] for s in (0, 1, 2)}


def jobs(root, table: dict, extra=lambda name: []) -> list[dict]:
    return [{"name": name, "argv": [*argv, f"--trainer.run_dir={root / name}", *extra(name)]}
            for name, argv in table.items()]


def launch(np_: int, job_list: list[dict], out, launcher: str = "gloo") -> list[dict]:
    out.mkdir()
    return run_commands(np_, job_list, out, launcher, worker=WORKER)


def launched(ranks: list[dict], name: str) -> None:
    assert [r[name]["code"] for r in ranks] == [0] * len(ranks), printed(ranks, name)[-4000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every run, trained once: 2 ranks, then resumes of the stopped run on 1 and on 3, and the pipeline on 4."""
    root = tmp_path_factory.mktemp("sharded")
    records = example_digits(root / "records")
    (root / "stopped").mkdir()
    (root / "stopped" / "STOP").touch()   # seen at the first agreement step, 10
    files = lambda name: [f"--data.path={records}"] if name.startswith("files") else []   # noqa: E731
    two = launch(2, jobs(root, TWO, files), root / "launch-2")
    for name in TWO:
        launched(two, name)
    for copy in ("on-1", "on-1-whole", "on-3"):
        shutil.copytree(root / "stopped", root / copy)
    shutil.copytree(root / "local", root / "local-moved")
    shutil.copytree(root / "files", root / "files-moved")
    restore = lambda name, run, s: {"name": name, "restore": str(root / run), "shard_state": s,   # noqa: E731
                                    "global_batch": 48, "steps": 29}
    one = launch(1, [
        *jobs(root, {"on-1": [*ADAM, *MOVES, "--parallel.shard_state=1"],
                     "on-1-whole": [*ADAM, *MOVES, "--parallel.shard_state=0"],
                     "dod-stopped": [*DIGITS, "--parallel.shard_state=1"],
                     "local-moved": TWO["local"], "files-moved": TWO["files"]}, files),
        restore("restored-on-1", "stopped", 1)], root / "launch-1")
    three = launch(3, [*jobs(root, {"on-3": [*ADAM, *MOVES, "--parallel.shard_state=1"]}),
                       restore("restored-on-3", "stopped", 2)], root / "launch-3")
    four = launch(4, jobs(root, PIPELINE), root / "launch-4", "mpi")
    return {"root": root, "two": two, "one": one, "three": three, "four": four}


def summary(runs, name: str) -> dict:
    return json.loads((runs["root"] / name / "summary.json").read_text())


def assert_close(runs, name: str, reference: str, rtol: float) -> None:
    ours = keras.saving.load_model(runs["root"] / name / "model.keras").get_weights()
    theirs = keras.saving.load_model(runs["root"] / reference / "model.keras").get_weights()
    for a, b in zip(ours, theirs):
        assert np.max(np.abs(a - b)) <= rtol * np.max(np.abs(b)), (name, reference)


def test_the_digits_job_with_adam_trains_as_stage_0_with_half_the_state_and_moves_to_one_rank(runs):
    """The issue's done-when: 2 ranks, Adam, the digits job."""
    whole, sharded = summary(runs, "adam-0"), summary(runs, "adam-1")
    assert sharded["test_accuracy"] == whole["test_accuracy"] >= 0.95 and sharded["sync"]["shard_state"] == 1
    assert_close(runs, "adam-1", "adam-0", 1e-6)
    # Adam keeps 8 bytes per parameter, plus its step counter (int64); sharded, each rank its half, plus the
    # wrapper's counter
    assert [m["optimizer_state_bytes"] for m in whole["memory"]] == [8 * PSI + 8] * 2
    assert [m["optimizer_state_bytes"] for m in sharded["memory"]] == [8 * PSI // 2 + 16] * 2
    assert [(m["weights_bytes"], m["gradient_bytes"]) for m in sharded["memory"]] == [(4 * PSI, 4 * PSI)] * 2
    moved = summary(runs, "dod-stopped")   # stopped after epoch 2 on 2 ranks, finished on 1
    assert moved["status"] == "completed" and moved["num_ranks"] == 1 and moved["test_accuracy"] >= 0.95
    assert "resuming from" in printed(runs["one"], "dod-stopped") and "written on 2 ranks, continuing on 1" in \
        printed(runs["one"], "dod-stopped")


@pytest.mark.parametrize("name, reference", [("sgd-1", "sgd-0"), ("accumulate-1", "accumulate-0"),
                                             ("accumulate-2", "accumulate-0"), ("mixed-1", "mixed-0")])
def test_sharded_state_trains_as_stage_0_for_fifty_steps(runs, name, reference):
    ours, theirs = summary(runs, name), summary(runs, reference)
    assert ours["global_step"] == theirs["global_step"] == 50
    assert ours["optimizer_steps"] == theirs["optimizer_steps"] == (25 if "accumulate" in name else 50)
    assert_close(runs, name, reference, 1e-6)


def test_the_bytes_sent_are_one_all_reduces(runs):
    """A reduce-scatter and an all-gather each count half their whole vector (see backend/traffic.py): per step,
    what stage 0's all-reduce of the gradients counts; fp16 compression halves the reduce-scatter only."""
    step = 4 * PSI
    assert summary(runs, "sgd-0")["communicated"][0]["gradients"] == {"float32": 50 * step}
    sent = summary(runs, "sgd-1")["communicated"][0]
    assert sent["gradients"] == sent["weights"] == {"float32": 50 * step // 2}
    mixed = summary(runs, "mixed-1")["communicated"][0]
    assert summary(runs, "mixed-0")["communicated"][0]["gradients"] == {"float16": 50 * step // 2}
    assert mixed["gradients"] == {"float16": 50 * step // 4} and mixed["weights"] == {"float32": 50 * step // 2}
    # Accumulating 2 passes: stage 1 reduce-scatters once per optimizer step (and once more for the accumulators
    # of the checkpoint at the end of epoch 1, taken between the passes of a step); stage 2 after every pass.
    one, two = summary(runs, "accumulate-1")["communicated"][0], summary(runs, "accumulate-2")["communicated"][0]
    assert one["gradients"] == {"float32": (25 + 1) * step // 2} and one["weights"] == {"float32": 25 * step // 2}
    assert two["gradients"] == {"float32": 50 * step // 2} and two["weights"] == {"float32": 25 * step // 2}
    # The start broadcast sends the weights and the step counters, not a rank's shard of the state.
    assert summary(runs, "adam-1")["communicated"][0]["broadcast"] == {"float32": 4 * PSI, "int64": 16}
    assert summary(runs, "adam-0")["communicated"][0]["broadcast"] == {"float32": 12 * PSI, "int64": 8}


def test_stage_2_holds_its_range_of_the_gradients_and_accumulators(runs):
    for name, shards in (("accumulate-0", 1), ("accumulate-1", 1), ("accumulate-2", 2)):
        # the averaged gradient and the accumulators: the whole at stages 0 and 1 (local), a half at stage 2
        assert [m["gradient_bytes"] for m in summary(runs, name)["memory"]] == [2 * 4 * PSI // shards] * 2, name


def test_a_pipeline_shards_each_stage_over_its_replicas(runs):
    """2 stages x 2 replicas: every stage's state is halved over its 2 replicas, and the model trains as stage 0's."""
    for name in PIPELINE:
        launched(runs["four"], name)
    stages = [64 * 256 + 256, 256 * 128 + 128 + 128 * 10 + 10]   # split by parameters at dense_1
    for s in (0, 1, 2):
        memory = summary(runs, f"pipeline-{s}")["memory"]
        expected = [8 * stages[r % 2] + 8 if s == 0 else 8 * stages[r % 2] // 2 + 16 for r in range(4)]
        assert [m["optimizer_state_bytes"] for m in memory] == expected
        assert_close(runs, f"pipeline-{s}", "pipeline-0", 1e-6)
    ckpt = runs["root"] / "pipeline-1" / "checkpoints" / "ckpt-00000050"
    assert sorted(p.name for p in (ckpt / "stage-1").iterdir()) == [
        "optimizer-0.json", "optimizer-0.npz", "optimizer-1.json", "optimizer-1.npz", "state.data-00000-of-00001",
        "state.index"]


def saved_state(ckpt) -> tuple[dict, dict]:
    """The whole optimizer state a checkpoint holds: its shards' slots put together in range order, and scalars."""
    headers = sorted(((json.loads(p.read_text()), p.with_suffix(".npz")) for p in ckpt.glob("optimizer-*.json")),
                     key=lambda item: item[0]["range"])
    slots = {slot: np.concatenate([np.load(npz)[slot] for _, npz in headers]) for slot in headers[0][0]["slots"]}
    return slots, headers[0][0]["scalars"]


@pytest.mark.parametrize("launch, name, ranks", [("one", "restored-on-1", 1), ("three", "restored-on-3", 3)])
def test_a_run_stopped_on_two_ranks_restores_its_optimizer_state_on_another_number_bit_for_bit(runs, launch, name,
                                                                                                ranks):
    """Through the Keras API's resume: the same step, and every rank's range of every slot as saved."""
    launched(runs[launch], name)
    slots, scalars = saved_state(runs["root"] / "stopped" / "checkpoints" / "ckpt-00000010")
    out = runs["root"] / f"launch-{ranks}"
    parts = [(json.loads((out / f"{name}-rank{r}.json").read_text()), out / f"{name}-rank{r}.npz") for r in range(ranks)]
    covered = 0
    for header, npz in sorted(parts, key=lambda item: item[0]["range"]):
        lo, hi = header["range"]
        assert lo == covered and header["global_step"] == 10
        assert {k: header["scalars"][k] for k in ("steps", "passes")} == {"steps": 10, "passes": 10} == \
            {k: scalars[k] for k in ("steps", "passes")}
        for slot, values in slots.items():
            np.testing.assert_array_equal(np.load(npz)[slot], values[lo:hi])
        covered = hi
    assert covered == PSI


@pytest.mark.parametrize("name, launch, ranks", [("on-1", "one", 1), ("on-1-whole", "one", 1), ("on-3", "three", 3)])
def test_the_moved_run_continues_within_float_rounding_of_the_two_rank_continuation(runs, name, launch, ranks):
    launched(runs[launch], name)
    assert summary(runs, "stopped")["global_step"] == 10
    moved, reference = summary(runs, name), summary(runs, "uninterrupted")
    assert moved["status"] == "completed" and moved["num_ranks"] == ranks and moved["global_step"] == 58
    assert f"(0 of 2 epochs + 10 steps done; written on 2 ranks, continuing on {ranks})" in printed(runs[launch], name)
    assert_close(runs, name, "uninterrupted", 1e-5)
    assert moved["test_accuracy"] == reference["test_accuracy"]


@pytest.mark.parametrize("name, message", [
    ("local-moved", "holds each of 2 ranks' own optimizer state (local SGD) and this run keeps each of 1 ranks' own "
                    "optimizer state (local SGD); resume with the ranks and trainer.sync_optimizer_state that wrote "
                    "it"),
    ("files-moved", "was written by 2 data-parallel ranks each reading its own files, and on 1 the rest of the run "
                    "would read other examples in another order; resume on 2"),
])
def test_a_layout_that_cannot_move_is_refused_in_one_line_and_the_run_is_left_as_it_was(runs, name, message):
    text = printed(runs["one"], name)
    errors = [line for line in text.splitlines() if "hvdtrain: error:" in line]
    assert runs["one"][0][name]["code"] == 2 and len(errors) == 1 and message in errors[0], text[-3000:]
    before = sorted(p.relative_to(runs["root"] / name.removesuffix("-moved")) for p in
                    (runs["root"] / name.removesuffix("-moved")).rglob("*"))
    assert sorted(p.relative_to(runs["root"] / name) for p in (runs["root"] / name).rglob("*")) == before
