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

Frozen layers (model.trainable_from): a stage runs a backward pass only if it or an earlier stage trains, and sends
its input gradient back only if an earlier stage trains. Both sides of a cut decide from the same whole model (every
rank has its layers), so a gradient is sent exactly when it is awaited; a stage of frozen layers with frozen stages
before it only runs forward.

The step is compiled like any Keras train step: the messages are `tf.numpy_function` calls, stateful, so TensorFlow
runs them in the order the schedule wrote them (its automatic control dependencies order every stateful op), and
sends do not wait (backend.p2p), so the step cannot deadlock. The computations are chained into that order too (each
pass and each message waits for the one before): left free, TensorFlow computes whatever is ready first (all of a
stage's backward passes, the gradient sums last) and sends late, and the next stage idles (measured: 1.4x the
schedule's time on 2 stages). A stage is then one sequential processor, as the schedules assume.
"""
from __future__ import annotations

import keras
import numpy as np

from hvdtrain.pipeline.schedule import peak_alive, stage_ops

LOGS_TAG = 1 << 20   # message tags: 2m forward activations, 2m + 1 backward gradients, then these
EVAL_TAG = LOGS_TAG + 1   # serving: a batch's activations, then its labels
WEIGHTS_TAG = LOGS_TAG + 2   # a stage's trained weights, to rank 0 for model.keras
LABELS_TAG = LOGS_TAG + 3


class _Running:
    """The last stage's loss and metrics over the epoch, outside Keras's tracking (the stage reports them itself);
    the other stages hold them too, for their names."""

    def __init__(self, metrics):
        self.loss = keras.metrics.Mean(name="loss")
        self.metrics = list(metrics)

    @property
    def names(self) -> list[str]:
        return [m.name for m in (self.loss, *self.metrics)]

    def update(self, loss, y, scores) -> None:
        self.loss.update_state(loss)
        for metric in self.metrics:
            metric.update_state(y, scores)

    def results(self) -> list:
        return [m.result() for m in (self.loss, *self.metrics)]

    def reset(self) -> None:
        for m in (self.loss, *self.metrics):
            m.reset_state()


class PipelineStage(keras.Model):
    def __init__(self, stage_model, world, channel, *, schedule: str, microbatches: int, loss=None, metrics=(),
                 timer=None, whole_outputs: int | None = None, earlier_trains: bool = True):
        super().__init__(name=stage_model.name)
        self.whole_outputs = whole_outputs   # the whole model's outputs (its task's classes), known on every stage
        self.stage_model = stage_model
        self.world, self.channel, self.microbatches = world, channel, microbatches
        # Frozen layers (see the module's docstring): an earlier stage that trains needs this stage's input gradient,
        # and then this stage its output gradient too, whether it trains itself or not.
        self.sends_input_gradient = earlier_trains and not world.first_stage
        self.runs_backward = earlier_trains or bool(stage_model.trainable_weights)
        self.ops = stage_ops(schedule, world.stage, world.stages, microbatches)
        if not self.runs_backward:
            self.ops = [op for op in self.ops if op[0] == "F"]
        self.peak_stashed = peak_alive(self.ops)
        self.loss_fn = loss
        self.running = _Running(metrics)
        self.timer = timer   # benchmarks: timer.start() before the schedule, timer.end() after it, as ops of the step
        self.input_tail = tuple(stage_model.inputs[0].shape[1:])
        self.output_tail = tuple(stage_model.outputs[0].shape[1:])
        import tensorflow as tf
        self._infer = tf.function(lambda x: self.stage_model(x, training=False), reduce_retracing=True)
        self.built = True

    def call(self, x, training=False):
        return self.stage_model(x, training=training)

    def reset_metrics(self):
        super().reset_metrics()
        self.running.reset()

    # ---- messages, as ops of the compiled step -------------------------------------------------------------------

    def _send(self, tensor, dest: int, tag: int, kind: str = "activations") -> None:
        import tensorflow as tf

        def send(array):
            self.channel.send(np.array(array), dest, tag, kind)   # a copy: TensorFlow may reuse the tensor's memory
            return np.int32(0)
        with self._in_order():
            self._last = tf.numpy_function(send, [tensor], tf.int32, stateful=True, name="pipeline_send")

    def _receive(self, source: int, tag: int, tail: tuple, dtype=None):
        import tensorflow as tf
        dtype = tf.as_dtype(dtype or self.compute_dtype)
        idle = tag < LOGS_TAG   # waiting for an activation or a gradient is the schedule's idle time

        def receive():
            return self.channel.recv(source, tag, tail, dtype.as_numpy_dtype, idle)
        with self._in_order():
            out = tf.numpy_function(receive, [], dtype, stateful=True, name="pipeline_receive")
        out.set_shape((None, *tail))
        self._last = out
        return out

    def _timing(self, event: str) -> None:
        if self.timer is not None:
            import tensorflow as tf
            with self._in_order():
                self._last = tf.numpy_function(lambda: (getattr(self.timer, event)(), np.int32(0))[1], [], tf.int32,
                                               stateful=True, name=f"pipeline_timer_{event}")

    def _in_order(self):
        """Ops made inside wait for the latest pass or message: the schedule's order, one thing at a time."""
        import tensorflow as tf
        return tf.control_dependencies([self._last] if self._last is not None else [])

    def _flush(self) -> None:
        import tensorflow as tf
        tf.numpy_function(lambda: (self.channel.flush(), np.int32(0))[1], [], tf.int32, stateful=True,
                          name="pipeline_flush")

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
        self._last = None
        self._timing("start")
        for kind, m in self.ops:
            if kind == "F":
                inputs = xs[m] if w.first_stage else self._receive(w.previous_rank, 2 * m, self.input_tail)
                stash[m] = self._forward(m, inputs, ys[m] if w.last_stage else None)
                if w.last_stage:
                    scores.append(stash[m].out)
                    loss += stash[m].loss
            else:
                new = self._backward(m, stash.pop(m), variables)
                with self._in_order():   # summed right after its pass (left to TensorFlow, the sums piled up late)
                    grads = [g if acc is None else acc + g for acc, g in zip(grads, new)]
                    self._last = tf.group(*[g for g in grads if g is not None])
        self._timing("end")
        grads = [tf.zeros_like(v) if g is None else g for v, g in zip(variables, grads)]
        if variables:
            self.optimizer.apply(grads, variables)   # averaged over this stage's replicas
        else:   # all frozen: nothing to update or average, but the step counts (optimizer_steps, as on every stage)
            self.optimizer.iterations.assign_add(1)
        logs = self._shared_logs(loss, y, scores)
        self._flush()
        return logs

    def _forward(self, m: int, inputs, y) -> "_Pass":
        import tensorflow as tf
        M = self.microbatches
        with self._in_order(), tf.GradientTape() as tape:
            if self.sends_input_gradient:
                tape.watch(inputs)
            out = self.stage_model(inputs, training=True)
            own = tf.add_n(self.stage_model.losses) / M if self.stage_model.losses else None   # regularisation
            loss = self.loss_fn(y, out) / M if self.world.last_stage else None
        self._last = out if loss is None else loss
        if not self.world.last_stage:
            self._send(out, self.world.next_rank, 2 * m)
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
        sources = list(variables) + ([p.inputs] if self.sends_input_gradient else [])
        with self._in_order():
            seeds = [tf.ones_like(t) if s is None else s for t, s in zip(targets, seeds)]
            grads = p.tape.gradient(targets, sources, output_gradients=seeds)
        if self.sends_input_gradient:
            self._send(grads[-1], w.previous_rank, 2 * m + 1)
            grads = grads[:-1]
        return grads

    def _shared_logs(self, loss, y, scores) -> dict:
        """The epoch's running loss and metrics, computed on the last stage and sent to the pipeline's other stages."""
        import tensorflow as tf
        w = self.world
        if w.last_stage:
            self.running.update(loss, y, tf.concat(scores, axis=0))
            values = tf.cast(tf.stack(self.running.results()), tf.float64)
            for stage in range(w.stages - 1):   # this rank's pipeline: its replica and tensor rank
                self._send(tf.reshape(values, (1, -1)), w.rank_of(w.replica, stage, w.tensor_rank), LOGS_TAG, "control")
        else:
            last = w.rank_of(w.replica, w.stages - 1, w.tensor_rank)
            values = tf.reshape(self._receive(last, LOGS_TAG, (len(self.running.names),), np.float64), (-1,))
        return dict(zip(self.running.names, tf.unstack(values, num=len(self.running.names))))

    # ---- inference -----------------------------------------------------------------------------------------------

    def serve(self, x, y=None):
        """One batch through this stage without training: its output (and the batch's labels, when given) sent to
        the next stage; on the last stage, returned. The first stage passes the batch's inputs, the others what
        `receive` gave them."""
        out = self._infer(x)
        if self.world.last_stage:
            return out
        self.channel.send(out.numpy(), self.world.next_rank, EVAL_TAG, "evaluation")
        self.channel.send_object(None if y is None else np.asarray(y), self.world.next_rank, LABELS_TAG)
        self.channel.flush(keep=2)   # the previous batch's sends done: a stream keeps two messages in flight
        return None

    def receive(self):
        """The next batch from the previous stage, (inputs, labels or None); None when the stream has ended."""
        w = self.world
        inputs = self.channel.recv(w.previous_rank, EVAL_TAG, self.input_tail, self.compute_dtype)
        if len(inputs) == 0:
            return None
        return inputs, self.channel.recv_object(w.previous_rank, LABELS_TAG)

    def end_stream(self) -> None:
        """Tell the next stage that no batch follows (an empty batch); after the last batch, and after a failure."""
        if not self.world.last_stage:
            self.channel.send(np.zeros((0, *self.output_tail), self.compute_dtype), self.world.next_rank, EVAL_TAG,
                              "evaluation")
        self.channel.flush()


class _Pass:
    """What a forward keeps for its backward: the tape, the input, the output, the scaled loss (last stage) and the
    stage's own regularisation loss."""
    __slots__ = ("tape", "inputs", "out", "loss", "own")

    def __init__(self, tape, inputs, out, loss, own):
        self.tape, self.inputs, self.out, self.loss, self.own = tape, inputs, out, loss, own
