"""`hvdtrain predict` / `evaluate` / `bench predict` as a user runs them: console script, scripts/launch.sh (MPI).

Bad input must stop every rank with the same one-line error (printed once) and leave no output file behind.
"""
import hashlib
import json
import subprocess

import pytest

from conftest import PNG_MAGIC, REPO, env, hvdtrain, output
from predict_fixtures import trained_run

LAUNCH = str(REPO / "scripts/launch.sh")
# Each rank reports its own exit code, so the test sees that every rank failed, not just one.
EACH_RANK = ["sh", "-c", 'hvdtrain "$@"; code=$?; echo "rank exit code $code"; exit $code', "sh"]


def launch(np_, args, timeout=180):
    return subprocess.run([LAUNCH, str(np_), *EACH_RANK, *args], cwd=REPO, env=env(), capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return trained_run(tmp_path_factory)


def test_predict_on_two_ranks_reports_throughput_and_writes_the_test_split(run, tmp_path):
    out = tmp_path / "preds.csv"
    proc = launch(2, ["predict", "--run", str(run), "--output", str(out)])
    assert proc.returncode == 0, output(proc)
    assert proc.stdout.count("rank exit code 0") == 2
    lines = out.read_text().splitlines()
    assert lines[0].startswith("index,class,prob_0,") and len(lines) == 1 + 360
    wrote = [line for line in proc.stdout.splitlines() if "wrote " in line]
    assert len(wrote) == 1, proc.stdout   # rank 0 alone reports
    assert f"wrote {out}: 360 rows (class, probs)" in wrote[0]
    assert "samples/s on 2 rank(s) (rank 0: " in wrote[0] and ", rank 1: " in wrote[0]
    assert [p.name for p in tmp_path.iterdir()] == ["preds.csv"]


def test_unwritable_output_stops_every_rank_with_one_line(run, tmp_path):
    """(More bad inputs, on 1, 2 and 3 ranks: tests/parallel/test_predict.py.)"""
    (tmp_path / "file.txt").write_text("a file, not a directory")
    proc = launch(2, ["predict", "--run", str(run), "--output", str(tmp_path / "file.txt" / "preds.npy")])
    assert proc.returncode != 0
    text = output(proc)
    assert text.count("rank exit code 2") == 2, text      # every rank failed, with the user-error code
    errors = [line for line in text.splitlines() if "hvdtrain: error:" in line]
    assert len(errors) == 1 and "cannot write --output" in errors[0] and "(Not a directory)" in errors[0], text
    assert "Traceback" not in text
    assert [p.name for p in tmp_path.iterdir()] == ["file.txt"]


def test_bench_predict_writes_rows_with_throughput_machine_and_versions(run, tmp_path):
    result = tmp_path / "predict.json"
    proc = hvdtrain(["bench", "predict", "--run", str(run), "--samples", "300", "--output", str(result)], timeout=600)
    assert proc.returncode == 0, output(proc)
    doc = json.loads(result.read_text())
    assert doc["benchmark"] == "predict" and [r["np"] for r in doc["rows"]] == [1, 2]
    for row in doc["rows"]:   # all samples over the slowest rank's time
        assert row["impl"] == "hvdtrain predict" and row["samples"] == 300
        assert row["samples_per_sec"] == pytest.approx(300 / row["seconds"])
    assert doc["rows"][0]["speedup"] == 1.0 and doc["summary"]["speedup_np2"] == doc["rows"][1]["speedup"]
    assert doc["rows"][1]["speedup"] == pytest.approx(doc["rows"][1]["samples_per_sec"] / doc["rows"][0]["samples_per_sec"])
    # What was compared is recorded: the sha256 of each rank count's output, the same as a plain 1-process run's.
    digests = {row["output_sha256"] for row in doc["rows"]}
    mine = tmp_path / "own.npy"
    own = hvdtrain(["predict", "--run", str(run), "--input", "synthetic", "--split", "train", "--fields", "probs",
                    "--data.synthetic_samples=300", "--batch-size", "128", "--output", str(mine),
                    "--runtime.intra_op_threads=1", "--runtime.inter_op_threads=1"], timeout=600)
    assert own.returncode == 0, output(own)
    assert digests == {hashlib.sha256(mine.read_bytes()).hexdigest()}
    assert "target" not in json.dumps(doc["summary"])          # measured ratios only; the goals live in the report
    assert doc["stack"]["keras"] == doc["versions"]["keras"]
    assert doc["machine"]["cpus"] >= 1 and doc["versions"]["horovod"] == "0.28.1" and "tensorflow-cpu" in doc["versions"]
    assert [len(r["per_rank"]) for r in doc["runs"]] == [1, 2]
    assert result.with_suffix(".png").read_bytes()[:8] == PNG_MAGIC
    assert "speed-up at 2 ranks:" in proc.stdout
