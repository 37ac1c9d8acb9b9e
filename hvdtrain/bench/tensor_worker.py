"""Runs inside each rank of `hvdtrain bench tensor`: the transformer trained with each layout D x T of this launch
(the first one sets Horovod's process sets: put the one with D > 1 and T > 1 first), rounds taking turns.

Per layout and rank: the parameters it holds (all, in split layers, in sliced weights) against the whole model's,
the activations its forward pass keeps for the backward pass (counted from the layers' output shapes, and inside
attention its query, key and value projections and scores), the time of a training step (compiled; the slowest
rank's), and the bytes it hands to Horovod per step by kind (traffic.py) against the formula of the split layers'
all-reduces: per encoder block one of batch x tokens x width forward and one backward in the attention and in the
MLP, 4 per block, with the replica's batch.

usage: python -m hvdtrain.bench.tensor_worker --layouts 2x2,1x4,4x1 --output OUT.json [--width ...]
"""
from __future__ import annotations

import argparse
import time

import numpy as np

TOKENS_SIDE = 8   # digits-sized images: 8 x 8, cut into patches


def add_arguments(p) -> None:
    p.add_argument("--layouts", required=True, help="DxT layouts of this launch's ranks, comma-separated")
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--blocks", type=int, default=2)
    p.add_argument("--patch", type=int, default=2)
    p.add_argument("--batch", type=int, default=64, help="global batch")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--output", required=True)


def run(args) -> int:
    from hvdtrain.bench import harness
    layouts = [tuple(int(n) for n in layout.split("x")) for layout in args.layouts.split(",")]
    trained = [Layout(args, replicas, tensor) for replicas, tensor in layouts]   # each built once, rounds alternate
    rows = [dict(layout.measure(round_), round=round_) for round_ in range(args.rounds) for layout in trained]
    if trained[0].world.is_chief:
        harness.write_json(args.output, {"rows": rows, "stack": harness.rank_stack()})
    return 0


class Layout:
    def __init__(self, args, replicas: int, tensor: int):
        from hvdtrain import world as worlds
        from hvdtrain.config import RuntimeConfig
        self.args, self.tensor = args, tensor
        self.world = worlds.start(RuntimeConfig(intra_op_threads=1, inter_op_threads=1, seed=1), tensor=tensor)
        if self.world.replicas != replicas:
            raise ValueError(f"layout {replicas}x{tensor} on {self.world.size} ranks")
        self.model, self.split, self.whole = self._built()
        rng = np.random.default_rng(self.world.replica)
        batch = args.batch // replicas
        self.x = rng.standard_normal((batch, TOKENS_SIDE, TOKENS_SIDE, 1)).astype(np.float32)
        self.y = rng.integers(0, 10, batch)
        for _ in range(3):   # traced, warmed up
            self.model.train_on_batch(self.x, self.y)

    def _built(self):
        import keras

        from hvdtrain import backend, models, pipeline
        from hvdtrain.config import ModelConfig
        from hvdtrain.strategies.tensor import split_of
        a = self.args
        cfg = ModelConfig(name="transformer", width=a.width, heads=a.heads, blocks=a.blocks, patch_size=a.patch)
        keras.utils.set_random_seed(1)
        whole = models.build_model(cfg, (TOKENS_SIDE, TOKENS_SIDE, 1), 10)
        split = split_of(whole, {}, self.world) if self.tensor > 1 else None
        model = whole if split is None else split.model
        if split is not None:
            pipeline.make_only(model)
        optimizer = backend.distributed_optimizer(keras.optimizers.SGD(1e-3), group=self.world.replica_group)
        model.compile(optimizer, keras.losses.SparseCategoricalCrossentropy(from_logits=True), jit_compile=False)
        return model, split, whole

    def measure(self, round_: int) -> dict:
        from hvdtrain import backend
        from hvdtrain.backend import traffic
        backend.barrier()
        before, started = backend.sent_bytes(), time.perf_counter()
        for _ in range(self.args.steps):
            self.model.train_on_batch(self.x, self.y)
        seconds = time.perf_counter() - started
        sent = traffic.since(before, backend.sent_bytes())
        mine = {"seconds": seconds, "sent": sent, **self._held()}
        ranks = backend.allgather_object(mine, "hvdtrain.bench.tensor")
        return self._row(ranks)

    def _held(self) -> dict:
        whole_split = sum(self.whole.get_layer(name).count_params() for name in self.split.plan) if self.split else 0
        if self.split is None:
            return {"params": self.model.count_params(), "split_params": 0, "sliced_params": 0,
                    "whole_split_params": 0, "activation_bytes": activation_bytes(self.model, len(self.x))}
        sliced = sum(int(np.prod(w.shape)) for name, layer in self.split.layers.items()
                     for w, axis in zip(layer.weights, self.split.axes[name]) if axis is not None)
        return {"params": self.split.parameters()[1], "split_params": self.split.parameters()[0],
                "sliced_params": sliced, "whole_split_params": whole_split,
                "activation_bytes": activation_bytes(self.model, len(self.x))}

    def _row(self, ranks: list[dict]) -> dict:
        a, w = self.args, self.world
        first = ranks[0]
        per_step = {kind: sum(by_dtype.values()) / a.steps for kind, by_dtype in first["sent"].items()}
        tokens = (TOKENS_SIDE // a.patch) ** 2
        formula = 4 * a.blocks * (a.batch // w.replicas) * tokens * a.width * 4 if self.tensor > 1 else 0
        slowest = max(r["seconds"] for r in ranks)
        whole_sliced = first["whole_split_params"] - _replicated(first)
        return {"layout": f"D={w.replicas} x T={self.tensor}", "ranks": w.size, "tensor": self.tensor,
                "replicas": w.replicas, "global_batch": a.batch, "width": a.width,
                "whole_params": self.whole.count_params(), "params_per_rank": first["params"],
                "split_params_per_rank": first["split_params"],
                "sliced_share": first["sliced_params"] / whole_sliced if whole_sliced else None,
                "activation_mb_per_rank": first["activation_bytes"] / 2**20,
                "step_ms": 1e3 * slowest / a.steps, "samples_per_sec": a.batch * a.steps / slowest,
                "tensor_mb_per_step": per_step.get("tensor", 0.0) / 2**20, "formula_mb_per_step": formula / 2**20,
                "gradient_mb_per_step": per_step.get("gradients", 0.0) / 2**20}


def _replicated(held: dict) -> int:
    """Parameters of the split layers every rank holds whole (their row and output biases)."""
    return held["split_params"] - held["sliced_params"]


def activation_bytes(model, batch: int) -> int:
    """Bytes of float32 activations one forward pass keeps for the backward pass: every layer's output, and inside
    each attention layer its query, key and value projections, scores and per-head output (this rank's heads)."""
    import keras

    from hvdtrain.tensor.plan import Calls
    calls, total = Calls(model), 0
    for layer in calls.layers:
        output = calls.calls[id(layer)][0].output_tensors[0]   # this model's call (its layers may be shared)
        total += int(np.prod(output.shape[1:]))
        if isinstance(layer, keras.layers.MultiHeadAttention):
            tokens = int(output.shape[1])
            per_head = 3 * layer.key_dim + tokens + layer.value_dim   # q, k, v, scores over the tokens, output
            total += tokens * layer.num_heads * per_head
    return 4 * batch * total


def main(argv=None) -> int:
    from hvdtrain.bench import harness
    return harness.worker_main(__doc__, add_arguments, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
