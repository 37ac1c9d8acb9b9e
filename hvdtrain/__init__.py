"""hvdtrain: data-parallel Keras training on Horovod, from one process to many nodes.

Public API: `load_config`, `Config`, `train(cfg)`, `register_model`, `UserError`, and `hvdtrain.keras` for your own
scripts. The module map is in docs/architecture.md.
"""
from hvdtrain.config import Config, load_config
from hvdtrain.errors import UserError
from hvdtrain.models import register_model

__version__ = "0.2.0"


def train(cfg: Config) -> dict:
    """Train inside the current rank (start the processes with horovodrun, mpirun or srun); returns the summary."""
    from hvdtrain.trainer import Trainer
    return Trainer(cfg).fit()


__all__ = ["Config", "UserError", "load_config", "register_model", "train", "__version__"]
