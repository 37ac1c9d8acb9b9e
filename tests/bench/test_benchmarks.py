"""The benchmarks without a launcher: the result check, sizes, best rounds, the stack comparison's ratios, the shared
flags, the Markdown report, the CLI."""
import argparse
import json

import pytest

from hvdtrain.bench import allreduce_worker, harness, memory, pipeline, report, serve, stacks, sync, timeline, train
from conftest import hvdtrain, output


def fake_impl(factor):
    """An 'all-reduce' on one rank that multiplies by `factor` (3 is the right sum for rank 0 of 2 ranks)."""
    return allreduce_worker.Impl("fake", lambda a: a, lambda x, iters: x * factor, lambda out: out, lambda: None,
                                 lambda v: v)


def test_measure_flags_a_wrong_sum_and_accepts_the_right_one():
    args = argparse.Namespace(min_size=4096, max_size=16384, budget_mb=0.01, repeats=1)
    right = allreduce_worker._measure([fake_impl(3.0)], args, rank=0, n=2)
    wrong = allreduce_worker._measure([fake_impl(2.0)], args, rank=0, n=2)
    assert [r["size_bytes"] for r in right] == [4096, 16384]
    assert all(r["correct"] and r["max_abs_error"] == 0 for r in right)
    assert not any(r["correct"] for r in wrong) and all(r["max_abs_error"] > 0 for r in wrong)
    with pytest.raises(Exception, match="wrong sums: fake at 4 KB"):
        allreduce_worker._wrong(wrong)


def test_sizes_and_iterations_cover_4kb_to_256mb_the_same_on_every_rank():
    s = allreduce_worker.sizes(4 * 1024, 256 * 1024 * 1024)
    assert s[0] == 4096 and s[-1] == 256 * 2**20 and len(s) == 9
    assert allreduce_worker.iterations(4096, 1024) == 1000 and allreduce_worker.iterations(256 * 2**20, 1024) == 4
    assert allreduce_worker._size("16MB") == 16 * 2**20 and allreduce_worker._size("4KB") == 4096
    assert allreduce_worker._size("16777216") == 16 * 2**20   # what a driver forwards


def test_bus_bandwidth_follows_nccl_tests():
    assert harness.busbw_gbps(1e9, 1.0, 2) == pytest.approx(1.0)
    assert harness.busbw_gbps(1e9, 1.0, 4) == pytest.approx(1.5)   # 2(n-1)/n


def test_best_by_keeps_one_row_per_key_the_best_by_column_or_function():
    rows = [{"m": "a", "v": 1.0}, {"m": "b", "v": 5.0}, {"m": "a", "v": 3.0}, {"m": "b", "v": 2.0}]
    assert harness.best_by(rows, ("m",), "v") == [{"m": "a", "v": 3.0}, {"m": "b", "v": 5.0}]
    assert harness.best_by(rows, ("m",), "v", higher=False) == [{"m": "a", "v": 1.0}, {"m": "b", "v": 2.0}]
    assert harness.best_by(rows, (), lambda r: -abs(r["v"] - 2.9)) == [{"m": "a", "v": 3.0}]


def test_fastest_keeps_the_best_time_but_never_hides_a_wrong_result():
    rows = [{"impl": "a", "size_bytes": 4, "time_us": 5.0, "max_abs_error": 0.0, "correct": True},
            {"impl": "a", "size_bytes": 4, "time_us": 3.0, "max_abs_error": 0.0, "correct": True},
            {"impl": "b", "size_bytes": 4, "time_us": 9.0, "max_abs_error": 2.0, "correct": False},
            {"impl": "b", "size_bytes": 4, "time_us": 1.0, "max_abs_error": 0.0, "correct": True}]
    got = {r["impl"]: r for r in allreduce_worker._fastest(rows)}
    assert got["a"]["time_us"] == 3.0 and got["a"]["correct"]
    assert got["b"]["time_us"] == 1.0 and not got["b"]["correct"] and got["b"]["max_abs_error"] == 2.0


