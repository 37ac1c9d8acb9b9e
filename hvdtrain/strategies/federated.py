"""Federated averaging (trainer.sync=fedavg; McMahan et al., 2017, "Communication-efficient learning of deep networks
from decentralized data"), simulated: K clients each hold a share of the training data (data.partition), and a
round (what an epoch is here)

  1. samples C x K clients (seeded by the round: the same choice on every rank, and again after a resume),
  2. deals them to the ranks (client i of the round to rank (i + round) mod N); a rank trains its clients one after
     another, each from the round's global model with a fresh optimizer, E passes over its data in batches of B,
  3. averages the clients' weights, weighted by their numbers of examples, in one all-reduce of the weighted sums,
  4. hands the round to the loop controller as one step and one epoch: the agreed stop, exact evaluation, the
     writers, the checkpoint (so a resume continues with the next round, bit for bit).

FedSGD, the paper's baseline, is E = 1 and B = 0 (a client's whole data in one batch). The learning rate follows
optim.lr and optim.schedule with rounds as epochs (cosine decays over the rounds). Random layers (Dropout) draw from
seeds derived from (data.seed, round, client), so a client trains alike on any rank and after a resume.
"""
from __future__ import annotations

import keras
import numpy as np

from hvdtrain import backend, optim
from hvdtrain.checkpoint import latest
from hvdtrain.data import partition
from hvdtrain.errors import UserError
from hvdtrain.rundir import write_json
from hvdtrain.strategies.base import DataParallel
from hvdtrain.variables import model_state


class Federated(DataParallel):
    name = "fedavg"
    progress_unit = "round"

    def __init__(self, world, cfg, source, run):
        """`cfg`: the run's config (fedavg.*, data.partition and data.seed, optim.*, trainer.epochs)."""
        super().__init__(world)
        self.cfg, self.fed, self.source, self.run = cfg, cfg.fedavg, source, run
        self.shares = None   # each client's example indices, once prepared
        self.rounds_run = self.examples_trained = 0

    @classmethod
    def from_config(cls, cfg, world, *, source=None, run=None) -> "Federated":
        return cls(world, cfg, source, run)

    def epoch_steps(self, count) -> int:
        return 1   # a round is an epoch of one step

    def optimizer(self, optim_cfg, precision: str, bucket_mb: float, steps_per_epoch: int, epochs: int):
        """A client's plain optimizer: clients train alone, the rounds average; the learning rate is set per round."""
        return optim.optimizer_with(optim_cfg, optim_cfg.lr)

    def distribute(self, optimizer, **options):
        return optimizer

    def prepare(self, model, objective, optimizer=None):
        self.shares = client_shares(self.cfg, self.source, self.run, self.world)
        return super().prepare(model, objective, optimizer)

    def start(self, model, elastic: bool = False) -> None:
        backend.build_optimizer(model.optimizer, model.trainable_variables)
        backend.broadcast_variables(model.variables, name="hvdtrain.fedavg.start")   # a fresh run: rank 0's weights

    def after_step(self, model, done: int) -> bool:
        return True   # every round ends with the weights averaged

    def train(self, session, model, batches_from, evaluate=None, callbacks=(), diagnose=None, **fit_kwargs) -> None:
        """Rounds instead of fit, driven through the same loop controller."""
        controller = session.loop(evaluate, unit=self.progress_unit)
        with session.guard(diagnose):
            Rounds(self, model, controller).run()

    def describe(self) -> dict:
        return {"mode": self.name}

    def summary(self, model, global_batch: int) -> dict:
        """The rounds, not one client's optimizer steps or a global batch no client used."""
        return {"fedavg": {**{f: getattr(self.fed, f) for f in ("clients", "fraction", "local_epochs",
                                                                  "local_batch_size")},
                           "per_round": self.fed.per_round, "partition": self.cfg.data.partition,
                           "rounds_this_run": self.rounds_run, "examples_trained_this_run": self.examples_trained}}


def client_shares(cfg, source, run, world) -> list[np.ndarray]:
    """The clients' example indices, computed from the seed on every rank; rank 0 writes them to partition.json, and a
    resumed run must find the same ones there."""
    if not source.elastic:
        raise UserError(f"trainer.sync=fedavg simulates its clients over in-memory data (digits, synthetic, npz), "
                        f"not data.source={cfg.data.source}; convert the data to .npz", agreed=True)
    labels = source.arrays("train").y
    shares = partition.partition(labels, cfg.fedavg.clients, cfg.data.partition, cfg.data.seed)
    record = {"partition": cfg.data.partition, "seed": cfg.data.seed, **partition.describe(shares, labels)}
    path = run.path / "partition.json"
    if path.exists() and latest(run.path) is not None:   # a resume: its clients must be the same
        if _read(path) != record:
            raise UserError(f"{path} holds another split of the clients than data.partition={cfg.data.partition}, "
                            f"fedavg.clients={cfg.fedavg.clients} and data.seed={cfg.data.seed} give; resume with the "
                            "config that wrote it, or use a fresh --trainer.run_dir")
    elif world.is_chief:
        write_json(path, record)
    return shares


