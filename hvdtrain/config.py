"""One frozen config tree: defaults -> YAML file -> `--section.key=value` overrides, validated once.

Every field has a one-line doc (used by `hvdtrain config --reference` and docs/configuration.md).
Validation raises UserError with one line per problem; `check_world` adds the checks that need the
number of ranks (e.g. the global batch must divide evenly).
"""
from __future__ import annotations

import dataclasses
import difflib
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from hvdtrain.errors import UserError
from hvdtrain.log import counted


def _f(default, doc, **kw):
    """A dataclass field with its documentation attached."""
    if isinstance(default, (list, dict, tuple)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"doc": doc, **kw})
    return field(default=default, metadata={"doc": doc, **kw})


@dataclass(frozen=True)
class DataConfig:
    source: str = _f("digits", "digits | synthetic | npz | tfrecord | images | image_tfrecord | tfds",
                     choices=("digits", "synthetic", "npz", "tfrecord", "images", "image_tfrecord", "tfds"))
    path: str = _f("", "training data: a .npz file; TFRecord files (a directory, a glob or one file); images: a "
                       "directory with one sub-directory of JPEG/PNG files per class; tfds: the data_dir")
    test_path: str = _f("", "held-out data in the same format as `path` (empty: none; tfds: the same data_dir)")
    task: str = _f("classification", "classification (one int label) | multilabel (num_classes 0/1 targets) | "
                                     "regression (num_classes real targets)",
                   choices=("classification", "multilabel", "regression"))
    input_shape: tuple = _f((), "shape of one example, e.g. [8, 8, 1]; required for synthetic and tfrecord")
    num_classes: int = _f(10, "classes (classification, multilabel) or outputs (regression); "
                              "classification labels must lie in [0, num_classes)")
    synthetic_samples: int = _f(4096, "number of synthetic training examples (test set: a quarter of it)")
    test_fraction: float = _f(0.2, "digits: share of the 1,797 images held out for testing (fixed seeded split)")
    shuffle_buffer: int = _f(10000, "tfrecord/images/tfds: shuffle buffer in examples (in-memory sources shuffle fully)")
    seed: int = _f(1234, "seed of the data order; epoch e shuffles with (seed, e) so order is reproducible")
    image_size: tuple = _f((224, 224), "images/image_tfrecord/tfds: [height, width] every image is resized to")
    channels: int = _f(3, "images/image_tfrecord: colour channels to decode to (1 grey, 3 RGB)")
    augment: bool = _f(True, "images: random crop (pad 1/8, crop back) and horizontal flip, training split only")
    normalize: str = _f("unit", "images: pixel scaling: unit ([0,1]) | symmetric ([-1,1]) | imagenet (mean/std per channel)",
                        choices=("unit", "symmetric", "imagenet"))
    bad_files: str = _f("fail", "images: a corrupt or unreadable image file stops the run (fail) or is left out and "
                                "counted (skip)", choices=("fail", "skip"))
    image_key: str = _f("image/encoded", "image_tfrecord: feature holding the encoded JPEG/PNG bytes")
    label_key: str = _f("image/class/label", "image_tfrecord: int64 feature holding the class label")
    label_offset: int = _f(0, "image_tfrecord: subtracted from stored labels (1 for the classic 1-based ImageNet converters)")
    tfds_name: str = _f("", "tfds: dataset name, e.g. cifar10 or my_set:1.0.0, already prepared in data.path (never downloaded)")
    train_split: str = _f("train", "tfds: split to train on")
    test_split: str = _f("test", "tfds: held-out split (empty: none)")
    partition: str = _f("iid", "fedavg: how the training examples are split over the clients: iid | labels:k (each "
                               "client mostly k labels, McMahan et al.'s non-IID split) | dirichlet:alpha (label "
                               "shares drawn from Dirichlet(alpha); small alpha: more skewed); written to "
                               "run_dir/partition.json")

    def __post_init__(self):
        _require(_valid_partition(self.partition), f"data.partition must be iid, labels:K (K >= 1) or dirichlet:ALPHA "
                                                   f"(ALPHA > 0), got {self.partition!r}")
        _require(self.num_classes >= (2 if self.task == "classification" else 1),
                 "data.num_classes must be >= 2 for classification and >= 1 otherwise")
        if self.partition.startswith("labels:") and self.task == "classification":   # else: near-IID clients
            k = int(self.partition.split(":")[1])
            _require(k <= self.num_classes, f"data.partition={self.partition} asks for {k} labels per client but there "
                                            f"are {self.num_classes} classes (data.num_classes); use labels:K with "
                                            f"K <= {self.num_classes}")
        _require(self.synthetic_samples >= 1, "data.synthetic_samples must be >= 1")
        _require(0.0 < self.test_fraction < 1.0, "data.test_fraction must lie strictly between 0 and 1")
        _require(self.shuffle_buffer >= 1, "data.shuffle_buffer must be >= 1")
        _require(all(isinstance(d, int) and d > 0 for d in self.input_shape),
                 f"data.input_shape must be positive integers, got {list(self.input_shape)}")
        _require(len(self.image_size) == 2 and all(isinstance(d, int) and d > 0 for d in self.image_size),
                 f"data.image_size must be [height, width] in pixels, got {list(self.image_size)}")
        _require(self.channels in (1, 3), f"data.channels must be 1 or 3, got {self.channels}")
        if self.source in ("npz", "tfrecord", "images", "image_tfrecord", "tfds"):
            _require(bool(self.path), f"data.path is required when data.source={self.source}")
        if self.source in ("synthetic", "tfrecord"):
            _require(bool(self.input_shape), f"data.input_shape is required when data.source={self.source}, "
                                             "e.g. --data.input_shape=[32,32,3]")
        if self.source == "tfds":
            _require(bool(self.tfds_name), "data.tfds_name is required when data.source=tfds, e.g. --data.tfds_name=cifar10")
        if self.source in ("digits", "images", "image_tfrecord", "tfds"):
            _require(self.task == "classification", f"data.source={self.source} has class labels: use data.task=classification")

    @property
    def image_source(self) -> bool:
        return self.source in ("images", "image_tfrecord", "tfds")


