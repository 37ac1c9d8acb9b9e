"""Federated averaging (trainer.sync=fedavg; McMahan et al., 2017, "Communication-efficient learning of deep networks
from decentralized data"), simulated: K clients each hold a share of the training data (data.partition), and a
round (what an epoch is here)

  1. samples C x K clients (seeded by the round: the same choice on every rank, and again after a resume),
  2. deals them to the ranks (client i of the round to rank i mod N); a rank trains its clients one after another,
     each from the round's global model with a fresh optimizer, E passes over its data in batches of B,
  3. averages the clients' weights, weighted by their numbers of examples, in one all-reduce of the weighted sums,
  4. agrees on stops and non-finite values, evaluates the global model exactly, writes the round's line and
     metrics.csv row, and checkpoints it (so a resume continues with the next round, bit for bit).

FedSGD, the paper's baseline, is E = 1 and B = 0 (a client's whole data in one batch). The learning rate follows
optim.lr and optim.schedule with rounds as epochs (cosine decays over the rounds). Random layers (Dropout) draw from
seeds derived from (data.seed, round, client), so a client trains alike on any rank and after a resume.
"""
from __future__ import annotations

import time

import keras
import numpy as np

from hvdtrain import backend, optim
from hvdtrain.checkpoint import latest
from hvdtrain import callbacks as cb
from hvdtrain.data import partition
from hvdtrain.errors import UserError
from hvdtrain.rundir import write_json
from hvdtrain.sync import model_state


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
    """The federated loop over a Trainer's parts (model, session, data, evaluation)."""

    def __init__(self, trainer):
        cfg = trainer.cfg
        self.cfg, self.fed, self.world, self.model = cfg, cfg.fedavg, trainer.world, trainer.model
        self.session, self.evaluate = trainer.session, trainer.evaluate
        self.shares = trainer.shares
        arrays = trainer.source.arrays("train")
        self.x, self.y = arrays.x, arrays.y
        self.schedule = optim.lr_schedule(cfg.optim, 1, 1, cfg.trainer.epochs)   # rounds as epochs
        self.weights = model_state(self.model)
        self.options = trainer.session.options
        # Random layers' generators (Keras 3 keeps their state in int variables, outside the weights)
        self.seed_states = [v for v in self.model.variables
                            if "seed_generator_state" in (getattr(v, "path", None) or v.name)]

    def run(self) -> None:
        p, world, model = self.session.progress, self.world, self.model
        backend.broadcast_variables(model.variables, name="hvdtrain.fedavg.start")   # a fresh run: rank 0's weights
        watchdog = cb.Watchdog(self.options.stall_timeout_s, world.rank, self.session.run.path)
        writers = RoundWriters(self.session, p.epochs) if world.is_chief else None
        agreement = cb.StopAgreement(world, p, self.session.stop)
        watchdog.on_train_begin()
        try:
            while p.position.epoch < p.epochs and not p.stop_reason:
                logs = self.round(p.position.epoch, watchdog)
                agreement.check(model, logs)
                if p.stop_reason == "nonfinite":
                    break
                self.finish_round(logs, writers)
        finally:
            watchdog.done.set()
            if writers:
                writers.close()

    def round(self, r: int, watchdog) -> dict:
        started = time.perf_counter()
        watchdog.beat()   # a rank without clients this round waits in the average; the round's start is progress
        chosen = sampled(self.fed.clients, self.fed.per_round, self.cfg.data.seed, r)
        start = [v.numpy() for v in self.weights]
        sums = [np.zeros(w.shape, np.float64) for w in start]
        examples = loss = 0.0
        size = self.world.size
        for client in [c for i, c in enumerate(chosen) if (i + r) % size == self.world.rank]:   # dealt in turn
            client_loss = self.train_client(client, r, start, watchdog)
            n = len(self.shares[client])
            for total, v in zip(sums, self.weights):
                total += n * v.numpy().astype(np.float64)
            examples, loss = examples + n, loss + n * client_loss
        flat = np.concatenate([s.ravel() for s in sums] + [np.array([examples, loss])])
        watchdog.armed = False   # waiting for peers whose clients are larger is not a stall
        total = backend.allreduce_sum(flat, "hvdtrain.fedavg.round")
        watchdog.beat()
        watchdog.armed = True
        examples, loss = total[-2], total[-1]
        offset = 0
        for v, w in zip(self.weights, start):   # the weighted average, into every rank's model
            v.assign((total[offset:offset + w.size] / examples).reshape(w.shape).astype(w.dtype))
            offset += w.size
        self.session.progress.advance()
        self.session.local_state.synced_at(self.session.progress.position.global_step)   # averaged with the weights
        seconds = time.perf_counter() - started
        return {"loss": loss / examples, "clients": len(chosen), "client_examples": int(examples),
                "samples_per_sec": examples * self.fed.local_epochs / seconds, "epoch_seconds": seconds}

    def train_client(self, client: int, r: int, start: list, watchdog) -> float:
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
        mine = self.shares[client]
        rng = np.random.default_rng([self.cfg.data.seed, r, client])
        batch = self.fed.local_batch_size or len(mine)
        passes = [mine[rng.permutation(len(mine))] for _ in range(self.fed.local_epochs)]
        data = None
        for order in passes:   # each pass batched on its own: a batch never spans two passes
            one = tf.data.Dataset.from_tensor_slices((self.x[order], self.y[order])).batch(batch)
            data = one if data is None else data.concatenate(one)
        beat = keras.callbacks.LambdaCallback(on_train_batch_end=watchdog.on_train_batch_end)
        history = model.fit(data, epochs=1, verbose=0, shuffle=False, callbacks=[beat])
        return float(history.history["loss"][-1])

    def finish_round(self, logs: dict, writers) -> None:
        p, session = self.session.progress, self.session
        at = p.position
        if self.evaluate is not None:
            metrics = self.evaluate(self.model)
            p.last_eval = (at.global_step, metrics)
            logs.update({f"val_{k}": v for k, v in (metrics or {}).items() if k != "examples" and isinstance(v, float)})
        logs["communicated_bytes"] = session.sync.communicated_bytes(self.model, 1)
        logs["global_step"] = at.global_step
        p.history.append({"epoch": at.epoch, **{k: float(v) for k, v in logs.items()}})
        if writers:
            writers.write(at.epoch, logs)
        last = at.epoch >= p.epochs
        if last or p.stop_reason or at.epoch % self.options.checkpoint_every_epochs == 0:
            session.checkpointer.save(self.model, at, self.world.size)


class RoundWriters:
    """Rank 0's line per round and metrics.csv row."""

    SHOWN = ("loss", "val_loss", "val_accuracy", "val_mae")

    def __init__(self, session, rounds: int):
        self.rounds, self.mode = rounds, session.options.progress
        self.csv = keras.callbacks.CSVLogger(str(session.run.path / "metrics.csv"), append=True) \
            if session.options.csv else None
        if self.csv:
            self.csv.on_train_begin()

    def write(self, round_: int, logs: dict) -> None:
        if self.csv:
            self.csv.on_epoch_end(round_ - 1, dict(logs))
        if self.mode != "none":
            shown = "  ".join(f"{k} {logs[k]:.4f}" for k in self.SHOWN if k in logs)
            print(f"round {round_}/{self.rounds}  {shown}  {logs['clients']} clients, {logs['client_examples']} "
                  f"examples  {logs['epoch_seconds']:.1f}s", flush=True)

    def close(self) -> None:
        if self.csv:
            self.csv.on_train_end()
