"""Sharded optimizer state and gradients (parallel.shard_state 1 and 2; ZeRO stages 1 and 2, Rajbhandari et al.,
SC 2020), on Keras 3, as an optimizer that wraps the configured one the way Keras's own LossScaleOptimizer does.

Layout. The trainable variables, flattened and concatenated in order, are Psi numbers. Replica i of the D replicas
that average together owns one contiguous range of them, the part Horovod's reduce-scatter hands it: the first
(Psi mod D) replicas one number more than floor(Psi / D), so the ranges are balanced to one number (by bytes, since
the variables share one dtype). The range cuts at most one piece out of each variable. The inner optimizer (the
configured one, rebuilt from its config) is built on this replica's pieces only, so its slots (momentum, Adam's
moments) are the range's: 1/D of stage 0's.

A step. The gradients, flattened into one vector, are reduce-scattered (averaged) over the replica group: each rank
receives its range's average. The inner optimizer updates the range (its update is elementwise, so every number gets
the arithmetic it gets at stage 0); an all-gather of the updated ranges gives every rank the whole new weights, which
are assigned to the model's variables: the replicas are bit-identical after it. A piece is not a variable but a
stand-in (`_Piece`) whose value is read from the model at the start of a step and carried as a tensor through the
inner optimizer's update: no second copy of the weights is held.

Stage 1 and 2 differ with gradient accumulation (backward_passes_per_step k > 1): stage 1 accumulates whole local
gradients and reduce-scatters once per optimizer step; stage 2 reduce-scatters after every backward pass and
accumulates only its range's average, so a rank never holds the whole averaged gradient (Keras's train step still
computes the local gradient whole before the optimizer sees it). Without accumulation they run the same step.

Clipping by norm (clipnorm, global_clipnorm) needs whole variables' norms: one small all-reduce of the ranges'
squared sums per variable. Mixed precision: the agreed LossScaleOptimizer (keras3.py) wraps this one, so every rank
skips the same steps. fp16 compression applies to the reduce-scatter (the all-gather sends weights, never rounded).
Bytes are counted where they are sent (traffic.py): a reduce-scatter and an all-gather are each half an all-reduce
on the wire, and each counts half its whole vector, so a sharded step counts what stage 0's all-reduce counts.

`optimizer_state` and `load_optimizer_state` read and write an optimizer's state in a form that does not depend on
the layout (its slots as flat ranges of the concatenated variables, its scalars by name): what checkpoints store,
so any layout re-shards any other (strategies/sharded.py).
"""
from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass, field

import keras
import numpy as np
import tensorflow as tf
from keras.optimizers import LossScaleOptimizer
from keras.src.optimizers import base_optimizer

from hvdtrain.backend import traffic
from hvdtrain.backend._horovod import hvd
from hvdtrain.backend.collectives import _group_size, _process_set
from hvdtrain.errors import UserError
from hvdtrain.variables import GRADIENT_ACCUMULATOR as ACCUMULATOR
# Optimizers whose update reads a whole variable's shape or norm (factored moments, trust ratios, orthogonalised
# updates): a range of a flattened variable would change what they compute.
WHOLE_VARIABLE_OPTIMIZERS = ("Adafactor", "Lamb", "Muon")


# ---- the layout --------------------------------------------------------------------------------------------------

def split(total: int, parts: int) -> list[int]:
    """How many numbers of `total` each of `parts` replicas owns: Horovod's reduce-scatter split (the first
    total % parts one more)."""
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def owned(total: int, parts: int, index: int) -> tuple[int, int]:
    """Replica `index`'s range [lo, hi) of the flat vector."""
    sizes = split(total, parts)
    lo = sum(sizes[:index])
    return lo, lo + sizes[index]


def cut(sizes: list[int], lo: int, hi: int) -> list[tuple[int, int, int]]:
    """The pieces of [lo, hi): (variable index, start, stop) within each variable it overlaps, in order."""
    out, offset = [], 0
    for i, n in enumerate(sizes):
        a, b = max(lo, offset), min(hi, offset + n)
        if a < b:
            out.append((i, a - offset, b - offset))
        offset += n
    return out


