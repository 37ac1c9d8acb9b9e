"""Bad input under horovodrun -np 2 (MPI, as `make train` launches): one clear line printed once, a non-zero exit,
no traceback from any rank, and nothing written to the run directory. The README's table lists these messages."""
import numpy as np
import pytest

from conftest import REPO, horovodrun, output
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


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_stops_every_rank_with_one_line(tmp_path, case):
    paths = make_inputs(tmp_path)
    paths.update(empty=tmp_path / "empty.npz", labels=tmp_path / "labels.npz", a_file=tmp_path / "a_file")
    args_for, message = CASES[case]
    run = tmp_path / "run"
    proc = horovodrun(2, ["hvdtrain", "train", f"--trainer.run_dir={run}", *args_for(paths)], "mpi")
    text = output(proc)
    assert proc.returncode != 0
    errors = [line for line in text.splitlines() if "hvdtrain: error:" in line]
    assert len(errors) == 1, text[-3000:]
    assert message in errors[0]
    assert "<stderr>:Traceback" not in text
    assert "exit code" in text.lower() or "exited" in text.lower()   # the launcher saw the ranks fail
    assert not run.exists(), sorted(p.name for p in run.rglob("*"))   # nothing written, not even an empty directory


def test_checkpoint_of_another_model_is_refused_on_every_rank(tmp_path):
    run = tmp_path / "run"
    first = horovodrun(2, ["hvdtrain", "train", f"--trainer.run_dir={run}", "--trainer.epochs=1"], "mpi")
    assert first.returncode == 0, output(first)
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    other = horovodrun(2, ["hvdtrain", "train", f"--trainer.run_dir={run}", "--trainer.epochs=2",
                           "--model.name=cnn", "--model.width=8"], "mpi")
    assert other.returncode != 0
    errors = [line for line in output(other).splitlines() if "hvdtrain: error:" in line]
    assert len(errors) == 1 and "belongs to another model (model is 'mlp', this run has 'cnn')" in errors[0]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before   # untouched
