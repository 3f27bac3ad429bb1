"""Training throughput of every model × loader, and time-to-99% of the fast preset, in one process.

    python scripts/benchmark.py                      # whatever device is there
    python scripts/benchmark.py --device cpu --epochs 2 --json logs/bench.json

Prints Markdown tables and writes JSON. Start-up, data preparation and compile time are their
own rows, never folded into training time. The torch DataLoader rows are the data path's baseline: the
ratio column divides the device loader's samples/s by theirs, same model, same batch size. The framework's
baseline is a hand-written PyTorch loop (`digits.baseline`), run interleaved with the framework inside one
fit: digits/raw per step (median and IQR over blocks of at least 20 steps) and per epoch. Where the device
computes bf16 (a GPU, or a CPU with `cpu_has_fast_bf16`), the same loop times each preset's net in bf16 autocast
against fp32, the measurement behind the default trainer's choice of precision.
"""

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("DIGITS_ROOT", str(Path(__file__).resolve().parents[1]))  # data/ in the checkout

import torch
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from digits.baseline import RawLoop
from digits.config import CONF_DIR, auto_precision, build, cpu_has_fast_bf16
from digits.data import shipped
from digits.train import train


def config(device: str, out: Path, *overrides: str):
    trainer = "gpu" if device == "cuda" else "cpu"
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        # no augmentation: the loaders and the raw loop compare moving the same images, not drawing them
        cfg = compose("train", overrides=[f"trainer={trainer}", "logger=none", "augment=none", *overrides])
    with open_dict(cfg):
        cfg.paths.output_dir = str(out)
        cfg.callbacks.pop("progress_bar", None)
        cfg.trainer.enable_progress_bar = False
        cfg.trainer.enable_model_summary = False
    return cfg


