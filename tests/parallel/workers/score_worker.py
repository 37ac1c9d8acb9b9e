"""Runs inside each rank (or alone): `hvdtrain evaluate` and `hvdtrain predict` on trained runs, in one launch.

usage: score_worker.py OUT_DIR RUN_DIR[=FIELDS] ...
For each run i: OUT_DIR/eval-i.json (evaluate's report) and OUT_DIR/pred-i.npy (predict, with FIELDS if given);
OUT_DIR/codes.json (rank 0) holds the commands' exit codes.
"""
import json
import sys
from pathlib import Path

from hvdtrain.cli import main

out = Path(sys.argv[1])
codes = {}
for i, spec in enumerate(sys.argv[2:]):
    run, _, fields = spec.partition("=")
    codes[f"eval-{i}"] = main(["evaluate", "--run", run, "--batch-size", "50", "--report", str(out / f"eval-{i}.json")])
    codes[f"pred-{i}"] = main(["predict", "--run", run, "--batch-size", "50", "--output", str(out / f"pred-{i}.npy"),
                               *(["--fields", fields] if fields else [])])
from hvdtrain import world  # noqa: E402  (started by the commands above)
if world.current().is_chief:
    (out / "codes.json").write_text(json.dumps(codes))
