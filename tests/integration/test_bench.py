"""`hvdtrain bench allreduce | train` end to end (each driver launches its own ranks), tiny sizes: correct sums,
promised fields (the stack included), plots. These check correctness only; speed is for `make bench`, never for
tests. `bench stacks`, which runs both virtualenvs, is in tests/integration/test_bench_stacks.py."""
import json
import os
import time

import pytest

from conftest import PNG_MAGIC, assert_rank_stack, hvdtrain, output


def timed(args, timeout):
    """hvdtrain ARGS, and the seconds it took: a bound on any time it reports."""
    started = time.monotonic()
    proc = hvdtrain(args, timeout=timeout)
    return proc, time.monotonic() - started


@pytest.fixture(scope="module")
def allreduce_doc(tmp_path_factory):
    """One driver run: it launches horovodrun --mpi, then --gloo, and merges both into one file."""
    out = tmp_path_factory.mktemp("allreduce") / "ar.json"
    proc, seconds = timed(["bench", "allreduce", "--np", "2", "--max-size", "1MB", "--budget-mb", "1", "--repeats",
                           "1", "--eager", "--output", str(out)], timeout=900)
    assert proc.returncode == 0, output(proc)
    return out, json.loads(out.read_text()), proc, seconds


def test_allreduce_every_implementation_returns_the_exact_sum(allreduce_doc):
    _, doc, _, _ = allreduce_doc
    impls = {r["impl"] for r in doc["rows"]}
    assert impls == {"mpi4py", "mpi4py-hvdtrain-settings", "mpi4py-hvdtrain-env", "hvdtrain-mpi", "hvdtrain-mpi-eager",
                     "hvdtrain-gloo", "hvdtrain-gloo-eager"}
    for impl in impls:
        sizes = sorted(r["size_bytes"] for r in doc["rows"] if r["impl"] == impl)
        assert sizes == [4096, 16384, 65536, 262144, 1048576], impl
    for row in doc["rows"]:
        assert row["correct"] is True and row["max_abs_error"] == 0.0, row


def test_allreduce_json_has_the_promised_fields(allreduce_doc):
    _, doc, _, seconds = allreduce_doc
    assert doc["benchmark"] == "allreduce" and doc["np"] == 2
    for row in doc["rows"]:
        assert {"impl", "size_bytes", "time_us", "algbw_gbps", "busbw_gbps", "iters"} <= set(row)
        # --budget-mb 1: 1 MB of all-reduces per size, within 3 and 1,000 of them
        assert row["iters"] == min(1000, max(3, round(2**20 / row["size_bytes"]))), row
        assert 0 < row["time_us"] * 1e-6 * row["iters"] < seconds, row   # they ran within the driver's run
        # nccl-tests definitions: algbw = S/t, busbw = algbw * 2(n-1)/n (= algbw at n=2).
        assert row["algbw_gbps"] == pytest.approx(row["size_bytes"] / (row["time_us"] * 1e-6) / 1e9)
        assert row["busbw_gbps"] == pytest.approx(row["algbw_gbps"] * 2 * (2 - 1) / 2)
    assert {"tensorflow-cpu", "keras", "horovod", "mpi4py", "python"} <= set(doc["versions"])
    assert_rank_stack(doc["stack"])
    assert doc["machine"]["cpus"] >= 1 and len(doc["machine"]["loadavg"]) == 3
    assert sorted(run["launch"] for run in doc["runs"]) == ["gloo", "mpi", "mpi-raw", "mpi-raw-hvdtrain"]
    assert all(len(run["loadavg_before"]) == 3 for run in doc["runs"])
    # hvdtrain's configured settings reached both Horovod launches; auto picks MPI operations under mpirun.
    # The raw baseline ran once with OpenMPI's defaults and once with hvdtrain's OpenMPI settings.
    assert doc["settings"]["mpi"]["HOROVOD_CPU_OPERATIONS"] == "MPI"
    assert doc["settings"]["mpi"]["OMPI_MCA_mpi_yield_when_idle"] == "1"
    assert doc["settings"]["mpi"]["HOROVOD_WAKE_ON_ENQUEUE"] == "1"
    assert "HOROVOD_CYCLE_TIME" in doc["settings"]["gloo"]
    assert doc["settings"]["mpi-raw"] == {"OpenMPI": "defaults"}
    assert doc["settings"]["mpi-raw-hvdtrain"] == {"OMPI_MCA_mpi_yield_when_idle": "1"}
    # Only 1 MB of the 1-16 MB range is measured here, so the summary ratio is that one size's ratio,
    # against the fastest of the raw MPI measurements.
    busbw = {(r["impl"], r["size_bytes"]): r["busbw_gbps"] for r in doc["rows"]}
    raw = max(busbw[(impl, 1 << 20)] for impl in ("mpi4py", "mpi4py-hvdtrain-settings", "mpi4py-hvdtrain-env"))
    assert doc["summary"]["hvdtrain-mpi"]["busbw_vs_mpi_1_16mb_min"] == pytest.approx(busbw[("hvdtrain-mpi", 1 << 20)] / raw)
    assert not any("target" in key for s in doc["summary"].values() for key in s)   # ratios, no verdicts