@dataclass(frozen=True)
class ModelConfig:
    name: str = _f("mlp", "mlp | cnn | resnet | transformer | a keras.applications name (ResNet50, MobileNetV2, EfficientNetB0, ...) | "
                          "a name added with hvdtrain.register_model | a builder by import path, package.module:function")
    weights: str = _f("", "keras.applications: a local weights file to start from (empty: random initialisation; "
                          "nothing is ever downloaded)")
    hidden: tuple = _f((256, 128), "mlp: widths of the hidden layers")
    width: int = _f(32, "cnn/resnet: filters of the first convolution; transformer: the model width (each block's "
                        "MLP is 2 x width wide)")
    blocks: int = _f(2, "resnet: residual blocks per stage (two stages); transformer: encoder blocks")
    heads: int = _f(4, "transformer: attention heads per block (width / heads values each)")
    patch_size: int = _f(2, "transformer: side of the square patches an image is cut into (one token each)")
    options: dict = _f({}, "free-form keyword arguments passed to a user-registered builder")
    trainable_from: str = _f("", "fine-tuning: the first layer that trains, by name (as model.summary() lists them); "
                                 "every layer before it is frozen: its weights never change, get no gradients and are "
                                 "not all-reduced, and a pipeline stage of frozen layers only runs forward (empty: "
                                 "every layer trains)")

    def __post_init__(self):
        _require(all(isinstance(h, int) and h > 0 for h in self.hidden), "model.hidden must be positive integers")
        _require(self.width > 0 and self.blocks > 0, "model.width and model.blocks must be > 0")
        _require(self.heads > 0 and self.patch_size > 0, "model.heads and model.patch_size must be > 0")
        if self.name == "transformer":
            _require(self.width % self.heads == 0, f"model.heads={self.heads} does not divide model.width="
                                                   f"{self.width} (each head gets width / heads values)")
        _require(not self.weights or Path(self.weights).is_file(), f"model.weights file not found: {self.weights}")


@dataclass(frozen=True)
class OptimConfig:
    name: str = _f("sgd", "sgd | adam | rmsprop", choices=("sgd", "adam", "rmsprop"))
    lr: float = _f(0.05, "learning rate before scaling by the number of ranks (see lr_scaling)")
    lr_scaling: str = _f("none", "how lr grows with the number of ranks n: none | linear (lr*n) | sqrt (lr*sqrt(n))",
                         choices=("none", "linear", "sqrt"))
    momentum: float = _f(0.9, "sgd/rmsprop momentum")
    warmup_epochs: float = _f(0.0, "linear warm-up to the scaled lr over this many epochs (0: none): from lr itself "
                                   "when lr_scaling raised it (Goyal et al.), else from lr/10; the same on any number "
                                   "of ranks unless lr_scaling scales it")
    schedule: str = _f("constant", "after warmup: constant | cosine (decays to 0 at the last step)",
                       choices=("constant", "cosine"))
    fp16_compression: bool = _f(False, "compress gradients to float16 for the all-reduce (halves the bytes sent)")
    backward_passes_per_step: int = _f(1, "accumulate gradients locally over this many batches per all-reduce")
    sparse_as_dense: bool = _f(False, "all-reduce embedding (sparse) gradients as dense tensors")

    def __post_init__(self):
        _require(self.lr > 0, "optim.lr must be > 0")
        _require(0.0 <= self.momentum < 1.0, "optim.momentum must lie in [0, 1)")
        _require(self.warmup_epochs >= 0, "optim.warmup_epochs must be >= 0")
        _require(self.backward_passes_per_step >= 1, "optim.backward_passes_per_step must be >= 1")


