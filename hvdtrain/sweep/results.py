"""What a sweep leaves in DIR besides the trials: trials.csv (rewritten after every trial), and at the end sweep.png
and best.yaml, plus the table and the best configuration on screen."""
from __future__ import annotations

import csv
import io
import json
import sys
import warnings
from pathlib import Path

from hvdtrain import config as configs
from hvdtrain.rundir import write_atomic
from hvdtrain.sweep.space import Space, override_text, with_values
from hvdtrain.sweep.trial import TrialDir

STATUS = {"COMPLETE": "completed", "PRUNED": "pruned", "FAIL": "failed", "RUNNING": "running", "WAITING": "waiting"}


def say(text: str) -> None:
    print(f"[sweep] {text}", flush=True)


# ------------------------------------------------------------------ rows

def rows(out: Path, study, space: Space) -> list[dict]:
    """One row per trial handed out (enqueued trials not yet run are left out), in trial order."""
    from optuna.trial import TrialState
    table = []
    for t in sorted(study.trials(), key=lambda t: t.number):
        if t.state == TrialState.WAITING:
            continue
        d = TrialDir(out, t.number)
        summary = d.summary() or {}
        values = space.config_values(t.params)
        wall = (t.datetime_complete - t.datetime_start).total_seconds() \
            if t.datetime_complete and t.datetime_start else None
        epochs = summary.get("epoch") if summary else max(t.intermediate_values, default=None)
        row = {"trial": t.number, "status": STATUS.get(t.state.name, t.state.name.lower()),
               space.objective.metric: t.value if t.state == TrialState.COMPLETE else None}
        row.update({k: _cell(values.get(k)) for k in space.params})
        row.update({"epochs": epochs, "wall_seconds": round(wall, 1) if wall is not None else None,
                    "samples_per_sec": round(summary["samples_per_sec"], 1) if summary.get("samples_per_sec") else None,
                    "run_dir": str(d.path.relative_to(out)), "note": t.user_attrs.get("note", "")})
        table.append(row)
    return table


def _cell(value):
    return json.dumps(value) if isinstance(value, (list, dict)) else value


def write_csv(out: Path, study, space: Space) -> Path:
    table = rows(out, study, space)
    columns = ["trial", "status", space.objective.metric, *space.params, "epochs", "wall_seconds", "samples_per_sec",
               "run_dir", "note"]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in table:
        writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
    write_atomic(out / "trials.csv", buf.getvalue())
    return out / "trials.csv"


def best_trial(study, space: Space):
    """The best completed trial (the earliest of equals), or None."""
    from optuna.trial import TrialState
    done = [t for t in study.trials(states=(TrialState.COMPLETE,))]
    if not done:
        return None
    sign = -1 if space.objective.maximize else 1
    return min(done, key=lambda t: (sign * t.value, t.number))


def importances(study, space: Space) -> dict:
    """Optuna's parameter importances over the completed trials (equal when there are fewer than two).

    fANOVA (a seeded random forest: the same numbers on every rerun), not Optuna 5's default PED-ANOVA: on the small
    sweeps this command runs, PED-ANOVA compares the top 10 % of trials (one or two) with the rest and gave e.g.
    0.50/0.50 to a learning rate that decided everything and a seed that decided nothing (docs/sweeps.md)."""
    from optuna.importance import FanovaImportanceEvaluator, get_param_importances
    from optuna.trial import TrialState
    if len(space.params) == 1:
        return {next(iter(space.params)): 1.0}
    if len(study.trials(states=(TrialState.COMPLETE,))) < 2:
        return {k: 1.0 / len(space.params) for k in space.params}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        found = get_param_importances(study.study, evaluator=FanovaImportanceEvaluator(seed=0))
    return {k: float(found.get(k, 0.0)) for k in space.params}


# ------------------------------------------------------------------ the end of a sweep

def finish(out: Path, study, space: Space, base: configs.Config, ranks: int, code: int) -> int:
    """Results on disk and on screen. Exit code: 0 with a best configuration, 1 when no trial completed, or the
    driver's code (130: interrupted)."""
    table = rows(out, study, space)
    _print_table(table, space)
    counts = {s: sum(r["status"] == s for r in table) for s in ("completed", "pruned", "failed", "running")}
    say(f"{len(table)} trial(s): " + ", ".join(f"{n} {s}" for s, n in counts.items() if n or s == "completed"))
    if code:
        return code
    best = best_trial(study, space)
    if best is None:
        print(f"hvdtrain: error: none of the {len(table)} trials completed; see {out / 'trials.csv'} and the trials' "
              "logs", file=sys.stderr, flush=True)
        return 1
    imp = importances(study, space)
    plot_path = plot(out, study, space, imp)
    best_path = write_best(out, best, space, base, ranks, len(table))
    values = space.config_values(best.params)
    say(f"best: trial {best.number}, {space.objective.metric} {best.value:.4f}: "
        + " ".join(override_text(k, v) for k, v in values.items()))
    say("importance: " + ", ".join(f"{k} {v:.2f}" for k, v in sorted(imp.items(), key=lambda kv: -kv[1])))
    launch = f"scripts/launch.sh {ranks} hvdtrain train" if ranks > 1 else "hvdtrain train"
    say(f"wrote {out / 'trials.csv'}, {plot_path}, {best_path}")
    say(f"train it: {launch} --config {best_path}")
    return 0