def test_allreduce_writes_a_plot_and_prints_a_table(allreduce_doc):
    out, _, proc, _ = allreduce_doc
    assert out.with_suffix(".png").read_bytes()[:8] == PNG_MAGIC
    assert "busbw_gbps" in proc.stdout and "hvdtrain-mpi: 4 KB latency" in proc.stdout


def test_train_bench_compares_single_hvdtrain_horovod_and_mwms(tmp_path):
    out = tmp_path / "train.json"
    proc = hvdtrain(["bench", "train", "--np", "2", "--steps", "2", "--warmup", "2", "--batch", "8",
                     "--output", str(out)], timeout=1200)
    assert proc.returncode == 0, output(proc)
    doc = json.loads(out.read_text())
    got = {(r["model"], r["impl"], r["np"]) for r in doc["rows"]}
    assert got == {(m, i, n) for m in ("mlp", "cnn")
                   for i, n in (("single", 1), ("hvdtrain", 2), ("horovod", 2), ("horovod-tuned", 2), ("mwms", 2))}
    speed = {(r["model"], r["impl"]): r["samples_per_sec"] for r in doc["rows"]}
    for row in doc["rows"]:
        assert row["global_batch"] == 8 * row["np"] and row["steps"] == 2
        assert row["samples_per_sec"] == pytest.approx(row["global_batch"] / (row["step_ms"] / 1e3))
        assert row["per_rank_samples_per_sec"] == pytest.approx(row["samples_per_sec"] / row["np"])
        if row["np"] == 2:   # weak scaling: T(2) / (2 T(1))
            assert row["efficiency"] == pytest.approx(row["samples_per_sec"] / (2 * speed[row["model"], "single"]))
        if row["impl"] == "hvdtrain":
            assert row["comm_share"] == pytest.approx(max(0.0, 1.0 - row["local_step_ms"] / row["step_ms"]))
            assert 0.0 <= row["comm_share"] < 1.0
            assert row["pipeline_ratio"] == pytest.approx(row["pipeline_samples_per_sec"]
                                                          / row["per_rank_samples_per_sec"])
            # CPU time of both ranks per step: at most every core of the machine for both processes' whole step.
            for cpu, wall in ((row["cpu_ms_per_step"], row["step_ms"]), (row["local_cpu_ms_per_step"], row["local_step_ms"])):
                assert 0 < cpu <= 2 * os.cpu_count() * wall
        if row["impl"] == "mwms" and doc["stack"]["name"] == "tf2.21":   # Keras 3: stock model.fit is recorded
            assert row["stock_fit"].startswith("fails: ")   # keras-team/keras#20585
    mlp = next(r for r in doc["rows"] if r["model"] == "mlp")
    assert 6_000_000 < mlp["params"] < 6_500_000   # the communication-heavy model really is ~6M parameters
    assert set(doc["summary"]) == {"mlp", "cnn"}
    for peer in ("mwms", "horovod", "horovod-tuned"):   # hvdtrain's speed over each peer's, the same model
        assert doc["summary"]["mlp"][f"hvdtrain_vs_{peer}"] == pytest.approx(speed["mlp", "hvdtrain"] / speed["mlp", peer])
    assert doc["summary"]["mlp"]["efficiency_horovod"] == next(r["efficiency"] for r in doc["rows"]
                                                               if (r["model"], r["impl"]) == ("mlp", "horovod"))
    assert doc["settings"]["hvdtrain"]["intra_op_threads"] == 1
    assert doc["settings"]["hvdtrain"]["HOROVOD_CPU_OPERATIONS"] == "MPI"
    # The plain loop starts with Horovod's and OpenMPI's defaults, the tuned one with hvdtrain's settings.
    assert doc["settings"]["horovod-tuned"]["OMPI_MCA_mpi_yield_when_idle"] == "1"
    assert "OMPI_MCA_mpi_yield_when_idle" not in doc["settings"]["horovod"]
    assert_rank_stack(doc["stack"])
    assert out.with_suffix(".png").read_bytes()[:8] == PNG_MAGIC


