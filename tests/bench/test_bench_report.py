"""The benchmark helpers without a launcher: the result check, sizes, target verdicts, the Markdown report, the CLI."""
import argparse
import json

import numpy as np
import pytest

from conftest import hvdtrain, output
from hvdtrain.bench import allreduce, markdown, report


def fake_impl(factor):
    """An 'all-reduce' on one rank that multiplies by `factor` (3 is the right sum for rank 0 of 2 ranks)."""
    return allreduce.Impl("fake", lambda a: a, lambda x, iters: x * factor, lambda out: out, lambda: None, lambda v: v)


def args(**kw):
    base = dict(min_size=4096, max_size=16384, budget_mb=0.01, repeats=1)
    return argparse.Namespace(**{**base, **kw})


def test_measure_flags_a_wrong_sum_and_accepts_the_right_one():
    right = allreduce._measure([fake_impl(3.0)], args(), rank=0, n=2)
    wrong = allreduce._measure([fake_impl(2.0)], args(), rank=0, n=2)
    assert [r["size_bytes"] for r in right] == [4096, 16384]
    assert all(r["correct"] and r["max_abs_error"] == 0 for r in right)
    assert not any(r["correct"] for r in wrong) and all(r["max_abs_error"] > 0 for r in wrong)
    with pytest.raises(Exception, match="wrong sums: fake at 4 KB"):
        allreduce._wrong(wrong)


def test_sizes_and_iterations_cover_4kb_to_256mb_the_same_on_every_rank():
    s = allreduce.sizes(4 * 1024, 256 * 1024 * 1024)
    assert s[0] == 4096 and s[-1] == 256 * 2**20 and len(s) == 9
    assert allreduce.iterations(4096, 1024) == 1000 and allreduce.iterations(256 * 2**20, 1024) == 4
    assert allreduce._size("16MB") == 16 * 2**20 and allreduce._size("4KB") == 4096


def test_bus_bandwidth_follows_nccl_tests():
    assert report.busbw_gbps(1e9, 1.0, 2) == pytest.approx(1.0)
    assert report.busbw_gbps(1e9, 1.0, 4) == pytest.approx(1.5)   # 2(n-1)/n


def test_report_checks_targets_and_includes_every_benchmark(tmp_path):
    machine = {"cpus": 2, "cpu": "x", "memory_gb": 1, "platform": "p", "loadavg": [1.0, 1.0, 1.0]}
    base = {"np": 2, "machine": machine, "versions": {"horovod": "0.28.1"}, "settings": {}, "runs": []}
    rows = [{"impl": i, "size_bytes": 4096, "time_us": t, "busbw_gbps": 1.0} for i, t in (("mpi4py", 3.0), ("hvdtrain-mpi", 50.0))]
    ar = {**base, "benchmark": "allreduce", "rows": rows, "settings": {"mpi": {"HOROVOD_CYCLE_TIME": "0.1"}},
          "summary": {"hvdtrain-mpi": {"latency_4kb_us": 50.0, "busbw_vs_mpi_1_16mb_min": 0.4, "busbw_vs_mpi_1_16mb_mean": 0.9}}}
    tr = {**base, "benchmark": "train", "rows": [{"model": "mlp", "impl": "single", "np": 1, "samples_per_sec": 10.0}],
          "summary": {"mlp": {"efficiency_hvdtrain": 0.3, "hvdtrain_vs_mwms": 2.0, "pipeline_ratio": 5.0}}}
    pr = {**base, "benchmark": "predict", "rows": [{"mode": "batch", "samples_per_sec": 123.0}]}
    for name, doc in (("allreduce", ar), ("train", tr), ("predict", pr)):
        (tmp_path / f"{name}.json").write_text(json.dumps(doc))
    (tmp_path / "notes.md").write_text("## Notes\n\nhand-written analysis")
    out = tmp_path / "docs" / "benchmarks.md"
    assert markdown.run(argparse.Namespace(dir=str(tmp_path), output=str(out))) == 0
    text = out.read_text()
    assert "| all-reduce busbw / raw MPI_Allreduce, 1-16 MB (worst size) | >= 0.8 | 0.4 | missed: 0.50x of the goal |" in text
    assert "| all-reduce 4 KB latency (us) | <= 100 | 50 | met |" in text
    assert "| mlp: weak-scaling efficiency T(n)/(n T(1)) | >= 0.6 | 0.3 | missed: 0.50x of the goal |" in text
    assert "| mlp: throughput / MultiWorkerMirroredStrategy | >= 1.3 | 2 | met |" in text
    assert "| cnn: weak-scaling efficiency T(n)/(n T(1)) | >= 0.9 | not measured | - |" in text
    assert "| batch | 123 |" in text                       # predict's rows, whatever their columns
    assert "![all-reduce bus bandwidth](../allreduce.png)" in text and "hand-written analysis" in text
    assert "HOROVOD_CYCLE_TIME=0.1" in text


def test_bench_command_lists_its_benchmarks():
    proc = hvdtrain(["bench", "--help"], timeout=60)
    assert proc.returncode == 0, output(proc)
    for name in ("allreduce", "train", "report"):
        assert name in proc.stdout
    bad = hvdtrain(["bench", "nosuch"], timeout=60)
    assert bad.returncode == 2 and "invalid choice" in bad.stderr


def test_timeline_breakdown_merges_overlapping_tensors_inside_the_window(tmp_path):
    """Two tensors whose all-reduces overlap count once; time outside the timed window does not count."""
    from hvdtrain.bench import timeline
    events = [{"name": "process_name", "ph": "M", "pid": 0, "args": {"start_time_since_epoch_in_micros": 1000}}]
    for pid, (a, b) in ((1, (100, 300)), (2, (200, 400)), (3, (5000, 6000))):
        events += [{"ph": "B", "name": "ALLREDUCE", "ts": a, "pid": pid},
                   {"ph": "B", "name": "MPI_ALLREDUCE", "ts": a + 10, "pid": pid},
                   {"ph": "E", "ts": b - 10, "pid": pid}, {"ph": "E", "ts": b, "pid": pid}]
    path = tmp_path / "timeline.json"
    path.write_text("[\n" + ",\n".join(json.dumps(e) for e in events) + ",")   # still being written: no "]"
    got = timeline.breakdown(path, (1000 + 0, 1000 + 1000), steps=2)
    assert got == {"allreduce_ms": pytest.approx(0.300 / 2), "mpi_allreduce_ms": pytest.approx(0.280 / 2)}


def test_fastest_keeps_the_best_time_but_never_hides_a_wrong_result():
    rows = [{"impl": "a", "size_bytes": 4, "time_us": 5.0, "max_abs_error": 0.0, "correct": True},
            {"impl": "a", "size_bytes": 4, "time_us": 3.0, "max_abs_error": 0.0, "correct": True},
            {"impl": "b", "size_bytes": 4, "time_us": 9.0, "max_abs_error": 2.0, "correct": False},
            {"impl": "b", "size_bytes": 4, "time_us": 1.0, "max_abs_error": 0.0, "correct": True}]
    got = {r["impl"]: r for r in allreduce._fastest(rows)}
    assert got["a"]["time_us"] == 3.0 and got["a"]["correct"]
    assert got["b"]["time_us"] == 1.0 and not got["b"]["correct"] and got["b"]["max_abs_error"] == 2.0
