"""Runs inside each rank (MPI, 2 ranks): examples/keras_pipeline.py, a plain Keras script using hvdtrain.keras with
pipeline stages, in phases one after another in this process (start-up paid once; Horovod starts with the stages'
process sets, so the data-parallel phase comes last):

  pipeline  the example's command with 2 stages (D=1), 2 epochs                 -> OUT/pipeline/ (summary, model.keras)
  stopped   the same in OUT/stopped, whose STOP file (made by the test) stops it mid-epoch
  resumed   the same again in OUT/stopped: resumes there, keeping the checkpoint's split (balance=time)
  errors    misuses, each stopped with one line on every rank; an evaluation whose data fails on the first stage,
            and the same stage's next evaluation, unchanged
  dp        the same script data-parallel (no stages, D=2) on the same global batches   -> OUT/dp/
            then OUT/pipeline/model.keras evaluated exactly, and a data-parallel resume of OUT/pipeline refused
Writes OUT/rank<R>.json: the summaries, the errors, the whole model's exact metrics.

usage: keras_pipeline_worker.py OUT_DIR | gloo       (gloo: only hk.init(pipeline_stages=2), which must refuse Gloo)
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "examples"))

import hvdtrain.keras as hk  # noqa: E402
import keras  # noqa: E402
import keras_pipeline as example  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from hvdtrain.errors import UserError  # noqa: E402

SEED, EPOCHS, GLOBAL_BATCH = 7, 2, 64
SETTINGS = dict(epochs=EPOCHS, global_batch=GLOBAL_BATCH, seed=SEED)


def refused(fn) -> str:
    try:
        fn()
    except UserError as exc:
        return str(exc)
    return "not refused"


def only_the_first(index, batch):
    """A batch that cannot be read after the first (a read error, as tf.data raises for a corrupt file)."""
    with tf.control_dependencies([tf.debugging.assert_less(index, tf.constant(1, tf.int64))]):
        return tf.nest.map_structure(tf.identity, batch)


def misuses(world, out: Path) -> dict:
    """Each misuse's error, in a pipelined world."""
    _, steps, test = example.data(world, GLOBAL_BATCH)
    run = hk.Run(out / "errors", world, epochs=1, steps_per_epoch=steps, global_batch_size=GLOBAL_BATCH)
    loss, metrics = example.objective()

    def stage(**options):
        return hk.pipeline(example.mlp(SEED), run, loss=loss, metrics=metrics, balance="params", **options)

    def averaged_over_all_ranks():
        s = stage()
        s.compile(hk.distribute(keras.optimizers.SGD(0.05)), jit_compile=False)   # no world=world
        run.resume(s)
    served = stage()   # one stage, one channel: a failed evaluation must leave nothing behind in it
    before = hk.evaluate(served, test, world)
    failing = test.enumerate().map(only_the_first)
    failed = refused(lambda: hk.evaluate(served, failing, world))   # the first stage cannot read the second batch
    after = hk.evaluate(served, test, world)
    return {
        "unreadable data": failed if before == after else f"the next evaluation differs: {before} {after}",
        "unknown layer": refused(lambda: stage(split=["hiden"])),
        "micro-batches": refused(lambda: stage(microbatches=5)),
        "schedule": refused(lambda: stage(schedule="zigzag")),
        "metric name": refused(lambda: hk.pipeline(example.mlp(SEED), run, loss=loss, metrics=["accuracy"])),
        "optimizer": refused(averaged_over_all_ranks),
        "predict": refused(lambda: hk.predict(stage(), np.zeros((4, 64), np.float32), world)),
        "whole model": refused(lambda: hk.evaluate(example.mlp(SEED), test, world)),
    }


def main(out: Path) -> None:
    summaries = {"pipeline": example.main(["--run-dir", str(out / "pipeline"), "--stages", "2", "--epochs",
                                           str(EPOCHS), "--seed", str(SEED), "--balance", "params"])}
    world = hk.init(seed=SEED, deterministic=True, pipeline_stages=2)   # the same world again
    summaries["stopped"] = example.train(out / "stopped", world, balance="params", **SETTINGS)
    summaries["resumed"] = example.train(out / "stopped", world, **SETTINGS)   # measured balance: the split is kept
    result = {"layout": [world.stage, world.replicas], "summaries": summaries, "errors": misuses(world, out)}

    world = hk.init(seed=SEED, deterministic=True)   # data-parallel: the 2 ranks are 2 replicas
    summaries["dp"] = example.train(out / "dp", world, **SETTINGS)
    hk.barrier(world)   # rank 0 wrote the pipeline's model.keras
    whole = keras.saving.load_model(out / "pipeline" / "model.keras")
    result["whole_model"] = hk.evaluate(whole, example.data(world, GLOBAL_BATCH)[2], world)
    run = hk.Run(out / "pipeline", world, epochs=EPOCHS, steps_per_epoch=22, global_batch_size=GLOBAL_BATCH)
    model = example.mlp(SEED)
    model.compile(hk.distribute(keras.optimizers.SGD(0.05)), example.objective()[0], jit_compile=False)
    result["errors"]["resume without the stages"] = refused(lambda: run.resume(model))
    (out / f"rank{world.rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    if sys.argv[1] == "gloo":
        hk.init(pipeline_stages=2)
    else:
        main(Path(sys.argv[1]))
