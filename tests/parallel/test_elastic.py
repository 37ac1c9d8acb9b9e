"""Horovod Elastic under horovodrun --gloo with a discovery script whose hosts file the test edits:
a worker is killed and training goes on with one; a host is added and it rejoins with the current state."""
import json
import os
import socket
import subprocess
import threading

from conftest import BIN, REPO, env, kill_tree, rank_pids, wait_for

# Long enough to still be training when the new host has joined: measured on 2 idle cores, the worker left after the
# first checkpoint (epoch 1) and the new one joined in epoch 2 (each epoch 179 steps at batch 8, ~2.6 s on 2 ranks);
# a busier machine slows the training and the joining alike. Every epoch after the join is waiting, nothing more.
EPOCHS = 15


def test_worker_leaves_then_a_host_joins_and_training_completes_consistently(tmp_path):
    hosts, run = tmp_path / "hosts", tmp_path / "run"
    hosts.write_text("localhost:1\n127.0.0.1:1\n")       # two "hosts" on this machine, one slot each
    cmd = [str(BIN / "horovodrun"), "--gloo", "-np", "2", "--min-np", "1", "--max-np", "2",
           "--host-discovery-script", str(REPO / "scripts/discover-hosts.sh"),
           str(BIN / "hvdtrain"), "train", "--elastic", "--config", str(REPO / "configs/digits.yaml"),
           f"--trainer.run_dir={run}", f"--trainer.epochs={EPOCHS}", "--trainer.global_batch_size=8"]
    job = subprocess.Popen(cmd, cwd=REPO, env={**env(), "HVDTRAIN_HOSTS_FILE": str(hosts)}, text=True,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(job.stdout), daemon=True)
    reader.start()
    starts = lambda size: [l for l in lines if f"elastic: {size} rank(s)" in l]
    try:
        wait_for(lambda: (run / "checkpoints").is_dir() and any((run / "checkpoints").glob("ckpt-*")), 180, "a checkpoint")
        ranks = rank_pids(job, 2)
        leaving = [pid for pid in ranks.values() if _hostname_of(pid) == "127.0.0.1"]
        assert len(leaving) == 1
        hosts.write_text("localhost:1\n")                # the host leaves the pool ...
        os.kill(leaving[0], 9)                           # ... and its worker dies
        wait_for(lambda: starts(1), 120, "training to continue on 1 rank")
        hosts.write_text(f"localhost:1\n{socket.gethostname()}:1\n")   # a new host appears
        wait_for(lambda: len(starts(2)) >= 2 or job.poll() is not None, 180, "the new host to join")
        assert len(starts(2)) >= 2, f"training ended before the new host joined:\n{''.join(lines)[-3000:]}"
        job.wait(timeout=600)
        reader.join(timeout=10)
    finally:
        kill_tree(job)
    text = "".join(lines)
    assert job.returncode == 0, text[-4000:]
    summary = json.loads((run / "summary.json").read_text())
    steps_per_epoch = 1437 // 8
    assert summary["status"] == "completed" and summary["num_ranks"] == 2   # ended with the rejoined worker
    # Epoch/step counts and the LR schedule (a function of the optimizer's step counter) stayed consistent.
    assert summary["global_step"] == summary["optimizer_steps"] == EPOCHS * steps_per_epoch
    resumed_at = starts(1)[0].split("global step ")[1].rstrip(")\n")
    assert 0 < int(resumed_at) < EPOCHS * steps_per_epoch
    assert summary["test_accuracy"] >= 0.9


def _hostname_of(pid: int) -> str:
    import psutil
    return psutil.Process(pid).environ().get("HOROVOD_HOSTNAME", "")
