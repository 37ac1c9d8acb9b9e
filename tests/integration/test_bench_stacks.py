"""`hvdtrain bench stacks` end to end, tiny sizes: the TF 2.21 virtualenv against the TF 2.15 one, side by side (run
once, from the current stack's virtualenv: it starts both stacks itself). Correctness only; speed is for `make bench`."""
import json

import pytest

from conftest import BIN, KERAS_MAJOR, PNG_MAGIC, REPO, assert_rank_stack, hvdtrain, output

# The other stack's virtualenv, and the command that installs it (`make test` does, before its tiers run).
OTHER = {3: (".venv-tf2.15", "bash scripts/install.sh --stack tf2.15 --venv .venv-tf2.15"),
         2: (".venv", "bash scripts/install.sh")}


def test_stacks_bench_runs_each_virtualenv_side_by_side_and_records_both_stacks(tmp_path):
    """This virtualenv against the other stack's, which must be installed: a missing stack fails, never compares a
    virtualenv with itself."""
    here = BIN.parent
    name, install = OTHER[KERAS_MAJOR]
    other = REPO / name
    if not (other / "bin" / "hvdtrain").is_file():
        pytest.fail(f"the other stack's virtualenv {other} is not installed; install it with `{install}` (or `make "
                    "test`, which installs both stacks first)")
    out = tmp_path / "stacks.json"
    proc = hvdtrain(["bench", "stacks", "--np", "2", "--new-venv", str(here), "--old-venv", str(other), "--rounds", "1",
                     "--models", "mlp", "--steps", "2", "--warmup", "2", "--batch", "8", "--max-size", "16KB",
                     "--budget-mb", "1", "--repeats", "1", "--output", str(out)], timeout=1800)
    assert proc.returncode == 0, output(proc)
    doc = json.loads(out.read_text())
    assert doc["benchmark"] == "stacks" and set(doc["stacks"]) == {"new", "old"}
    assert_rank_stack(doc["stacks"]["new"]["stack"])
    for label, venv in (("new", here), ("old", other)):
        s = doc["stacks"][label]
        assert s["venv"] == str(venv) and s["stack"]["source"] == "rank" and s["versions"]["horovod"]
        assert s["stack"]["keras"] == s["versions"]["keras"]     # what the rank imported is what is installed there
    assert doc["stacks"]["new"]["stack"]["keras"] != doc["stacks"]["old"]["stack"]["keras"]
    assert {(r["benchmark"], r["stack"]) for r in doc["rows"]} == {(b, s) for b in ("train", "allreduce")
                                                                   for s in ("new", "old")}
    assert all(r["correct"] for r in doc["rows"] if r["benchmark"] == "allreduce")
    s = doc["summary"]
    assert set(s) == {"mlp", "allreduce 4 KB", "allreduce 16 KB"}
    assert s["mlp"]["new_vs_old"] == pytest.approx(s["mlp"]["new"] / s["mlp"]["old"])
    # The control: each stack's best time of the same steps without the all-reduce, old over new.
    local = {stack: min(r["local_step_ms"] for r in doc["rows"] if r["benchmark"] == "train" and r["stack"] == stack)
             for stack in ("new", "old")}
    assert s["mlp"]["control_new_vs_old"] == pytest.approx(local["old"] / local["new"])
    assert s["allreduce 4 KB"]["new_vs_old"] == pytest.approx(s["allreduce 4 KB"]["old"] / s["allreduce 4 KB"]["new"])
    assert len(s["mlp"]["per_round"]) == 1
    assert "new_vs_old" in proc.stdout and out.with_suffix(".png").read_bytes()[:8] == PNG_MAGIC