@dataclass(frozen=True)
class TrainerConfig:
    epochs: int = _f(30, "number of epochs")
    global_batch_size: int = _f(64, "examples per step summed over all ranks; each rank gets global_batch_size / ranks")
    run_dir: str = _f("runs/digits", "where config.yaml, checkpoints, metrics.csv, TensorBoard logs and summary.json go")
    keep_checkpoints: int = _f(3, "how many recent checkpoints to keep")
    checkpoint_every_epochs: int = _f(1, "write a checkpoint every this many epochs (and at the end)")
    checkpoint_every_steps: int = _f(0, "also write one at the first agreed check (check_every_steps) this many steps "
                                        "or more after the last checkpoint (0: off)")
    top_k: int = _f(5, "classification: also report top-k accuracy for this k (0: off; only when num_classes > k)")
    resume: str = _f("auto", "auto: resume if run_dir holds a checkpoint | never: refuse a used run_dir | always: require one",
                     choices=("auto", "never", "always"))
    check_every_steps: int = _f(10, "how often (in steps) ranks agree on non-finite loss and stop requests (and elastic commits)")
    elastic: bool = _f(False, "Horovod Elastic: survive workers leaving/joining (horovodrun --gloo --min-np/--max-np "
                              "--host-discovery-script); in-memory data sources only")
    tensorboard: bool = _f(True, "write TensorBoard logs under run_dir/tensorboard (rank 0)")
    sync: str = _f("every_step", "how replicas stay one model: every_step (average the gradients at every step) | "
                                 "local_sgd (each rank takes sync_period steps on its own, then the weights are "
                                 "averaged: fewer bytes sent, for slow links; an epoch's end always averages) | "
                                 "fedavg (federated averaging of simulated clients, see fedavg.*; an epoch is a "
                                 "communication round)",
                   choices=("every_step", "local_sgd", "fedavg"))
    sync_period: int = _f(8, "local_sgd: steps each rank takes on its own between weight averages (H); stops and "
                             "checkpoints happen at averages")
    sync_warmup_steps: int = _f(0, "local_sgd: average the gradients at every step for this many steps first "
                                   "(post-local SGD)")
    sync_optimizer_state: str = _f("local", "local_sgd: optimizer state (momentum, Adam's moments) at a weight "
                                            "average: local (each rank keeps its own, as in Lin et al. and PyTorch's "
                                            "PostLocalSGDOptimizer; checkpointed rank by rank) | average (averaged "
                                            "with the weights: with momentum, twice the bytes)",
                                   choices=("local", "average"))
    progress: str = _f("auto", "rank 0 progress display: auto (bar on a terminal, one line per epoch otherwise) | bar | epoch | none",
                       choices=("auto", "bar", "epoch", "none"))

    def __post_init__(self):
        _require(self.epochs >= 1, "trainer.epochs must be >= 1")
        _require(self.global_batch_size >= 1, "trainer.global_batch_size must be >= 1")
        _require(bool(self.run_dir), "trainer.run_dir must not be empty")
        _require(self.keep_checkpoints >= 1, "trainer.keep_checkpoints must be >= 1")
        _require(self.checkpoint_every_epochs >= 1, "trainer.checkpoint_every_epochs must be >= 1")
        _require(self.check_every_steps >= 1, "trainer.check_every_steps must be >= 1")
        _require(self.checkpoint_every_steps >= 0 and self.top_k >= 0,
                 "trainer.checkpoint_every_steps and trainer.top_k must be >= 0")
        _require(self.sync_period >= 1, f"trainer.sync_period must be >= 1 (steps between weight averages), got "
                                        f"{self.sync_period}")
        _require(self.sync_warmup_steps >= 0, f"trainer.sync_warmup_steps must be >= 0, got {self.sync_warmup_steps}")