def _numel(variable) -> int:
    return int(np.prod(variable.shape))


# ---- pieces: what the inner optimizer updates ---------------------------------------------------------------------

class _Piece:
    """One variable's part of this replica's range, standing in for a variable in the inner optimizer: the shape,
    dtype and path (so slots get stage 0's names) of a flat range, and during a step its value as a tensor, which
    the optimizer's assign/assign_add/assign_sub replace (see _OnPieces)."""

    _ids = itertools.count()

    def __init__(self, variable, index: int, start: int, stop: int):
        self.variable, self.index, self.start, self.stop = variable, index, start, stop
        self.shape = (stop - start,)
        self.dtype = variable.dtype
        self.path, self.name = variable.path, variable.name
        self.constraint = None   # the model variable's constraint runs on the whole variable, after the gather
        self._unique_id = f"hvdtrain_piece_{next(self._ids)}"
        self.value = None

    def read(self):
        self.value = tf.reshape(self.variable.value, [-1])[self.start:self.stop]

    def assign(self, value):
        self.value = tf.cast(value, self.dtype)

    def assign_add(self, value):
        self.value = self.value + tf.cast(value, self.dtype)

    def assign_sub(self, value):
        self.value = self.value - tf.cast(value, self.dtype)


tf.register_tensor_conversion_function(_Piece, lambda piece, dtype=None, name=None, as_ref=False: piece.value)


class _OnPieces:
    """Mixed into the inner optimizer's class: updates go to pieces, slots are made without TensorFlow's placement
    (a piece has no device), and clipping by norm and weight decay see whole variables. Its step counter counts
    backward passes, as a Keras optimizer's does when it accumulates gradients (its learning-rate schedule reads
    them), and `iterations` the optimizer steps."""

    _hvdtrain_accumulation = 1

    @property
    def iterations(self):
        k = self._hvdtrain_accumulation
        return keras.ops.floor_divide(self._iterations, k) if k > 1 else self._iterations

    def add_variable_from_reference(self, reference_variable, name=None, initializer="zeros"):
        slot = base_optimizer.BaseOptimizer.add_variable_from_reference(self, reference_variable, name, initializer)
        self._hvdtrain_slots.append((name or "var", reference_variable, slot))
        return slot

    def assign(self, variable, value):
        return variable.assign(value) if isinstance(variable, _Piece) else super().assign(variable, value)

    def assign_add(self, variable, value):
        return variable.assign_add(value) if isinstance(variable, _Piece) else super().assign_add(variable, value)

    def assign_sub(self, variable, value):
        return variable.assign_sub(value) if isinstance(variable, _Piece) else super().assign_sub(variable, value)

    def _distributed_tf_update_step(self, distribution, grads_and_vars, learning_rate):
        for grad, variable in grads_and_vars:   # no tf.distribute: a piece is updated as a tensor
            self.update_step(grad, variable, learning_rate)

    def _apply_weight_decay(self, variables):
        return base_optimizer.BaseOptimizer._apply_weight_decay(self, variables)

    def _use_weight_decay(self, variable):
        return super()._use_weight_decay(variable.variable if isinstance(variable, _Piece) else variable)

    def _clip_gradients(self, grads):
        if not (self.clipnorm or self.global_clipnorm):
            return super()._clip_gradients(grads)   # clipvalue is elementwise
        squares = self._hvdtrain_squares(grads)     # whole variables' squared norms, summed over the group
        if self.global_clipnorm:
            norm = tf.sqrt(tf.reduce_sum(squares))   # Keras's clip_by_global_norm, on the whole model's norm
            scale = self.global_clipnorm * tf.minimum(1.0 / norm, 1.0 / self.global_clipnorm) + (norm - norm)
            return [g * scale for g in grads]
        out = []
        for g, piece in zip(grads, self._trainable_variables):   # tf.clip_by_norm, on the whole variable's norm
            l2sum = squares[piece.index]
            l2norm = tf.where(l2sum > 0, tf.sqrt(tf.where(l2sum > 0, l2sum, 1.0)), l2sum)
            out.append(g * self.clipnorm / tf.maximum(l2norm, self.clipnorm))
        return out


