"""Read finished runs back from a log root or sweep dir: one table, learning curves, error bars, Optuna plots.

Never imported by training: it only reads what runs wrote (metrics.json, .hydra/, TensorBoard events).
"""

import csv
import functools
import json
import re
import shutil
import statistics
import sys
from collections import defaultdict
from collections.abc import Collection, Iterator, Sequence
from pathlib import Path
from typing import Any

import yaml
from matplotlib.ticker import MaxNLocator
from omegaconf import DictConfig, OmegaConf

from digits.config import SWEEP_RUNS
from digits.figures import Figure, save_figures
from digits.hparams import ABSENT, TRIAL, experiment_summary, hyperparameters, varying_keys

COLUMNS = (
    "run", "model", "params", "optimizer", "lr", "batch", "epochs", "weight_decay", "seed", "device",
    "precision", "train_seconds", "best_val_acc_pct", "test_acc_pct", "test_error_pct", "robust_pct", "fonts_pct",
)  # fmt: skip
CURVES = ("train/loss", "val/loss", "train/acc", "val/acc")
YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
KEPT = "<!-- report.py writes what is above this line; what is below it, it keeps as it is -->"
PNG_LINK = r"!\[[^\]]*\]\(([^)]+\.png)\)"


METRICS = ("best_val_acc", "params", "epochs", "train_seconds", "device", "precision")
TEST_METRICS = ("test_acc", "test_error_pct")  # absent from a run that chose on validation (test=false)


def find_runs(root: Path) -> list[Path]:
    """Every finished run below `root`, or listed in a multirun's runs.txt below it, that can be read back:
    metrics.json and its .hydra config. Runs with `test=false` (sweep trials among them) are included: only
    `tested` ones stand behind a test figure.

    A run whose files are corrupt, empty or cut short is skipped with a warning naming it.
    """
    runs = []
    listed = [Path(line) for listing in root.rglob(SWEEP_RUNS) for line in listing.read_text().splitlines() if line]
    found = {p.parent.resolve(): None for p in sorted(root.rglob("metrics.json"))}
    found |= {run.resolve(): None for run in listed if (run / "metrics.json").is_file()}
    for run in sorted(found, key=natural):
        if not (run / ".hydra" / "config.yaml").is_file():
            continue
        try:
            metrics = json.loads((run / "metrics.json").read_text())
            required = METRICS + (TEST_METRICS if any(k in metrics for k in TEST_METRICS) else ())
            missing = [k for k in required if k not in metrics]
            if missing:
                raise ValueError(f"no {', '.join(missing)}")
            run_config(run)
            run_choices(run)
        except (OSError, ValueError, yaml.YAMLError, AttributeError, KeyError, TypeError) as err:
            print(f"warning: skipping {run}: unreadable ({type(err).__name__}: {err})", file=sys.stderr)
            continue
        runs.append(run)
    return runs


