"""Runs inside each rank: the `hvdtrain` command line in this process, then records the exit code the command gave
on this rank (before exiting with it), so a test can see every rank's code, not only the launcher's summary.

usage: cli_worker.py OUT_DIR hvdtrain-arguments...     (writes OUT_DIR/exit-rank<R>.txt)
"""
import os
import sys
from pathlib import Path

from hvdtrain.cli import main

out, argv = Path(sys.argv[1]), sys.argv[2:]
code = main(argv)
rank = os.environ.get("HOROVOD_RANK", os.environ.get("OMPI_COMM_WORLD_RANK", "0"))
(out / f"exit-rank{rank}.txt").write_text(str(code))
sys.exit(code)