@functools.lru_cache(maxsize=None)
def _on_pieces(base: type) -> type:
    return type(base.__name__, (_OnPieces, base), {"__module__": base.__module__, "__doc__": base.__doc__,
                                                   "_hvdtrain_base": base})


# ---- the optimizer ------------------------------------------------------------------------------------------------

class ShardedOptimizer(keras.optimizers.Optimizer):
    """The configured optimizer (`inner_optimizer`, built on this replica's pieces), behind a reduce-scatter of the
    gradients and an all-gather of the updated weights over the replica group (`group`: None for all ranks, or a
    pipeline stage's replicas). `stage` 1 or 2, `accumulation` the backward passes per optimizer step."""

    _hvdtrain_distributed = True   # see keras3.is_distributed

    def __init__(self, inner, *, stage: int, group=None, fp16_compression: bool = False, accumulation: int = 1,
                 name=None):
        super().__init__(learning_rate=lambda: 0.0, name=name)   # the inner optimizer's is used; no variable
        self.inner_optimizer = inner
        self.stage, self.accumulation, self._hvdtrain_group = stage, accumulation, group
        self.fp16_compression = fp16_compression
        inner._hvdtrain_squares, inner._hvdtrain_accumulation = self._group_squares, accumulation

    def _trackable_children(self, save_type="checkpoint", **kwargs):
        """None for TensorFlow's checkpoints: a rank's variables are its range's, which checkpoints keep by range
        (strategies/sharded.py); the model's checkpoint (which reaches its optimizer) holds the weights alone."""
        return {}

    # what Keras and the loop read
    @property
    def iterations(self):
        return self.inner_optimizer.iterations

    @property
    def learning_rate(self):
        return self.inner_optimizer.learning_rate

    @learning_rate.setter
    def learning_rate(self, value):
        self.inner_optimizer.learning_rate = value

    @property
    def variables(self):
        return self._variables + self.inner_optimizer.variables

    @property
    def replicas(self) -> int:
        return _group_size(self._hvdtrain_group)

    @property
    def replica(self) -> int:
        ranks = _process_set(self._hvdtrain_group).ranks if self._hvdtrain_group is not None else None
        return hvd().rank() if ranks is None else ranks.index(hvd().rank())

    # ---- building ----------------------------------------------------------------------------------------------------

    @base_optimizer.tracking.no_automatic_dependency_tracking
    def build(self, var_list):
        variables = list(var_list)
        if len({str(v.dtype) for v in variables}) > 1:
            raise UserError("parallel.shard_state flattens the trainable variables into one vector: they must share "
                            f"one dtype, found {sorted({str(v.dtype) for v in variables})}", agreed=True)
        self.sizes = [_numel(v) for v in variables]
        self.total = sum(self.sizes)
        if self.total < self.replicas:
            raise UserError(f"the model's {self.total} trainable numbers are fewer than the {self.replicas} replicas "
                            "that would share them; use parallel.shard_state=0", agreed=True)
        self.lo, self.hi = owned(self.total, self.replicas, self.replica)
        self.pieces = [_Piece(variables[i], i, a, b) for i, a, b in cut(self.sizes, self.lo, self.hi)]
        self.inner_optimizer._hvdtrain_slots = []
        self.inner_optimizer.build(self.pieces)
        self.accumulators = []
        if self.accumulation > 1 and self.stage == 1:   # whole local gradients, reduced once per optimizer step
            self.accumulators = [self.add_variable_from_reference(v, ACCUMULATOR) for v in variables]
        elif self.accumulation > 1:                     # stage 2: only this range's average
            self.accumulators = [self.add_variable((self.hi - self.lo,), name=ACCUMULATOR, dtype=variables[0].dtype)]
        super().build(variables)

    # ---- a step --------------------------------------------------------------------------------------------------------

    def apply(self, grads, trainable_variables=None):
        if not self.built:
            with keras.name_scope(self.name, caller=self):
                self.build(trainable_variables)
        variables = self._trainable_variables
        grads = [tf.zeros(v.shape, v.dtype) if g is None else tf.convert_to_tensor(g) for g, v in zip(grads, variables)]
        k = self.accumulation
        if k == 1:
            self._update(self._scatter(grads))
        elif self.stage == 1:
            tf.cond(self._update_step(), lambda: self._update(self._scatter(self._accumulated(grads))),
                    lambda: self._accumulate(grads))
        else:
            shard = self._scatter(grads)
            tf.cond(self._update_step(), lambda: self._update(self._accumulated([shard])[0]),
                    lambda: self._accumulate([shard]))

    def _update_step(self):
        return (self.inner_optimizer._iterations + 1) % self.accumulation == 0

    def _accumulated(self, grads) -> list:
        """Keras's update of an accumulating optimizer: (g + accumulated) / k, the accumulators reset."""
        out = [(g + acc) / self.accumulation for g, acc in zip(grads, self.accumulators)]
        for acc in self.accumulators:
            acc.assign(tf.zeros(acc.shape, acc.dtype))
        return out

    def _accumulate(self, grads):
        for g, acc in zip(grads, self.accumulators):
            acc.assign_add(g)
        self.inner_optimizer._iterations.assign_add(1)   # a backward pass (an update counts its own)
        return tf.constant(0)

    def _flat(self, tensors):
        return tf.concat([tf.reshape(t, [-1]) for t in tensors], 0)

    # Collectives inside the step are named, without the name scope: Horovod matches requests by name, and a node
    # inside a lowered tf.cond of a nested function is named differently on each rank (seen: a hang).
    def _scatter(self, grads):
        """This range's gradient averaged over the group: one reduce-scatter of the flattened gradients."""
        flat = self._flat(grads)
        if self.replicas == 1:
            return flat
        h = hvd()
        compression = h.Compression.fp16 if self.fp16_compression else h.Compression.none
        sent, context = compression.compress(flat)
        traffic.count_tensors("gradients", [sent], share=0.5)
        shard = h.reducescatter(sent, op=h.Average, name="hvdtrain.shard.gradients", ignore_name_scope=True,
                                process_set=_process_set(self._hvdtrain_group))
        return compression.decompress(shard, context)

    def _update(self, shard):
        """The inner optimizer's update of this range, then every range gathered into the model's variables."""
        for piece in self.pieces:
            piece.read()
        self.inner_optimizer.apply(tf.split(shard, [p.stop - p.start for p in self.pieces]), self.pieces)
        mine = self._flat([p.value for p in self.pieces])
        for piece in self.pieces:
            piece.value = None   # the tensors belong to this trace
        whole = self._gather(mine)
        for variable, value in zip(self._trainable_variables, tf.split(whole, self.sizes)):
            variable.assign(tf.reshape(value, variable.shape))
            if variable.constraint is not None:
                variable.assign(variable.constraint(variable))
        return tf.constant(0)

    def _gather(self, mine):
        if self.replicas == 1:
            return mine
        h = hvd()
        whole = h.allgather(mine, name="hvdtrain.shard.weights", ignore_name_scope=True,
                            process_set=_process_set(self._hvdtrain_group))
        whole = tf.ensure_shape(whole, [self.total])
        traffic.count_tensors("weights", [whole], share=0.5)
        return whole

    def _group_squares(self, grads):
        """Each whole variable's squared norm (a vector over the model's variables), from every replica's range: one
        small all-reduce."""
        mine = tf.zeros([len(self.sizes)], grads[0].dtype)
        for g, piece in zip(grads, self.pieces):
            mine = mine + tf.one_hot(piece.index, len(self.sizes), dtype=g.dtype) * tf.reduce_sum(tf.square(g))
        if self.replicas == 1:
            return mine
        h = hvd()
        traffic.count_tensors("control", [mine])
        return h.allreduce(mine, op=h.Sum, name="hvdtrain.shard.norms", ignore_name_scope=True,
                           process_set=_process_set(self._hvdtrain_group))