def peak_memory_mb(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process peak RSS so far


def startup_seconds() -> float:
    """A fresh interpreter importing the training stack, as every `python train.py` does."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import digits.train"], check=True, env={**os.environ})
    return time.perf_counter() - start


def data_seconds(data_dir: str, device: str) -> float:
    dm = shipped("mnist", data_dir=data_dir)
    start = time.perf_counter()
    for train_split in (True, False):
        dm.load_tensors(train=train_split, device=device)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


SWEEP_TRIALS = 6


def sweep_overhead_seconds(out: Path, trials: int = SWEEP_TRIALS) -> float:
    """A sweep of tiny MLP trials in one process (`python train.py -m hparams_search=mlp_optuna debug=quick`):
    the median over trials after the first of each trial's seconds from ask to tell, less its fit seconds."""
    import optuna  # only this row needs it

    log_dir = out / "sweep"
    command = [sys.executable, "train.py", "-m", "hparams_search=mlp_optuna", "debug=quick", "logger=none"]
    command += [f"hydra.sweeper.n_trials={trials}", f"paths.log_dir={log_dir}"]
    subprocess.run(command, check=True, capture_output=True, cwd=Path(__file__).resolve().parents[1])
    sweep = log_dir / "sweeps" / "mlp_optuna_mnist"
    study = optuna.load_study(study_name="mlp_optuna_mnist", storage=f"sqlite:///{sweep / 'optuna.db'}")
    fit = {}  # trial number → fit seconds; a trial's run dir ends in _trial<number>
    for run in (sweep / "runs.txt").read_text().split():
        fit[int(run.rsplit("_trial", 1)[1])] = json.loads((Path(run) / "metrics.json").read_text())["train_seconds"]
    extra = sorted(t.duration.total_seconds() - fit[t.number] for t in study.trials if t.number > 0)
    return extra[len(extra) // 2]


def raw_loop_ratio(args: argparse.Namespace, out: Path, model: str) -> dict:
    """One fit of `model` with `digits.baseline.InterleavedBaseline`: blocks of at least 20 framework steps, each
    followed by as many steps of the hand-written loop on the same device, data and optimizer, timed in one process."""
    timings = out / f"raw_{model}.json"
    cfg = config(
        args.device, out, f"model={model}", f"data.batch_size={args.batch_size}", f"trainer.max_epochs={args.epochs}"
    )
    with open_dict(cfg):
        cfg.callbacks.raw_loop = {"_target_": "digits.baseline.InterleavedBaseline", "out": str(timings)}
    m = train(cfg)
    t = json.loads(timings.read_text())
    steps = m["epochs"] * -(-m["train_size"] // args.batch_size)
    framework = sum(m["epoch_seconds"]) - sum(t["raw_block_s"])  # the epochs without the raw blocks inside them
    row = {"model": model, **{k: t[k] for k in ("raw_step_s", "step_ratio_median", "step_ratio_iqr")}}
    row["epoch_ratio"] = framework / (t["raw_step_s"] * steps)
    print(f"{model:7s} raw loop {1000 * row['raw_step_s']:.2f} ms/step, digits/raw {row['step_ratio_median']:.2f}")
    return row


PRECISION_PRESETS = "mlp_8,mlp_64_64,mlp_300,mlp_512_256,mlp_500_300,lenet5,lab_cnn,mnist_fast"


def precision_ratio(
    args: argparse.Namespace, out: Path, preset: str, tensors: tuple, blocks: int = 12, steps: int = 30
) -> dict:
    """bf16 autocast against fp32 on `preset`'s net, optimizer and batch size over the training `tensors` (images,
    labels): the hand-written loop in alternating blocks of `steps`, one process. What the default trainer's
    precision choice rests on."""
    cfg = config(args.device, out, f"experiment={preset}")
    images, labels = tensors
    net = build(cfg.model, "model")
    loops = {
        dtype: RawLoop(net, build(cfg.optimizer, "optimizer"), images, labels, cfg.data.batch_size, autocast=dtype)
        for dtype in (None, torch.bfloat16)
    }
    seconds: dict = {dtype: [] for dtype in loops}
    for loop in loops.values():
        loop.run(steps).item()  # warm-up; .item() waits for the device
    for _ in range(blocks):
        for dtype, loop in loops.items():
            start = time.perf_counter()
            loop.run(steps).item()
            seconds[dtype].append((time.perf_counter() - start) / steps)
    fp32, bf16 = (sorted(seconds[d])[blocks // 2] for d in loops)
    row = {"preset": preset, "batch": cfg.data.batch_size, "fp32_step_s": fp32, "bf16_step_s": bf16}
    row["auto"] = auto_precision(args.device, cfg.model._target_, cfg.cpu_bf16)
    print(f"{preset:12s} bf16/fp32 per step {bf16 / fp32:.2f}")
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per throughput run; the first is warm-up")
    parser.add_argument("--models", default="mlp,cnn,cnn_bn")
    parser.add_argument("--loaders", default="device,torch")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="for the torch loader")
    parser.add_argument("--compile", action="store_true", help="also measure torch.compile for each model")
    parser.add_argument("--no-fast", action="store_true", help="skip the time-to-99%% run of experiment=mnist_fast")
    parser.add_argument("--no-sweep", action="store_true", help="skip the per-trial overhead of a tiny sweep")
    parser.add_argument("--no-raw", action="store_true", help="skip the comparison with a hand-written loop")
    parser.add_argument("--precisions", default=PRECISION_PRESETS, help="presets timed in bf16 against fp32; '' skips")
    parser.add_argument("--json", type=Path, default=Path(__file__).resolve().parents[1] / "logs" / "benchmark.json")
    args = parser.parse_args()

    out = Path(tempfile.mkdtemp(prefix="digits-bench-"))
    rows: list[dict] = []
    overheads = {"start-up (import torch, lightning, digits)": startup_seconds()}
    data_dir = config(args.device, out).paths.data_dir
    shipped("mnist", data_dir=data_dir).prepare_data()
    overheads["data preparation (60k+10k images to the device)"] = data_seconds(data_dir, args.device)

    variants = [(m, lo, False) for m in args.models.split(",") for lo in args.loaders.split(",")]
    if args.compile:
        variants += [(m, "device", True) for m in args.models.split(",")]
    for model, loader, compiled in variants:
        if args.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        workers = args.workers if loader == "torch" else 0
        overrides = [
            f"model={model}",
            f"data.loader={loader}",
            f"data.batch_size={args.batch_size}",
            f"trainer.max_epochs={args.epochs}",
            f"data.num_workers={workers}",
            f"compile={compiled}",
        ]
        m = train(config(args.device, out, *overrides))
        steady = m["epoch_seconds"][1:] or m["epoch_seconds"]
        epoch = sorted(steady)[len(steady) // 2]
        row = {
            "model": model,
            "loader": loader + (" + compile" if compiled else ""),
            "batch": args.batch_size,
            "samples_per_s": m["train_size"] / epoch,
            "epoch_s": epoch,
            "first_epoch_s": m["epoch_seconds"][0],
            "peak_mem_mb": peak_memory_mb(args.device),
            "test_acc": m["test_acc"],
            "precision": m["precision"],
        }
        if compiled:
            overheads[f"compile ({model}, first epoch minus a steady one)"] = row["first_epoch_s"] - epoch
        rows.append(row)
        print(f"{model:7s} {row['loader']:18s} {row['samples_per_s']:12,.0f} samples/s  epoch {epoch:.2f} s")

    if not args.no_sweep:
        overheads[f"sweep: per tiny trial beyond its training (median of {SWEEP_TRIALS - 1})"] = sweep_overhead_seconds(
            out
        )

    raw_rows = [] if args.no_raw else [raw_loop_ratio(args, out, model) for model in args.models.split(",")]

    bf16_here = args.device == "cuda" or cpu_has_fast_bf16()
    presets = [p for p in args.precisions.split(",") if p] if bf16_here else []
    mnist = shipped("mnist", data_dir=data_dir).load_tensors(train=True, device=args.device) if presets else ()
    precision_rows = [precision_ratio(args, out, preset, mnist) for preset in presets]

    baseline = {r["model"]: r["samples_per_s"] for r in rows if r["loader"] == "torch"}
    for r in rows:
        r["vs_torch_loader"] = r["samples_per_s"] / baseline[r["model"]] if r["model"] in baseline else None

    fast = []  # mnist_fast in fp32, then in the precision the default trainer picks here when that differs
    if not args.no_fast:
        precisions = dict.fromkeys(["32-true", auto_precision(args.device)])
        for precision in precisions:
            m = train(config(args.device, out, "experiment=mnist_fast", f"trainer.precision={precision}"))
            fast.append(
                {
                    "precision": precision,
                    "train_seconds": m["train_seconds"],
                    "epoch_seconds": m["epoch_seconds"],
                    "test_acc": m["test_acc"],
                    "reached_99": m["test_acc"] >= 0.99,
                }
            )

    device_name = torch.cuda.get_device_name() if args.device == "cuda" else f"{platform.processor() or 'cpu'}"
    machine = f"{device_name}, {os.cpu_count()} CPU cores, torch {torch.__version__}"
    print(f"\n### Training throughput on {args.device} ({machine})\n")
    print("| model | loader | batch | samples/s | epoch s | × torch loader | peak MB | precision |")
    print("|---|---|---:|---:|---:|---:|---:|---|")
    for r in rows:
        ratio = f"{r['vs_torch_loader']:.2f}" if r["vs_torch_loader"] else ""
        print(
            f"| {r['model']} | {r['loader']} | {r['batch']} | {r['samples_per_s']:,.0f} | {r['epoch_s']:.2f} "
            f"| {ratio} | {r['peak_mem_mb']:,.0f} | {r['precision']} |"
        )
    if raw_rows:
        print("\n### digits against a hand-written PyTorch loop (interleaved in one fit, device loader)\n")
        print("| model | raw step ms | digits / raw per step (IQR) | digits / raw per epoch |")
        print("|---|---:|---:|---:|")
        for r in raw_rows:
            low, high = r["step_ratio_iqr"]
            print(
                f"| {r['model']} | {1000 * r['raw_step_s']:.2f} | {r['step_ratio_median']:.2f} ({low:.2f}-{high:.2f}) "
                f"| {r['epoch_ratio']:.2f} |"
            )
    if precision_rows:
        print("\n### bf16 autocast against fp32 (the hand-written loop, alternating blocks)\n")
        print("| preset | batch | fp32 step ms | bf16 step ms | bf16 / fp32 | default trainer picks |")
        print("|---|---:|---:|---:|---:|---|")
        for r in precision_rows:
            print(
                f"| {r['preset']} | {r['batch']} | {1000 * r['fp32_step_s']:.2f} | {1000 * r['bf16_step_s']:.2f} "
                f"| {r['bf16_step_s'] / r['fp32_step_s']:.2f} | {r['auto']} |"
            )
    print("\n| overhead | seconds |\n|---|---:|")
    for name, seconds in overheads.items():
        print(f"| {name} | {seconds:.2f} |")
    if fast:
        print("\n### experiment=mnist_fast (fit seconds, validation included; start-up and data not counted)\n")
        print("| precision | test acc % | train s | × 32-true |\n|---|---:|---:|---:|")
        for r in fast:
            ratio = r["train_seconds"] / fast[0]["train_seconds"]
            print(f"| {r['precision']} | {100 * r['test_acc']:.2f} | {r['train_seconds']:.2f} | {ratio:.2f} |")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    results = {
        "machine": machine,
        "device": args.device,
        "rows": rows,
        "raw_loop": raw_rows,
        "precision": precision_rows,
        "overheads_s": overheads,
        "fast": fast,
    }
    args.json.write_text(json.dumps(results, indent=2))
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
