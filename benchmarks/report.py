"""Write docs/benchmarks.md from the benchmark JSON files in one directory (what `make bench` ends with).

    hvdtrain bench report --dir docs/bench --output docs/benchmarks.md

Reads allreduce.json, train.json, predict.json and tuning.json when present (a missing one is reported as
not run), checks the targets of issue 4 against the numbers, and appends notes.md from the same directory
(the hand-written analysis: why a target is missed, profiles) verbatim. Plots are linked, not copied.
"""
from __future__ import annotations

import os
from pathlib import Path

from benchmarks import harness as report

HELP = "write the Markdown benchmark report (tables, plots, targets, machine, versions) from the JSON files"
KB, MB = 1024, 1024 * 1024


def add_arguments(p) -> None:
    p.add_argument("--dir", default="docs/bench", help="directory with allreduce.json, train.json, predict.json, ...")
    p.add_argument("--output", default="docs/benchmarks.md", help="the Markdown file to write")


def run(args) -> int:
    directory, out = Path(args.dir), Path(args.output)
    docs = {name: report.read_json(directory / f"{name}.json")
            for name in ("allreduce", "train", "train-timeline", "predict", "tuning") if (directory / f"{name}.json").is_file()}
    rel = Path(os.path.relpath(directory, out.parent))
    notes = directory / "notes.md"
    text = "\n\n".join(part for part in (
        _header(docs), _targets(docs), _allreduce(docs.get("allreduce"), rel), _train(docs.get("train"), rel),
        _timeline(docs.get("train-timeline")), _predict(docs.get("predict"), rel), _tuning(docs.get("tuning")),
        notes.read_text().strip() if notes.is_file() else "") if part) + "\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"[bench] wrote {out} from {', '.join(f'{n}.json' for n in docs) or 'no benchmark files'}")
    return 0


def _header(docs: dict) -> str:
    first = next(iter(docs.values()), None)
    lines = ["# Benchmarks", "",
             "Made by `make bench` (`hvdtrain bench allreduce`, `train`, `predict`, then `hvdtrain bench report`); "
             "the JSON files and plots are in [bench/](bench/). **The machine was shared** with other engineers' "
             "test runs while these numbers were taken, so absolute numbers are noisy: compare the ratios, which "
             "were measured side by side in the same run. The load average is recorded with every run."]
    if first:
        m, v = first["machine"], first["versions"]
        lines += ["", f"- machine: {m['cpus']} x {m['cpu']}, {m['memory_gb']} GB, {m['platform']}",
                  "- versions: " + ", ".join(f"{k} {val}" for k, val in v.items()),
                  "- load average (1/5/15 min) when each benchmark started: " +
                  "; ".join(f"{name} {d['machine']['loadavg']}" for name, d in docs.items())]
    return "\n".join(lines)


# ---------------------------------------------------------------- targets

def _targets(docs: dict) -> str:
    rows = []
    ar, tr = docs.get("allreduce"), docs.get("train")
    if ar:
        s = ar["summary"].get("hvdtrain-mpi", {})
        rows.append(_target("all-reduce busbw / raw MPI_Allreduce, 1-16 MB (worst size)",
                            s.get("busbw_vs_mpi_1_16mb_min"), 0.8, ">="))
        rows.append(_target("all-reduce busbw / raw MPI_Allreduce, 1-16 MB (mean)", s.get("busbw_vs_mpi_1_16mb_mean"), 0.8, ">="))
        rows.append(_target("all-reduce 4 KB latency (us)", s.get("latency_4kb_us"), 100, "<="))
    if tr:
        for model, goal in (("cnn", 0.9), ("mlp", 0.6)):
            s = tr["summary"].get(model, {})
            rows.append(_target(f"{model}: weak-scaling efficiency T(n)/(n T(1))", s.get("efficiency_hvdtrain"), goal, ">="))
        for model in ("mlp", "cnn"):
            s = tr["summary"].get(model, {})
            rows.append(_target(f"{model}: throughput / MultiWorkerMirroredStrategy", s.get("hvdtrain_vs_mwms"), 1.3, ">="))
            rows.append(_target(f"{model}: tf.data throughput / training consumption", s.get("pipeline_ratio"), 3.0, ">="))
    if not rows:
        return ""
    return "## Targets (2 ranks on this machine)\n\n" + report.markdown_table(rows, ["target", "goal", "measured", "verdict"])


def _target(name: str, value, goal: float, sense: str) -> dict:
    if value is None:
        return {"target": name, "goal": f"{sense} {goal:g}", "measured": "not measured", "verdict": "-"}
    met = value >= goal if sense == ">=" else value <= goal
    verdict = "met" if met else f"missed: {value / goal:.2f}x of the goal" if sense == ">=" \
        else f"missed: {value / goal:.2f}x the limit"
    return {"target": name, "goal": f"{sense} {goal:g}", "measured": f"{value:.3g}", "verdict": verdict}


# ---------------------------------------------------------------- sections