def sharded_optimizer(optimizer, *, stage: int, fp16_compression: bool = False, backward_passes_per_step: int = 1,
                      group=None):
    """`optimizer` with sharded state (see the module docstring): rebuilt from its config on this replica's pieces.
    A LossScaleOptimizer is rebuilt around the sharded one with its finiteness check agreed."""
    from hvdtrain.backend.keras3 import _AgreedLossScaleOptimizer, is_distributed
    if is_distributed(optimizer):
        raise UserError("the optimizer is already distributed; pass the plain Keras optimizer", agreed=True)
    if isinstance(optimizer, LossScaleOptimizer):
        inner = sharded_optimizer(optimizer.inner_optimizer, stage=stage, fp16_compression=fp16_compression,
                                  backward_passes_per_step=backward_passes_per_step, group=group)
        return _AgreedLossScaleOptimizer(inner, initial_scale=optimizer.initial_scale,
                                         dynamic_growth_steps=optimizer.dynamic_growth_steps, name=optimizer.name)
    name = type(optimizer).__name__
    if name in WHOLE_VARIABLE_OPTIMIZERS:
        raise UserError(f"{name} computes each update from a whole variable's shape or norm, which a shard of it "
                        "does not have: use parallel.shard_state=0 with it", agreed=True)
    config = optimizer.get_config()
    if config.get("use_ema"):
        raise UserError("an optimizer with use_ema=True keeps a whole-model average; parallel.shard_state does not "
                        "shard it yet: set use_ema=False or parallel.shard_state=0", agreed=True)
    own = config.pop("gradient_accumulation_steps", None) or 1   # accumulated here, before the reduce-scatter
    if own > 1 and backward_passes_per_step > 1:
        raise UserError(f"the optimizer already accumulates gradients (gradient_accumulation_steps={own}); set that "
                        "or backward_passes_per_step, not both", agreed=True)
    steps = max(own, backward_passes_per_step)
    inner = _on_pieces(type(optimizer)).from_config(config)
    return ShardedOptimizer(inner, stage=stage, group=group, fp16_compression=fp16_compression, accumulation=steps,
                            name=f"sharded_{optimizer.name}")