@dataclass(frozen=True)
class RuntimeConfig:
    seed: int = _f(42, "seed for weight initialisation and TensorFlow ops (the same on every rank)")
    deterministic: bool = _f(False, "enable TensorFlow op determinism (bit-for-bit repeatable runs on CPU)")
    intra_op_threads: int = _f(0, "TensorFlow intra-op threads per rank (0: CPU cores / ranks on this node)")
    inter_op_threads: int = _f(0, "TensorFlow inter-op threads per rank (0: 2)")
    # 0.05 ms, not Horovod's 5 ms or our earlier 0.5: a back-to-back all-reduce waits for the next tick, so the
    # tick bounds latency (0.5 ms -> ~590 us at 4 KB). It applies where Horovod does not wake on enqueue (a Horovod
    # built without scripts/patches, or wake_on_enqueue off); hvdtrain's build waits idle_cycle_time_ms instead.
    cycle_time_ms: float = _f(0.05, "HOROVOD_CYCLE_TIME: how often Horovod's background thread batches tensors")
    fusion_threshold_mb: float = _f(64.0, "HOROVOD_FUSION_THRESHOLD: tensors are fused into buffers up to this size")
    # 0: on 2 CPU ranks no bucket size beat one group beyond run-to-run noise (docs/benchmarks.md, bench averaging):
    # the overlapped all-reduce is CPU work on the cores the backward pass needs. Where communication has its own
    # hardware (NCCL on GPUs, a NIC between nodes) buckets let it run during the backward pass.
    bucket_mb: float = _f(0.0, "Keras 3: average gradients in buckets of this many MB as the backward pass produces them "
                               "(the last layers' first, each bucket's all-reduce free to start while earlier layers "
                               "are computed); 0: one group for all; "
                               "below the smallest gradient: one request per tensor")
    cpu_operations: str = _f("auto", "HOROVOD_CPU_OPERATIONS: auto | mpi | gloo (auto: mpi when launched with MPI, else gloo)",
                             choices=("auto", "mpi", "gloo"))
    mpi_yield_when_idle: bool = _f(True, "OMPI_MCA_mpi_yield_when_idle: MPI waits yield the CPU instead of spinning "
                                   "(Horovod's background thread polls MPI every cycle; spinning steals the cores training needs)")
    wake_on_enqueue: bool = _f(True, "HOROVOD_WAKE_ON_ENQUEUE (scripts/patches): Horovod's background thread starts its "
                                     "cycle as soon as a collective is enqueued, instead of sleeping out the cycle time")
    # 5 ms: a woken thread needs no tick for latency; each idle tick is an MPI round on the cores training uses
    # (an idle rank: 23-31 % of a core at the 0.05 ms cycle, 2-3 % at 5 ms; docs/benchmarks.md).
    idle_cycle_time_ms: float = _f(5.0, "HOROVOD_IDLE_CYCLE_TIME (scripts/patches): with wake_on_enqueue, how long Horovod's "
                                        "background thread sleeps while no collective is waiting")
    tf_thread_spinning: bool = _f(False, "TensorFlow's inter-op threads spin before they sleep (TensorFlow's default); off, "
                                         "they sleep at once and leave the core to Horovod's background thread")
    stall_timeout_s: float = _f(60.0, "a collective that some ranks never join shuts the job down after this many seconds")
    expected_ranks: int = _f(0, "refuse to start unless exactly this many ranks are running (0: any number)")
    precision: str = _f("float32", "float32 | mixed_float16 (loss scaling agreed by all ranks) | mixed_bfloat16",
                        choices=("float32", "mixed_float16", "mixed_bfloat16"))

    def __post_init__(self):
        _require(self.intra_op_threads >= 0 and self.inter_op_threads >= 0, "runtime thread counts must be >= 0")
        _require(self.cycle_time_ms > 0, "runtime.cycle_time_ms must be > 0")
        _require(self.idle_cycle_time_ms > 0, "runtime.idle_cycle_time_ms must be > 0")
        _require(self.fusion_threshold_mb >= 0, "runtime.fusion_threshold_mb must be >= 0")
        _require(self.bucket_mb >= 0, "runtime.bucket_mb must be >= 0")
        _require(self.stall_timeout_s > 0, "runtime.stall_timeout_s must be > 0")
        _require(self.expected_ranks >= 0, "runtime.expected_ranks must be >= 0")


@dataclass(frozen=True)
class ParallelConfig:
    pipeline_stages: int = _f(1, "P: split the model into this many pipeline stages, one per rank of a pipeline; the "
                                 "ranks form D = ranks / P data-parallel copies of the pipeline (1: data parallelism only)")
    microbatches: int = _f(4, "pipeline: micro-batches per replica batch (more: a smaller idle bubble, (P-1)/(M+P-1))")
    schedule: str = _f("1f1b", "pipeline: 1f1b (one forward, one backward: at most P micro-batches' activations kept) | "
                               "gpipe (all forwards, then all backwards: M kept); both give the same update",
                       choices=("1f1b", "gpipe"))
    split: tuple = _f((), "pipeline: the layer names at which stages 2..P begin; empty or auto: balanced (see "
                          "balance) over the places where exactly one tensor crosses; a resumed run keeps its "
                          "checkpoint's split", auto=True)
    balance: str = _f("time", "pipeline, automatic split: time (each layer's forward+backward measured on rank 0 on a "
                              "micro-batch) | params (parameter counts: no measuring, the same split every time)",
                      choices=("time", "params"))
    stage_only: bool = _f(True, "pipeline, tensor parallelism: ranks other than 0 make only their stage's weights and "
                                "their slices of split layers (false: every rank makes the whole model's, for a model "
                                "builder whose weights Keras cannot defer)")
    tensor_parallel: int = _f(1, "T: split layers across this many consecutive ranks (Megatron-style tensor "
                                 "parallelism: each holds 1/T of a split layer's weights, an all-reduce joins them); "
                                 "the ranks form D = ranks / (P x T) replicas (1: no split layers)")
    tensor_plan: dict = _f({}, "tensor parallelism: which layers to split, {layer_name: column | row | heads | vocab} "
                               "(column: a Dense's output units, paired with the row Dense its output feeds through "
                               "activations; row: a Dense's input units; heads: a MultiHeadAttention's heads; vocab: "
                               "an Embedding's rows); empty: every Dense -> Dense pair and every MultiHeadAttention "
                               "whose sizes T divides")
    shard_state: int = _f(0, "ZeRO: 0 every replica holds the whole optimizer state | 1 each of the D replicas holds "
                             "1/D of it (a reduce-scatter of the gradients, its range updated, an all-gather of the "
                             "weights: the bytes of one all-reduce) | 2 also only its range of the averaged "
                             "gradients (with backward_passes_per_step > 1 it reduce-scatters every pass); a "
                             "pipeline shards each stage over its replicas; Keras 3 only")

    def __post_init__(self):
        _require(self.pipeline_stages >= 1, "parallel.pipeline_stages must be >= 1")
        _require(self.tensor_parallel >= 1, f"parallel.tensor_parallel must be >= 1, got {self.tensor_parallel}")
        for name, kind in self.tensor_plan.items():
            _require(kind in TENSOR_SPLITS, f"parallel.tensor_plan: {name}: {kind!r} must be one of "
                                            f"{' | '.join(TENSOR_SPLITS)}{_did_you_mean(str(kind), TENSOR_SPLITS)}")
        _require(not self.tensor_plan or self.tensor_parallel > 1,
                 "parallel.tensor_plan applies to parallel.tensor_parallel > 1; set parallel.tensor_parallel or leave "
                 "parallel.tensor_plan out")
        _require(self.microbatches >= 1, "parallel.microbatches must be >= 1")
        _require(self.shard_state in (0, 1, 2), f"parallel.shard_state must be 0 (whole state), 1 (sharded optimizer "
                                                f"state) or 2 (and sharded gradients), got {self.shard_state}")
        _require(all(isinstance(name, str) and name for name in self.split),
                 f"parallel.split must be layer names, got {list(self.split)}")
        if self.split:
            _require(len(self.split) == self.pipeline_stages - 1,
                     f"parallel.split names {len(self.split)} layer(s) but parallel.pipeline_stages="
                     f"{self.pipeline_stages} needs {self.pipeline_stages - 1} (the first layer of each stage after "
                     "the first), or leave it empty (auto)")

    @property
    def pipelined(self) -> bool:
        return self.pipeline_stages > 1

    @property
    def tensor_split(self) -> bool:
        return self.tensor_parallel > 1


