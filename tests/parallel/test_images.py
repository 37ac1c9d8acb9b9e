"""Under horovodrun -np 2: real image data end to end through `hvdtrain train/evaluate/predict`.

The digits (1,797 scans) become PNG class folders at 32x32 (built once per session, tests/image_fixtures.py) and
train the CNN to >= 0.95 held-out accuracy on 2 ranks. The training processes run under strace, so the test sees
every image file each rank really opened: rank r must open exactly its round-robin share of the sorted training
files, and of the test files its contiguous validation block and its dealt evaluation batches. The same holds for
ImageNet-style TFRecords (by file) and a TensorFlow Datasets dataset prepared in a local data_dir. Also: corrupt
images (fail / skip), class names in predictions, and a ResNet50 (keras.applications) smoke run. The trainings run
in one launch under strace, the other commands in another (tests/parallel/workers/commands_worker.py).
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

from conftest import REPO, printed, run_commands
from hvdtrain import data
from hvdtrain.data import images
from image_fixtures import CLASSES, NAMES, build_tfds, digits_folders, digits_records

TIMEOUT = 1500          # two shared cores: generous
# The CNN on 32x32 greyscale digits; crop + flip augmentation is off (a flipped digit is another symbol).
DIGITS_ARGS = ["--config", str(REPO / "configs/images.yaml"), "--data.channels=1", "--data.augment=false",
               "--model.width=16", "--trainer.tensorboard=false", "--trainer.global_batch_size=64"]


def traced(out: Path) -> tuple:
    """run_commands' prefix: each rank under strace (file opens only), its trace in out/trace-<rank>."""
    return ("sh", "-c", "exec strace -f -qq --seccomp-bpf -e trace=open,openat -e signal=none "
            f'-o {out}/trace-$HOROVOD_RANK "$@"', "sh")


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
def traced_runs(digits_png, tmp_path_factory):
    """Three trainings on 2 ranks (gloo), one after another in one launch under strace: the digits PNG folders,
    ImageNet-style TFRecords and a TFDS dataset, each read from its own directory. Returns (directory, per-rank
    results of run_commands, the TFRecord files, the TFDS builder); run directories <directory>/<name>-run."""
    out = tmp_path_factory.mktemp("traced")
    records = digits_records(out / "records", files=4, label_offset=1)
    builder = build_tfds(out / "tfds", num_shards=4)
    sources = {
        "images": [f"--data.path={digits_png['train']}", f"--data.test_path={digits_png['test']}", "--trainer.epochs=8"],
        "records": ["--data.source=image_tfrecord", f"--data.path={out / 'records' / 'train'}",
                    f"--data.test_path={out / 'records' / 'test'}", "--data.label_offset=1", "--trainer.epochs=5"],
        "tfds": ["--data.source=tfds", "--data.tfds_name=hvd_digits", f"--data.path={out / 'tfds'}",
                 "--trainer.epochs=5"],
    }
    jobs = [{"name": name, "argv": ["train", *DIGITS_ARGS, *args, f"--trainer.run_dir={out / f'{name}-run'}"]}
            for name, args in sources.items()]
    ranks = run_commands(2, jobs, out, "gloo", timeout=TIMEOUT, prefix=traced(out))
    for name in sources:
        assert [r[name]["code"] for r in ranks] == [0, 0], printed(ranks, name)[-5000:]
    return out, ranks, records, builder


@pytest.fixture(scope="module")
def image_run(traced_runs):
    """The digits PNG folders trained on 2 ranks: (run directory, trace directory, what the ranks printed)."""
    out, ranks, _, _ = traced_runs
    return out / "images-run", out, printed(ranks, "images")


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


@pytest.fixture(scope="module")
def scored(image_run, digits_png, tmp_path_factory):
    """predict and evaluate of the image run on 2 ranks, four commands in one launch: (directory, bad files)."""
    run, _, _ = image_run
    out = tmp_path_factory.mktemp("image-scoring")
    shutil.copytree(digits_png["test"] / "seven", out / "sevens")        # a flat folder of images: unlabelled inputs
    damaged = out / "damaged"   # the test folders and two unreadable files, each first in its class folder
    shutil.copytree(digits_png["test"], damaged)
    bad = [damaged / CLASSES[0] / "a-bad.png", damaged / CLASSES[5] / "a-bad.png"]
    for path in bad:
        path.write_bytes(b"not a PNG")
    for name in ("two", "seven"):   # other class folders, with only two of the ten classes
        shutil.copytree(digits_png["test"] / name, out / "subset" / name)
    jobs = {"names": ["predict", "--run", str(run), "--input", str(damaged), "--data.bad_files=skip",
                      "--fields", "name,probs,path", "--output", str(out / "names.csv")],
            "sevens": ["predict", "--run", str(run), "--input", str(out / "sevens"), "--fields", "class,name,path",
                       "--output", str(out / "sevens.jsonl")],
            "evaluate": ["evaluate", "--run", str(run), "--report", str(out / "eval.json")],
            "subset": ["evaluate", "--run", str(run), "--input", str(out / "subset"), "--report", str(out / "subset.json")]}
    ranks = run_commands(2, [{"name": name, "argv": argv} for name, argv in jobs.items()], out, "gloo", timeout=TIMEOUT)
    for name in jobs:
        assert [r[name]["code"] for r in ranks] == [0, 0], printed(ranks, name)[-3000:]
    return out, bad