def _core(optimizer):
    """(the loss scaler or None, the optimizer under it)."""
    return (optimizer, optimizer.inner_optimizer) if isinstance(optimizer, LossScaleOptimizer) else (None, optimizer)


def shard_stage(optimizer) -> int:
    """0 for an optimizer that holds the whole state, else its stage (1 or 2)."""
    _, core = _core(optimizer)
    return core.stage if isinstance(core, ShardedOptimizer) else 0


def replicated_variables(optimizer) -> list:
    """The optimizer's variables every replica holds alike (step counters, the loss scale; at stage 0 all)."""
    scaler, core = _core(optimizer)
    if not isinstance(core, ShardedOptimizer):
        return list(optimizer.variables)
    shard = {id(v) for v in core.accumulators if core.stage == 2} | \
        {id(slot) for _, _, slot in core.inner_optimizer._hvdtrain_slots}
    return [v for v in optimizer.variables if id(v) not in shard]


# ---- the state, whatever the layout ---------------------------------------------------------------------------------

@dataclass
class OptimizerState:
    """An optimizer's state as checkpoints keep it: `slots` (name -> the flat range [lo, hi) of that slot over the
    concatenated trainable variables) and `scalars` (by name: steps and backward passes taken, the loss scale, any
    other variable every replica holds alike)."""
    lo: int
    hi: int
    total: int
    scalars: dict = field(default_factory=dict)
    slots: dict = field(default_factory=dict)


def _slot_name(slot, variables) -> tuple[int, str] | None:
    """(variable index, slot name) of a stage-0 optimizer's slot, from the name Keras gives it
    (`<variable path with _ for />_<slot>`) and its shape; None for a variable that is not a slot."""
    best = None
    for i, v in enumerate(variables):
        prefix = v.path.replace("/", "_") + "_"
        if slot.name.startswith(prefix) and tuple(slot.shape) == tuple(v.shape) and \
                (best is None or len(prefix) > best[2]):
            best = (i, slot.name[len(prefix):], len(prefix))
    return best[:2] if best else None