def _print_table(table: list[dict], space: Space) -> None:
    if not table:
        return
    columns = ["trial", "status", space.objective.metric, *space.params, "epochs", "wall_seconds"]

    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.0f}"
        return "" if v is None else str(v)

    cells = [[fmt(r.get(c)) for c in columns] for r in table]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)), flush=True)
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)), flush=True)


def write_best(out: Path, best, space: Space, base: configs.Config, ranks: int, n_trials: int) -> Path:
    """The base config with the best trial's values and a fresh run directory, ready for `hvdtrain train --config`."""
    values = space.config_values(best.params)
    cfg = with_values(base, {**values, "trainer.run_dir": str(out / "best")})
    launch = f"scripts/launch.sh {ranks} hvdtrain train" if ranks > 1 else "hvdtrain train"
    header = [f"# best of {n_trials} trials of `hvdtrain sweep` in {out}: trial {best.number}, "
              f"{space.objective.metric} {best.value:.6g} ({space.objective.direction})",
              f"# found with {ranks} rank(s) per trial; train it the same way:",
              f"#   {launch} --config {out / 'best.yaml'}",
              "# swept: " + " ".join(override_text(k, v) for k, v in values.items())]
    path = out / "best.yaml"
    write_atomic(path, "\n".join(header) + "\n" + cfg.to_yaml())
    return path


def plot(out: Path, study, space: Space, imp: dict) -> Path:
    """Left: the objective of every trial (pruned ones at their last per-epoch value) and the best so far.
    Right: the objective against the most important parameter."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.colors
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    from optuna.trial import TrialState
    trials = sorted((t for t in study.trials() if t.state != TrialState.WAITING), key=lambda t: t.number)
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    pruned = [t for t in trials if t.state == TrialState.PRUNED and t.intermediate_values]
    failed = [t for t in trials if t.state == TrialState.FAIL]
    metric = space.objective.metric
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=110)
    left.plot([t.number for t in done], [t.value for t in done], "o", color="tab:blue", label="completed")
    if pruned:
        left.plot([t.number for t in pruned], [t.intermediate_values[max(t.intermediate_values)] for t in pruned],
                  "x", color="tab:orange", label="pruned (value at its last epoch)")
    if failed and done:
        low = min(t.value for t in done)
        left.plot([t.number for t in failed], [low] * len(failed), "v", color="tab:red", label="failed")
    best, xs, ys = None, [], []
    for t in trials:
        if t.state == TrialState.COMPLETE and (best is None or (t.value > best if space.objective.maximize else t.value < best)):
            best = t.value
        if best is not None:
            xs.append(t.number)
            ys.append(best)
    left.step(xs, ys, where="post", color="tab:green", label="best so far")
    left.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    left.set(xlabel="trial", ylabel=metric, title=f"{metric} per trial ({space.objective.direction})")
    left.grid(True, alpha=0.3)
    left.legend(fontsize=8)

    key = max(imp, key=lambda k: (imp[k], -list(space.params).index(k)))
    param = space.params[key]
    xs = [space.config_values(t.params).get(key) for t in done]
    if param.kind == "choice":
        labels = [str(c) for c in param.choices]
        xs = [labels.index(str(x)) for x in xs]
        right.set_xticks(range(len(labels)), labels)
    others = [k for k in sorted(imp, key=lambda k: -imp[k]) if k != key and space.params[k].kind != "choice"]
    if others:   # colour by the next most important numeric parameter
        second = others[0]
        colours = [space.config_values(t.params).get(second) for t in done]
        points = right.scatter(xs, [t.value for t in done], c=colours, cmap="viridis",
                               norm=matplotlib.colors.LogNorm() if space.params[second].kind == "log_uniform" else None)
        fig.colorbar(points, ax=right, label=second)
    else:
        right.plot(xs, [t.value for t in done], "o", color="tab:blue")
    if param.kind == "log_uniform":
        right.set_xscale("log")
    right.set(xlabel=key, ylabel=metric, title=f"{metric} vs {key} (importance {imp[key]:.2f})")
    right.grid(True, alpha=0.3)
    fig.tight_layout()
    path = out / "sweep.png"
    tmp = out / ".sweep.png.tmp.png"
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
    return path