def test_predict_writes_class_names_and_evaluate_agrees_with_training(image_run, digits_png, scored):
    run, _, _ = image_run
    out, bad = scored
    rows = list(csv.reader((out / "names.csv").open()))
    assert rows[0] == ["index", "name"] + [f"prob_{i}" for i in range(10)] + ["path"]
    listed = [path for path, _ in images.list_class_folders(str(out / "damaged"))[1]]
    assert len(listed) == 362 and listed.index(str(bad[0])) == 0
    # index: the position among the listed files (the skipped ones have no row and renumber nothing); path: the file
    assert [(int(row[0]), row[-1]) for row in rows[1:]] == [(i, p) for i, p in enumerate(listed) if p not in map(str, bad)]
    truth = [CLASSES[label] for _, label in digits_png["files"]["test"]]
    names = [row[1] for row in rows[1:]]
    probs = np.array([[float(v) for v in row[2:-1]] for row in rows[1:]])
    assert names == [CLASSES[i] for i in probs.argmax(axis=1)]
    assert np.mean([a == b for a, b in zip(names, truth)]) == pytest.approx(run_summary(run)["test_accuracy"])

    flat = out / "sevens"
    lines = [json.loads(line) for line in (out / "sevens.jsonl").read_text().splitlines()]
    assert len(lines) == len(list(flat.iterdir())) == 36
    assert [(line["index"], line["path"]) for line in lines] == list(enumerate(images.list_images(str(flat))))
    assert all(CLASSES[line["class"]] == line["name"] for line in lines)
    assert sum(line["name"] == "seven" for line in lines) >= 33

    metrics = json.loads((out / "eval.json").read_text())
    assert metrics["examples"] == 360 and metrics["ranks"] == 2
    assert metrics["accuracy"] == run_summary(run)["test_accuracy"]
    assert metrics["loss"] == pytest.approx(run_summary(run)["test_loss"], rel=1e-9)

    # Other class folders, with only two of the ten classes: labelled by the model's class names, not their order.
    metrics = json.loads((out / "subset.json").read_text())
    assert metrics["examples"] == len(list((out / "subset").rglob("*.png"))) == 71 and metrics["accuracy"] >= 0.9, metrics


def small_folder(digits_png, root: Path, per_class: int = 12) -> Path:
    """A copy of the first `per_class` training images of three classes (to damage without touching the shared one)."""
    for name in CLASSES[:3]:
        (root / name).mkdir(parents=True)
        for path in sorted((digits_png["train"] / name).glob("*.png"))[:per_class]:
            shutil.copy(path, root / name / path.name)
    return root


@pytest.fixture(scope="module")
def small_runs(digits_png, tmp_path_factory):
    """Three short jobs on 2 ranks in one launch: a folder with a corrupt image (fails), a folder with two bad files
    and data.bad_files=skip, ResNet50 on synthetic images. Returns (directory, per-rank results, bad files)."""
    out = tmp_path_factory.mktemp("small-runs")
    corrupt = small_folder(digits_png, out / "corrupt")
    bad = {"corrupt": sorted((corrupt / CLASSES[1]).glob("*.png"))[5]}
    bad["corrupt"].write_bytes(bad["corrupt"].read_bytes()[:40])          # a truncated PNG
    skip = small_folder(digits_png, out / "skip")
    bad["skip"] = [sorted((skip / CLASSES[0]).glob("*.png"))[3], sorted((skip / CLASSES[2]).glob("*.png"))[7]]
    bad["skip"][0].write_bytes(b"this is not a PNG")
    bad["skip"][1].write_bytes(bad["skip"][1].read_bytes()[:60])
    small = [*DIGITS_ARGS, "--data.num_classes=3", "--trainer.global_batch_size=8", "--trainer.epochs=1"]
    jobs = [{"name": "corrupt", "argv": ["train", *small, f"--data.path={corrupt}", f"--trainer.run_dir={out / 'corrupt-run'}"]},
            {"name": "skip", "argv": ["train", *small, f"--data.path={skip}", f"--data.test_path={skip}",
                                      "--data.bad_files=skip", f"--trainer.run_dir={out / 'skip-run'}"]},
            {"name": "resnet50", "argv": ["train", "--config", str(REPO / "configs/resnet50-synthetic.yaml"),
                                          "--data.input_shape=[32,32,3]", "--data.synthetic_samples=64",
                                          "--trainer.global_batch_size=16", f"--trainer.run_dir={out / 'resnet50-run'}"]}]
    return out, run_commands(2, jobs, out, "gloo", timeout=TIMEOUT), bad