def _stage0_slots(core, variables) -> tuple[dict, list]:
    """{slot name: [its variable for each trainable variable]} of a whole-state optimizer, and its other variables."""
    slots, others = {}, []
    for v in core.variables:
        found = _slot_name(v, variables)
        if found is None:
            others.append(v)
        else:
            slots.setdefault(found[1], [None] * len(variables))[found[0]] = v
    incomplete = [name for name, per in slots.items() if any(s is None for s in per)]
    if incomplete:
        raise UserError(f"{type(core).__name__} keeps {incomplete[0]} for some variables only; its state cannot be "
                        "moved between layouts", agreed=True)
    return slots, others


def _scalars(scaler, core, others) -> dict:
    out = {v.name: v.numpy().item() for v in others if v is not core._iterations and v.shape == ()}
    out["passes"] = int(core._iterations.numpy())
    if scaler is not None:
        out["loss_scale_step_counter"] = int(scaler.step_counter.numpy())
        out["loss_scale"] = float(scaler.dynamic_scale.numpy())
    return out


def optimizer_state(optimizer, variables) -> OptimizerState:
    """This rank's state (a sharded optimizer's range, or the whole), as numpy arrays. A collective for a stage-1
    optimizer that accumulates (its local accumulators are averaged over the group: their average is what the next
    update needs)."""
    scaler, core = _core(optimizer)
    variables = list(variables)
    if isinstance(core, ShardedOptimizer):
        return core_state(scaler, core)
    slots, others = _stage0_slots(core, variables)
    scalars = _scalars(scaler, core, others)
    scalars["steps"] = int(keras.ops.convert_to_numpy(core.iterations))
    total = sum(_numel(v) for v in variables)
    return OptimizerState(0, total, total, scalars,
                          {name: np.concatenate([s.numpy().ravel() for s in per]) for name, per in slots.items()})


def core_state(scaler, core: ShardedOptimizer) -> OptimizerState:
    inner = core.inner_optimizer
    slots: dict = {}
    for name, piece, slot in inner._hvdtrain_slots:
        slots.setdefault(name, []).append(slot.numpy().ravel())
    state = OptimizerState(core.lo, core.hi, core.total, slots={k: np.concatenate(v) for k, v in slots.items()})
    owned_slots = {id(s) for _, _, s in inner._hvdtrain_slots}
    state.scalars = _scalars(scaler, inner, [v for v in inner.variables if id(v) not in owned_slots])
    state.scalars["steps"] = int(keras.ops.convert_to_numpy(inner.iterations))
    if core.accumulators:
        state.slots[ACCUMULATOR] = _accumulated_range(core)
    return state


def _accumulated_range(core: ShardedOptimizer) -> np.ndarray:
    if core.stage == 2:
        return core.accumulators[0].numpy()
    if int(core.inner_optimizer._iterations.numpy()) % core.accumulation == 0:   # between optimizer steps: zeros
        return np.zeros(core.hi - core.lo, np.float32)                          # (on every rank alike)
    flat = tf.concat([tf.reshape(a.value, [-1]) for a in core.accumulators], 0)
    if core.replicas == 1:
        return flat.numpy()
    h = hvd()
    traffic.count_tensors("gradients", [flat], share=0.5)
    return h.reducescatter(flat, op=h.Average, name="hvdtrain.shard.accumulated",
                           process_set=_process_set(core._hvdtrain_group)).numpy()


def state_range(optimizer, variables) -> tuple[int, int, int]:
    """(lo, hi, total): the range of the flat slots this rank's optimizer holds."""
    _, core = _core(optimizer)
    if isinstance(core, ShardedOptimizer):
        return core.lo, core.hi, core.total
    total = sum(_numel(v) for v in variables)
    return 0, total, total