def test_a_driver_forwards_its_workload_flags_to_a_worker_unchanged():
    driver, worker = argparse.ArgumentParser(), argparse.ArgumentParser()
    train.add_arguments(driver)
    train.add_workload_arguments(worker)
    args = driver.parse_args(["--models", "resnet50", "--steps", "3", "--batch", "4", "--image-size", "32"])
    forwarded = harness.forward(args, train.WORKLOAD_ARGS)
    assert forwarded[:2] == ["--models", "resnet50"] and "--image-size" in forwarded
    got = worker.parse_args(forwarded)
    assert all(getattr(got, name) == getattr(args, name) for name in train.WORKLOAD_ARGS)
    assert train.input_shape(train.WORKLOADS["resnet50"], 32) == (32, 32, 3)
    assert train.input_shape(train.WORKLOADS["cnn"], 32) == (32, 32, 3) == train.WORKLOADS["cnn"].input_shape
    assert harness.forward(argparse.Namespace(eager=True, quiet=False), ["eager", "quiet"]) == ["--eager"]


def test_the_stack_is_named_from_package_versions():
    new = harness.stack_of({"tensorflow-cpu": "2.21.0", "keras": "3.15.1"})
    old = harness.stack_of({"tensorflow-cpu": "2.15.1", "keras": "2.15.0"})
    assert (new["name"], new["keras"], old["name"], old["tensorflow"]) == ("tf2.21", "3.15.1", "tf2.15", "2.15.1")
    assert "Keras 3" in new["integration"] and "Horovod's Keras 2" in old["integration"]
    assert new["source"] == old["source"] == "package metadata"


def test_train_summary_compares_hvdtrain_with_each_peer_and_with_one_rank():
    def row(impl, np_, samples_per_sec):
        return {"model": "mlp", "impl": impl, "np": np_, "samples_per_sec": samples_per_sec}
    rows = [row("single", 1, 100.0), row("hvdtrain", 2, 180.0), row("horovod", 2, 120.0), row("mwms", 2, 90.0)]
    s = train.summarize(rows)["mlp"]
    assert s["efficiency_hvdtrain"] == pytest.approx(0.9) and s["efficiency_horovod"] == pytest.approx(0.6)
    assert s["efficiency_mwms"] == pytest.approx(0.45)
    assert s["hvdtrain_vs_horovod"] == pytest.approx(1.5) and s["hvdtrain_vs_mwms"] == pytest.approx(2.0)
    assert rows[2]["efficiency"] == pytest.approx(0.6)   # each distributed row gets its efficiency too


def stack_rows(new_sps, old_sps, new_us, old_us):
    """Two rounds of both stacks: a model (samples/s, steps without all-reduce) and one all-reduce size."""
    rows = []
    for round_, factor in ((0, 1.0), (1, 0.5)):
        for stack, sps, us in (("new", new_sps, new_us), ("old", old_sps, old_us)):
            rows.append({"benchmark": "train", "stack": stack, "round": round_, "model": "mlp",
                         "samples_per_sec": sps * factor, "local_step_ms": 10.0 / factor})
            rows += [{"benchmark": "allreduce", "stack": stack, "round": round_, "impl": impl, "size_bytes": 4096,
                      "time_us": t / factor} for impl, t in (("hvdtrain-mpi", us), ("mpi4py", 4.0))]
    return rows


def test_stacks_summary_compares_each_sides_best_round_with_controls():
    s = stacks.summarize(stack_rows(new_sps=900.0, old_sps=1000.0, new_us=100.0, old_us=200.0))
    assert s["mlp"]["new"] == 900.0 and s["mlp"]["old"] == 1000.0
    assert s["mlp"]["new_vs_old"] == pytest.approx(0.9) and s["mlp"]["per_round"] == pytest.approx([0.9, 0.9])
    assert s["mlp"]["control_new_vs_old"] == pytest.approx(1.0)
    # all-reduce: time, so new/old speed is old time / new time
    assert s["allreduce 4 KB"]["new_vs_old"] == pytest.approx(2.0) and s["allreduce 4 KB"]["unit"] == "us"
    assert s["allreduce 4 KB"]["control_new_vs_old"] == pytest.approx(1.0)
    one_sided = [r for r in stack_rows(1, 1, 1, 1) if r["stack"] == "new"]
    assert "new_vs_old" not in stacks.summarize(one_sided)["mlp"]