TENSOR_SPLITS = ("column", "row", "heads", "vocab")


@dataclass(frozen=True)
class FedavgConfig:
    clients: int = _f(100, "fedavg: K simulated clients, each holding a share of the training data (data.partition); "
                           "the ranks train the round's clients side by side")
    fraction: float = _f(0.1, "fedavg: C, the share of clients sampled each round (at least one; seeded, the same on "
                              "every rank)")
    local_epochs: int = _f(1, "fedavg: E, passes a sampled client makes over its data each round")
    local_batch_size: int = _f(10, "fedavg: B, a client's batch size (0: all its examples in one batch, FedSGD's "
                                   "B = infinity)")

    def __post_init__(self):
        _require(self.clients >= 1, f"fedavg.clients must be >= 1, got {self.clients}")
        _require(0 < self.fraction <= 1, f"fedavg.fraction must be in (0, 1] (the share of clients sampled per "
                                         f"round), got {self.fraction}")
        _require(self.local_epochs >= 1, f"fedavg.local_epochs must be >= 1, got {self.local_epochs}")
        _require(self.local_batch_size >= 0, f"fedavg.local_batch_size must be >= 0 (0: whole client), got "
                                             f"{self.local_batch_size}")

    @property
    def per_round(self) -> int:
        """Clients sampled each round: max(1, round(C * K))."""
        return max(1, round(self.fraction * self.clients))


