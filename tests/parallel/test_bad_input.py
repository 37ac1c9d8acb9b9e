"""Bad input under horovodrun -np 2 (MPI, as `make train` launches): one clear line printed once, exit code 2 on
every rank, no traceback from any rank, and nothing written to the run directory. docs/reliability.md's table lists these
messages. Every case runs in one launch (tests/parallel/workers/commands_worker.py); one more launch checks what the
launcher itself sees when the ranks fail."""
import re

import numpy as np
import pytest

from conftest import horovodrun, output, run_commands
from hvdtrain import data


def make_inputs(tmp_path):
    """Files for the cases below; returns {name: path}."""
    paths = {}
    (tmp_path / "bad.yaml").write_text("trainer:\n  epochs: 3\n   run_dir: x\n")
    paths["bad_yaml"] = tmp_path / "bad.yaml"
    np.savez(tmp_path / "empty.npz", x=np.zeros((0, 8, 8, 1), np.float32), y=np.zeros(0))
    np.savez(tmp_path / "labels.npz", x=np.zeros((100, 8, 8, 1), np.float32), y=np.full(100, 12))
    records = tmp_path / "records"
    records.mkdir()
    files = [str(records / f"part-{i}.tfrecord") for i in range(2)]
    data.write_tfrecords(np.zeros((40, 4), np.float32), np.zeros(40, np.int64), files)
    blob = bytearray(open(files[1], "rb").read())
    blob[30:60] = b"\xff" * 30
    open(files[1], "wb").write(bytes(blob))
    paths["records"] = records
    # The case: valid training files, a held-out directory whose second file lost its last 37 bytes.
    good, held_out = tmp_path / "good", tmp_path / "held-out"
    good.mkdir(), held_out.mkdir()
    data.write_tfrecords(np.zeros((40, 4), np.float32), np.zeros(40, np.int64), [str(good / "a.tfrecord"), str(good / "b.tfrecord")])
    data.write_tfrecords(np.zeros((20, 4), np.float32), np.zeros(20, np.int64), [str(held_out / "a.tfrecord"), str(held_out / "b.tfrecord")])
    (held_out / "b.tfrecord").write_bytes((held_out / "b.tfrecord").read_bytes()[:-37])
    paths.update(good=good, held_out=held_out)
    (tmp_path / "a_file").write_text("")
    return paths


CASES = {
    "malformed YAML": (lambda p: ["--config", str(p["bad_yaml"])], "is not valid YAML at line 3"),
    "unknown key": (lambda p: ["--trainer.epoch=3"], "unknown config key 'trainer.epoch' (did you mean 'epochs'?)"),
    "wrong type": (lambda p: ["--trainer.epochs=many"], "trainer.epochs must be an integer, got 'many'"),
    "missing data path": (lambda p: ["--data.source=npz", "--data.path=/no/such/train.npz"],
                          "data file not found: /no/such/train.npz"),
    "empty dataset": (lambda p: ["--data.source=npz", f"--data.path={p['empty']}"], "the dataset is empty"),
    "label out of range": (lambda p: ["--data.source=npz", f"--data.path={p['labels']}"],
                           "label 12 is outside [0, 10)"),
    "corrupt TFRecord": (lambda p: ["--data.source=tfrecord", f"--data.path={p['records']}", "--data.input_shape=[4]"],
                         "corrupt TFRecord file "),
    "corrupt held-out TFRecord": (lambda p: ["--data.source=tfrecord", f"--data.path={p['good']}",
                                             f"--data.test_path={p['held_out']}", "--data.input_shape=[4]"],
                                  "held-out/b.tfrecord: unreadable after record 9, at byte "),
    "TFRecord shape mismatch": (lambda p: ["--data.source=tfrecord", f"--data.path={p['records']}",
                                           "--data.input_shape=[5]"], "found features x: 4 floats, y: 1 int64, expected x: 5 floats (data.input_shape=[5])"),
    "unwritable run directory": (lambda p: [f"--trainer.run_dir={p['a_file']}/run"], "is not writable"),
}


def slug(case: str) -> str:
    return re.sub(r"[^a-z]+", "-", case)


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """(results per rank, run directory per case, the checkpoint test's run directory), from one launch."""
    root = tmp_path_factory.mktemp("bad-input")
    paths = make_inputs(root)
    paths.update(empty=root / "empty.npz", labels=root / "labels.npz", a_file=root / "a_file")
    runs = {case: root / "runs" / slug(case) for case in CASES}
    jobs = [{"name": case, "argv": ["train", f"--trainer.run_dir={runs[case]}", *args_for(paths)]}
            for case, (args_for, _) in CASES.items()]
    other = root / "other-model"
    jobs += [{"name": "first run", "argv": ["train", f"--trainer.run_dir={other}", "--trainer.epochs=1"]},
             {"name": "other model", "argv": ["train", f"--trainer.run_dir={other}", "--trainer.epochs=2",
                                              "--model.name=cnn", "--model.width=8"]}]
    return run_commands(2, jobs, root, "mpi"), runs, other


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_stops_every_rank_with_one_line(launched, case):
    ranks, runs, _ = launched
    _, message = CASES[case]
    assert [r[case]["code"] for r in ranks] == [2, 2], [r[case] for r in ranks]
    printed = "".join(r[case]["stdout"] + r[case]["stderr"] for r in ranks)
    errors = [line for line in printed.splitlines() if "hvdtrain: error:" in line]
    assert len(errors) == 1, printed[-3000:]                        # printed once, by rank 0
    assert message in errors[0]
    assert "Traceback" not in printed
    assert not runs[case].exists(), sorted(p.name for p in runs[case].rglob("*"))   # nothing, not even a directory


def test_checkpoint_of_another_model_is_refused_on_every_rank(launched):
    ranks, _, run = launched
    assert [r["first run"]["code"] for r in ranks] == [0, 0], ranks[0]["first run"]["stderr"][-3000:]
    assert [r["other model"]["code"] for r in ranks] == [2, 2]
    printed = "".join(r["other model"]["stdout"] + r["other model"]["stderr"] for r in ranks)
    errors = [line for line in printed.splitlines() if "hvdtrain: error:" in line]
    assert len(errors) == 1 and "belongs to another model (model is 'mlp', this run has 'cnn')" in errors[0]
    # Untouched: only the first run's one epoch (22 steps of 64) is there, nothing newer.
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["ckpt-00000022"]


def test_the_launcher_sees_every_rank_fail_without_a_traceback(tmp_path):
    """As a user sees it: horovodrun itself exits non-zero and reports the ranks' exit; one line, no traceback."""
    run = tmp_path / "run"
    proc = horovodrun(2, ["hvdtrain", "train", f"--trainer.run_dir={run}", "--trainer.epoch=3"], "mpi")
    text = output(proc)
    assert proc.returncode != 0
    errors = [line for line in text.splitlines() if "hvdtrain: error:" in line]
    assert len(errors) == 1 and "unknown config key 'trainer.epoch' (did you mean 'epochs'?)" in errors[0], text[-3000:]
    assert "<stderr>:Traceback" not in text
    assert "exit code" in text.lower() or "exited" in text.lower()   # the launcher saw the ranks fail
    assert not run.exists()
