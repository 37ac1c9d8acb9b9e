"""Runs inside each rank (2 ranks): examples/keras_tensor.py, a plain Keras script using hvdtrain.keras with split
layers, in phases one after another in this process (start-up paid once):

  tensor-adam, tensor-sgd   the example's training with T = 2 (D = 1), 1 epoch     -> OUT/<phase>/, each step's logs
  stopped, resumed          tensor-adam again in OUT/stopped, whose STOP file (made by the test) stops it mid-epoch
  errors                    misuses, each stopped with one line on every rank
  dp-adam, dp-sgd           the same script data-parallel (T = 1, D = 2) on the same global batches
  split, whole              OUT/tensor-adam/model.keras split again over the 2 ranks, evaluated and scored; then the
                            whole model, data-parallel
Writes OUT/rank<R>.json.

usage: keras_tensor_worker.py OUT_DIR
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "examples"))

import hvdtrain.keras as hk  # noqa: E402
import keras  # noqa: E402
import keras_tensor as example  # noqa: E402

from hvdtrain.errors import UserError  # noqa: E402

SEED, GLOBAL_BATCH = 7, 64
SETTINGS = dict(epochs=1, global_batch=GLOBAL_BATCH, seed=SEED)


class StepLogs(keras.callbacks.Callback):
    """The logged loss after every step (Keras's running mean over the epoch so far)."""

    def __init__(self):
        super().__init__()
        self.losses = []

    def on_train_batch_end(self, batch, logs=None):
        self.losses.append(float(logs["loss"]))


def trained(out: Path, name: str, world, **options) -> dict:
    steps = StepLogs()
    summary = example.train(out / name, world, callbacks=[steps], **SETTINGS, **options)
    return {"summary": summary, "losses": steps.losses}


def refused(fn) -> str:
    try:
        fn()
    except UserError as exc:
        return str(exc)
    return "not refused"


def misuses(world, out: Path) -> dict:
    _, steps, _ = example.data(world, GLOBAL_BATCH)
    run = hk.Run(out / "errors", world, epochs=1, steps_per_epoch=steps, global_batch_size=GLOBAL_BATCH)

    def whole_model_trained():
        model = example.transformer(SEED)
        model.compile(hk.distribute(keras.optimizers.SGD(0.01), world=world), "mse", jit_compile=False)
        run.resume(model)
    def averaged_over_all_ranks():
        split = hk.tensor_parallel(example.transformer(SEED), run)
        split.compile(hk.distribute(keras.optimizers.SGD(0.01)), "mse", jit_compile=False)   # no world=world
        run.resume(split)
    return {"whole model": refused(whole_model_trained), "optimizer": refused(averaged_over_all_ranks),
            "unknown layer": refused(lambda: hk.tensor_parallel(example.transformer(SEED), run, plan={"mlp": "row"})),
            "column without its row": refused(lambda: hk.tensor_parallel(example.transformer(SEED), run,
                                                                         plan={"mlp_in": "column"}))}


def main(out: Path) -> None:
    world = hk.init(seed=SEED, deterministic=True, tensor_parallel=2)
    result = {"layout": [world.tensor_rank, world.replicas], "runs": {}}
    runs = result["runs"]
    for optimizer in ("adam", "sgd"):
        runs[f"tensor-{optimizer}"] = trained(out, f"tensor-{optimizer}", world, optimizer=optimizer)
    runs["stopped"] = trained(out, "stopped", world)
    runs["resumed"] = trained(out, "stopped", world)
    result["errors"] = misuses(world, out)
    hk.barrier(world)   # rank 0 wrote model.keras: the whole model, split again (its trained weights' slices)
    reader = hk.Run(out / "reader", world, epochs=1, steps_per_epoch=1, global_batch_size=GLOBAL_BATCH)
    split = hk.tensor_parallel(keras.saving.load_model(out / "tensor-adam" / "model.keras"), reader)
    test = example.data(world, GLOBAL_BATCH)[2]
    x_test = example.digits()[1][0]
    result["split"] = {"evaluated": hk.evaluate(split, test, world),
                       "predicted": hk.predict(split, x_test, world, batch_size=100).tolist()}

    world = hk.init(seed=SEED, deterministic=True)   # data-parallel: the 2 ranks are 2 replicas
    for optimizer in ("adam", "sgd"):
        runs[f"dp-{optimizer}"] = trained(out, f"dp-{optimizer}", world, optimizer=optimizer)
    hk.barrier(world)   # rank 0 wrote model.keras
    whole = keras.saving.load_model(out / "tensor-adam" / "model.keras")
    result["whole"] = {"evaluated": hk.evaluate(whole, example.data(world, GLOBAL_BATCH)[2], world),
                       "predicted": hk.predict(whole, x_test, world, batch_size=100).tolist(),
                       "parameters": whole.count_params()}
    (out / f"rank{world.rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
