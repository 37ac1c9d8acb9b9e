"""Under horovodrun -np 2: real image data end to end through `hvdtrain train/evaluate/predict`.

The digits (1,797 scans) become PNG class folders at 32x32 (built once per session, tests/image_fixtures.py) and
train the CNN to >= 0.95 held-out accuracy on 2 ranks. The training processes run under strace, so the test sees
every image file each rank really opened: rank r must open exactly its round-robin share of the sorted training
files, and of the test files its contiguous validation block and its dealt evaluation batches. The same holds for ImageNet-style TFRecords (by file) and a
TensorFlow Datasets dataset prepared in a local data_dir. Also: corrupt images (fail / skip), class names in
predictions, and a ResNet50 (keras.applications) smoke run.
"""
from __future__ import annotations

import csv
import json
import re
import shutil
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, horovodrun, output
from hvdtrain import data
from hvdtrain.data import images
from image_fixtures import CLASSES, NAMES, build_tfds, digits_folders, digits_records

WORKER = str(REPO / "tests/parallel/workers/cli_worker.py")
TIMEOUT = 1500          # two shared cores: generous
# The CNN on 32x32 greyscale digits; crop + flip augmentation is off (a flipped digit is another symbol).
DIGITS_ARGS = ["--config", str(REPO / "configs/images.yaml"), "--data.channels=1", "--data.augment=false",
               "--model.width=16", "--trainer.tensorboard=false", "--trainer.global_batch_size=64"]


def traced(out: Path, args: list[str]) -> list[str]:
    """`hvdtrain args` on this rank under strace (file opens only), trace in out/trace-<rank>."""
    command = " ".join(["exec strace -f -qq --seccomp-bpf -e trace=open,openat -e signal=none",
                        f"-o {out}/trace-$HOROVOD_RANK hvdtrain", *args])
    return ["sh", "-c", command]


CALL = re.compile(r'^(\d+) +open(?:at)?\((?:AT_FDCWD, )?"([^"]+)", ([A-Z_|]+)(.*)$')
RESUMED = re.compile(r'^(\d+) +<\.\.\. open(?:at)? resumed>.*\) += (-?\d+)')
RESULT = re.compile(r'\) += (-?\d+)')


def opened(trace: Path, under: Path) -> dict[str, int]:
    """{file: times opened successfully} for regular files below a directory, from an `strace -f` log (a call that
    another thread interrupted is split into '<unfinished ...>' and '<... openat resumed>' lines)."""
    counts: dict[str, int] = defaultdict(int)
    pending: dict[str, str] = {}
    for line in trace.read_text().splitlines():
        call, resumed = CALL.match(line), RESUMED.match(line)
        if call:
            pid, path, flags, rest = call.groups()
            wanted = path.startswith(f"{under}/") and "O_DIRECTORY" not in flags
            if rest.endswith("<unfinished ...>"):
                if wanted:
                    pending[pid] = path
            elif wanted and int(RESULT.search(rest).group(1)) >= 0:
                counts[path] += 1
        elif resumed and resumed.group(1) in pending:
            path = pending.pop(resumed.group(1))
            if int(resumed.group(2)) >= 0:
                counts[path] += 1
    return dict(counts)


def run_summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


@pytest.fixture(scope="session")
def digits_png(tmp_path_factory):
    return digits_folders(tmp_path_factory.getbasetemp() / "digits-png")


@pytest.fixture(scope="module")
def image_run(digits_png, tmp_path_factory):
    """The digits PNG folders trained on 2 ranks (gloo) under strace: (run directory, trace directory, output)."""
    out = tmp_path_factory.mktemp("image-run")
    run = out / "run"
    args = ["train", *DIGITS_ARGS, f"--data.path={digits_png['train']}", f"--data.test_path={digits_png['test']}",
            "--trainer.epochs=8", f"--trainer.run_dir={run}"]
    proc = horovodrun(2, traced(out, args), "gloo", timeout=TIMEOUT)
    assert proc.returncode == 0, output(proc)[-5000:]
    return run, out, output(proc)


def test_digits_png_folders_train_to_95_percent_on_two_ranks(image_run, digits_png):
    run, _, text = image_run
    summary = run_summary(run)
    assert summary["status"] == "completed" and summary["num_ranks"] == 2
    assert summary["test_examples"] == len(digits_png["files"]["test"]) == 360
    assert summary["test_accuracy"] >= 0.95, summary
    assert json.loads((run / "classes.json").read_text()) == CLASSES
    assert re.search(r"test accuracy 0\.9[5-9]\d\d .*\(360 held-out examples, 2 ranks", text), text[-2000:]
    config = (run / "config.yaml").read_text()
    assert "source: images" in config and "image_size:\n  - 32\n  - 32" in config