def test_averaging_bench_compares_the_ways_and_finds_overlap_in_the_timeline(tmp_path):
    out = tmp_path / "averaging.json"
    proc = hvdtrain(["bench", "averaging", "--np", "2", "--models", "mlp", "--ways", "one-group,bucket-4MB",
                     "--rounds", "1", "--steps", "4", "--warmup", "2", "--output", str(out)], timeout=1200)
    assert proc.returncode == 0, output(proc)
    doc = json.loads(out.read_text())
    rows = {r["way"]: r for r in doc["rows"]}
    assert set(rows) == {"one-group", "bucket-4MB"} and {r["model"] for r in doc["rows"]} == {"mlp"}
    for row in rows.values():
        assert row["exposed_ms"] == pytest.approx(max(0.0, row["step_ms"] - row["local_step_ms"]))
    # The MLP's 6 gradients (3 kernels, 3 biases): one group, or the 16 MB kernel closing the first 4 MB bucket.
    assert rows["one-group"]["bucket_layout"] == "5,4,3,2,1,0" and rows["bucket-4MB"]["bucket_layout"] == "5,4,3,2|1,0"
    assert rows["one-group"]["speed_vs_one_group"] == 1.0 and rows["bucket-4MB"]["same_as_one_group"] is False
    assert doc["summary"]["mlp"]["fastest_exact"] in rows
    traced = {r["way"]: r for r in doc["timeline"]}
    assert set(traced) == set(rows)
    for r in traced.values():   # all-reduce work in every timed step (the union of its spans), within the step
        assert 0 < r["timeline_allreduce_ms"] <= r["step_ms"] * 1.01, r
    for r in traced.values():
        assert 0 <= r["timeline_overlapped_ms"] <= r["timeline_overlapped_max_ms"]
    # One group is requested once its last gradient exists: nothing of it can run during the backward pass.
    assert traced["one-group"]["timeline_overlapped_max_ms"] == 0
    assert out.with_suffix(".png").read_bytes()[:8] == PNG_MAGIC


def test_train_bench_runs_resnet50_on_synthetic_images_and_reports_images_per_second(tmp_path):
    out = tmp_path / "resnet50.json"
    proc = hvdtrain(["bench", "train", "--np", "2", "--models", "resnet50", "--impls", "single,hvdtrain",
                     "--image-size", "32", "--batch", "2", "--steps", "1", "--warmup", "1", "--output", str(out)],
                    timeout=1200)
    assert proc.returncode == 0, output(proc)
    doc = json.loads(out.read_text())
    rows = {r["impl"]: r for r in doc["rows"]}
    assert set(rows) == {"single", "hvdtrain"}
    for row in rows.values():
        assert (row["model"], row["input"], row["classes"], row["per_rank_batch"]) == ("resnet50", "32x32x3", 1000, 2)
        assert 25_000_000 < row["params"] < 26_000_000       # keras.applications ResNet50 with a 1000-class head
        assert row["samples_per_sec"] == pytest.approx(row["per_rank_samples_per_sec"] * row["np"])
    assert rows["hvdtrain"]["np"] == 2
    assert rows["hvdtrain"]["efficiency"] == pytest.approx(rows["hvdtrain"]["samples_per_sec"]
                                                           / (2 * rows["single"]["samples_per_sec"]))
    assert doc["summary"]["resnet50"]["efficiency_hvdtrain"] == rows["hvdtrain"]["efficiency"]
    assert out.with_suffix(".png").read_bytes()[:8] == PNG_MAGIC
