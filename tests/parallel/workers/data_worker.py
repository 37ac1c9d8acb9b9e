"""Runs inside each rank: record which examples this rank's training batches hold (epoch 0).

usage: data_worker.py OUT_DIR GLOBAL_BATCH [data config overrides...]
"""
import json
import sys
from pathlib import Path

from hvdtrain import dist
from hvdtrain.config import load_config
from hvdtrain.trainer import Trainer

out, global_batch = Path(sys.argv[1]), int(sys.argv[2])
cfg = load_config(None, sys.argv[3:] + [f"--trainer.global_batch_size={global_batch}"])
topo = dist.init(cfg.runtime)
trainer = Trainer(cfg)
trainer.topo = topo
trainer.steps = trainer._steps_per_epoch(topo)
stream = trainer._train_stream(topo, 0, 0, 1)
batches = [[int(v) for v in x.numpy().reshape(len(x), -1)[:, 0]] for x, _ in stream.dataset]
(out / f"rank{topo.rank}.json").write_text(json.dumps({"steps": stream.steps_per_epoch, "batches": batches}))