def load_optimizer_state(optimizer, variables, scalars: dict, read) -> None:
    """Set a built optimizer's state: `scalars` as optimizer_state gives them, `read(slot, lo, hi)` the flat values
    of a slot over [lo, hi) (missing gradient accumulators read as zeros: the checkpoint was taken between optimizer
    steps). Stage-1 accumulators are set to the group's average, whole (the next update averages them again)."""
    scaler, core = _core(optimizer)
    variables = list(variables)
    if isinstance(core, ShardedOptimizer):
        _load_sharded(core, scalars, read)
        holder = core.inner_optimizer
    else:
        slots, others = _stage0_slots(core, variables)
        offsets = np.cumsum([0] + [_numel(v) for v in variables])
        for name, per in slots.items():
            values = read(name, 0, int(offsets[-1]))
            for slot, a, b in zip(per, offsets[:-1], offsets[1:]):
                slot.assign(values[a:b].reshape(slot.shape))
        core._iterations.assign(scalars["passes"])
        holder = core
    named = {v.name: v for v in holder.variables if v.shape == () and v is not holder._iterations}
    for name, variable in named.items():
        if name in scalars:
            variable.assign(scalars[name])
    if scaler is not None and "loss_scale" in scalars:
        scaler.step_counter.assign(scalars["loss_scale_step_counter"])
        scaler.dynamic_scale.assign(scalars["loss_scale"])


def _load_sharded(core: ShardedOptimizer, scalars: dict, read) -> None:
    inner = core.inner_optimizer
    for name, piece, slot in inner._hvdtrain_slots:
        offset = sum(core.sizes[:piece.index])
        slot.assign(read(name, offset + piece.start, offset + piece.stop))
    inner._iterations.assign(scalars["passes"])
    if core.stage == 2 and core.accumulators:
        core.accumulators[0].assign(read(ACCUMULATOR, core.lo, core.hi))
    elif core.accumulators:
        whole = read(ACCUMULATOR, 0, core.total)
        offsets = np.cumsum([0] + core.sizes)
        for acc, a, b in zip(core.accumulators, offsets[:-1], offsets[1:]):
            acc.assign(whole[a:b].reshape(acc.shape))


def whole_twin(optimizer):
    """A plain optimizer holding the whole state as stage 0 would hold it for this (sharded) one: the same class,
    config and accumulation, loss-scaled alike; built by the caller, to read a stage-0 checkpoint from."""
    scaler, core = _core(optimizer)
    inner = core.inner_optimizer
    base = type(inner)._hvdtrain_base
    config = inner.get_config()
    if core.accumulation > 1:
        config["gradient_accumulation_steps"] = core.accumulation
    twin = base.from_config(config)
    return LossScaleOptimizer(twin) if scaler is not None else twin


# ---- what a rank holds --------------------------------------------------------------------------------------------

def held_bytes(model) -> dict:
    """summary.json's memory entry of this rank, from the variables it holds: its weights (every variable of its
    model: a pipeline's stage), its gradients at the optimizer step (the averaged gradient: the whole, or at stage 2
    its range; plus gradient accumulators) and its optimizer state (the rest of the optimizer's variables)."""
    from hvdtrain.variables import nbytes
    optimizer = getattr(model, "optimizer", None)
    weights = nbytes(model.weights)
    if optimizer is None:
        return {"weights_bytes": weights, "gradient_bytes": 0, "optimizer_state_bytes": 0}
    _, core = _core(optimizer)
    trainable = nbytes(model.trainable_variables)
    accumulators = [v for v in optimizer.variables if v.name.endswith(ACCUMULATOR)]
    gradient = trainable
    if isinstance(core, ShardedOptimizer) and core.stage == 2:
        gradient = (core.hi - core.lo) * trainable // max(1, core.total)
    state = nbytes([v for v in optimizer.variables if not v.name.endswith(ACCUMULATOR)])
    return {"weights_bytes": weights, "gradient_bytes": gradient + nbytes(accumulators),
            "optimizer_state_bytes": state}
