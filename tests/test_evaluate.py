"""eval.py and predict.py on a real short-trained checkpoint."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import ROOT, read_events, run_train
from digits.data import shipped
from digits.evaluate import frame


def run_script(script: str, *args: str, log_dir: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / script), *args, f"paths.log_dir={log_dir}"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=log_dir.parent)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_dir) -> tuple[Path, dict, Path]:
    log_dir = tmp_path_factory.mktemp("eval") / "logs"
    done = run_train("model=mlp", "debug=quick", "logger=none", log_dir=log_dir, data_dir=data_dir)
    assert done.returncode == 0, done.stderr[-2000:]
    (metrics_file,) = log_dir.glob("runs/*/*/metrics.json")
    metrics = json.loads(metrics_file.read_text())
    return Path(metrics["best_checkpoint"]), metrics, log_dir


@pytest.fixture(scope="module")
def evaluated(trained) -> tuple[dict, Path]:
    ckpt, _, log_dir = trained
    done = run_script("eval.py", f"ckpt_path={ckpt}", log_dir=log_dir)
    assert done.returncode == 0, done.stderr[-2000:]
    (eval_json,) = log_dir.glob("eval/*/*/eval.json")
    run = ckpt.parent.parent
    assert eval_json.parent.parent.name == f"{run.parent.name}_{run.name}_{ckpt.stem}", "named after what it evaluated"
    return json.loads(eval_json.read_text()), eval_json.parent


def test_eval_confusion_matrix_matches_the_logged_test_accuracy(trained, evaluated):
    _, metrics, _ = trained
    result, _ = evaluated
    cm = torch.tensor(result["confusion_matrix"])
    assert cm.sum() == 10_000 == result["test_size"]
    assert cm.diag().sum().item() / cm.sum().item() == pytest.approx(metrics["test_acc"], abs=1e-6)
    assert result["test_acc"] == pytest.approx(metrics["test_acc"], abs=1e-6)
    assert len(result["per_class"]) == 10 and sum(r["support"] for r in result["per_class"]) == 10_000
    assert result["most_confused"][0]["count"] >= result["most_confused"][-1]["count"] > 0


def test_eval_writes_images_tables_and_tensorboard(evaluated):
    result, out = evaluated
    for name in ("test_confusion_matrix.png", "test_confusion_matrix_normalized.png", "test_misclassified.png"):
        with Image.open(out / name) as image:
            assert image.size[0] > 300 and image.size[1] > 300
    assert (out / "per_class.csv").read_text().startswith("class,precision,recall,f1,support")
    events = read_events(out)
    # the tags training uses for the same figures
    figures = {"test/confusion_matrix", "test/confusion_matrix_normalized", "test/misclassified"}
    assert set(events.Tags()["images"]) == figures
    assert events.Scalars("test/acc")[-1].value == pytest.approx(result["test_acc"], abs=1e-6)
    assert set(events.Tags()["scalars"]) == {"test/acc", "test/loss", "test/mse"}


def test_predict_on_test_images_agrees_with_the_model(trained, data_dir):
    ckpt, _, log_dir = trained
    done = run_script("predict.py", f"ckpt_path={ckpt}", "test_index=0:5", "--json", log_dir=log_dir)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(done.stdout)
    assert [r["input"] for r in rows] == [f"test[{i}]" for i in range(5)]
    assert all(0 <= r["probability"] <= 1 and r["class"] for r in rows)
    assert sum(r["class"] == r["true"] for r in rows) >= 4  # a >90% model gets most of the first five


def test_predict_on_a_png_matches_the_tensor_and_reports_bad_files(trained, data_dir, tmp_path):
    ckpt, _, log_dir = trained
    raw = shipped("mnist", data_dir=data_dir).dataset_cls(str(data_dir), train=False).data
    Image.fromarray(raw[0].numpy()).save(tmp_path / "digit.png")
    Image.fromarray(255 - raw[0].numpy()).resize((140, 140)).save(tmp_path / "paper.jpg")  # black on white
    # a small digit in the corner of a grey sheet, as a phone photo would hold it: framed as MNIST was
    sheet = Image.new("L", (400, 300), 190)
    sheet.paste(Image.fromarray((190 - raw[0].int() * 190 // 255).byte().numpy()).resize((56, 56)), (320, 220))
    sheet.save(tmp_path / "sheet.png")
    alpha = Image.fromarray(raw[0].numpy()).resize((84, 84))  # black strokes on a transparent canvas
    Image.merge("RGBA", (*[Image.new("L", (84, 84), 0)] * 3, alpha)).save(tmp_path / "drawn.png")
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "empty.png").write_bytes(b"")
    names = ("digit.png", "paper.jpg", "sheet.png", "drawn.png", "notes.txt", "empty.png")
    inputs = "inputs=[" + ",".join(str(tmp_path / name) for name in names) + "]"
    done = run_script("predict.py", f"ckpt_path={ckpt}", "test_index=0", inputs, "--json", log_dir=log_dir)
    assert done.returncode == 1  # some inputs failed; the others still got answers
    rows = {Path(r["input"]).name: r for r in json.loads(done.stdout)}
    assert rows["digit.png"]["label"] == rows["test[0]"]["label"]
    assert rows["digit.png"]["probability"] == pytest.approx(rows["test[0]"]["probability"], abs=1e-4)
    for name in ("paper.jpg", "sheet.png", "drawn.png"):
        assert rows[name]["label"] == rows["test[0]"]["label"], name
    assert "not a readable image" in rows["notes.txt"]["error"]
    assert "the file is empty" in rows["empty.png"]["error"]


def test_eval_of_a_missing_checkpoint_is_one_line(tmp_path):
    done = run_script("eval.py", f"ckpt_path={tmp_path}/none.ckpt", log_dir=tmp_path / "logs")
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("error: ckpt_path=")


@pytest.mark.parametrize(("box", "by_mass"), [(20, True), (28, False)])
def test_frame_scales_the_ink_box_and_centres_it(box, by_mass):
    photo = torch.full((300, 400), 0.2)  # ink 0.9 on a 0.2 background, 60 tall and 30 wide, off in a corner
    photo[200:260, 330:360] = 0.9
    x = frame(photo, 0.2, box, by_mass)
    rows, cols = (x > 0.5).nonzero(as_tuple=True)
    assert x.shape == (28, 28) and x.min() == 0 and x.max() == pytest.approx(1)
    assert rows.max() - rows.min() + 1 == box and cols.max() - cols.min() + 1 == box // 2  # aspect kept
    centre = (rows.float().mean().item(), cols.float().mean().item())
    assert centre == (pytest.approx(13.5, abs=0.6), pytest.approx(13.5, abs=0.6))
    assert frame(torch.full((50, 50), 0.3), 0.3, box, by_mass).abs().sum() == 0  # no ink: a blank canvas