def natural(path: Path) -> list:
    """A path's sort key with its numbers compared as numbers: `seed2` before `seed10`, job `_9` before `_10`."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(path))]


# a report reads each run's files once, whichever tables and figures ask
@functools.cache
def run_config(run: Path) -> DictConfig:
    return OmegaConf.load(run / ".hydra" / "config.yaml")


@functools.cache
def run_choices(run: Path) -> dict[str, Any]:
    """The config group choices the run was composed from. Read as plain YAML (libyaml's, where PyYAML has it):
    hydra.yaml needs no interpolation, and OmegaConf takes ten times as long over a hundred runs."""
    return yaml.load((run / ".hydra" / "hydra.yaml").read_text(), Loader=YAML_LOADER)["hydra"]["runtime"]["choices"]


def run_row(run: Path, root: Path) -> dict[str, Any]:
    m = run_metrics(run)
    inside = run.is_relative_to(root.resolve())
    name = str(run.relative_to(root.resolve())) if inside else f"{run.parent.name}/{run.name}"
    cfg = run_config(run)
    model = run_choices(run).get("model", m["model"])
    return {
        "run": name if run != root else run.name,
        "model": model,
        "params": m["params"],
        "optimizer": str(cfg.optimizer._target_).rsplit(".", 1)[-1],
        "lr": cfg.optimizer.lr,
        "batch": cfg.data.batch_size,
        "epochs": m["epochs"],
        "weight_decay": cfg.optimizer.get("weight_decay", 0.0),
        "seed": cfg.seed,
        "device": m["device"],
        "precision": m["precision"],
        "train_seconds": round(m["train_seconds"], 2),
        "best_val_acc_pct": round(100 * m["best_val_acc"], 3),
        "test_acc_pct": round(100 * m["test_acc"], 3) if "test_acc" in m else ABSENT,
        "test_error_pct": round(m["test_error_pct"], 3) if "test_acc" in m else ABSENT,
        **{f"{k}_pct": robust_pct(m, k) for k in ("robust", "fonts")},
    }


def robust_pct(metrics: dict[str, Any], key: str) -> float | str:
    """The robustness suite's mean over its degraded test images (`robust`) or its font digits (`fonts`), in %;
    `-` for a run that did not measure it."""
    measured = metrics.get("robustness", {}).get("test", {})
    value = measured.get("mean" if key == "robust" else key)
    return ABSENT if value is None else round(100 * value, 2)


def table_head(columns: Sequence[str], numeric: Collection[str] = ()) -> list[str]:
    """A Markdown table's header row and its alignment row, the `numeric` columns aligned right."""
    return ["| " + " | ".join(columns) + " |", "|" + "".join("---:|" if c in numeric else "---|" for c in columns)]


def markdown_table(rows: list[dict[str, Any]], columns: tuple[str, ...] = COLUMNS) -> str:
    lines = table_head(columns)
    lines += ["| " + " | ".join(str(r[c]) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


@functools.cache
def overrides_of(run: Path) -> dict[str, str]:
    lines = yaml.load((run / ".hydra" / "overrides.yaml").read_text(), Loader=YAML_LOADER) or []
    return dict(str(line).split("=", 1) for line in lines if "=" in str(line))


def swept_keys(runs: list[Path]) -> list[str]:
    """Command-line keys that take more than one value across the runs (the seed aside)."""
    values: dict[str, set[str]] = defaultdict(set)
    for run in runs:
        for key, value in overrides_of(run).items():
            values[key].add(value)
    return sorted(k for k, v in values.items() if len(v) > 1 and k != "seed")


@functools.cache
def run_metrics(run: Path) -> dict[str, Any]:
    return json.loads((run / "metrics.json").read_text())


@functools.cache
def run_hparams(run: Path) -> dict[str, Any]:
    """A finished run's hyperparameters, as TensorBoard and Optuna show them (`digits.hparams`)."""
    cfg, choices = run_config(run), run_choices(run)
    # the precision the run had, not what `auto` would pick on this machine
    metrics = run_metrics(run)
    return hyperparameters(cfg, choices, metrics["params"]) | {"trainer.precision": metrics["precision"]}


Series = dict[str, dict[str, list[float]]]  # series label → value of the key → test accuracies (%) over seeds


def series_by(runs: list[Path], key: str, others: list[str]) -> Series:
    """Test accuracy (%) by value of `key`, one series per combination of the `others`' values: only seeds are
    folded together."""
    series: Series = defaultdict(lambda: defaultdict(list))
    for run in runs:
        params = run_hparams(run)
        label = ", ".join(f"{k}={params.get(k)}" for k in others)
        series[label][str(params.get(key))].append(100 * run_metrics(run)["test_acc"])
    return series


def value_sorted(values: set[str]) -> list[str]:
    try:
        return sorted(values, key=float)
    except ValueError:
        return sorted(values)


def error_bar_plot(series: Series, key: str, labs: dict[str, float] | None = None, title: str = "") -> Figure:
    """Test accuracy (%) against one key, a line per series: mean ± std over each point's seeds.

    `labs` adds the labs' figures (%) by value of the key, "*" for one figure across all values.
    """
    order = value_sorted({v for points in series.values() for v in points})
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    seeds = [len(accs) for points in series.values() for accs in points.values()]
    for label, points in sorted(series.items()):
        xs = [i for i, v in enumerate(order) if v in points]
        means = [statistics.fmean(points[order[i]]) for i in xs]
        stds = [statistics.stdev(points[order[i]]) if len(points[order[i]]) > 1 else 0.0 for i in xs]
        ax.errorbar(xs, means, yerr=stds, fmt="o-", capsize=4, label=label or "digits")
    if labs:
        marked = [i for i, v in enumerate(order) if v in labs]
        if marked:
            ax.plot(marked, [labs[order[i]] for i in marked], "rx", markersize=9, label="labs")
        if "*" in labs:
            ax.axhline(labs["*"], color="r", linestyle="--", label=f"labs: {labs['*']}%")
    if labs or len(series) > 1:
        ax.legend(fontsize=7)
    ax.set_xticks(range(len(order)), order)
    ax.set_xlabel(key)
    n = f"{min(seeds)}" if min(seeds) == max(seeds) else f"{min(seeds)}-{max(seeds)}"
    ax.set_ylabel(f"test accuracy % (mean ± std, {n} seeds)")
    ax.set_title(title or f"test accuracy against {key}")
    fig.tight_layout()
    return fig


def series_table(runs: list[Path]) -> str:
    """One row per combination of the values that differ between runs, its seeds folded into mean ± std (%)."""
    params = [run_hparams(run) for run in runs]
    keys = varying_keys(params, ignore=("seed", TRIAL, "params"))
    groups: dict[tuple[str, ...], list[dict[str, float]]] = defaultdict(list)
    for run, p in zip(runs, params, strict=True):
        m = run_metrics(run)
        groups[tuple(str(p.get(k)) for k in keys)].append({"test": 100 * m["test_acc"], "val": 100 * m["best_val_acc"]})
    header = [*keys, "seeds", "test accuracy %", "best val accuracy %"]
    lines = table_head(header)
    for values, rows in sorted(groups.items(), key=lambda g: [value_order(f"k={v}") for v in g[0]]):
        cells = [mean_std([r[what] for r in rows]) for what in ("test", "val")]
        lines.append("| " + " | ".join([*values, str(len(rows)), *cells]) + " |")
    return "\n".join(lines) + "\n"


def mean_std(values: list[float]) -> str:
    return f"{statistics.fmean(values):.2f}" + (f" ± {statistics.stdev(values):.2f}" if len(values) > 1 else "")


def learning_curves(run: Path, name: str) -> Figure | None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run), size_guidance={"scalars": 0})
    events.Reload()
    tags = [t for t in CURVES if t in events.Tags().get("scalars", [])]
    if not tags:
        return None
    fig = Figure(figsize=(10, 3.5))
    axes = fig.subplots(1, 2)
    epochs = {e.step: e.value for e in events.Scalars("epoch")} if "epoch" in events.Tags()["scalars"] else {}
    for tag in tags:
        ax = axes[0] if tag.endswith("loss") else axes[1]
        points = events.Scalars(tag)
        ax.plot([epochs.get(p.step, p.step) for p in points], [p.value for p in points], "o-", label=tag)
    for ax, what in zip(axes, ("loss", "accuracy"), strict=True):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        ax.set_xlabel("epoch")
        ax.set_ylabel(what)
        ax.legend()
    fig.suptitle(name, fontsize=8)
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.14, top=0.88, wspace=0.22)  # tight_layout's, without its cost
    return fig


