"""What runs are compared by: one flat set of hyperparameters per run, with the same keys and one type per key
in every run, named by the config's dotted keys. TensorBoard's HParams tab, the Optuna trials' attributes and
report.py's series all read this set.
"""

from functools import cache
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from digits.config import CONF_DIR

CHOICES = ("experiment", "data", "augment", "model", "optimizer", "scheduler")
NUMBERS = (
    "seed", "data.batch_size", "data.val_size", "data.translate", "data.rotate", "data.zoom", "data.elastic",
    "data.stroke", "data.low_res", "data.blur", "data.contrast", "data.degrade", "trainer.max_epochs", "optimizer.lr",
    "optimizer.weight_decay",
)  # fmt: skip
TEXTS = ("data.flip", "data.train_size", "trainer.precision")
ABSENT = "-"  # a key this run's model or optimizer does not take
TRIAL = "optuna.trial"  # `<study>#<number>` for a sweep's trial


@cache
def shipped_keys(group: str) -> frozenset[str]:
    """The keys of every shipped option of a config group: each run lists them all, so that runs of different
    models sit in the same columns."""
    keys: set[str] = set()
    for path in (CONF_DIR / group).glob("*.yaml"):
        keys |= {k for k in OmegaConf.load(path) if not k.startswith("_") and k != "defaults"}
    return frozenset(keys)


def text(value: Any) -> str:
    """A value as one string: nets take an int in one config and a list in another."""
    if isinstance(value, ListConfig | DictConfig):
        value = OmegaConf.to_container(value, resolve=True)
    if isinstance(value, float):
        return f"{value:g}"
    return "none" if value is None else str(value)


def hyperparameters(cfg: DictConfig, choices: Any, num_parameters: int | None = None) -> dict[str, Any]:
    """The run's hyperparameters: group choices, then numbers and texts, then every model and optimizer
    key (as text), the model's size and the Optuna trial it ran for."""
    params: dict[str, Any] = {g: text(choices.get(g)) if choices.get(g) else ABSENT for g in CHOICES}
    # weight decay absent from a config is torch's default: 0
    params |= {k: OmegaConf.select(cfg, k, default=0) for k in NUMBERS}
    params |= {k: text(OmegaConf.select(cfg, k, default=None)) for k in TEXTS}
    for group in ("model", "optimizer"):
        keys = (shipped_keys(group) | {k for k in cfg[group] if not k.startswith("_")}) - set(NUMBERS)
        for key in sorted(keys):
            if f"{group}.{key}" not in params:
                params[f"{group}.{key}"] = text(cfg[group][key]) if key in cfg[group] else ABSENT
    optuna = cfg.get("optuna") or {}
    trial = optuna.get("trial")
    params[TRIAL] = f"{optuna.get('study_name')}#{trial}" if trial is not None else ABSENT
    if num_parameters is not None:
        params["params"] = num_parameters
    return params


def write_tensorboard(experiment: Any, params: dict[str, Any]) -> None:
    """The run's hyperparameters into its TensorBoard events, as a session only.

    No per-run experiment summary: TensorBoard takes the first one it finds as every run's columns. Without
    any, it builds the columns from all runs' sessions, the keys that differ between runs first, and pairs each
    run with its last value of every scalar (test/acc, val/acc_best, ...) as metrics.
    """
    from torch.utils.tensorboard.summary import hparams

    _, session_start, session_end = hparams(params, {})
    for summary in (session_start, session_end):
        experiment._get_file_writer().add_summary(summary)  # reopened if Lightning closed it after fit


def varying_keys(params: list[dict[str, Any]], ignore: tuple[str, ...] = ()) -> list[str]:
    """Keys that differ between runs, those in `ignore` aside, each difference named once: a key whose values
    follow from an earlier one's (a model's own keys follow from the model) is left out."""
    every = dict.fromkeys(k for p in params for k in p)
    keys = [k for k in every if k not in ignore and len({repr(p.get(k)) for p in params}) > 1]
    kept: list[str] = []
    for key in keys:
        if not any(follows(params, earlier, key) for earlier in kept):
            kept.append(key)
    return kept


def follows(params: list[dict[str, Any]], earlier: str, key: str) -> bool:
    """Every run with the same value of `earlier` has the same value of `key`."""
    seen: dict[str, str] = {}
    return all(seen.setdefault(repr(p.get(earlier)), repr(p.get(key))) == repr(p.get(key)) for p in params)


METRICS = ("val/acc_best", "test/acc", "robust/mean", "robust/fonts", "val/acc", "test/loss", "val/loss", "train/loss",
           "train/acc", "train/lr")  # fmt: skip


def experiment_summary(params: list[dict[str, Any]]) -> Any:
    """One HParams experiment for these runs' hyperparameters: every key any run has, typed as the runs wrote
    it, with `differs` set only on the keys that set runs apart (TensorBoard shows those first and ticked)."""
    from google.protobuf.struct_pb2 import ListValue
    from tensorboard.compat.proto.summary_pb2 import Summary
    from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2

    shown = set(varying_keys(params, ignore=("params",)))
    infos = []
    for key in dict.fromkeys(k for p in params for k in p):
        values = [p[key] for p in params if key in p]
        distinct = sorted(set(values), key=lambda v: (isinstance(v, str), v))
        number = all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
        info = api_pb2.HParamInfo(
            name=key, type=api_pb2.DATA_TYPE_FLOAT64 if number else api_pb2.DATA_TYPE_STRING, differs=key in shown
        )
        if number and len(distinct) > 10:
            info.domain_interval.min_value, info.domain_interval.max_value = float(distinct[0]), float(distinct[-1])
        else:
            domain = ListValue()
            domain.extend([float(v) if number else str(v) for v in distinct])
            info.domain_discrete.CopyFrom(domain)
        infos.append(info)
    metrics = [api_pb2.MetricInfo(name=api_pb2.MetricName(tag=tag)) for tag in METRICS]
    experiment = api_pb2.Experiment(hparam_infos=infos, metric_infos=metrics)
    content = plugin_data_pb2.HParamsPluginData(version=metadata.PLUGIN_DATA_VERSION, experiment=experiment)
    tagged = Summary.Value(tag=metadata.EXPERIMENT_TAG, metadata=metadata.create_summary_metadata(content))
    return Summary(value=[tagged])