def test_each_rank_opened_only_its_own_image_files(image_run, digits_png):
    """From the system calls of the real training processes: training files round robin over the sorted list, every
    one read by exactly one rank; held-out files validated in contiguous blocks and evaluated in whole batches of
    256 dealt in turn (one process's batches)."""
    _, out, _ = image_run
    train = [f for f, _ in digits_png["files"]["train"]]
    test = [f for f, _ in digits_png["files"]["test"]]
    assert [f for f, _ in images.list_class_folders(str(digits_png["train"]))[1]] == train   # hvdtrain's order
    for rank in range(2):
        seen = opened(out / f"trace-{rank}", Path(digits_png["train"]).parent)
        own_train = set(train[rank::2])
        start, stop = data.eval_range(len(test), rank, 2)
        evaluated = {test[i] for a, b in data.dealt_batches(len(test), 256, rank, 2) for i in range(a, b)}
        assert set(f for f in seen if "/train/" in f) == own_train, f"rank {rank} training files"
        assert set(f for f in seen if "/test/" in f) == set(test[start:stop]) | evaluated, f"rank {rank} test files"
        # validation decodes each file once, then 8 epochs read all but the few a rank's last batch leaves over
        assert min(seen[f] for f in own_train) >= 2 and sum(seen[f] for f in own_train) >= len(own_train) * 8
    assert len(train) == 1437 and len(test) == 360


def test_predict_writes_class_names_and_evaluate_agrees_with_training(image_run, digits_png, tmp_path):
    run, _, _ = image_run
    predictions = tmp_path / "names.csv"
    flat = tmp_path / "sevens"       # a flat folder of images: unlabelled inputs
    shutil.copytree(digits_png["test"] / "seven", flat)
    damaged = tmp_path / "damaged"   # the test folders and two unreadable files, each first in its class folder
    shutil.copytree(digits_png["test"], damaged)
    bad = [damaged / CLASSES[0] / "a-bad.png", damaged / CLASSES[5] / "a-bad.png"]
    for path in bad:
        path.write_bytes(b"not a PNG")
    proc = horovodrun(2, ["python", WORKER, str(tmp_path), "predict", "--run", str(run), "--input", str(damaged),
                          "--data.bad_files=skip", "--fields", "name,probs,path", "--output", str(predictions)],
                      "gloo", timeout=TIMEOUT)
    assert proc.returncode == 0, output(proc)[-3000:]
    rows = list(csv.reader(predictions.open()))
    assert rows[0] == ["index", "name"] + [f"prob_{i}" for i in range(10)] + ["path"]
    listed = [path for path, _ in images.list_class_folders(str(damaged))[1]]
    assert len(listed) == 362 and listed.index(str(bad[0])) == 0
    # index: the position among the listed files (the skipped ones have no row and renumber nothing); path: the file
    assert [(int(row[0]), row[-1]) for row in rows[1:]] == [(i, p) for i, p in enumerate(listed) if p not in map(str, bad)]
    truth = [CLASSES[label] for _, label in digits_png["files"]["test"]]
    names = [row[1] for row in rows[1:]]
    probs = np.array([[float(v) for v in row[2:-1]] for row in rows[1:]])
    assert names == [CLASSES[i] for i in probs.argmax(axis=1)]
    assert np.mean([a == b for a, b in zip(names, truth)]) == pytest.approx(run_summary(run)["test_accuracy"])

    more = horovodrun(2, ["python", WORKER, str(tmp_path), "predict", "--run", str(run), "--input", str(flat),
                          "--fields", "class,name,path", "--output", str(tmp_path / "sevens.jsonl")],
                      "gloo", timeout=TIMEOUT)
    assert more.returncode == 0, output(more)[-3000:]
    lines = [json.loads(line) for line in (tmp_path / "sevens.jsonl").read_text().splitlines()]
    assert len(lines) == len(list(flat.iterdir())) == 36
    assert [(line["index"], line["path"]) for line in lines] == list(enumerate(images.list_images(str(flat))))
    assert all(CLASSES[line["class"]] == line["name"] for line in lines)
    assert sum(line["name"] == "seven" for line in lines) >= 33

    report = tmp_path / "eval.json"
    ev = horovodrun(2, ["python", WORKER, str(tmp_path), "evaluate", "--run", str(run), "--report", str(report)],
                    "gloo", timeout=TIMEOUT)
    assert ev.returncode == 0, output(ev)[-3000:]
    metrics = json.loads(report.read_text())
    assert metrics["examples"] == 360 and metrics["ranks"] == 2
    assert metrics["accuracy"] == run_summary(run)["test_accuracy"]
    assert metrics["loss"] == pytest.approx(run_summary(run)["test_loss"], rel=1e-9)

    # Other class folders, with only two of the ten classes: labelled by the model's class names, not their order.
    subset = tmp_path / "subset"
    for name in ("two", "seven"):
        shutil.copytree(digits_png["test"] / name, subset / name)
    some = horovodrun(2, ["python", WORKER, str(tmp_path), "evaluate", "--run", str(run), "--input", str(subset),
                          "--report", str(tmp_path / "subset.json")], "gloo", timeout=TIMEOUT)
    assert some.returncode == 0, output(some)[-3000:]
    metrics = json.loads((tmp_path / "subset.json").read_text())
    assert metrics["examples"] == len(list(subset.rglob("*.png"))) == 71 and metrics["accuracy"] >= 0.9, metrics


