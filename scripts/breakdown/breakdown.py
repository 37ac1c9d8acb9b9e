"""Where the microseconds of one all-reduce go: each stage of Horovod's path timed inside the ranks, for a small and a
large tensor and the MLP's gradient group, under Horovod's stock behaviour and under hvdtrain's settings.

Needs Horovod built with the probe (timestamps only; never part of a normal install), in a virtualenv of its own:

    scripts/install.sh --venv /tmp/venv-probe --extra-patch scripts/breakdown/horovod-0.28.1-probe.patch
    /tmp/venv-probe/bin/python scripts/breakdown/breakdown.py --rounds 3 --output docs/bench/breakdown.json

The variants take turns, round after round (the machine is shared); each (variant, case) keeps its round with the
lowest median time per call. Stage times are medians over the calls of both ranks (p10/p90 beside them).
`hvdtrain bench report` renders the file.
"""
from __future__ import annotations

import argparse
import glob
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO))
from hvdtrain.bench import harness  # noqa: E402

EVENTS = dict(COMPUTE=1, ENQUEUED=2, CYCLE_START=3, POPPED=4, COORD_START=5, COORD_END=6, PERFORM=7, MPI_START=8,
              MPI_END=9, CB_START=10, CB_END=11, COPY_IN_START=13, COPY_IN_END=14, COPY_OUT_START=15,
              COPY_OUT_END=16, ALLOC_START=17, ALLOC_END=18)
NAMES = {v: k for k, v in EVENTS.items()}
STAGES = [   # (stage, from event, to event)
    ("TensorFlow runs the op: output allocated, request enqueued", "COMPUTE", "ENQUEUED"),
    ("background thread picks the request up (cycle wait / wake-up)", "ENQUEUED", "POPPED"),
    ("negotiation: every rank asked (bit-vector all-reduce)", "POPPED", "PERFORM"),
    ("copy into the fusion buffer", "COPY_IN_START", "COPY_IN_END"),
    ("MPI_Allreduce", "MPI_START", "MPI_END"),
    ("scaling and copy out of the fusion buffer", "MPI_END", "CB_START"),
    ("completion -> TensorFlow starts the next collective", "CB_START", "NEXT"),
    ("total per call", "COMPUTE", "NEXT"),
]
CASES = {"4 KB": ("single", 4 << 10, 2000), "4 MB": ("single", 4 << 20, 200), "MLP gradients (24 MB, 6 tensors)":
         ("group", 0, 60)}
VARIANTS = {   # Horovod's stock loop and TensorFlow's thread spinning vs hvdtrain's settings; both at 0.05 ms cycles
    "before": ["--runtime.wake_on_enqueue=false", "--runtime.tf_thread_spinning=true"],
    "hvdtrain": [],
}
ELEMENTS = {"single": lambda size: size // 4, "group": lambda size: 6316042}


def calls(path: Path, elements: int) -> list[dict]:
    """The probe's events of one rank, cut into calls (a call runs from its op's start to the next op's start)."""
    records = sorted((int(ns), int(ev), int(aux)) for ev, aux, ns in (line.split() for line in path.open())
                     if int(ev) > 0)
    out, current = [], None
    for ns, ev, aux in records:
        name = NAMES.get(ev)
        if name == "COMPUTE":
            if current and "CB_START" in current:
                out.append({**current, "NEXT": ns})
            current = {"COMPUTE": ns, "rounds": 0}
        elif current is not None and name:
            if name == "MPI_START" and aux != elements:
                current = None   # another collective (a barrier) in between
                continue
            current["rounds"] += name == "COORD_START"
            current.setdefault(name, ns)
    return out[len(out) // 10:]   # the first calls warm up


def stage_stats(all_calls: list[dict]) -> dict:
    stats = {}
    for stage, a, b in STAGES:
        values = [max(0, c[b] - c[a]) / 1e3 for c in all_calls if a in c and b in c]
        if values:
            deciles = statistics.quantiles(values, n=10) if len(values) > 1 else values * 9
            stats[stage] = {"median_us": statistics.median(values), "p10_us": deciles[0], "p90_us": deciles[-1]}
    stats["coordination rounds per call"] = {"median_us": statistics.mean(c["rounds"] for c in all_calls)}
    return stats


def run_once(python: Path, variant: str, case: str, work: Path) -> dict:
    kind, size, iters = CASES[case]
    probe_dir = Path(tempfile.mkdtemp(prefix="probe-", dir=work))
    out = harness.horovodrun(2, "mpi", [str(python), str(HERE / "probe_rank.py"), kind, str(size), str(iters),
                                        *VARIANTS[variant]], env={"HVD_PROBE_DIR": str(probe_dir)})
    found = [c for path in sorted(probe_dir.glob("probe.*.txt")) for c in calls(path, ELEMENTS[kind](size))]
    return {"variant": variant, "case": case, "calls": len(found), "loadavg": harness.loadavg(),
            "stages": stage_stats(found), "printed": out.strip().splitlines()[-1] if out.strip() else ""}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--output", default="docs/bench/breakdown.json")
    args = p.parse_args()
    python = Path(sys.executable)
    runs = []
    with tempfile.TemporaryDirectory(prefix="hvdtrain-breakdown-") as work:
        for round_ in range(args.rounds):
            for case in CASES:
                for variant in VARIANTS:
                    print(f"[breakdown] {case}, {variant} (round {round_ + 1}/{args.rounds}) ...", flush=True)
                    runs.append({**run_once(python, variant, case, Path(work)), "round": round_})
    best = harness.best_by(runs, ("variant", "case"), lambda r: r["stages"]["total per call"]["median_us"],
                           higher=False)
    doc = harness.new_document("breakdown", 2, {variant: flags or ["hvdtrain's defaults"]
                                                for variant, flags in VARIANTS.items()})
    doc["runs"] = [{k: r[k] for k in ("variant", "case", "round", "loadavg", "calls", "printed")} for r in runs]
    doc["rows"] = [{"case": r["case"], "variant": r["variant"], "stage": stage, **values}
                   for r in best for stage, values in r["stages"].items()]
    harness.write_json(args.output, doc)
    print(harness.text_table(doc["rows"], ["case", "variant", "stage", "median_us", "p10_us", "p90_us"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