def _allreduce(doc, rel: Path) -> str:
    if not doc:
        return "## All-reduce\n\nNot run."
    impls = sorted({r["impl"] for r in doc["rows"]}, key=lambda i: (i != "mpi4py", i))
    by = {(r["impl"], r["size_bytes"]): r for r in doc["rows"]}
    table = []
    for size in sorted({r["size_bytes"] for r in doc["rows"]}):
        row = {"size": report.human_bytes(size)}
        for impl in impls:
            r = by.get((impl, size))
            row[f"{impl} us"] = r["time_us"] if r else None
            row[f"{impl} GB/s"] = r["busbw_gbps"] if r else None
        table.append(row)
    columns = ["size"] + [f"{i} {what}" for i in impls for what in ("us", "GB/s")]
    settings = "; ".join(f"{c}: " + ", ".join(f"{k}={v}" for k, v in s.items()) for c, s in doc["settings"].items())
    return "\n".join([
        "## All-reduce", "",
        f"`hvdtrain bench allreduce --np {doc['np']}`: float32 sum over {doc['np']} ranks; time per all-reduce (us) "
        "and bus bandwidth busbw = S/t * 2(n-1)/n (GB/s). `mpi4py` is raw MPI_Allreduce on numpy buffers (the "
        "transport underneath) in a launch of its own with OpenMPI's defaults, best of 4 sweeps; "
        "`mpi4py-hvdtrain-env` is the same call inside the Horovod processes, with hvdtrain's MPI settings, taking "
        "turns with Horovod size by size while Horovod's background thread polls MPI; `hvdtrain-mpi`/`hvdtrain-gloo` is hvdtrain's Horovod path "
        "(collectives inside a tf.function) launched with `horovodrun --mpi`/`--gloo`; `-eager` rows call "
        "Horovod from Python without tf.function. Every result was checked against the exact sum.", "",
        report.markdown_table(table, columns), "",
        f"Settings in force: {settings}", "",
        f"![all-reduce bus bandwidth]({rel / 'allreduce.png'})"])


def _train(doc, rel: Path) -> str:
    if not doc:
        return "## Training throughput\n\nNot run."
    columns = ["model", "impl", "np", "params", "global_batch", "step_ms", "samples_per_sec", "efficiency",
               "local_step_ms", "comm_share", "pipeline_samples_per_sec", "pipeline_ratio"]
    rows = sorted(doc["rows"], key=lambda r: (r["model"], r["np"], r["impl"]))
    return "\n".join([
        "## Training throughput and scaling", "",
        f"`hvdtrain bench train --np {doc['np']}`: synthetic data, the same per-rank batch on every rank (weak "
        "scaling), one intra-op thread per rank. `single` is plain Keras in one process (T(1)); `hvdtrain` is "
        f"`horovodrun -np {doc['np']} --mpi` with the tuned defaults; `mwms` is TensorFlow's "
        "MultiWorkerMirroredStrategy with TF_CONFIG workers on localhost. efficiency = T(n)/(n T(1)). "
        "`local_step_ms` is the same step without the all-reduce, run on all ranks at once, so "
        "comm_share = 1 - local/step is the share of the step spent communicating. `pipeline_*` is tf.data "
        "alone, per rank, against what one rank's training consumes.", "",
        report.markdown_table(rows, columns), "",
        f"![training speed-up]({rel / 'train.png'})"])


def _timeline(doc) -> str:
    if not doc:
        return ""
    rows = sorted(doc["rows"], key=lambda r: r["model"])
    columns = ["model", "step_ms", "local_step_ms"] + [c for c in report.scalar_columns(rows) if c.startswith("timeline_")]
    return "\n".join([
        "### Where the communication time goes (Horovod timeline)", "",
        f"`hvdtrain bench train --impls hvdtrain --timeline` (a separate run, {doc['np']} ranks): rank 0's Horovod "
        "timeline over the timed steps, in ms per step. `negotiate_allreduce` is the wait from a rank's request "
        "until every rank has asked (cycle tick and slower ranks); `allreduce` is the work: memcpy into the fusion "
        "buffer, `mpi_allreduce` itself, memcpy out. Intervals of overlapping tensors are merged.", "",
        report.markdown_table(rows, columns)])


def _predict(doc, rel: Path) -> str:
    if not doc:
        return "## Inference\n\nNot run (`hvdtrain bench predict`)."
    rows = doc.get("rows", [])
    png = Path(rel / "predict.png")
    return "\n".join(["## Inference", "", "`hvdtrain bench predict` (see `hvdtrain bench predict --help`).", "",
                      report.markdown_table(rows, report.scalar_columns(rows)) if rows else "No rows.", "",
                      f"![inference]({png})"])


def _tuning(doc) -> str:
    if not doc:
        return ""
    rows = doc.get("rows", [])
    return "\n".join(["## Tuning sweeps", "", doc.get("description", ""), "",
                      report.markdown_table(rows, report.scalar_columns(rows))])
