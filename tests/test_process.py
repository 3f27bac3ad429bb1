"""What a training process imports and sets, observed from outside."""

import os
import subprocess
import sys

import pytest

from conftest import ROOT

SINGLE_RUN = """
import os
import sys
from hydra import compose, initialize_config_dir
from omegaconf import open_dict
from digits.config import CONF_DIR
from digits.train import train
with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
    cfg = compose("train", overrides=["model=mlp", "debug=fast", "logger=none", f"paths.data_dir={sys.argv[1]}"])
with open_dict(cfg):
    cfg.paths.output_dir = sys.argv[2]
train(cfg)
print(sorted({"optuna", "sqlalchemy", "PYTORCH_NVML_BASED_CUDA_CHECK"} & (set(sys.modules) | set(os.environ))))
"""


def test_a_single_run_imports_no_optuna_and_drops_lightnings_nvml_probe(tmp_path, data_dir):
    env = {k: v for k, v in os.environ.items() if k != "PYTORCH_NVML_BASED_CUDA_CHECK"}
    done = subprocess.run(
        [sys.executable, "-c", SINGLE_RUN, str(data_dir), str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize("script", sorted(p.name for p in (ROOT / "scripts").glob("*.py")))
def test_each_script_prints_its_help_as_written(script):
    """argparse formats each option's help with %: a bare one prints the option's internals in its place."""
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / script), "--help"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert script.removesuffix(".py") in done.stdout and "option_strings" not in done.stdout
