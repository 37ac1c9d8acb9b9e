"""The Keras API for people who keep their own training script.

    import hvdtrain.keras as hk
    topo = hk.init()                                   # Horovod started, GPU pinned, tuned comm settings
    ds = hk.shard(dataset, topo)                       # this rank's share, before shuffle/batch
    opt = hk.distribute(tf.keras.optimizers.SGD(hk.scale_lr(0.01, topo, "linear")))
    model.compile(optimizer=opt, loss=..., metrics=[...])
    model.fit(ds, callbacks=hk.callbacks(topo), verbose=hk.verbose(topo))
    metrics = hk.evaluate(model, eval_ds_shard, topo)  # exact, from all-reduced sums
    outputs = hk.predict(model, x_or_dataset, topo)  # model outputs for every input, in input order

All communication goes through hvdtrain.dist, like the rest of the framework.
"""
from __future__ import annotations

from hvdtrain import dist, runtime
from hvdtrain.config import OptimConfig, RuntimeConfig
from hvdtrain.optim import scaled_lr

Topology = dist.Topology


def init(runtime_cfg: RuntimeConfig | None = None) -> dist.Topology:
    runtime.quiet_tensorflow()
    runtime.check_versions()
    cfg = runtime_cfg or RuntimeConfig()
    topo = dist.init(cfg)
    runtime.configure(cfg, topo.local_size)
    return topo


def distribute(optimizer, *, fp16_compression: bool = False, backward_passes_per_step: int = 1,
               sparse_as_dense: bool = False):
    """Wrap a Keras optimizer so gradients are averaged over all ranks with a ring all-reduce."""
    return dist.wrap_optimizer(optimizer, OptimConfig(fp16_compression=fp16_compression,
                                                      backward_passes_per_step=backward_passes_per_step,
                                                      sparse_as_dense=sparse_as_dense))


def scale_lr(lr: float, topo: dist.Topology, rule: str = "linear") -> float:
    """lr scaled by the number of ranks: none, linear (lr*n) or sqrt (lr*sqrt(n))."""
    return scaled_lr(lr, rule, topo.size)


def shard(dataset, topo: dist.Topology):
    """This rank's share of a tf.data.Dataset (element i goes to rank i % size). Shard before shuffling."""
    return dataset.shard(topo.size, topo.rank)


def callbacks(topo: dist.Topology, average_metrics: bool = True) -> list:
    """Broadcast of rank 0's initial state, then metric averaging; put your own callbacks after these."""
    out = [dist.broadcast_callback()]
    if average_metrics:
        out.append(dist.metric_average_callback())
    return out


def verbose(topo: dist.Topology) -> int:
    """Keras `verbose` value: progress on rank 0 only."""
    return 2 if topo.is_chief else 0


def evaluate(model, dataset, topo: dist.Topology) -> dict:
    """Exact loss/accuracy over all ranks' shards of `dataset` (sums are all-reduced, never per-rank means averaged)."""
    from hvdtrain.predict import exact_metrics
    return exact_metrics(model, dataset, topo, name="hvdtrain.keras.evaluate")


def predict(model, dataset_or_array, topo: dist.Topology, batch_size: int = 256):
    """Data-parallel model.predict: each rank scores 1/size of the inputs (pass all of them, unsharded);
    the outputs come back in input order, every input exactly once, on every rank (rank 0 included)."""
    from hvdtrain.predict import predict_ordered
    return predict_ordered(model, dataset_or_array, topo, batch_size)
