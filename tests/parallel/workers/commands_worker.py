"""Runs inside each rank: many `hvdtrain` commands one after another in this one process, so a test file pays for
starting Python, TensorFlow and Horovod once instead of once per command (Horovod tests itself the same way).

usage: commands_worker.py JOBS.json OUT_DIR
JOBS.json: [{"name": ..., "argv": [hvdtrain arguments...], "cwd": optional directory}, ...]
Writes OUT_DIR/results-rank<R>.json: {name: {"code": exit code, "stdout": ..., "stderr": ...}} with what this rank
printed during that command, captured at the file-descriptor level (TensorFlow's C++ output and loggers bound to
the original streams included).
"""
import contextlib
import json
import os
import sys
import tempfile
from pathlib import Path

from hvdtrain.cli import main


@contextlib.contextmanager
def captured(into: dict):
    """Send file descriptors 1 and 2 to temporary files for the duration; their text lands in into['stdout'/'stderr']."""
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    files = {fd: tempfile.TemporaryFile() for fd in (1, 2)}
    sys.stdout.flush(), sys.stderr.flush()
    for fd, f in files.items():
        os.dup2(f.fileno(), fd)
    try:
        yield
    finally:
        sys.stdout.flush(), sys.stderr.flush()
        for fd, name in ((1, "stdout"), (2, "stderr")):
            os.dup2(saved[fd], fd)
            os.close(saved[fd])
            files[fd].seek(0)
            into[name] = files[fd].read().decode(errors="replace")
            files[fd].close()


def run(job: dict) -> dict:
    result = {}
    here = os.getcwd()
    os.chdir(job.get("cwd", here))
    try:
        with captured(result):
            result["code"] = main(job["argv"])
    finally:
        os.chdir(here)
        import keras
        keras.backend.clear_session()    # the next command builds its model with fresh layer names
    return result


def work(run_job=run) -> None:
    """Every job of JOBS.json in turn (`run_job`: how one is run), then this rank's results."""
    jobs, out = json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2])
    results = {job["name"]: run_job(job) for job in jobs}
    from hvdtrain.backend import rank_hint
    (out / f"results-rank{rank_hint()}.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    work()