def base_doc(benchmark, stack=None, **kw):
    machine = {"cpus": 2, "cpu": "x", "memory_gb": 1, "platform": "p", "loadavg": [1.0, 1.0, 1.0]}
    doc = {"benchmark": benchmark, "np": 2, "created": "2026-11-28T00:00:00", "machine": machine, "settings": {},
           "runs": [{"round": 0}], "versions": {"tensorflow-cpu": "2.21.0", "keras": "3.15.1", "horovod": "0.28.1"}}
    if stack:
        doc["stack"] = stack
    return {**doc, **kw}


def test_report_shows_each_stage_of_the_breakdown_per_variant(tmp_path):
    stage = "MPI_Allreduce"
    rows = [{"case": "4 KB", "variant": v, "stage": stage, "median_us": m, "p10_us": m - 1, "p90_us": m + 2}
            for v, m in (("before", 12.5), ("hvdtrain", 4.0))]
    rows.append({"case": "4 KB", "variant": "hvdtrain", "stage": "coordination rounds per call", "median_us": 1.0})
    doc = base_doc("breakdown", rows=rows, settings={"before": ["--runtime.wake_on_enqueue=false"],
                                                     "hvdtrain": ["hvdtrain's defaults"]},
                   runs=[{"loadavg": [2.5, 1, 1]}, {"loadavg": [1.5, 1, 1]}])
    (tmp_path / "breakdown.json").write_text(json.dumps(doc))
    out = tmp_path / "benchmarks.md"
    assert report.run(argparse.Namespace(dir=str(tmp_path), output=str(out))) == 0
    text = out.read_text()
    assert "| stage | before | hvdtrain |" in text
    assert "| MPI_Allreduce | 12.5 (11.5-14.5) | 4.0 (3.0-6.0) |" in text
    assert "| coordination rounds per call |  | 1.00 |" in text   # a count, not a time: no spread, blank where absent
    assert "Load average during the runs: 1.5-2.5." in text