@dataclass(frozen=True)
class ServeConfig:
    max_batch_size: int = _f(32, "hvdtrain serve: requests a replica scores together in one model call (dynamic "
                                 "batching); 1: each request alone")
    batch_wait_ms: float = _f(5.0, "hvdtrain serve: how long a batch's first request waits for others to join it (ms)")
    min_replicas: int = _f(1, "hvdtrain serve: replicas of the model (of each stage with --stages) kept when idle")
    max_replicas: int = _f(0, "hvdtrain serve: replicas the autoscaler may add under load (0: as many as the cores "
                              "allow, cores / (stages x replica_cpus); more are started if asked, sharing the cores)")
    target_ongoing_requests: float = _f(2.0, "hvdtrain serve: requests in flight per replica (queued or being scored) "
                                             "the autoscaler aims at: above it replicas are added, below it removed")
    upscale_delay_s: float = _f(5.0, "hvdtrain serve: how long the load must stay above the target before a replica "
                                     "is added (s)")
    downscale_delay_s: float = _f(30.0, "hvdtrain serve: how long the load must stay below the target before a "
                                        "replica is removed (s)")
    replica_cpus: float = _f(1.0, "hvdtrain serve: cores each replica reserves (Ray's num_cpus); TensorFlow runs that "
                                  "many threads in it (at least 1)")
    max_request_instances: int = _f(1024, "hvdtrain serve: most instances one predict request may carry (more: a 400 "
                                          "answer)")

    def __post_init__(self):
        _require(self.max_batch_size >= 1, f"serve.max_batch_size must be >= 1 (1: no batching), got {self.max_batch_size}")
        _require(self.batch_wait_ms >= 0, f"serve.batch_wait_ms must be >= 0, got {self.batch_wait_ms}")
        _require(self.min_replicas >= 1, f"serve.min_replicas must be >= 1, got {self.min_replicas}")
        _require(self.max_replicas == 0 or self.max_replicas >= self.min_replicas,
                 f"serve.max_replicas={self.max_replicas} is below serve.min_replicas={self.min_replicas}; raise it "
                 "or set 0 (as many as the cores allow)")
        _require(self.target_ongoing_requests > 0, f"serve.target_ongoing_requests must be > 0, got "
                                                   f"{self.target_ongoing_requests}")
        _require(self.upscale_delay_s >= 0 and self.downscale_delay_s >= 0,
                 "serve.upscale_delay_s and serve.downscale_delay_s must be >= 0")
        _require(self.replica_cpus > 0, f"serve.replica_cpus must be > 0, got {self.replica_cpus}")
        _require(self.max_request_instances >= 1, f"serve.max_request_instances must be >= 1, got "
                                                  f"{self.max_request_instances}")


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    fedavg: FedavgConfig = field(default_factory=FedavgConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)

    def __post_init__(self):
        for ok, message in self._combinations():
            _require(ok, message)

    def _combinations(self):
        """(allowed?, the one line that says why not and what to do) for every combination of strategies and
        settings across sections: the one place they are checked. The first refusal is raised."""
        p, t, o, r = self.parallel, self.trainer, self.optim, self.runtime
        sync = t.sync
        if sync != "local_sgd":
            for name in ("sync_period", "sync_warmup_steps", "sync_optimizer_state"):
                yield (getattr(t, name) == getattr(TrainerConfig, name),
                       f"trainer.{name} applies to trainer.sync=local_sgd only (this run's sync is {sync}); set "
                       f"trainer.sync=local_sgd or leave trainer.{name} out")
        if p.pipelined:
            yield (r.precision == "float32", f"parallel.pipeline_stages={p.pipeline_stages} trains in float32 only "
                   f"(runtime.precision={r.precision}); set runtime.precision=float32")
            yield not t.elastic, ("parallel.pipeline_stages > 1 cannot be elastic (a lost rank takes a stage with "
                                  "it); set trainer.elastic=false")
        if p.tensor_split:
            T = p.tensor_parallel
            yield r.precision == "float32", (f"parallel.tensor_parallel={T} trains in float32 only "
                                             f"(runtime.precision={r.precision}); set runtime.precision=float32")
            yield not t.elastic, (f"parallel.tensor_parallel={T} cannot be elastic (a lost rank takes a slice of "
                                  "every split layer with it); set trainer.elastic=false")
            yield sync == "every_step", (f"trainer.sync={sync} averages whole models, not tensor-parallel slices; use "
                                         f"trainer.sync=every_step with parallel.tensor_parallel={T}")
        if p.shard_state:
            yield sync == "every_step", (f"parallel.shard_state={p.shard_state} shards the state of every-step "
                                         f"averaging; trainer.sync={sync} keeps whole models apart between averages: "
                                         "set parallel.shard_state=0")
            yield not t.elastic, ("parallel.shard_state > 0 cannot be elastic (a new world size re-shards the state, "
                                  "which a resume does); set trainer.elastic=false")
            yield r.bucket_mb == 0, ("runtime.bucket_mb applies to stage 0's all-reduce; parallel.shard_state > 0 "
                                     "sends one reduce-scatter per step: set runtime.bucket_mb=0")
            yield not p.tensor_split, (f"parallel.shard_state={p.shard_state} with parallel.tensor_parallel="
                                       f"{p.tensor_parallel} is not supported yet (the sharded ranges would cut across "
                                       "split layers' slices); set parallel.shard_state=0 or parallel.tensor_parallel=1")
        if sync == "local_sgd":
            yield not p.pipelined, ("trainer.sync=local_sgd averages whole models, not pipeline stages; use "
                                    "trainer.sync=every_step with parallel.pipeline_stages > 1")
            yield not t.elastic, ("trainer.sync=local_sgd cannot be elastic yet (a worker that joins between averages "
                                  "has no model to average); set trainer.elastic=false")
            yield r.precision != "mixed_float16", ("trainer.sync=local_sgd with mixed_float16 would agree on the loss "
                                                   "scale with an all-reduce at every local step; use float32 or "
                                                   "mixed_bfloat16")
            yield o.backward_passes_per_step == 1, ("trainer.sync=local_sgd already takes steps without "
                                                    "communicating; set optim.backward_passes_per_step=1 (or a "
                                                    "larger trainer.global_batch_size)")
        if sync == "fedavg":
            yield not p.pipelined, ("trainer.sync=fedavg averages whole models, not pipeline stages; set "
                                    "parallel.pipeline_stages=1")
            yield not t.elastic, "trainer.sync=fedavg cannot be elastic; set trainer.elastic=false"
            yield r.precision != "mixed_float16", ("trainer.sync=fedavg trains its clients in float32 or "
                                                   "mixed_bfloat16 (mixed_float16's loss scaling is agreed step by "
                                                   "step); set runtime.precision")
            yield o.backward_passes_per_step == 1, ("trainer.sync=fedavg trains each client with plain local steps; "
                                                    "set optim.backward_passes_per_step=1 (or a larger "
                                                    "fedavg.local_batch_size)")
            yield o.warmup_epochs == 0 and o.lr_scaling == "none", (
                "trainer.sync=fedavg trains every client with optim.lr (optim.schedule=cosine decays it over the "
                "rounds); set optim.warmup_epochs=0 and optim.lr_scaling=none")
            yield self.data.partition == "iid" or self.data.task == "classification", (
                f"data.partition={self.data.partition} splits the clients by class label; a {self.data.task} task "
                "has none: use data.partition=iid")
        else:
            fedavg_only = [("data.partition", self.data.partition, DataConfig.partition)] + [
                (f"fedavg.{f.name}", getattr(self.fedavg, f.name), f.default) for f in dataclasses.fields(FedavgConfig)]
            for key, value, default in fedavg_only:
                yield value == default, (f"{key} applies to trainer.sync=fedavg only (this run's sync is {sync}); "
                                         f"set trainer.sync=fedavg or leave {key} out")

    def to_dict(self) -> dict:
        return _plain(dataclasses.asdict(self))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def replace(self, **sections) -> "Config":
        """A copy with some keys changed: cfg.replace(trainer={"epochs": 3})."""
        return from_dict(_merge(self.to_dict(), sections))


