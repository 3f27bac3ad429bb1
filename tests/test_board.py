"""TensorBoard as a researcher reads it: a real `tensorboard` server over a log root holding a grid of MLPs and
CNNs and a small Optuna sweep, queried over HTTP the way its HParams page is, and looked at in a real headless
Chromium."""

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import ROOT, assert_real_png, train_command

TINY = ["data.train_size=256", "data.val_size=256", "trainer.max_epochs=1"]
GRID = ["model=mlp,cnn", "optimizer.weight_decay=0,0.001"]
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")


@pytest.fixture(scope="module")
def log_root(tmp_path_factory, data_dir) -> Path:
    """Four grid runs (2 models × 2 weight decays) and a three-trial sweep, under one log root."""
    log_dir = tmp_path_factory.mktemp("board") / "logs"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    for command in (["-m", *GRID], ["-m", "hparams_search=mlp_optuna", "hydra.sweeper.n_trials=3"]):
        cmd = train_command(*command, *TINY, log_dir=log_dir, data_dir=data_dir)
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
        assert done.returncode == 0, done.stderr[-3000:]
    return log_dir


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def board(log_root) -> Iterator[str]:
    """`scripts/board.py` (as `make tensorboard` runs it) serving the log root; its URL once the runs are loaded."""
    port = free_port()
    cmd = [sys.executable, str(ROOT / "scripts" / "board.py"), str(log_root), "--host", "127.0.0.1", f"--port={port}"]
    server = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert server.poll() is None, server.stdout.read()
            try:
                if len(session_groups(url)["sessionGroups"]) == 7:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "TensorBoard did not load the seven runs"
            time.sleep(1)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)


def experiment(url: str) -> dict:
    return post(f"{url}/data/plugin/hparams/experiment", {"experimentName": "", "includeMetrics": True})


def session_groups(url: str, hparams: tuple[str, ...] = ("model",)) -> dict:
    statuses = ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE", "STATUS_RUNNING"]
    columns = [{"hparam": name, "order": "ORDER_ASC", "includeInResult": True} for name in hparams]
    body = {"experimentName": "", "allowedStatuses": statuses, "colParams": columns, "startIndex": 0, "sliceSize": 100}
    return post(f"{url}/data/plugin/hparams/session_groups", body | {"includeMetrics": True})


def test_hparams_columns_cover_every_run_the_keys_that_vary_first(board):
    infos = experiment(board)["hparamInfos"]
    names = [info["name"] for info in infos]
    shown = [info["name"] for info in infos if info.get("differs")]
    # what sets these runs apart, named once each, leads; the model's own keys follow from the model, the
    # augmentation's (the sweep's MLPs train without shifts) from `augment`
    assert set(shown) == {"augment", "model", "optimizer.weight_decay", "model.hidden_size", "data.batch_size"}
    assert names[: len(shown)] == shown
    # every key any run has, MLP or CNN, under the config's dotted names, each with one type
    assert {"model.kernel_size", "model.channels", "trainer.max_epochs", "optuna.trial", "seed"} <= set(names)
    assert "max_epochs" not in names and len(names) == len(set(names))
    kinds = {info["name"]: info["type"] for info in infos}
    assert kinds["model.hidden_size"] == "DATA_TYPE_STRING" and kinds["optimizer.weight_decay"] == "DATA_TYPE_FLOAT64"
    metrics = [m["name"]["tag"] for m in experiment(board)["metricInfos"]]
    assert metrics[:2] == ["val/acc_best", "test/acc"] and not [m for m in metrics if m.startswith("hp/")]


def test_every_run_and_trial_is_a_row_with_every_column(board, log_root):
    names = {info["name"] for info in experiment(board)["hparamInfos"]}
    groups = session_groups(board, tuple(names))["sessionGroups"]
    assert len(groups) == 7  # 4 grid runs and 3 trials
    for group in groups:
        # parallel coordinates leave out a run that lacks a value of a chosen column: none lacks any
        assert names <= set(group["hparams"]), names - set(group["hparams"])
        # named by what sets it apart, its time last
        assert re.match(
            r"runs/((mlp|cnn)_wd[\d.]+|h\d+_bs\d+_wd[\d.e-]+)_.*/\d{4}-\d\d-\d\d_.*_(\d|trial\d)$", group["name"]
        )
        metrics = {m["name"]["tag"]: m for m in group["metricValues"]}
        assert 0 < metrics["val/acc_best"]["value"] <= 1
        if group["name"].endswith(("trial0", "trial1", "trial2")):  # trials choose on validation: no test read
            assert "test/acc" not in metrics
        else:
            assert 0 < metrics["test/acc"]["value"] <= 1 and metrics["test/acc"]["trainingStep"] == 1  # epoch 1
    trials = sorted(g["hparams"]["optuna.trial"] for g in groups)
    assert trials == ["-"] * 4 + [f"mlp_optuna_mnist#{n}" for n in range(3)]


@pytest.mark.skipif(
    not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
    reason="no Debian chromium and chromium-driver (.ci/run installs them)",
)
def test_the_hparams_table_in_a_real_browser_shows_the_swept_keys(board, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    browser = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        browser.set_page_load_timeout(30)
        metrics = {"width": 1600, "height": 1000, "deviceScaleFactor": 1, "mobile": False}
        browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics)
        browser.get(f"{board}/#hparams")
        deadline = time.monotonic() + 30
        while len(table := browser.execute_script(GRID_ROWS)) < 8:
            assert time.monotonic() < deadline, f"no HParams table of 7 runs; the page shows {table}"
            time.sleep(0.5)
        header, rows = table[0], [row for row in table[1:] if row and row[0]]
        # the swept keys are the table's first columns, ticked by default; then the metrics
        assert header[:7] == [
            "Trial ID",
            "Show Metrics",
            "augment",
            "data.batch_size",
            "model",
            "model.hidden_size",
            "optimizer.weight_decay",
        ]
        assert "val/acc_best" in header and "test/acc" in header
        assert len(rows) == 7 and sorted(row[header.index("model")] for row in rows) == ["cnn"] * 2 + ["mlp"] * 5
        shot = tmp_path / "hparams.png"
        assert browser.save_screenshot(str(shot))
        assert_real_png(shot)
    finally:
        browser.quit()


# TensorBoard's HParams table is a vaadin-grid inside shadow roots: its rows, each cell's slotted text
GRID_ROWS = """
const grids = [];
const walk = (node) => {
  if (!node) return;
  if (node.shadowRoot) walk(node.shadowRoot);
  for (const child of node.children || []) walk(child);
  if (node.tagName === "VAADIN-GRID") grids.push(node);
};
walk(document.documentElement);
if (!grids.length) return [];
return Array.from(grids[0].shadowRoot.querySelectorAll("tr")).map((row) =>
  Array.from(row.querySelectorAll("td, th")).map((cell) => {
    const slot = cell.querySelector("slot");
    return slot ? slot.assignedElements().map((e) => e.innerText.trim()).join(" ") : "";
  })
);
"""
