"""SPACE.yaml: which config keys a sweep varies and over what ranges, what it optimises, how it prunes.

    optim.lr: {log_uniform: [1.0e-3, 1.0]}           # a config key (section.key) and its range
    optim.warmup_epochs: {uniform: [0, 3]}
    trainer.global_batch_size: {choice: [64, 128, 256]}
    model.width: {int: [16, 64], step: 16}            # step optional (default 1)
    objective: {metric: test_accuracy, direction: maximize}   # a key of summary.json (default: the task's headline)
    pruning: {metric: val_accuracy, startup_trials: 2, warmup_epochs: 1}   # optional: Optuna's MedianPruner
    sampler: {name: tpe, seed: 0, startup_trials: 10} # optional: tpe (default) | random
    enqueue:                                          # optional: trials to run first, exactly as given
      - {optim.lr: 0.05, optim.warmup_epochs: 1}

Keys may also be nested by section (`optim: {lr: {log_uniform: [...]}}`). Everything is checked against the base
config before any trial runs: every key through hvdtrain.config (unknown keys get its "did you mean"), both ends of
every range and every choice (types, choices, limits, the global batch against the ranks per trial), and every
enqueued trial as a whole. Each problem is one line.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from hvdtrain import config as configs
from hvdtrain.errors import UserError

KINDS = ("log_uniform", "uniform", "int", "choice")
RESERVED = ("objective", "pruning", "sampler", "enqueue")
SAMPLERS = ("tpe", "random")
# Keys the sweep sets itself, or settings a trial could not live with.
NOT_SWEPT = {"trainer.run_dir": "the sweep gives every trial its own run directory under --output",
             "trainer.resume": "trials must resume from their checkpoints after an interruption",
             "trainer.elastic": "trials are launched as static jobs"}
# Settings checked against the number of ranks (hvdtrain.config.check_world).
WORLD_KEYS = ("trainer.global_batch_size", "runtime.expected_ranks")
# A big int range is checked at both ends only; up to this many values it is checked value by value.
CHECK_EVERY_VALUE = 4096


class SpaceError(UserError):
    def __init__(self, message: str):
        super().__init__(message, agreed=True)


@dataclass(frozen=True)
class Param:
    key: str                 # section.key
    kind: str                # one of KINDS
    low: float | int | None = None
    high: float | int | None = None
    step: int = 1
    choices: tuple = ()

    def distribution(self):
        from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
        if self.kind == "choice":
            return CategoricalDistribution([encode_choice(c) for c in self.choices])
        if self.kind == "int":
            return IntDistribution(int(self.low), int(self.high), step=self.step)
        return FloatDistribution(float(self.low), float(self.high), log=self.kind == "log_uniform")

    def describe(self) -> str:
        if self.kind == "choice":
            return f"{{choice: {json.dumps(list(self.choices))}}}"
        step = f", step: {self.step}" if self.kind == "int" and self.step != 1 else ""
        return f"{{{self.kind}: [{self.low:g}, {self.high:g}]{step}}}"

    def boundary_values(self) -> list:
        """The values that must all be valid for any sample to be: the choices, or the ends (every value of a
        modest int range, so a global batch the ranks cannot share is found wherever it is)."""
        if self.kind == "choice":
            return list(self.choices)
        if self.kind == "int":
            count = (self.high - self.low) // self.step + 1
            if count <= CHECK_EVERY_VALUE:
                return list(range(self.low, self.high + 1, self.step))
            return [self.low, self.high]
        return [float(self.low), float(self.high)]

    def config_value(self, optuna_value):
        """The config value of a sampled (or stored) Optuna value."""
        if self.kind == "choice":
            return decode_choice(optuna_value)
        if self.kind == "int":
            return int(optuna_value)
        return float(optuna_value)


@dataclass(frozen=True)
class Objective:
    metric: str
    direction: str           # maximize | minimize

    @property
    def maximize(self) -> bool:
        return self.direction == "maximize"


@dataclass(frozen=True)
class Pruning:
    metric: str              # a column of metrics.csv, read after every epoch
    startup_trials: int = 2  # MedianPruner n_startup_trials: completed trials before anything is pruned
    warmup_epochs: int = 1   # MedianPruner n_warmup_steps: epochs of every trial that are never pruned


@dataclass(frozen=True)
class Sampler:
    name: str = "tpe"
    seed: int = 0
    startup_trials: int = 10  # TPE: random trials before the model takes over


@dataclass(frozen=True)
class Space:
    path: str
    params: dict            # key -> Param, in file order
    objective: Objective
    pruning: Pruning | None
    sampler: Sampler
    enqueue: tuple = field(default_factory=tuple)   # ({key: config value}, ...)

    def distributions(self) -> dict:
        return {key: p.distribution() for key, p in self.params.items()}

    def config_values(self, optuna_params: dict) -> dict:
        return {key: self.params[key].config_value(v) for key, v in optuna_params.items() if key in self.params}

    def to_dict(self) -> dict:
        """A plain, comparable form (stored with the study; a rerun must bring the same space)."""
        return {"params": {k: {"kind": p.kind, "low": p.low, "high": p.high, "step": p.step,
                               "choices": list(p.choices)} for k, p in self.params.items()},
                "objective": dataclasses.asdict(self.objective),
                "pruning": dataclasses.asdict(self.pruning) if self.pruning else None,
                "sampler": dataclasses.asdict(self.sampler),
                "enqueue": [dict(e) for e in self.enqueue]}


# ------------------------------------------------------------------ values on the command line and in Optuna

def encode_choice(value):
    """Optuna's choices are scalars: a list or mapping (e.g. model.hidden) is kept as its JSON text."""
    return value if value is None or isinstance(value, (bool, int, float, str)) else json.dumps(value)