def test_a_corrupt_image_stops_every_rank_with_one_line_and_writes_nothing(small_runs):
    out, ranks, bad = small_runs
    text = printed(ranks, "corrupt")
    assert [r["corrupt"]["code"] for r in ranks] == [2, 2], text[-3000:]
    errors = [line for line in text.splitlines() if "hvdtrain: error:" in line]
    assert len(errors) == 1, text[-3000:]
    owner = [f for f, _ in images.list_class_folders(str(out / "corrupt"))[1]].index(str(bad["corrupt"])) % 2
    assert errors[0].split("hvdtrain: error: ", 1)[1] == (   # found by the rank that reads it
        f"corrupt or unreadable image {bad['corrupt']} (1 such file(s) in this rank's share); fix or remove it, or set "
        f"data.bad_files=skip to leave such files out (on rank {owner})")
    assert "Traceback" not in text
    assert not (out / "corrupt-run").exists()


def test_bad_files_skip_trains_without_them_and_says_how_many(small_runs):
    out, ranks, bad = small_runs
    assert [r["skip"]["code"] for r in ranks] == [0, 0], printed(ranks, "skip")[-3000:]
    said = [line for line in ranks[0]["skip"]["stdout"].splitlines() if "left out" in line]
    # once per split (train and test read the same folder), from rank 0 only
    assert "left out" not in ranks[1]["skip"]["stdout"] + ranks[1]["skip"]["stderr"] + ranks[0]["skip"]["stderr"]
    assert len(said) == 2 and all(line.startswith("[hvdtrain] ") for line in said), said
    assert said[0].endswith(f"train: left out 2 unreadable image(s) of 36 (data.bad_files=skip), e.g. {bad['skip'][0]}")
    assert said[1].endswith(f"test: left out 2 unreadable image(s) of 36 (data.bad_files=skip), e.g. {bad['skip'][0]}")
    summary = run_summary(out / "skip-run")
    assert summary["status"] == "completed" and summary["test_examples"] == 34
    assert summary["global_step"] == 34 // 2 // 4            # 17 files per rank, per-rank batch 4: 4 steps


def test_imagenet_style_tfrecords_shard_by_file_and_train(traced_runs):
    out, _, records, _ = traced_runs
    run = out / "records-run"
    test_file = [f for f in range(4) for _ in range(f, 360, 4)]   # example -> file: dealt round robin, read file by file
    summary = run_summary(run)
    assert summary["test_examples"] == 360 and summary["test_accuracy"] >= 0.9, summary
    for rank in range(2):
        seen = opened(out / f"trace-{rank}", out / "records")
        assert {f for f in seen if "/train/" in f} == set(records["train"][rank::2])
        # held-out: its contiguous block of files validated, and the files its dealt evaluation batches (256, the
        # evaluator's default) lie in read (evaluation reads the records of every file, decodes only its batches)
        evaluated = {records["test"][test_file[i]] for a, b in data.dealt_batches(360, 256, rank, 2) for i in range(a, b)}
        assert {f for f in seen if "/test/" in f} >= set(records["test"][2 * rank:2 * rank + 2]) | evaluated
    assert not (run / "classes.json").exists()     # TFRecords carry no class names


def test_tfds_dataset_from_a_local_data_dir_shards_by_file_and_trains(traced_runs):
    out, ranks, _, builder = traced_runs
    train_files = [f.filename for f in builder.info.splits["train"].file_instructions]
    assert len(train_files) == 4
    run, text = out / "tfds-run", printed(ranks, "tfds")
    assert "AutoGraph" not in text and "Downloading" not in text
    summary = run_summary(run)
    assert summary["test_examples"] == 360 and summary["test_accuracy"] >= 0.9, summary
    assert json.loads((run / "classes.json").read_text()) == list(NAMES)      # the ClassLabel's names, in its order
    for rank in range(2):
        seen = opened(out / f"trace-{rank}", out / "tfds")
        assert {f for f in seen if "-train.tfrecord-" in f} == set(train_files[rank::2]), f"rank {rank}"


def test_resnet50_from_keras_applications_trains_a_few_steps_on_two_ranks(small_runs):
    out, ranks, _ = small_runs
    assert [r["resnet50"]["code"] for r in ranks] == [0, 0], printed(ranks, "resnet50")[-3000:]
    run = out / "resnet50-run"
    summary = run_summary(run)
    assert summary["status"] == "completed" and summary["num_ranks"] == 2
    assert summary["global_step"] == summary["optimizer_steps"] == 4       # 64 examples / 16 per global batch
    assert np.isfinite(summary["train_loss"]) and summary["test_examples"] == 16
    meta = json.loads(next((run / "checkpoints").glob("ckpt-*/meta.json")).read_text())
    weights = dict((name, shape) for name, shape in meta["signature"]["weights"])
    assert meta["signature"]["model"] == "ResNet50" and meta["signature"]["input_shape"] == [32, 32, 3]
    assert len(weights) > 300 and [7, 7, 3, 64] in weights.values() and [2048, 10] in weights.values()
