"""One rank's pipeline stage as a Keras model. `fit` runs its steps like any model's, so the controller (agreed
stops, checkpoints, averaged metrics, exact evaluation), the watchdog and the writers work unchanged; `train_step`
runs this stage's part of the schedule on the replica's batch:

  forward of micro-batch m: the input (stage 1: the batch's slice; later stages: the previous stage's activation),
      the stage's layers under a gradient tape, the output sent on (the last stage: the loss, scaled by 1/M);
  backward of micro-batch m: the gradient of the output (received from the next stage; the last stage starts from
      its loss) through the tape to the stage's weights (summed over micro-batches) and to its input (sent back).

Summing the 1/M-scaled micro-batch gradients gives the gradient of the batch's mean loss; the distributed optimizer
then averages it over the stage's replicas: the same update as the unsplit model on the global batch. The last stage
computes loss and metrics and sends them to the other stages of its pipeline, so every rank logs the same values.
The steps run eagerly (messages are Python calls between TensorFlow ops).
"""
from __future__ import annotations

import keras

from hvdtrain.pipeline.schedule import peak_alive, stage_ops

LOGS_TAG = 1 << 20   # message tags: 2m forward activations, 2m + 1 backward gradients, then these
EVAL_TAG = LOGS_TAG + 1


class _Running:
    """The last stage's loss and metrics over the epoch, outside Keras's tracking (the stage reports them itself)."""

    def __init__(self, metrics):
        self.loss = keras.metrics.Mean(name="loss")
        self.metrics = list(metrics)

    def update(self, loss, y, scores) -> None:
        self.loss.update_state(loss)
        for metric in self.metrics:
            metric.update_state(y, scores)

    def result(self) -> dict:
        return {m.name: float(m.result()) for m in (self.loss, *self.metrics)}

    def reset(self) -> None:
        for m in (self.loss, *self.metrics):
            m.reset_state()


class PipelineStage(keras.Model):
    def __init__(self, stage_model, world, channel, *, schedule: str, microbatches: int, loss=None, metrics=()):
        super().__init__(name=stage_model.name)
        self.stage_model = stage_model
        self.world, self.channel, self.microbatches = world, channel, microbatches
        self.ops = stage_ops(schedule, world.stage, world.stages, microbatches)
        self.peak_stashed = peak_alive(self.ops)
        self.loss_fn = loss
        self.running = _Running(metrics) if world.last_stage else None
        self.input_tail = tuple(stage_model.inputs[0].shape[1:])
        self.output_tail = tuple(stage_model.outputs[0].shape[1:])
        self.built = True

    def call(self, x, training=False):
        return self.stage_model(x, training=training)

    def reset_metrics(self):
        super().reset_metrics()
        if self.running is not None:
            self.running.reset()

    # ---- training ------------------------------------------------------------------------------------------------

    def train_step(self, data):
        import tensorflow as tf
        x, y = data[0], data[1]
        w, M = self.world, self.microbatches
        xs = tf.split(x, M) if w.first_stage else None
        ys = tf.split(y, M) if w.last_stage else None
        variables = self.trainable_variables
        grads = [None] * len(variables)
        stash, scores, loss = {}, [], 0.0
        for kind, m in self.ops:
            if kind == "F":
                inputs = xs[m] if w.first_stage else self._receive(w.previous_rank, 2 * m, self.input_tail)
                stash[m] = self._forward(m, inputs, ys[m] if w.last_stage else None)
                if w.last_stage:
                    scores.append(stash[m].out)
                    loss += float(stash[m].loss)
            else:
                for i, g in enumerate(self._backward(m, stash.pop(m), variables)):
                    grads[i] = g if grads[i] is None else grads[i] + g
        grads = [tf.zeros_like(v) if g is None else g for v, g in zip(variables, grads)]
        self.optimizer.apply(grads, variables)   # averaged over this stage's replicas
        logs = self._shared_logs(loss, y, scores)
        self.channel.flush()
        return logs

    def _receive(self, source: int, tag: int, tail: tuple):
        import tensorflow as tf
        return tf.constant(self.channel.recv(source, tag, tail, self.compute_dtype))

    def _forward(self, m: int, inputs, y) -> "_Pass":
        import tensorflow as tf
        M = self.microbatches
        with tf.GradientTape() as tape:
            if not self.world.first_stage:
                tape.watch(inputs)
            out = self.stage_model(inputs, training=True)
            own = tf.add_n(self.stage_model.losses) / M if self.stage_model.losses else None   # regularisation
            loss = self.loss_fn(y, out) / M if self.world.last_stage else None
        if not self.world.last_stage:
            self.channel.send(out.numpy(), self.world.next_rank, 2 * m)
        return _Pass(tape, inputs, out, loss, own)

    def _backward(self, m: int, p: "_Pass", variables) -> list:
        """This stage's weight gradients for micro-batch m; its input gradient goes to the previous stage."""
        import tensorflow as tf
        w = self.world
        if w.last_stage:
            targets, seeds = [p.loss], [None]
        else:
            targets, seeds = [p.out], [self._receive(w.next_rank, 2 * m + 1, self.output_tail)]
        if p.own is not None:
            targets, seeds = targets + [p.own], seeds + [None]
        sources = list(variables) + ([] if w.first_stage else [p.inputs])
        seeds = [tf.ones_like(t) if s is None else s for t, s in zip(targets, seeds)]
        grads = p.tape.gradient(targets, sources, output_gradients=seeds)
        if not w.first_stage:
            self.channel.send(grads[-1].numpy(), w.previous_rank, 2 * m + 1)
            grads = grads[:-1]
        return grads

    def _shared_logs(self, loss: float, y, scores) -> dict:
        """The epoch's running loss and metrics, computed on the last stage and sent to the pipeline's other stages."""
        import tensorflow as tf
        w = self.world
        first_of_pipeline = w.rank - w.stage
        if w.last_stage:
            self.running.update(loss, y, tf.concat(scores, axis=0))
            logs = self.running.result()
            for rank in range(first_of_pipeline, w.rank):
                self.channel.send_object(logs, rank, LOGS_TAG)
            return logs
        return self.channel.recv_object(first_of_pipeline + w.stages - 1, LOGS_TAG)

    # ---- inference -----------------------------------------------------------------------------------------------

    def forward(self, x):
        """The pipeline's output for a batch on the last stage (None on the others), without training: each stage
        runs its layers on what the previous one sent. Every stage of the pipeline calls it for the same batch."""
        w = self.world
        inputs = x if w.first_stage else self._receive(w.previous_rank, EVAL_TAG, self.input_tail)
        out = self.stage_model(inputs, training=False)
        if w.last_stage:
            return out
        self.channel.send(out.numpy(), w.next_rank, EVAL_TAG)
        return None


class _Pass:
    """What a forward keeps for its backward: the tape, the input, the output, the scaled loss (last stage) and the
    stage's own regularisation loss."""
    __slots__ = ("tape", "inputs", "out", "loss", "own")

    def __init__(self, tape, inputs, out, loss, own):
        self.tape, self.inputs, self.out, self.loss, self.own = tape, inputs, out, loss, own