def optuna_plots(root: Path) -> Iterator[tuple[str, Figure]]:
    """Each study in the sqlite storages below `root`, drawn as a study: its optimisation history, parameter
    importances and a slice per parameter."""
    import optuna
    from optuna.visualization import matplotlib as optuna_plt

    for db in root.rglob("optuna.db"):
        storage = f"sqlite:///{db}"
        for summary in optuna.get_all_study_summaries(storage):
            study = optuna.load_study(study_name=summary.study_name, storage=storage)
            if not [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]:
                continue
            plots = {"history": optuna_plt.plot_optimization_history}
            if len(study.trials) > 1 and len(study.best_params) > 1:
                plots["importances"] = optuna_plt.plot_param_importances
            for param in study.best_params:
                plots[f"slice_{param}"] = lambda study, param=param: optuna_plt.plot_slice(study, params=[param])
            for kind, plot in plots.items():
                ax = plot(study)
                ax.figure.tight_layout()
                yield f"optuna/{study.study_name}_{kind}", ax.figure


def tested(runs: list[Path]) -> list[Path]:
    """The runs that read the test set."""
    return [run for run in runs if "test_acc" in run_metrics(run)]


def replicated(runs: list[Path]) -> list[Path]:
    """The tested runs that are not an Optuna trial: a study's trials are each one draw, never replicates."""
    return [run for run in tested(runs) if run_hparams(run)[TRIAL] == ABSENT]


def report_figures(
    root: Path, runs: list[Path], rows: list[dict[str, Any]], plain: list[Path]
) -> Iterator[tuple[str, Figure]]:
    """Learning curves per run; error bars against each key that differs between the `plain` runs (trials
    aside), one line per combination of the other keys, where some point has several seeds; then the Optuna
    studies. Made one at a time."""
    for run, row in zip(runs, rows, strict=True):
        if fig := learning_curves(run, row["run"]):
            yield f"curves/{row['run']}", fig
    keys = varying_keys([run_hparams(run) for run in plain], ignore=("seed", TRIAL, "params")) if plain else []
    for key in keys:
        series = series_by(plain, key, [k for k in keys if k != key])
        if any(len(accs) > 1 for points in series.values() for accs in points.values()):
            yield f"errorbars/{key}", error_bar_plot(series, key)
    yield from optuna_plots(root)