def small_folder(digits_png, root: Path, per_class: int = 12) -> Path:
    """A copy of the first `per_class` training images of three classes (to damage without touching the shared one)."""
    for name in CLASSES[:3]:
        (root / name).mkdir(parents=True)
        for path in sorted((digits_png["train"] / name).glob("*.png"))[:per_class]:
            shutil.copy(path, root / name / path.name)
    return root


def test_a_corrupt_image_stops_every_rank_with_one_line_and_writes_nothing(digits_png, tmp_path):
    folder = small_folder(digits_png, tmp_path / "images")
    bad = sorted((folder / CLASSES[1]).glob("*.png"))[5]
    bad.write_bytes(bad.read_bytes()[:40])          # a truncated PNG
    run = tmp_path / "run"
    proc = horovodrun(2, ["python", WORKER, str(tmp_path), "train", *DIGITS_ARGS, f"--data.path={folder}",
                          "--data.num_classes=3", "--trainer.global_batch_size=8", "--trainer.epochs=1",
                          f"--trainer.run_dir={run}"], "gloo", timeout=TIMEOUT)
    text = output(proc)
    assert proc.returncode != 0
    assert [(tmp_path / f"exit-rank{r}.txt").read_text() for r in range(2)] == ["2", "2"], text[-3000:]
    errors = [line for line in text.splitlines() if "hvdtrain: error:" in line]
    assert len(errors) == 1, text[-3000:]
    owner = [f for f, _ in images.list_class_folders(str(folder))[1]].index(str(bad)) % 2   # found by its reader
    assert errors[0].split("hvdtrain: error: ", 1)[1] == (
        f"corrupt or unreadable image {bad} (1 such file(s) in this rank's share); fix or remove it, or set "
        f"data.bad_files=skip to leave such files out (on rank {owner})")
    assert "<stderr>:Traceback" not in text        # no rank printed a traceback (horovodrun itself may)
    assert not run.exists()


def test_bad_files_skip_trains_without_them_and_says_how_many(digits_png, tmp_path):
    folder = small_folder(digits_png, tmp_path / "images")
    bad = [sorted((folder / CLASSES[0]).glob("*.png"))[3], sorted((folder / CLASSES[2]).glob("*.png"))[7]]
    bad[0].write_bytes(b"this is not a PNG")
    bad[1].write_bytes(bad[1].read_bytes()[:60])
    run = tmp_path / "run"
    proc = horovodrun(2, ["python", WORKER, str(tmp_path), "train", *DIGITS_ARGS, f"--data.path={folder}",
                          f"--data.test_path={folder}", "--data.num_classes=3", "--data.bad_files=skip",
                          "--trainer.global_batch_size=8", "--trainer.epochs=1", f"--trainer.run_dir={run}"],
                      "gloo", timeout=TIMEOUT)
    text = output(proc)
    assert proc.returncode == 0, text[-3000:]
    assert [(tmp_path / f"exit-rank{r}.txt").read_text() for r in range(2)] == ["0", "0"]
    said = [line for line in text.splitlines() if "left out" in line]
    # once per split (train and test read the same folder), from rank 0 only
    assert len(said) == 2 and all(line.startswith("[0]<stdout>:[hvdtrain] ") for line in said), said
    assert said[0].endswith(f"train: left out 2 unreadable image(s) of 36 (data.bad_files=skip), e.g. {bad[0]}")
    assert said[1].endswith(f"test: left out 2 unreadable image(s) of 36 (data.bad_files=skip), e.g. {bad[0]}")
    summary = run_summary(run)
    assert summary["status"] == "completed" and summary["test_examples"] == 34
    assert summary["global_step"] == 34 // 2 // 4            # 17 files per rank, per-rank batch 4: 4 steps