SECTIONS = {"data": DataConfig, "model": ModelConfig, "optim": OptimConfig, "trainer": TrainerConfig,
            "runtime": RuntimeConfig, "parallel": ParallelConfig, "fedavg": FedavgConfig, "serve": ServeConfig}


class ConfigError(UserError):
    """A bad config. Every rank reads the same file and arguments, so every rank raises it: rank 0 alone prints."""

    def __init__(self, message: str, agreed: bool = True):
        super().__init__(message, agreed=True)


_PARTITION = re.compile(r"^(iid|labels:[1-9][0-9]*|dirichlet:(?:[0-9]*\.)?[0-9]+(?:e-?[0-9]+)?)$")


def _valid_partition(spec: str) -> bool:
    return bool(_PARTITION.match(spec)) and not (spec.startswith("dirichlet:") and float(spec.split(":")[1]) <= 0)


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _plain(value):
    """Tuples -> lists so the YAML is plain and portable."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        out[key] = _merge(out.get(key, {}), value) if isinstance(value, dict) and isinstance(out.get(key), dict) and key in SECTIONS else value
    return out


def _did_you_mean(name: str, options) -> str:
    close = difflib.get_close_matches(name, list(options), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _coerce(where: str, value, annotation: str, meta: dict):
    """Check one value against its field's declared type; ints are accepted for floats, lists for tuples."""
    kind = {"str": str, "int": int, "float": float, "bool": bool, "tuple": tuple, "dict": dict}[annotation]
    if meta.get("auto") and value == "auto":
        value = []   # a list that may also be chosen automatically: `auto` is the empty list
    if kind is float and isinstance(value, str):
        value = _float_or_same(value)  # YAML 1.1 reads 1e-3 (no dot) as a string
    ok = (isinstance(value, kind) and not (kind is int and isinstance(value, bool))) \
        or (kind is float and isinstance(value, int) and not isinstance(value, bool)) \
        or (kind is tuple and isinstance(value, list))
    if not ok:
        raise ConfigError(f"{where} must be {_TYPE_NAMES[annotation]}, got {value!r} ({type(value).__name__})")
    value = tuple(value) if kind is tuple else float(value) if kind is float else value
    if "choices" in meta and value not in meta["choices"]:
        raise ConfigError(f"{where} must be one of {' | '.join(meta['choices'])}, got {value!r}{_did_you_mean(str(value), meta['choices'])}")
    return value


def _float_or_same(text: str):
    try:
        return float(text)
    except ValueError:
        return text


_TYPE_NAMES = {"str": "a string", "int": "an integer", "float": "a number", "bool": "true or false",
               "tuple": "a list", "dict": "a mapping"}


def from_dict(raw: dict) -> Config:
    if not isinstance(raw, dict):
        raise ConfigError(f"the config must be a mapping of sections ({', '.join(SECTIONS)}), got {type(raw).__name__}")
    sections = {}
    for name, values in raw.items():
        if name not in SECTIONS:
            raise ConfigError(f"unknown config section '{name}'{_did_you_mean(name, SECTIONS)}; sections are {', '.join(SECTIONS)}")
        if values is None:
            values = {}
        if not isinstance(values, dict):
            raise ConfigError(f"config section '{name}' must be a mapping of keys, got {values!r}")
        cls = SECTIONS[name]
        fields = {f.name: f for f in dataclasses.fields(cls)}
        kwargs = {}
        for key, value in values.items():
            if key not in fields:
                raise ConfigError(f"unknown config key '{name}.{key}'{_did_you_mean(key, fields)}")
            kwargs[key] = _coerce(f"{name}.{key}", value, fields[key].type, dict(fields[key].metadata))
        sections[name] = cls(**kwargs)
    return Config(**sections)