def test_report_states_ratios_goals_stacks_and_every_benchmark(tmp_path):
    rank_stack = {"name": "tf2.21", "tensorflow": "2.21.0", "keras": "3.15.1", "source": "rank",
                  "integration": "hvdtrain's own Keras 3 layer over horovod.tensorflow"}
    rows = [{"impl": i, "size_bytes": 4096, "time_us": t, "busbw_gbps": 1.0} for i, t in (("mpi4py", 3.0), ("hvdtrain-mpi", 50.0))]
    docs = {
        "allreduce": base_doc("allreduce", rank_stack, rows=rows, settings={"mpi": {"HOROVOD_CYCLE_TIME": "0.1"}},
                              summary={"hvdtrain-mpi": {"latency_4kb_us": 50.0, "busbw_vs_mpi_1_16mb_min": 0.4,
                                                        "busbw_vs_mpi_1_16mb_mean": 0.9}}),
        "train": base_doc("train", rank_stack, rows=[{"model": "mlp", "impl": "single", "np": 1, "samples_per_sec": 10.0}],
                          summary={"mlp": {"efficiency_hvdtrain": 0.3, "hvdtrain_vs_mwms": 2.0, "pipeline_ratio": 5.0}}),
        "train-resnet50": base_doc("train", rank_stack, summary={"resnet50": {"efficiency_hvdtrain": 0.7}}, rows=[
            {"model": "resnet50", "impl": impl, "np": n, "input": "64x64x3", "classes": 1000, "params": 25_636_712,
             "per_rank_batch": 16, "steps": 10, "step_ms": 500.0, "samples_per_sec": 32.0 * n,
             "per_rank_samples_per_sec": 32.0, "efficiency": 0.7 if n == 2 else None}
            for impl, n in (("single", 1), ("hvdtrain", 2))]),
        "predict": base_doc("predict", rows=[{"mode": "batch", "samples_per_sec": 123.0}], summary={"speedup_np2": 1.5}),
        "tuning": base_doc("tuning", rows=[{"variant": "default", "mlp_step_ms": 40.0}], description="one at a time",
                           versions={"tensorflow-cpu": "2.15.1", "keras": "2.15.0"}),   # from before stacks were recorded
    }
    docs["stacks"] = base_doc("stacks", summary=stacks.summarize(stack_rows(900.0, 1000.0, 100.0, 200.0)),
                              stacks={label: {"venv": f".venv-{label}", "versions": {"horovod": "0.28.1"},
                                              "stack": {**rank_stack, "keras": keras}}
                                      for label, keras in (("new", "3.15.1"), ("old", "2.15.0"))},
                              runs=[{"round": 0}, {"round": 1}])
    for name, doc in docs.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(doc))
    (tmp_path / "notes.md").write_text("## Notes\n\nhand-written analysis")
    out = tmp_path / "docs" / "benchmarks.md"
    assert report.run(argparse.Namespace(dir=str(tmp_path), output=str(out))) == 0
    text = out.read_text()
    assert ("| all-reduce busbw / raw MPI_Allreduce (the faster raw launch), 1-16 MB, worst size | 0.4 | issue 40: >= 0.9 |"
            in text)
    assert "| all-reduce 4 KB latency (us) | 50 | issue 40: <= 60 |" in text
    assert "| mlp: hvdtrain / MultiWorkerMirroredStrategy samples/s | 2 | issue 4: >= 1.3 |" in text
    assert "| cnn: weak-scaling efficiency T(n)/(n T(1)) | not measured | issue 4: >= 0.9 |" in text
    assert "| mlp: new stack / old stack samples/s (best rounds) | 0.9 | issue 10: >= 0.95 |" in text
    assert "| resnet50: weak-scaling efficiency T(n)/(n T(1)) | 0.7 |  |" in text
    assert "met" not in text.split("## All-reduce")[0].replace("metadata", "")   # ratios and goals, no verdicts
    assert "train: TF 2.21.0, Keras 3.15.1, hvdtrain's own Keras 3 layer over horovod.tensorflow (rank)" in text
    assert "tuning: TF 2.15.1, Keras 2.15.0, Horovod's Keras 2 layer (horovod.tensorflow.keras) (package metadata)" in text
    assert "Measured on 2026-11-28 with TensorFlow 2.15.1 and Keras 2.15.0. one at a time" in text
    assert "| hvdtrain | 2 | 64x64x3 | 16 | 500 | 32 | 64 | 0.7 |" in text          # images/s per rank and total
    assert "--image-size 224" in text                                                  # what a GPU run needs
    assert "| mlp | samples/s | 900 | 1,000 | 0.9 | 0.90, 0.90 | 1 |" in text          # the stack comparison
    assert "| allreduce 4 KB | us | 100 | 200 | 2 | 2.00, 2.00 | 1 |" in text
    assert "- old: `.venv-old`: TensorFlow 2.21.0, Keras 2.15.0" in text
    assert "| batch | 123 |" in text                       # predict's rows, whatever their columns
    assert "![all-reduce bus bandwidth](../allreduce.png)" in text and "hand-written analysis" in text
    assert "HOROVOD_CYCLE_TIME=0.1" in text


def test_report_says_what_was_not_run(tmp_path):
    out = tmp_path / "b.md"
    assert report.run(argparse.Namespace(dir=str(tmp_path), output=str(out))) == 0
    text = out.read_text()
    assert "## All-reduce\n\nNot run." in text and "Not run (`hvdtrain bench stacks`)." in text
    assert "| inference speed-up at 2 ranks | not measured | issue 5: >= 1.8 |" in text


