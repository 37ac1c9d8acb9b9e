"""Runs inside each rank: train with hvdtrain, then write what this rank ended with for the test to compare.

usage: train_worker.py OUT_DIR [hvdtrain config args...]
"""
import json
import sys
from pathlib import Path

import numpy as np

from hvdtrain.config import load_config
from hvdtrain.trainer import Trainer

out = Path(sys.argv[1])
args = sys.argv[2:]
config_file = args[args.index("--config") + 1] if "--config" in args else None
overrides = [a for a in args if a.startswith("--") and "=" in a]
trainer = Trainer(load_config(config_file, overrides))
summary = trainer.fit()
rank = trainer.world.rank
np.savez(out / f"weights-rank{rank}.npz", *trainer.model.get_weights())
(out / f"rank{rank}.json").write_text(json.dumps({
    "topology": trainer.world.__dict__, "history": trainer.session.progress.history, "summary": summary}))
