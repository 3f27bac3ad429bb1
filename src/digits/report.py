"""Read finished runs back from a log root or sweep dir: one table, learning curves, error bars, Optuna plots.

Never imported by training: it only reads what runs wrote (metrics.json, .hydra/, TensorBoard events).
"""

import csv
import json
import re
import statistics
import sys
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf

from digits.figures import Figure, save_figures

COLUMNS = (
    "run", "model", "params", "optimizer", "lr", "batch", "epochs", "weight_decay", "seed", "device",
    "precision", "train_seconds", "best_val_acc", "test_acc", "test_error_pct",
)  # fmt: skip
CURVES = ("train/loss", "val/loss", "train/acc", "val/acc")


METRICS = ("test_acc", "test_error_pct", "best_val_acc", "params", "epochs", "train_seconds", "device", "precision")


def find_runs(root: Path) -> list[Path]:
    """Every finished run below `root` that can be read back: metrics.json and its .hydra config.

    A run whose files are corrupt, empty or cut short is skipped with a warning naming it.
    """
    runs = []
    for path in sorted(root.rglob("metrics.json")):
        run = path.parent
        if not (run / ".hydra" / "config.yaml").is_file():
            continue
        try:
            metrics = json.loads(path.read_text())
            missing = [k for k in METRICS if k not in metrics]
            if missing:
                raise ValueError(f"no {', '.join(missing)}")
            OmegaConf.load(run / ".hydra" / "config.yaml")
            OmegaConf.load(run / ".hydra" / "hydra.yaml")
        except (OSError, ValueError, yaml.YAMLError, AttributeError) as err:
            print(f"warning: skipping {run}: unreadable ({type(err).__name__}: {err})", file=sys.stderr)
            continue
        runs.append(run)
    return runs


def run_row(run: Path, root: Path) -> dict[str, Any]:
    m = OmegaConf.to_container(OmegaConf.load(run / "metrics.json"))
    cfg = OmegaConf.load(run / ".hydra" / "config.yaml")
    model = OmegaConf.load(run / ".hydra" / "hydra.yaml").hydra.runtime.choices.get("model", m["model"])
    return {
        "run": str(run.relative_to(root)) if run != root else run.name,
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
        "best_val_acc": round(m["best_val_acc"], 5),
        "test_acc": round(m["test_acc"], 5),
        "test_error_pct": round(m["test_error_pct"], 3),
    }


def markdown_table(rows: list[dict[str, Any]], columns: tuple[str, ...] = COLUMNS) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(r[c]) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def overrides_of(run: Path) -> dict[str, str]:
    lines = OmegaConf.load(run / ".hydra" / "overrides.yaml")
    return dict(str(line).split("=", 1) for line in lines if "=" in str(line))


def swept_keys(runs: list[Path]) -> list[str]:
    """Command-line keys that take more than one value across the runs (the seed aside)."""
    values: dict[str, set[str]] = defaultdict(set)
    for run in runs:
        for key, value in overrides_of(run).items():
            values[key].add(value)
    return sorted(k for k, v in values.items() if len(v) > 1 and k != "seed")


def error_bar_plot(runs: list[Path], key: str, labs: dict[str, float] | None = None, title: str = "") -> Figure:
    """Test accuracy (%) against one swept key: mean ± std over the seeds (and any other swept keys).

    `labs` adds the labs' figures (%) by value of the key, "*" for one figure across all values.
    """
    groups: dict[str, list[float]] = defaultdict(list)
    for run in runs:
        if value := overrides_of(run).get(key):
            groups[value].append(100 * OmegaConf.load(run / "metrics.json")["test_acc"])
    try:
        order = sorted(groups, key=float)
    except ValueError:
        order = sorted(groups)
    means = [statistics.fmean(groups[v]) for v in order]
    stds = [statistics.stdev(groups[v]) if len(groups[v]) > 1 else 0.0 for v in order]
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    ax.errorbar(range(len(order)), means, yerr=stds, fmt="o-", capsize=4, label="digits")
    if labs:
        marked = [i for i, v in enumerate(order) if v in labs]
        if marked:
            ax.plot(marked, [labs[order[i]] for i in marked], "rx", markersize=9, label="labs")
        if "*" in labs:
            ax.axhline(labs["*"], color="r", linestyle="--", label=f"labs: {labs['*']}%")
        ax.legend()
    ax.set_xticks(range(len(order)), order)
    ax.set_xlabel(key)
    ax.set_ylabel(f"test accuracy % (mean ± std, n={min(len(v) for v in groups.values())}+)")
    ax.set_title(title or f"test accuracy against {key}")
    fig.tight_layout()
    return fig


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
        ax.set_xlabel("epoch")
        ax.set_ylabel(what)
        ax.legend()
    fig.suptitle(name, fontsize=8)
    fig.tight_layout()
    return fig