def test_timeline_breakdown_merges_overlapping_tensors_inside_the_window(tmp_path):
    """Two tensors whose all-reduces overlap count once; time outside the timed window does not count."""
    events = [{"name": "process_name", "ph": "M", "pid": 0, "args": {"start_time_since_epoch_in_micros": 1000}}]
    for pid, (a, b) in ((1, (100, 300)), (2, (200, 400)), (3, (5000, 6000))):
        events += [{"ph": "B", "name": "ALLREDUCE", "ts": a, "pid": pid},
                   {"ph": "B", "name": "MPI_ALLREDUCE", "ts": a + 10, "pid": pid},
                   {"ph": "E", "ts": b - 10, "pid": pid}, {"ph": "E", "ts": b, "pid": pid}]
    path = tmp_path / "timeline.json"
    path.write_text("[\n" + ",\n".join(json.dumps(e) for e in events) + ",")   # still being written: no "]"
    got = timeline.breakdown(timeline.spans(path), (1000 + 0, 1000 + 1000), steps=2)
    assert got == {"allreduce_ms": pytest.approx(0.300 / 2), "mpi_allreduce_ms": pytest.approx(0.280 / 2)}


def test_bench_command_lists_its_benchmarks_and_leaves_the_ranks_to_the_drivers():
    proc = hvdtrain(["bench", "--help"], timeout=120)
    assert proc.returncode == 0, output(proc)
    for name in ("allreduce", "train", "averaging", "stacks", "predict", "tune", "pipeline", "sync", "serve", "tensor",
                 "memory", "report"):
        assert name in proc.stdout
    assert "--role" not in hvdtrain(["bench", "train", "--help"], timeout=120).stdout   # no hidden worker flags
    bad = hvdtrain(["bench", "nosuch"], timeout=120)
    assert bad.returncode == 2 and "invalid choice" in bad.stderr


