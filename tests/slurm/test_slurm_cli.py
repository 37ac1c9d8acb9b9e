"""`hvdtrain slurm render` without a cluster: the sbatch line it prints, its quoting and its validation."""
from __future__ import annotations

import shlex
import subprocess

import pytest

from slurm_cluster import REPO, VENV_BIN

HOSTILE = "my configs $(touch pwned) `touch pwned2` $HOME; rm -rf x'\"/job $USER.yaml"


def render(*args, config=None) -> subprocess.CompletedProcess:
    cfg = ["--config", str(config)] if config else []
    return subprocess.run([str(VENV_BIN / "hvdtrain"), "slurm", "render", *cfg, *args], capture_output=True, text=True,
                          timeout=120, cwd=REPO)


@pytest.fixture
def hostile_config(tmp_path):
    path = tmp_path / HOSTILE
    path.parent.mkdir(parents=True)
    path.write_text((REPO / "configs/digits.yaml").read_text())
    return path


def test_render_is_the_sbatch_line_for_the_repository_script(hostile_config):
    proc = render("--nodes", "2", "--gpus-per-node", "4", "--time", "2:00:00", "--partition", "gpu",
                  "--trainer.epochs=5", config=hostile_config)
    assert proc.returncode == 0, proc.stderr
    words = shlex.split(proc.stdout)
    env = dict(w.split("=", 1) for w in words[:words.index("sbatch")])
    assert env["HVDTRAIN_SLURM_DIR"] == str(REPO / "slurm") and env["HVDTRAIN_VENV"] == str(REPO / ".venv")
    argv = words[words.index("sbatch"):]
    assert argv[:10] == ["sbatch", "--nodes=2", "--ntasks-per-node=4", "--job-name=hvdtrain-train",
                         "--signal=B:USR1@180", "--requeue", "--open-mode=append", "--gres=gpu:4", "--time=2:00:00",
                         "--partition=gpu"]
    # The hostile path is one argument, unchanged: nothing in it split or expanded.
    assert argv[10:] == [str(REPO / "slurm/train.sbatch"), "--config", str(hostile_config), "--trainer.epochs=5"]


def test_rendered_line_survives_a_real_shell(hostile_config, tmp_path):
    """bash reads the printed line back into exactly the argv that `submit` would run."""
    line = render("--tasks-per-node", "2", config=hostile_config).stdout.strip()
    assert line.count(" sbatch ") == 1
    # Replace only the program name: bash parses every word, prints them NUL-separated, runs nothing else.
    probe = subprocess.run(["bash", "-c", line.replace(" sbatch ", " printf '%s\\0' ", 1)], capture_output=True,
                           text=True, timeout=30, cwd=tmp_path)
    assert probe.returncode == 0, probe.stderr
    words = probe.stdout.split("\0")[:-1]
    assert words[-3:] == [str(REPO / "slurm/train.sbatch"), "--config", str(hostile_config)]
    assert not list(tmp_path.glob("pwned*"))


@pytest.mark.parametrize("args, message", [
    (["--time", "1:75:00"], "minutes and seconds must be below 60"),
    (["--time", "soon"], "--time must be MINUTES, H:MM:SS or D-HH[:MM[:SS]], got 'soon'"),
    (["--time", "2"], "--time 2 is not longer than --stop-notice 180 s"),
    (["--gpus-per-node", "4", "--tasks-per-node", "2"], "hvdtrain runs one rank per GPU"),
    (["--tasks-per-node", "3"], "global_batch_size=64 is not divisible by the 3 ranks"),
    (["--trainer.resume=never"], "a requeued job (preemption, time limit) could not resume"),
    (["--trainer.epochz=3"], "unknown config key 'trainer.epochz'"),
    (["--config", "no/such.yaml"], "config file not found: no/such.yaml"),
    (["--partition", "gpu;reboot"], "--partition must be a Slurm name"),
    (["--nodes", "0"], "--nodes must be an integer >= 1, got '0'"),
])
def test_bad_values_are_refused_with_one_line(args, message):
    proc = render(*args)
    assert proc.returncode == 2 and proc.stdout == ""
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and message in errors[0], proc.stderr


@pytest.mark.parametrize("text, seconds", [("30", 1800), ("5:30", 330), ("2:00:00", 7200), ("1-0", 86400),
                                           ("1-2:30", 95400), ("0-0:0:45", 45)])
def test_slurm_time_formats(text, seconds):
    from hvdtrain.slurm_jobs import time_seconds
    assert time_seconds(text, "--time") == seconds