def optuna_plots(root: Path) -> Iterator[tuple[str, Figure]]:
    """Optimisation history and parameter importances of every study in the sqlite storages below `root`."""
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
            for kind, plot in plots.items():
                ax = plot(study)
                ax.figure.tight_layout()
                yield f"optuna/{study.study_name}_{kind}", ax.figure


def report_figures(root: Path, runs: list[Path], rows: list[dict[str, Any]]) -> Iterator[tuple[str, Figure]]:
    """Learning curves per run; per multirun (the runs of one folder), error bars for each key it swept with
    replicates; then the Optuna studies' plots. Made one at a time."""
    for run, row in zip(runs, rows, strict=True):
        if fig := learning_curves(run, row["run"]):
            yield f"curves/{row['run']}", fig
    multiruns: dict[Path, list[Path]] = defaultdict(list)
    for run in runs:
        multiruns[run.parent].append(run)
    for folder, group in multiruns.items():
        prefix = f"{folder.relative_to(root)}/" if root in folder.parents else ""
        for key in swept_keys(group):
            values = [overrides_of(run).get(key) for run in group]
            if any(values.count(v) > 1 for v in values):
                yield f"errorbars/{prefix}{key}", error_bar_plot(group, key)
    yield from optuna_plots(root)


def write_page(page: Path, text: str, figures: list[Path]) -> None:
    """Write a Markdown page; the PNGs its previous version linked and this one does not (figures of runs
    since removed) are deleted, and nothing else in its folder."""
    if page.exists():
        for link in re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", page.read_text()):
            if (stale := page.parent / link) not in figures:
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
    figures = save_figures(report_figures(root, runs, rows), out, dpi=100)
    text = f"# Runs under {root}\n\n{markdown_table(rows)}\n" + "".join(f"![{p.stem}]({p.name})\n" for p in figures)
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
    """Finished runs of `experiment=` presets by (experiment, dataset)."""
    presets: dict[tuple[str, str], list[Path]] = defaultdict(list)
    for run in find_runs(root):
        choices = OmegaConf.load(run / ".hydra" / "hydra.yaml").hydra.runtime.choices
        if choices.get("experiment"):
            presets[choices.experiment, OmegaConf.load(run / "metrics.json").data].append(run)
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
              "optimizer, lr", "epochs", "train s", "device", "labs / reference", "verdict")  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|---|---|---:|---:|---:|---:|---:|---|---:|---:|---|---|---|"]
    for (experiment, data, variant), rows in sorted(groups.items(), key=lambda g: (*g[0][:2], value_order(g[0][2]))):
        accs = [100 * r["test_acc"] for r in rows]
        mean = statistics.fmean(accs)
        spread = f" ± {statistics.stdev(accs):.2f}" if len(accs) > 1 else ""  # one seed has no spread to show
        seconds = statistics.fmean(r["train_seconds"] for r in rows)
        first = rows[0]
        ref = references.get((experiment, data, variant)) or references.get((experiment, data, "*"), {})
        lab, note, bar = ref.get("labs"), ref.get("note", ""), None if variant else ref.get("bar")
        lines.append(
            f"| `{experiment}`{f' {variant}' if variant else ''} | {data} | {first['params']:,} | {len(rows)} | "
            f"{mean:.2f}%{spread} | {max(accs):.2f}% | {100 - mean:.2f} | {first['optimizer']}, {first['lr']} "
            f"| {first['epochs']} | {seconds:.1f} | {first['device']} | {note} | {verdict(mean, lab, bar)} |"
        )
    return "\n".join(lines) + "\n"


def study_figures(root: Path, references: LabFigures) -> Iterator[tuple[str, Figure]]:
    """For each key a preset sweeps (the labs' studies): our accuracy against it, beside the labs'."""
    for (experiment, data), runs in sorted(preset_runs(root).items()):
        for key in study_keys(runs):
            labs = lab_figures_by_value(references, experiment, data, key)
            yield f"{experiment}_{data}_{key}", error_bar_plot(runs, key, labs, title=f"{experiment} on {data}")


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
    figures and the bars from `labs.yaml` beside the page."""
    references = lab_references(path.parent / "labs.yaml")
    figures = save_figures(study_figures(root, references), path.parent / "figures", dpi=100, events=False)
    links = "".join(f"![{p.stem}](figures/{p.name})\n" for p in figures)
    text = f"# Results\n\nGenerated by `{command}`.\n\n{note}{results_table(root, references)}"
    write_page(path, text + (f"\n## The studies, against the labs\n\n{links}" if links else ""), figures)
    return figures