def test_imagenet_style_tfrecords_shard_by_file_and_train(tmp_path):
    records = digits_records(tmp_path / "records", files=4, label_offset=1)
    run = tmp_path / "run"
    args = ["train", *DIGITS_ARGS, "--data.source=image_tfrecord", f"--data.path={tmp_path / 'records' / 'train'}",
            f"--data.test_path={tmp_path / 'records' / 'test'}", "--data.label_offset=1", "--trainer.epochs=5",
            f"--trainer.run_dir={run}"]
    proc = horovodrun(2, traced(tmp_path, args), "gloo", timeout=TIMEOUT)
    assert proc.returncode == 0, output(proc)[-3000:]
    summary = run_summary(run)
    assert summary["test_examples"] == 360 and summary["test_accuracy"] >= 0.9, summary
    for rank in range(2):
        seen = opened(tmp_path / f"trace-{rank}", tmp_path / "records")
        assert {f for f in seen if "/train/" in f} == set(records["train"][rank::2])
        assert {f for f in seen if "/test/" in f} == set(records["test"][2 * rank:2 * rank + 2])
    assert not (run / "classes.json").exists()     # TFRecords carry no class names


def test_tfds_dataset_from_a_local_data_dir_shards_by_file_and_trains(tmp_path):
    builder = build_tfds(tmp_path / "tfds", num_shards=4)
    train_files = [f.filename for f in builder.info.splits["train"].file_instructions]
    assert len(train_files) == 4
    run = tmp_path / "run"
    args = ["train", *DIGITS_ARGS, "--data.source=tfds", "--data.tfds_name=hvd_digits", f"--data.path={tmp_path / 'tfds'}",
            "--trainer.epochs=5", f"--trainer.run_dir={run}"]
    proc = horovodrun(2, traced(tmp_path, args), "gloo", timeout=TIMEOUT)
    text = output(proc)
    assert proc.returncode == 0, text[-3000:]
    assert "AutoGraph" not in text and "Downloading" not in text
    summary = run_summary(run)
    assert summary["test_examples"] == 360 and summary["test_accuracy"] >= 0.9, summary
    assert json.loads((run / "classes.json").read_text()) == list(NAMES)      # the ClassLabel's names, in its order
    for rank in range(2):
        seen = opened(tmp_path / f"trace-{rank}", tmp_path / "tfds")
        assert {f for f in seen if "-train.tfrecord-" in f} == set(train_files[rank::2]), f"rank {rank}"


def test_resnet50_from_keras_applications_trains_a_few_steps_on_two_ranks(tmp_path):
    run = tmp_path / "run"
    proc = horovodrun(2, ["python", WORKER, str(tmp_path), "train", "--config", str(REPO / "configs/resnet50-synthetic.yaml"),
                          "--data.input_shape=[32,32,3]", "--data.synthetic_samples=64", "--trainer.global_batch_size=16",
                          f"--trainer.run_dir={run}"], "gloo", timeout=TIMEOUT)
    assert proc.returncode == 0, output(proc)[-3000:]
    summary = run_summary(run)
    assert summary["status"] == "completed" and summary["num_ranks"] == 2
    assert summary["global_step"] == summary["optimizer_steps"] == 4       # 64 examples / 16 per global batch
    assert np.isfinite(summary["train_loss"]) and summary["test_examples"] == 16
    meta = json.loads(next((run / "checkpoints").glob("ckpt-*/meta.json")).read_text())
    weights = dict((name, shape) for name, shape in meta["signature"]["weights"])
    assert meta["signature"]["model"] == "ResNet50" and meta["signature"]["input_shape"] == [32, 32, 3]
    assert len(weights) > 300 and [7, 7, 3, 64] in weights.values() and [2048, 10] in weights.values()