def parse_override(text: str) -> tuple[str, str, object]:
    """`--trainer.epochs=5` or `trainer.epochs=5` -> ("trainer", "epochs", 5); values are read as YAML scalars/lists."""
    body = text[2:] if text.startswith("--") else text
    if "=" not in body or "." not in body.split("=", 1)[0]:
        raise ConfigError(f"cannot read override '{text}': write it as --section.key=value, e.g. --trainer.epochs=5")
    dotted, raw = body.split("=", 1)
    section, key = dotted.split(".", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return section, key, value


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    raw: dict = {}
    if path:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path} (pass an existing YAML file, e.g. configs/digits.yaml)")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise ConfigError(f"config file {path} is not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections ({', '.join(SECTIONS)})")
    return with_overrides(raw, overrides)


def with_overrides(raw: dict, overrides: typing.Sequence[str] = ()) -> Config:
    """A config from a plain dict (a YAML file's, or the one stored in a checkpoint) and `--section.key=value`s."""
    for text in overrides:
        section, key, value = parse_override(text)
        raw = _merge(raw, {section: {key: value}})
    return from_dict(raw)


def check_world(cfg: Config, size: int) -> None:
    """Checks that depend on the number of ranks; run on every rank so all ranks fail together."""
    batch, stages, tensor = cfg.trainer.global_batch_size, cfg.parallel.pipeline_stages, cfg.parallel.tensor_parallel
    check_layout(stages, tensor, size)
    replicas = size // (stages * tensor)
    if stages > 1:
        check_pipeline_batch(batch, cfg.parallel.microbatches, replicas)
    elif batch % replicas and cfg.trainer.sync != "fedavg":   # fedavg's clients have their own batch size
        lower, upper = (batch // replicas) * replicas, -(-batch // replicas) * replicas
        hint = f"{lower} or {upper}" if lower else f"{upper}"
        whom = f"{replicas} ranks" if replicas == size else f"{replicas} replicas (ranks / parallel.tensor_parallel)"
        raise ConfigError(f"trainer.global_batch_size={batch} is not divisible by the {whom}; use a multiple of "
                          f"{replicas}, e.g. {hint}")
    expected = cfg.runtime.expected_ranks
    if expected and expected != size:
        raise ConfigError(f"the config expects {counted(expected, 'rank')} (runtime.expected_ranks) but {size} "
                          f"{'is' if size == 1 else 'are'} running; launch with `horovodrun -np {expected} hvdtrain "
                          "train ...` (or srun)")


def check_layout(stages: int, tensor: int, size: int) -> None:
    """The ranks a layout of `stages` pipeline stages and tensor groups of `tensor` ranks needs, against `size`."""
    group = stages * tensor
    if size < group:
        if tensor == 1:
            name, needs = f"parallel.pipeline_stages={stages}", f"{stages} stages need"
        elif stages == 1:
            name, needs = f"parallel.tensor_parallel={tensor}", f"a tensor group of {tensor} ranks needs"
        else:
            name = f"parallel.tensor_parallel={tensor} x parallel.pipeline_stages={stages}"
            needs = f"{stages} stages of {tensor} ranks need"
        launch = f"horovodrun --mpi -np {group}, mpirun, srun --mpi=pmix" if stages > 1 else f"horovodrun -np {group}"
        raise ConfigError(f"{name}: {needs} at least {group} ranks; {size} {'is' if size == 1 else 'are'} running; "
                          f"launch with `scripts/launch.sh {group} hvdtrain ...` (or {launch})")
    if size % tensor:
        raise ConfigError(f"parallel.tensor_parallel={tensor} does not divide the {counted(size, 'rank')}: launch a "
                          f"multiple of {tensor} ranks (each tensor group has {tensor} ranks) or change "
                          "parallel.tensor_parallel")
    if size % group:
        if tensor == 1:
            raise ConfigError(f"parallel.pipeline_stages={stages} does not divide the {counted(size, 'rank')}: launch "
                              f"a multiple of {stages} ranks (each pipeline has one rank per stage) or change the stages")
        raise ConfigError(f"parallel.pipeline_stages={stages} does not divide the {size // tensor} tensor groups (of "
                          f"parallel.tensor_parallel={tensor} ranks each): launch a multiple of {group} ranks (each "
                          f"pipeline has {group} ranks) or change the stages")


def check_pipeline_batch(batch: int, micro: int, replicas: int) -> None:
    if batch % replicas:
        raise ConfigError(f"trainer.global_batch_size={batch} is not divisible by the {replicas} pipeline replicas "
                          f"(ranks / parallel.pipeline_stages); use a multiple of {replicas}")
    if (batch // replicas) % micro:
        raise ConfigError(f"parallel.microbatches={micro} does not divide the replica batch of {batch // replicas} "
                          f"(trainer.global_batch_size / {replicas} replicas); choose a divisor of {batch // replicas}")


def describe_fields() -> list[tuple[str, str, str]]:
    """(key, default, doc) for every field, for --reference and docs/configuration.md."""
    rows = []
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            rows.append((f"{section}.{f.name}", repr(_plain(default)), f.metadata.get("doc", "")))
    return rows