def decode_choice(value):
    if isinstance(value, str) and value[:1] in "[{":
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def override_text(key: str, value) -> str:
    """`--section.key=value` that hvdtrain.config reads back to exactly `value` (floats by their shortest exact repr)."""
    text = repr(value) if isinstance(value, float) else json.dumps(value)
    return f"--{key}={text}"


def with_values(cfg: configs.Config, values: dict, where: str = "") -> configs.Config:
    """cfg with some section.key values replaced, validated by hvdtrain.config (its one-line errors, prefixed)."""
    sections: dict = {}
    for key, value in values.items():
        section, name = key.split(".", 1)
        sections.setdefault(section, {})[name] = value
    try:
        return cfg.replace(**sections)
    except configs.ConfigError as exc:
        raise SpaceError(f"{where}{exc}") from None


# ------------------------------------------------------------------ reading and checking

def load_space(path: str | Path, base: configs.Config, ranks: int) -> Space:
    """Read SPACE.yaml and check it against the base config and the ranks per trial (SpaceError: one line)."""
    path = Path(path)
    if not path.is_file():
        raise SpaceError(f"space file not found: {path} (pass --space SPACE.yaml; see `hvdtrain sweep --help`)")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise SpaceError(f"space file {path} is not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(raw, dict) or not raw:
        raise SpaceError(f"space file {path} must map config keys to ranges, e.g. `optim.lr: {{log_uniform: [1e-3, 1]}}`")
    name = path.name
    settings = {k: raw.pop(k) for k in RESERVED if k in raw}
    params = {}
    for key, spec in _flatten(raw, name).items():
        params[key] = _param(key, spec, name)
    if not params:
        raise SpaceError(f"{name}: no parameters to sweep; add config keys with ranges, e.g. `optim.lr: {{log_uniform: [1e-3, 1]}}`")
    for param in params.values():
        _check_against_config(param, base, ranks, name)
    objective = _objective(settings.get("objective"), base, name)
    space = Space(path=str(path), params=params, objective=objective,
                  pruning=_pruning(settings.get("pruning"), objective, base, name),
                  sampler=_sampler(settings.get("sampler"), name),
                  enqueue=_enqueue(settings.get("enqueue"), params, base, ranks, name))
    configs.check_world(with_values(base, first_values(space)), ranks)   # what the space leaves to the base config
    return space


def _flatten(raw: dict, name: str) -> dict:
    out = {}
    for key, spec in raw.items():
        key = str(key)
        if "." in key:
            out[key] = spec
        elif key in configs.SECTIONS and isinstance(spec, dict) and not set(spec) & set(KINDS):
            for sub, sub_spec in spec.items():
                out[f"{key}.{sub}"] = sub_spec
        else:
            options = [*RESERVED, *configs.SECTIONS]
            close = difflib.get_close_matches(key, options, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise SpaceError(f"{name}: '{key}' is neither a config key (section.key, e.g. optim.lr) nor one of "
                             f"{', '.join(RESERVED)}{hint}")
    return out


def _param(key: str, spec, name: str) -> Param:
    if key in NOT_SWEPT:
        raise SpaceError(f"{name}: {key} cannot be swept: {NOT_SWEPT[key]}")
    where = f"{name}: {key}"
    if not isinstance(spec, dict):
        raise SpaceError(f"{where} must be a range such as {{log_uniform: [1e-3, 1]}}, {{uniform: [0, 3]}}, "
                         f"{{int: [1, 8]}} or {{choice: [64, 128]}}, got {spec!r}")
    kinds = [k for k in spec if k in KINDS]
    extra = [k for k in spec if k not in KINDS and k != "step"]
    if extra or len(kinds) != 1:
        bad = extra[0] if extra else None
        close = difflib.get_close_matches(str(bad), [*KINDS, "step"], n=1) if bad else []
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        what = f"unknown range kind '{bad}'{hint}" if bad else "needs exactly one range kind"
        raise SpaceError(f"{where}: {what}; use one of {', '.join(KINDS)}")
    kind, values = kinds[0], spec[kinds[0]]
    if "step" in spec and kind != "int":
        raise SpaceError(f"{where}: step applies to int ranges only")
    if kind == "choice":
        if not isinstance(values, list) or not values:
            raise SpaceError(f"{where}: choice needs a non-empty list of values, got {values!r}")
        encoded = [encode_choice(v) for v in values]
        if len(set(map(json.dumps, encoded))) != len(encoded):
            raise SpaceError(f"{where}: choice lists a value twice: {values!r}")
        return Param(key, kind, choices=tuple(values))
    if not (isinstance(values, list) and len(values) == 2):
        raise SpaceError(f"{where}: {kind} needs [low, high], got {values!r}")
    low, high = (_number(v, where, kind) for v in values)
    if kind == "int":
        step = spec.get("step", 1)
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (low, high, step)):
            raise SpaceError(f"{where}: int needs integer [low, high] (and step), got {values!r}")
        if step < 1 or low > high:
            raise SpaceError(f"{where}: int needs low <= high and step >= 1, got {values!r}, step {step}")
        if (high - low) % step:
            raise SpaceError(f"{where}: int range [{low}, {high}] does not end on a step of {step}; "
                             f"use [{low}, {high - (high - low) % step}]")
        return Param(key, kind, low, high, step)
    if not low < high:
        raise SpaceError(f"{where}: {kind} needs low < high, got [{low:g}, {high:g}]")
    if kind == "log_uniform" and low <= 0:
        raise SpaceError(f"{where}: log_uniform needs 0 < low < high, got [{low:g}, {high:g}]")
    return Param(key, kind, low, high)


def _number(value, where: str, kind: str):
    if isinstance(value, str):   # YAML 1.1 reads 1e-3 (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise SpaceError(f"{where}: {kind} bounds must be finite numbers, got {value!r}")
    return value


def _check_against_config(param: Param, base: configs.Config, ranks: int, name: str) -> None:
    """Every end and choice through hvdtrain.config and the rank check, alone on top of the base config."""
    section, key = param.key.split(".", 1)
    cls = configs.SECTIONS.get(section)
    fields = {f.name: f for f in dataclasses.fields(cls)} if cls else {}
    if key not in fields:   # hvdtrain.config's own message, with its "did you mean"
        with_values(base, {param.key: param.boundary_values()[0]}, f"{name}: ")
    if key in fields and fields[key].type == "int" and param.kind in ("uniform", "log_uniform"):
        raise SpaceError(f"{name}: {param.key} is an integer setting but {param.kind} draws real numbers; use "
                         f"{{int: [{int(param.low)}, {int(param.high)}]}} or a choice")
    for value in param.boundary_values():
        cfg = with_values(base, {param.key: value}, f"{name}: {param.key} {param.describe()}: ")
        if param.key not in WORLD_KEYS:
            continue
        try:
            configs.check_world(cfg, ranks)
        except configs.ConfigError as exc:
            raise SpaceError(f"{name}: {param.key} {param.describe()} includes {value!r}: {exc}") from None


def first_values(space: "Space") -> dict:
    """One point of the space (every range's first end or choice): the base config with these must be sound."""
    return {key: p.boundary_values()[0] for key, p in space.params.items()}


def known_metrics(base: configs.Config) -> list[str]:
    """The per-epoch metric names of the base config's task (metrics.csv adds val_ versions)."""
    from hvdtrain.tasks import Task
    task = Task.from_config(base.data, base.trainer.top_k)
    names = ["loss", task.headline]
    if task.top_k:
        names.append(f"top{task.top_k}_accuracy")
    return names


def _default_direction(metric: str) -> str:
    lower = ("loss", "mae", "seconds")
    return "minimize" if any(metric.endswith(s) for s in lower) else "maximize"


def _has_test_split(data: configs.DataConfig) -> bool:
    if data.source in ("digits", "synthetic"):
        return True
    if data.source == "tfds":
        return bool(data.test_split)
    return bool(data.test_path)


def _objective(spec, base: configs.Config, name: str) -> Objective:
    spec = {} if spec is None else spec
    if not isinstance(spec, dict):
        raise SpaceError(f"{name}: objective must be a mapping, e.g. {{metric: test_accuracy, direction: maximize}}")
    _only(spec, ("metric", "direction"), f"{name}: objective")
    metrics = known_metrics(base)
    summary = [f"test_{m}" for m in metrics] + ["train_loss", "samples_per_sec", "wall_seconds"]
    metric = str(spec.get("metric", f"test_{metrics[1]}"))
    if metric not in summary:
        close = difflib.get_close_matches(metric, summary, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise SpaceError(f"{name}: objective metric '{metric}' is not in a trial's summary.json{hint}; "
                         f"choose one of {', '.join(summary)}")
    if metric.startswith("test_") and not _has_test_split(base.data):
        raise SpaceError(f"{name}: objective {metric} needs a held-out split but the base config has none "
                         f"(data.source={base.data.source}); set data.test_path or choose objective metric train_loss")
    direction = str(spec.get("direction", _default_direction(metric)))
    if direction not in ("maximize", "minimize"):
        raise SpaceError(f"{name}: objective direction must be maximize or minimize, got {direction!r}")
    return Objective(metric, direction)


def _pruning(spec, objective: Objective, base: configs.Config, name: str) -> Pruning | None:
    if spec is None or spec is False:
        return None
    if spec is True:
        spec = {}
    if not isinstance(spec, dict):
        raise SpaceError(f"{name}: pruning must be a mapping, e.g. {{startup_trials: 2, warmup_epochs: 1}}, or false")
    _only(spec, ("metric", "startup_trials", "warmup_epochs"), f"{name}: pruning")
    metrics = known_metrics(base)
    columns = [*metrics, *(f"val_{m}" for m in metrics)]
    if objective.metric.startswith("test_"):
        default = "val_" + objective.metric[len("test_"):]
    elif objective.metric == "train_loss":
        default = "loss"
    else:
        default = None
    metric = spec.get("metric", default)
    if metric is None:
        raise SpaceError(f"{name}: objective {objective.metric} has no per-epoch counterpart; set pruning.metric to "
                         f"one of {', '.join(columns)}")
    if metric not in columns:
        close = difflib.get_close_matches(str(metric), columns, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise SpaceError(f"{name}: pruning metric '{metric}' is not a column of metrics.csv{hint}; "
                         f"choose one of {', '.join(columns)}")
    startup, warmup = spec.get("startup_trials", 2), spec.get("warmup_epochs", 1)
    for what, value in (("startup_trials", startup), ("warmup_epochs", warmup)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise SpaceError(f"{name}: pruning.{what} must be an integer >= 0, got {value!r}")
    if _default_direction(str(metric)) != objective.direction:
        # the pruner compares per-epoch values in the study's direction: the metric must improve the same way
        better = "lower" if _default_direction(str(metric)) == "minimize" else "higher"
        raise SpaceError(f"{name}: pruning metric {metric} is better when {better} but the objective is to "
                         f"{objective.direction} {objective.metric}; set pruning.metric to one that agrees")
    return Pruning(str(metric), startup, warmup)


def _sampler(spec, name: str) -> Sampler:
    spec = {} if spec is None else spec
    if not isinstance(spec, dict):
        raise SpaceError(f"{name}: sampler must be a mapping, e.g. {{name: tpe, seed: 0}}")
    _only(spec, ("name", "seed", "startup_trials"), f"{name}: sampler")
    sampler = Sampler(**spec)
    if sampler.name not in SAMPLERS:
        raise SpaceError(f"{name}: sampler name must be one of {', '.join(SAMPLERS)}, got {sampler.name!r}")
    for what in ("seed", "startup_trials"):
        value = getattr(sampler, what)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise SpaceError(f"{name}: sampler.{what} must be an integer >= 0, got {value!r}")
    return sampler


def _enqueue(spec, params: dict, base: configs.Config, ranks: int, name: str) -> tuple:
    if spec is None:
        return ()
    if not isinstance(spec, list) or not all(isinstance(e, dict) and e for e in spec):
        raise SpaceError(f"{name}: enqueue must be a list of trials, e.g. [{{optim.lr: 0.05}}]")
    out = []
    for i, entry in enumerate(spec):
        where = f"{name}: enqueue[{i}]"
        entry = {str(k): v for k, v in entry.items()}
        for key, value in entry.items():
            if key not in params:
                close = difflib.get_close_matches(key, list(params), n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                raise SpaceError(f"{where}: {key} is not a swept parameter{hint}; enqueue values of the keys above")
            p = params[key]
            if p.kind == "choice":
                ok = encode_choice(value) in [encode_choice(c) for c in p.choices]
            elif isinstance(value, bool) or not isinstance(value, (int, float)):
                ok = False
            elif p.kind == "int":
                ok = isinstance(value, int) and p.low <= value <= p.high and (value - p.low) % p.step == 0
            else:
                ok = p.low <= value <= p.high
            if not ok:
                raise SpaceError(f"{where}: {key}={value!r} lies outside its range {p.describe()}")
            entry[key] = p.config_value(encode_choice(value) if p.kind == "choice" else value)
        # keys an enqueued trial leaves out are sampled: check it at one point of their ranges
        cfg = with_values(base, {**{k: p.boundary_values()[0] for k, p in params.items()}, **entry}, f"{where}: ")
        try:
            configs.check_world(cfg, ranks)
        except configs.ConfigError as exc:
            raise SpaceError(f"{where}: {exc}") from None
        out.append(entry)
    return tuple(out)


def _only(spec: dict, allowed: tuple, where: str) -> None:
    for key in spec:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise SpaceError(f"{where}: unknown setting '{key}'{hint}; settings are {', '.join(allowed)}")