EXPERIMENT_DIR = "hparams_experiment"  # a run of its own under the log root, holding only the experiment


def write_experiment(root: Path, runs: list[Path]) -> Path:
    """TensorBoard's HParams experiment for every run under `root`, in `root/hparams_experiment/`: the columns
    that set runs apart first and shown, each key with one type. Replaced whole, never appended to."""
    from torch.utils.tensorboard import SummaryWriter

    out = root / EXPERIMENT_DIR
    tmp = root / f".{EXPERIMENT_DIR}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    writer = SummaryWriter(str(tmp))
    writer._get_file_writer().add_summary(experiment_summary([run_hparams(run) for run in runs]))
    writer.close()
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def write_page(page: Path, text: str, figures: list[Path]) -> None:
    """Write a Markdown page; the PNGs its previous version linked and this one does not (figures of runs
    since removed) are deleted, and nothing else in its folder."""
    if page.exists():
        linked = set(re.findall(PNG_LINK, text))
        for link in re.findall(PNG_LINK, page.read_text()):
            if (stale := page.parent / link) not in figures and link not in linked:
                stale.unlink(missing_ok=True)
    page.write_text(text)


def write_report(root: Path, runs: list[Path], out: Path | None = None) -> dict[str, Any]:
    """Write report.md, runs.csv and the figures (PNGs and TensorBoard images) of `runs` into `out`
    (default `<root>/report`)."""
    out = out or root / "report"
    out.mkdir(parents=True, exist_ok=True)
    rows = [run_row(run, root) for run in runs]
    with open(out / "runs.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(COLUMNS))
        writer.writeheader()
        writer.writerows(rows)
    plain = replicated(runs)
    figures = save_figures(report_figures(root, runs, rows, plain), out, dpi=100)
    series = f"## Series (seeds folded)\n\n{series_table(plain)}\n" if plain else ""
    text = f"# Runs under {root}\n\n{markdown_table(rows)}\n{series}" + "".join(
        f"![{p.stem}]({p.name})\n" for p in figures
    )
    write_page(out / "report.md", text, figures)
    return {"runs": rows, "figures": figures, "out": out}


LabFigures = dict[tuple[str, str, str], dict[str, Any]]


def lab_references(path: Path) -> LabFigures:
    """The labs' figures and the framework's bars by (experiment, data, variant), from a YAML file like
    docs/labs.yaml (`variant`: a study's `key=value`, `*` for every value, absent for the preset itself)."""
    if not path.is_file():
        return {}
    entries = yaml.safe_load(path.read_text())["references"]
    return {(e["experiment"], e["data"], str(e.get("variant", ""))): e for e in entries}


def verdict(mean: float, lab: float | None, bar: float | None) -> str:
    """Whether a mean test accuracy (%) beats the labs' figure and reaches the framework's bar."""
    parts = []
    if lab is not None:
        parts.append(f"{'✓' if mean > lab else '✗'} labs {lab}%")
    if bar is not None:
        parts.append(f"{'✓' if mean >= bar else '✗'} bar ≥ {bar}%")
    return ", ".join(parts)


def value_order(variant: str) -> list[tuple[str, int, float, str]]:
    """Sort key for `key=value, ...` that puts hidden_size=8 before hidden_size=16."""
    order = []
    for item in variant.split(", ") if variant else []:
        key, _, value = item.partition("=")
        try:
            order.append((key, 0, float(value), ""))
        except ValueError:
            order.append((key, 1, 0.0, value))
    return order


def preset_runs(root: Path) -> dict[tuple[str, str], list[Path]]:
    """Tested runs of `experiment=` presets by (experiment, dataset)."""
    presets: dict[tuple[str, str], list[Path]] = defaultdict(list)
    for run in tested(find_runs(root)):
        if experiment := run_choices(run).get("experiment"):
            presets[experiment, run_metrics(run)["data"]].append(run)
    return dict(presets)


def study_keys(runs: list[Path]) -> list[str]:
    """What a preset's runs compare: its swept keys but for the preset and the dataset themselves."""
    return [k for k in swept_keys(runs) if k not in ("experiment", "data")]


def results_table(root: Path, references: LabFigures) -> str:
    """Presets by experiment, dataset and swept values: test accuracy as mean ± std over seeds, with verdicts."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = defaultdict(list)
    for (experiment, data), runs in preset_runs(root).items():
        keys = study_keys(runs)
        for run in runs:
            overrides = overrides_of(run)
            variant = ", ".join(f"{k}={overrides.get(k, '(preset)')}" for k in keys)
            groups[experiment, data, variant].append(run_row(run, root))
    header = ("experiment", "data", "params", "seeds", "test accuracy (mean ± std)", "best", "test error %",
              "robustness", "fonts", "optimizer, lr", "epochs", "train s", "device", "precision",
              "labs / reference", "verdict")  # fmt: skip
    numeric = ("params", "seeds", "test accuracy (mean ± std)", "best", "test error %", "robustness", "fonts",
               "epochs", "train s")  # fmt: skip
    lines = table_head(header, numeric)
    for (experiment, data, variant), rows in sorted(groups.items(), key=lambda g: (*g[0][:2], value_order(g[0][2]))):
        accs = [r["test_acc_pct"] for r in rows]
        mean = statistics.fmean(accs)
        spread = f" ± {statistics.stdev(accs):.2f}" if len(accs) > 1 else ""  # one seed has no spread to show
        seconds = statistics.fmean(r["train_seconds"] for r in rows)
        precisions = ", ".join(sorted({r["precision"] for r in rows}))  # more than one only if mixed by hand
        first = rows[0]
        ref = references.get((experiment, data, variant)) or references.get((experiment, data, "*"), {})
        lab, note, bar = ref.get("labs"), ref.get("note", ""), None if variant else ref.get("bar")
        lines.append(
            f"| `{experiment}`{f' {variant}' if variant else ''} | {data} | {first['params']:,} | {len(rows)} | "
            f"{mean:.2f}%{spread} | {max(accs):.2f}% | {100 - mean:.2f} | {mean_pct(rows, 'robust_pct')} | "
            f"{mean_pct(rows, 'fonts_pct')} | {first['optimizer']}, {first['lr']} | {first['epochs']} | "
            f"{seconds:.1f} | {first['device']} | {precisions} | {note} | {verdict(mean, lab, bar)} |"
        )
    return "\n".join(lines) + "\n"


def mean_pct(rows: list[dict[str, Any]], column: str) -> str:
    """A column's mean over the rows that measured it, with their count where that is not all of them."""
    values = [r[column] for r in rows if r[column] != ABSENT]
    if not values:
        return ABSENT
    return f"{statistics.fmean(values):.2f}%" + (f" ({len(values)})" if len(values) < len(rows) else "")


def study_figures(root: Path, references: LabFigures) -> Iterator[tuple[str, Figure]]:
    """For each key a preset sweeps (the labs' studies): our accuracy against it, beside the labs'."""
    for (experiment, data), runs in sorted(preset_runs(root).items()):
        for key in study_keys(runs):
            labs = lab_figures_by_value(references, experiment, data, key)
            series = series_by(runs, key, [k for k in study_keys(runs) if k != key])
            yield f"{experiment}_{data}_{key}", error_bar_plot(series, key, labs, title=f"{experiment} on {data}")


def lab_figures_by_value(references: LabFigures, experiment: str, data: str, key: str) -> dict[str, float]:
    """The labs' accuracies (%) for a study, by the value of its swept key ("*": one for every value)."""
    figures = {}
    for (e, d, variant), ref in references.items():
        accuracy = ref.get("labs")
        if (e, d) == (experiment, data) and accuracy is not None and (variant == "*" or variant.startswith(f"{key}=")):
            figures[variant.removeprefix(f"{key}=")] = accuracy
    return figures


def write_results(root: Path, path: Path, command: str, note: str = "") -> list[Path]:
    """The results page: the table, then one figure per study (PNGs in `figures/` beside it), with the labs'
    figures and the bars from `labs.yaml` beside the page. What the page holds below its `KEPT` line (the
    choices written up by hand, with their runs) is kept as it is."""
    references = lab_references(path.parent / "labs.yaml")
    figures = save_figures(study_figures(root, references), path.parent / "figures", dpi=100, events=False)
    links = "".join(f"![{p.stem}](figures/{p.name})\n" for p in figures)
    text = f"# Results\n\nGenerated by `{command}`.\n\n{note}{results_table(root, references)}"
    text += f"\n## The studies, against the labs\n\n{links}" if links else ""
    kept = path.read_text().partition(KEPT)[2] if path.exists() else "\n"
    write_page(path, f"{text}\n{KEPT}{kept}", figures)
    return figures