def test_a_driver_under_a_launcher_refuses_and_says_why(monkeypatch):
    import subprocess

    from conftest import BIN, env
    proc = subprocess.run([str(BIN / "hvdtrain"), "bench", "train", "--np", "2"], env={**env(), "PMIX_RANK": "0"},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "starts its own ranks: run it without a launcher" in proc.stderr, output(proc)


def test_workers_are_entry_modules_with_their_own_help():
    import subprocess

    from conftest import BIN, env
    for module, flag in (("train_worker", "--role"), ("horovod_worker", "--models"),
                         ("mwms_worker", "--stock-fit-only"), ("allreduce_worker", "--raw-only"),
                         ("pipeline_worker", "--micro-batch"), ("tensor_worker", "--layouts")):
        proc = subprocess.run([str(BIN / "python"), "-m", f"hvdtrain.bench.{module}", "--help"], env=env(),
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0 and flag in proc.stdout, output(proc)


def test_pipeline_idle_is_measured_against_the_makespan_of_the_quietest_round():
    """Stage busy time over the pipeline's makespan (its longest span), the round with the shortest makespan kept,
    only replica 0's pipeline reported, and the deviation from (P-1)/(M+P-1) summarised for M >= 4."""
    def worker_row(stage, round_, span, waited, replica=0):
        return {"schedule": "1f1b", "micro": 4, "round": round_, "rank": stage + 2 * replica, "stage": stage,
                "replica": replica, "schedule_ms": span, "busy_ms": span - waited, "step_ms": span + 1,
                "p2p_bytes_per_step": 2**20, "stashed_peak": 2 - stage, "param_bytes": 50, "optimizer_bytes": 50}
    got = {"stages": 2, "whole_param_bytes": 100, "cost": "fixed", "rows": [
        worker_row(0, 0, 100.0, 20.0), worker_row(1, 0, 90.0, 10.0),      # makespan 100: idle 0.2 and 0.2
        worker_row(0, 1, 300.0, 0.0), worker_row(1, 1, 300.0, 0.0),       # a disturbed round: longer, dropped
        worker_row(0, 0, 50.0, 0.0, replica=1)]}                          # another replica: not reported
    rows = pipeline.table(got)
    assert [(r["stage"], r["idle"], r["makespan_ms"]) for r in rows] == [(1, pytest.approx(0.2), 100.0),
                                                                         (2, pytest.approx(0.2), 100.0)]
    assert rows[0]["formula"] == pytest.approx(0.2) and rows[0]["param_share"] == 0.5
    assert rows[0]["p2p_mb_per_step"] == 1.0 and rows[0]["stashed_peak"] == 2
    assert rows[0]["allreduce_mb_per_step"] * 2 == rows[0]["dp_allreduce_mb_per_step"] == 100 / 2**20
    summary = pipeline.summarize(rows)
    assert summary["p2_1f1b_max_deviation_m4plus"] == pytest.approx(0.0, abs=1e-9)
    assert summary["p2_1f1b_stashed_peak_stage1"] == 2
    dense = pipeline.summarize(pipeline.table({**got, "cost": "dense"}))   # real compute: reported apart
    assert set(dense) == {"dense_p2_1f1b_max_deviation_m4plus", "dense_p2_1f1b_stashed_peak_stage1"}


def test_pipeline_throughput_takes_the_slowest_rank_and_sums_the_bytes():
    def row(impl, rank, seconds, round_=0, p2p=0, allreduce=0):
        return {"impl": impl, "rank": rank, "round": round_, "global_batch": 8, "seconds": seconds, "samples": 80,
                "p2p_bytes_per_step": p2p, "allreduce_bytes_per_step": allreduce}
    got = {"rows": [row("pipeline 2x2", r, 2.0 if r == 3 else 1.0, p2p=2**20, allreduce=2**20) for r in range(4)]
           + [row("pipeline 2x2", r, 4.0, round_=1) for r in range(4)]                  # a slower round: dropped
           + [row("data parallel x4", r, 1.0, allreduce=2 * 2**20) for r in range(4)]}
    rows = pipeline.throughput_table(got)
    assert [(r["impl"], r["samples_per_sec"], r["p2p_mb_per_step"], r["allreduce_mb_per_step"]) for r in rows] == [
        ("data parallel x4", 80.0, 0.0, 8.0), ("pipeline 2x2", 40.0, 4.0, 4.0)]
    summary = pipeline.throughput_summary(rows)
    assert summary == {"pipeline_vs_data_parallel_samples_per_sec": 0.5, "p2p_mb_vs_allreduce_mb_saved": 1.0}


def test_sync_counts_rounds_to_the_target_and_compares_with_fedsgd_and_every_step(tmp_path):
    """Rounds to the target: the first round whose evaluation reaches it (never: None, and no speed-up); the speed-up
    is FedSGD's rounds on the same clients over these; local SGD's bytes against every-step averaging's."""
    def metrics(name, accuracies):
        run = tmp_path / name
        run.mkdir()
        lines = ["global_step,val_accuracy,communicated_bytes"]
        lines += [f"{i + 1},{a},{2 ** 20}" for i, a in enumerate(accuracies)]
        (run / "metrics.csv").write_text("\n".join(lines) + "\n")
        return run
    rows = [sync.fedavg_row("FedSGD", 1, 0, "iid", metrics("sgd", [0.5, 0.9, 0.94, 0.96, 0.97]), 0.95),
            sync.fedavg_row("FedAvg", 5, 10, "iid", metrics("avg", [0.8, 0.96, 0.94, 0.97]), 0.95),
            sync.fedavg_row("FedAvg", 1, 10, "iid", metrics("slow", [0.5, 0.6]), 0.95)]
    summaries = []
    for name, sync_mode, sent in (("every", "every_step", 8 * 2**20), ("h4", "local_sgd", 2 * 2**20)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "summary.json").write_text(json.dumps(
            {"test_accuracy": 0.97, "communicated_bytes": sent, "samples_per_sec": 100.0, "sync": {"mode": sync_mode}}))
        summaries.append(sync.local_row(None if name == "every" else 4, tmp_path / name))
    sync.add_ratios(rows, summaries)
    assert [(r["rounds_to_target"], r["speedup"], r["mb_to_target"], r["B"]) for r in rows] == [
        (4, 1.0, 4.0, "all"), (2, 2.0, 2.0, 10), (None, None, None, 10)]
    assert [(r["sync"], r["H"], r["bytes_vs_every_step"]) for r in summaries] == [
        ("every_step", 1, 1.0), ("local_sgd", 4, 0.25)]
    assert sync.summarize(rows, summaries)["FedAvg_E5_B10_iid_rounds"] == 2


def test_timeline_overlap_is_bounded_by_the_requests_and_the_background_threads_idle_time(tmp_path):
    """Step 1: a bucket reduced (100-300), then the thread idle until the last request (700): 200 us certainly
    overlapped. Step 2: one group, reduced after its requests: none. Step 3: the last request stamped the moment a
    reduce ends (2500): it may have waited in the queue, so 400 us at most, none for certain. Step 2's requests
    came before the step began (a faster peer): its work, not its requests, places it in its step."""
    events = [{"name": "process_name", "ph": "M", "pid": 0, "args": {"start_time_since_epoch_in_micros": 0}}]
    for pid, (asked, began, ended) in ((1, (50, 100, 300)), (2, (700, 720, 800)), (3, (990, 1150, 1300)),
                                       (4, (2050, 2100, 2500)), (5, (2500, 2510, 2600))):
        events += [{"ph": "B", "name": "NEGOTIATE_ALLREDUCE", "ts": asked, "pid": pid}, {"ph": "E", "ts": began, "pid": pid},
                   {"ph": "B", "name": "ALLREDUCE", "ts": began, "pid": pid},
                   {"ph": "B", "name": "MPI_ALLREDUCE", "ts": began + 1, "pid": pid}, {"ph": "E", "ts": ended - 1, "pid": pid},
                   {"ph": "E", "ts": ended, "pid": pid}]
    path = tmp_path / "timeline.json"
    path.write_text(json.dumps(events))
    got = timeline.overlap(timeline.spans(path), [0, 1000, 2000, 3000])
    assert got == {"overlapped_ms": pytest.approx(0.200 / 3), "overlapped_max_ms": pytest.approx(0.600 / 3),
                   "steps_overlapped": pytest.approx(1 / 3)}
    assert timeline.overlap(timeline.spans(path), [5000, 6000]) == {}   # no all-reduce in the window


def test_averaging_measures_every_way_against_one_group_and_keeps_identical_ways_as_noise_controls():
    from hvdtrain.bench import averaging

    def row(way, round_, step, local, layout="1,0"):
        return {"model": "mlp", "way": way, "round": round_, "step_ms": step, "local_step_ms": local,
                "bucket_layout": layout, "samples_per_sec": 1000 / step, "loadavg": [1.0, 1.0, 1.0]}
    rows = averaging.best_rows([row("one-group", 0, 40.0, 22.0), row("one-group", 1, 30.0, 20.0),
                                row("bucket-4MB", 0, 25.0, 20.0, "1|0"), row("fp16", 0, 24.0, 20.0),
                                row("bucket-25MB", 0, 20.0, 19.0), row("per-tensor", 1, 35.0, 20.0, "1|0")])
    by_way = {r["way"]: r for r in rows}
    assert [r["way"] for r in rows] == ["one-group", "bucket-4MB", "bucket-25MB", "per-tensor", "fp16"]   # WAYS order
    assert all("loadavg" not in r for r in rows)   # lists stay out of the table
    assert by_way["one-group"]["step_ms"] == 30.0 and by_way["one-group"]["exposed_ms"] == 10.0   # its best round
    assert by_way["bucket-25MB"]["same_as_one_group"] and not by_way["bucket-4MB"]["same_as_one_group"]
    assert not by_way["fp16"]["same_as_one_group"]   # the same buckets, but other bytes
    # One group's best is the 25 MB launch (20 ms, 1 ms exposed): it sent exactly one group.
    assert by_way["one-group"]["speed_vs_one_group"] == pytest.approx(20.0 / 30.0)
    assert by_way["bucket-4MB"]["speed_vs_one_group"] == pytest.approx(20.0 / 25.0)
    assert by_way["bucket-4MB"]["exposed_vs_one_group"] == pytest.approx(5.0 / 1.0)
    summary = averaging.summarize(rows, [])["mlp"]
    # The fastest row is one group under another name and fp16 is lossy: neither is the evidence for a default.
    assert summary["fastest_exact"] == "bucket-4MB"
    assert summary["noise_band"] == [pytest.approx(20.0 / 30.0), 1.0]


def test_serve_rows_and_summary_come_from_the_answers_the_cpu_and_the_replica_samples(tmp_path):
    answers = [(0.010, 200, 1), (0.020, 200, 3), (0.030, 200, 3), (0.5, 500, None)]   # (latency s, status, batch)
    row = serve._row("on", 4, answers, 2.0, [1, 2, 2], {"proxy": 0.03, "model": 0.06, "clients": 0.0})
    assert (row["answers"], row["errors"], row["answers_per_sec"]) == (3, 1, 1.5)
    assert row["p50_ms"] == pytest.approx(20.0) and row["mean_batch"] == pytest.approx(7 / 3)
    assert (row["replicas_max"], row["replicas_end"]) == (2, 2)
    assert (row["cpu_proxy_ms"], row["cpu_model_ms"], row["cpu_ingress_ms"]) == pytest.approx((10.0, 20.0, 0.0))
    assert row["cpu_total_ms"] == pytest.approx(30.0)
    rows = [row, {**row, "batching": "off", "answers_per_sec": 1.0}]
    samples = [{"t": 0.0, "clients": 0, "replicas": 1}, {"t": 1.0, "clients": 4, "replicas": 1},
               {"t": 2.0, "clients": 4, "replicas": 2}, {"t": 3.0, "clients": 0, "replicas": 2},
               {"t": 7.5, "clients": 0, "replicas": 1}]
    summary = serve.summarize(rows, {"on": samples})
    assert summary["on_vs_off_answers_per_sec_4_clients"] == 1.5
    assert (summary["on_replicas_start"], summary["on_replicas_peak"], summary["on_replicas_after_idle"]) == (1, 2, 1)
    assert summary["on_scale_down_s_after_load"] == pytest.approx(5.5)   # removed at 7.5 s, the load's last sample 2 s
    doc = base_doc("serve", rows=rows, timeline={"on": samples}, summary=summary,
                   settings={"batching": serve.SETTINGS, "autoscaling": serve.AUTOSCALING, "requests": 100,
                             "phase_s": 5.0, "idle_s": 9.0})
    (tmp_path / "serve.json").write_text(json.dumps(doc))
    out = tmp_path / "benchmarks.md"
    assert report.run(argparse.Namespace(dir=str(tmp_path), output=str(out))) == 0
    text = out.read_text()
    assert "| serving: batching on / off answers/s at the highest load | 1.5 |  |" in text
    assert "batching on: 1 -> 2 -> 1 replicas (the last removed 6 s after the load ended)" in text
    assert "| on | 4 | 3 | 2 | 1.5 | 20 |" in text and "![serving](serve.png)" in text
    serve.plot(doc, tmp_path / "serve.png")
    assert (tmp_path / "serve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_memory_rows_hold_each_stages_largest_rank_against_the_formula_and_stage_0():
    """Per (model, D, stage) the fastest round; its largest rank's bytes against K Psi (/ D when sharded); its peak
    growth and step time against stage 0's on the same ranks."""
    def row(stage, round_, step_ms, state, peak):
        ranks = [{"optimizer_state_bytes": state + extra, "gradient_bytes": 400 // (2 if stage == 2 else 1),
                  "weights_bytes": 400, "peak_rss_bytes": peak + extra, "baseline_rss_bytes": 1000}
                 for extra in (0, 8)]
        return {"model": "mlp", "ranks": 2, "stage": stage, "parameters": 100, "step_ms": step_ms, "round": round_,
                "per_rank": ranks}
    rows = memory.table([row(0, 0, 10.0, 800, 3000), row(0, 1, 12.0, 800, 9000), row(1, 0, 11.0, 400, 2000),
                         row(2, 1, 15.0, 400, 2500)])
    assert [(r["stage"], r["round"]) for r in rows] == [(0, 0), (1, 0), (2, 1)]   # stage 0's faster round
    zero, one, two = rows
    assert one["state_vs_formula"] == pytest.approx(408 / 400) and zero["state_vs_formula"] == pytest.approx(808 / 800)
    assert two["gradient_mb"] == two["formula_gradient_mb"] == 200 / 2**20
    assert one["rss_growth_vs_stage0"] == pytest.approx(1008 / 2008) and one["step_vs_stage0"] == pytest.approx(1.1)
    assert memory.summarize(rows)["mlp_d2_stage2_state_vs_stage0"] == pytest.approx(408 / 808)