def _read(path):
    import json
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read {path} ({exc}); restore it or use a fresh --trainer.run_dir") from None


def sampled(clients: int, per_round: int, seed: int, round_: int) -> list[int]:
    """The round's clients, in increasing order: the same on every rank, whatever the number of ranks."""
    return sorted(np.random.default_rng([seed, 11, round_]).choice(clients, per_round, replace=False).tolist())


class Rounds:
    """The federated loop: each round trains this rank's clients and averages them, then the loop controller takes
    the round as one step and one epoch."""

    def __init__(self, strategy: Federated, model, controller):
        cfg = strategy.cfg
        self.strategy, self.cfg, self.fed, self.world = strategy, cfg, cfg.fedavg, strategy.world
        self.model, self.controller = model, controller
        arrays = strategy.source.arrays("train")
        self.x, self.y = arrays.x, arrays.y
        self.schedule = optim.lr_schedule(cfg.optim, 1, 1, cfg.trainer.epochs)   # rounds as epochs
        self.weights = model_state(model)
        # Random layers' generators (Keras 3 keeps their state in int variables, outside the weights)
        self.seed_states = [v for v in model.variables
                            if "seed_generator_state" in (getattr(v, "path", None) or v.name)]

    def run(self) -> None:
        c = self.controller
        p = c.progress
        c.attach(self.model)
        c.train_begin()
        while not p.finished and not p.stop_reason:
            r = p.position.epoch
            c.epoch_begin(r)
            logs, examples = self.round(r)
            c.step_end(0, logs, samples=examples * self.fed.local_epochs)
            c.epoch_end(r, logs, averaged=True)   # the round's loss is every client's already
        c.train_end()

    def round(self, r: int) -> tuple[dict, int]:
        """Train this rank's clients of round r and average every rank's into the model: (the round's logs, the
        examples its clients hold)."""
        chosen = sampled(self.fed.clients, self.fed.per_round, self.cfg.data.seed, r)
        start = [v.numpy() for v in self.weights]
        sums = [np.zeros(w.shape, np.float64) for w in start]
        examples = loss = 0.0
        size = self.world.size
        for client in [c for i, c in enumerate(chosen) if (i + r) % size == self.world.rank]:   # dealt in turn
            client_loss = self.train_client(client, r, start)
            n = len(self.strategy.shares[client])
            for total, v in zip(sums, self.weights):
                total += n * v.numpy().astype(np.float64)
            examples, loss = examples + n, loss + n * client_loss
        flat = np.concatenate([s.ravel() for s in sums] + [np.array([examples, loss])])
        with self.controller.watchdog.waiting():   # waiting for peers whose clients are larger is not a stall
            total = backend.allreduce_sum(flat, "hvdtrain.fedavg.round", kind="weights")
        examples, loss = total[-2], total[-1]
        offset = 0
        for v, w in zip(self.weights, start):   # the weighted average, into every rank's model
            v.assign((total[offset:offset + w.size] / examples).reshape(w.shape).astype(w.dtype))
            offset += w.size
        self.strategy.rounds_run += 1
        self.strategy.examples_trained += int(examples) * self.fed.local_epochs
        return {"loss": loss / examples, "clients": len(chosen), "client_examples": int(examples)}, int(examples)

    def train_client(self, client: int, r: int, start: list) -> float:
        """E passes of one client over its data, from the round's global weights with a fresh optimizer."""
        import tensorflow as tf
        model, optimizer = self.model, self.model.optimizer
        for v, value in zip(self.weights, start):
            v.assign(value)
        for v in optimizer.variables:   # FedAvg's clients start without momentum or moments
            v.assign(tf.zeros_like(v))
        optimizer.learning_rate = float(self.schedule(r))   # after the zeroing: Keras 3 counts it among the variables
        seed = int(np.random.default_rng([self.cfg.data.seed, 13, r, client]).integers(2**31 - 1))
        for i, state in enumerate(self.seed_states):
            state.assign(np.array([seed + i, 0], dtype=state.dtype))   # Keras 3: the dtype is a name
        tf.random.set_seed(seed)
        mine = self.strategy.shares[client]
        rng = np.random.default_rng([self.cfg.data.seed, r, client])
        batch = self.fed.local_batch_size or len(mine)
        passes = [mine[rng.permutation(len(mine))] for _ in range(self.fed.local_epochs)]
        data = None
        for order in passes:   # each pass batched on its own: a batch never spans two passes
            one = tf.data.Dataset.from_tensor_slices((self.x[order], self.y[order])).batch(batch)
            data = one if data is None else data.concatenate(one)
        progress = keras.callbacks.LambdaCallback(on_train_batch_end=lambda *_, **__: self.controller.watchdog.arm())
        history = model.fit(data, epochs=1, verbose=0, shuffle=False, callbacks=[progress])
        return float(history.history["loss"][-1])
