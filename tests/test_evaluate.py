"""eval.py and predict.py on a real short-trained checkpoint."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from conftest import ROOT, assert_real_png, read_events, run_train
from digits.data import shipped
from digits.errors import DigitsError
from digits.images import MAX_BYTES, MAX_FRAMES, frame, model_view
from digits.predict import input_entries
from digits.robustness import CORRUPTIONS, photographed


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
    console = (done.stdout + done.stderr).splitlines()  # each of Lightning's notices once, no advertisement
    assert sum("GPU available" in line for line in console) == 1 and not [line for line in console if "Tip:" in line]
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
    robust = {f"robust/{name}" for name in result["robustness"]}
    assert robust == {f"robust/{name}" for name in (*CORRUPTIONS, "fonts", "mean")}
    assert set(events.Tags()["scalars"]) == {"test/acc", "test/loss", "test/mse"} | robust


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
    # written on squared paper, photographed in uneven light
    squared = photographed(raw[0].float() / 255, 0.3, 0.02, torch.Generator().manual_seed(0), "squared")
    Image.fromarray((255 * squared).round().byte().numpy()).save(tmp_path / "squared.png")
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "empty.png").write_bytes(b"")
    names = ("digit.png", "paper.jpg", "sheet.png", "drawn.png", "squared.png", "notes.txt", "empty.png")
    inputs = "inputs=[" + ",".join(str(tmp_path / name) for name in names) + "]"
    done = run_script("predict.py", f"ckpt_path={ckpt}", "test_index=0", inputs, "--json", log_dir=log_dir)
    assert done.returncode == 1  # some inputs failed; the others still got answers
    rows = {Path(r["input"]).name: r for r in json.loads(done.stdout)}
    assert rows["digit.png"]["label"] == rows["test[0]"]["label"]
    assert rows["digit.png"]["probability"] == pytest.approx(rows["test[0]"]["probability"], abs=1e-4)
    for name in ("paper.jpg", "sheet.png", "drawn.png", "squared.png"):
        assert rows[name]["label"] == rows["test[0]"]["label"], name
    assert rows["notes.txt"]["error"].startswith("not an image in a format read here")
    assert "the file is empty" in rows["empty.png"]["error"]


def test_predicting_images_imports_neither_lightning_nor_torchvision(trained, data_dir, tmp_path):
    """Importing them took half of predict.py's start-up: the net and what its dataset's images are (classes,
    normalisation, framing) come from the checkpoint."""
    ckpt, _, _ = trained
    raw = shipped("mnist", data_dir=data_dir).dataset_cls(str(data_dir), train=False).data
    Image.fromarray(raw[0].numpy()).save(tmp_path / "digit.png")
    cmd = [sys.executable, "-X", "importtime", str(ROOT / "predict.py"), f"ckpt_path={ckpt}", "digit.png", "--json"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert len(json.loads(done.stdout)) == 1
    imported = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time")}
    assert {"torch", "digits.predict", "digits.images"} <= imported
    heavy = {"lightning", "lightning_fabric", "torchmetrics", "torchvision", "matplotlib", "optuna"}
    assert not heavy & {name.split(".")[0] for name in imported}


def test_eval_of_a_missing_checkpoint_is_one_line(tmp_path):
    done = run_script("eval.py", f"ckpt_path={tmp_path}/none.ckpt", log_dir=tmp_path / "logs")
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("error: ckpt_path=")


@pytest.mark.parametrize(("box", "by_mass"), [(20, True), (28, False)])
def test_frame_scales_the_ink_box_and_centres_it(box, by_mass):
    photo = torch.full((300, 400), 0.2)  # ink 0.9 on a 0.2 background, 60 tall and 30 wide, off in a corner
    photo[200:260, 330:360] = 0.9
    x = frame(photo - 0.2, box, by_mass)
    rows, cols = (x > 0.5).nonzero(as_tuple=True)
    assert x.shape == (28, 28) and x.min() == 0 and x.max() == pytest.approx(1)
    assert rows.max() - rows.min() + 1 == box and cols.max() - cols.min() + 1 == box // 2  # aspect kept
    centre = (rows.float().mean().item(), cols.float().mean().item())
    assert centre == (pytest.approx(13.5, abs=0.6), pytest.approx(13.5, abs=0.6))
    assert frame(torch.zeros(50, 50), box, by_mass).abs().sum() == 0  # no ink: a blank canvas


def test_a_shadow_across_the_sheet_and_camera_noise_are_paper_not_ink(data_dir):
    """A photographed digit under light that falls off by half across the sheet, with camera noise, is framed as
    the same digit photographed in even light without noise: the same height, nearly the same pixels."""
    raw = shipped("mnist", data_dir=data_dir).dataset_cls(str(data_dir), train=False)
    generator = torch.Generator().manual_seed(0)

    def height(view: torch.Tensor) -> int:
        rows = (view > 0.5).any(1).nonzero()
        return int(rows.max() - rows.min() + 1)

    differences = []
    for digit in raw.data[:20].float() / 255:
        even = model_view(photographed(digit, 0.0, 0.0, generator), 20, True)
        shaded = model_view(photographed(digit, 0.5, 0.02, generator), 20, True)
        assert abs(height(shaded) - height(even)) <= 1
        differences.append((shaded - even).abs().mean().item())
    assert sum(differences) / len(differences) < 0.05  # 0.11 when the paper was one tone, its shade taken for ink


def test_dark_ink_on_a_dim_sheet_is_ink(data_dir):
    """A photo of dark ink on a sheet so dim that its border is darker than mid-grey (a grey sheet, a dark
    room) is still dark ink on paper, framed as the same digit on white paper."""
    raw = shipped("mnist", data_dir=data_dir).dataset_cls(str(data_dir), train=False)
    big = torch.nn.functional.interpolate(raw.data[:3, None].float() / 255, size=(112, 112), mode="bilinear")
    for ink in torch.nn.functional.pad(big[:, 0], (40, 40, 40, 40)):
        dim, white = 0.45 - 0.35 * ink, 1 - ink
        assert torch.allclose(model_view(dim, 20, True), model_view(white, 20, True), atol=1e-4)


@pytest.mark.parametrize("paper", ["ruled", "squared"])
def test_the_lines_of_ruled_and_squared_paper_are_paper_not_ink(data_dir, paper):
    """A digit photographed on ruled or squared paper (lines turned by up to 3°, some across the digit) is framed
    as the same digit on plain paper; a ruled sheet with nothing written on it has no ink."""
    raw = shipped("mnist", data_dir=data_dir).dataset_cls(str(data_dir), train=False)
    differences = []
    for i, digit in enumerate(raw.data[:20].float() / 255):
        plain = model_view(photographed(digit, 0.2, 0.02, torch.Generator().manual_seed(i)), 20, True)
        lined = model_view(photographed(digit, 0.2, 0.02, torch.Generator().manual_seed(i), paper), 20, True)
        differences.append((lined - plain).abs().mean().item())
    assert sum(differences) / len(differences) < 0.04  # 0.11-0.12 while the lines were taken for ink
    blank = photographed(torch.zeros(28, 28), 0.2, 0.02, torch.Generator().manual_seed(0), paper)
    with pytest.raises(DigitsError, match="no ink found"):
        model_view(blank, 20, True)


def test_a_stroke_across_a_tight_crop_is_writing_not_a_ruled_line():
    """A 7 cropped to its ink, its bar from edge to edge as dark as its stem, keeps its bar; so does a 4 whose
    bar and stem both reach the crop's edges."""
    seven = torch.ones(120, 100)
    seven[:6, :] = 0.1  # the bar, edge to edge
    seven[:, 44:50] = 0.1  # the stem, top to bottom
    four = torch.ones(120, 100)
    four[70:76, :] = 0.1
    four[:, 60:66] = 0.1
    four[:70, 10:16] = 0.1
    for tight in (seven, four):
        with_margin = torch.nn.functional.pad(tight, (30, 30, 30, 30), value=1.0)  # no line reaches its edges
        assert torch.allclose(model_view(tight, 20, True), model_view(with_margin, 20, True), atol=1e-4)


@pytest.fixture(scope="module")
def digits_on_disk(tmp_path_factory, data_dir) -> Path:
    """The first 12 MNIST test images as PNG files: 6 in a folder, 6 in a subfolder, some with awkward names."""
    root = tmp_path_factory.mktemp("mine")
    raw = shipped("mnist", data_dir=data_dir).dataset_cls(str(data_dir), train=False)
    (root / "more").mkdir()
    names = [f"digit {i} (copy, {i}).png" if i % 3 == 0 else f"d{i}.png" for i in range(12)]
    for i, name in enumerate(names):
        where = root if i < 6 else root / "more"
        Image.fromarray(raw.data[i].numpy()).resize((56, 56)).save(where / name)
    return root


def predicted(done: subprocess.CompletedProcess) -> dict[str, dict]:
    return {Path(r["input"]).name: r for r in json.loads(done.stdout)}


def test_predict_takes_directories_globs_bare_paths_and_list_files(trained, digits_on_disk, tmp_path):
    ckpt, _, log_dir = trained
    root = digits_on_disk
    by_dir = run_script("predict.py", f"ckpt_path={ckpt}", str(root), "--json", log_dir=log_dir)
    assert by_dir.returncode == 0, by_dir.stderr[-2000:]
    rows = predicted(by_dir)
    assert len(rows) == 12  # the folder and its subfolder, recursively
    assert all({"second", "second_probability", "low_confidence"} <= r.keys() for r in rows.values())
    # a glob, a bare path with parentheses and commas, one inputs= path without brackets, a list file
    odd = root / "digit 3 (copy, 3).png"
    by_glob = run_script(
        "predict.py", f"ckpt_path={ckpt}", str(root / "more" / "*.png"), str(odd), "--json", log_dir=log_dir
    )
    assert sorted(predicted(by_glob)) == sorted([p.name for p in (root / "more").glob("*.png")] + [odd.name])
    single = run_script("predict.py", f"ckpt_path={ckpt}", f"inputs={root / 'd1.png'}", "--json", log_dir=log_dir)
    assert list(predicted(single)) == ["d1.png"]
    listing = tmp_path / "list.txt"
    listing.write_text("".join(f"{p}\n" for p in sorted(root.rglob("*.png"))))
    by_list = run_script("predict.py", f"ckpt_path={ckpt}", f"inputs_from={listing}", "--json", log_dir=log_dir)
    assert predicted(by_list) == rows  # the same answers, whichever way the files were named


def test_a_directory_leaves_out_hidden_files_and_walks_each_folder_once(trained, digits_on_disk, tmp_path):
    """A folder copied from a Mac holds a `._` file beside each image; an image viewer's `.thumbnails/` holds
    copies: neither is one of the user's images. A symlinked folder is walked, once, however many links lead
    to it, and a link back up the tree (`again -> .`) names no file a second time."""
    ckpt, _, log_dir = trained
    scans, elsewhere = tmp_path / "scans", tmp_path / "elsewhere"
    (scans / ".thumbnails").mkdir(parents=True)
    elsewhere.mkdir()
    image = (digits_on_disk / "d1.png").read_bytes()
    for copy in (scans / "d1.png", scans / ".thumbnails" / "d1.png", elsewhere / "d2.png"):
        copy.write_bytes(image)
    (scans / "._d1.png").write_bytes(b"\x00\x05\x16\x07 Mac OS X resource fork")
    (scans / "again").symlink_to(".")
    (scans / "linked").symlink_to(elsewhere)
    (scans / "linked too").symlink_to(elsewhere)
    expected = [str(scans / "d1.png"), str(scans / "linked" / "d2.png")]
    for entry in (scans, scans / "**" / "*.png"):
        done = run_script("predict.py", f"ckpt_path={ckpt}", str(entry), "--json", log_dir=log_dir)
        assert done.returncode == 0, done.stdout[-2000:]
        assert [row["input"] for row in json.loads(done.stdout)] == expected
    done = run_script("predict.py", f"ckpt_path={ckpt}", str(scans / "*.png"), "--json", log_dir=log_dir)
    assert [row["input"] for row in json.loads(done.stdout)] == expected[:1]


def test_batched_predictions_equal_one_by_one_and_the_views_are_saved(trained, digits_on_disk, tmp_path):
    ckpt, _, log_dir = trained
    root = digits_on_disk
    files = sorted(root.glob("*.png"))
    together = run_script(
        "predict.py",
        f"ckpt_path={ckpt}",
        *map(str, files),
        f"save_inputs={tmp_path / 'seen'}",
        "--json",
        log_dir=log_dir,
    )
    rows = predicted(together)
    for path in files[:3]:
        alone = predicted(run_script("predict.py", f"ckpt_path={ckpt}", str(path), "--json", log_dir=log_dir))[
            path.name
        ]
        assert alone["label"] == rows[path.name]["label"]
        assert alone["probability"] == pytest.approx(rows[path.name]["probability"], abs=1e-5)
    seen = sorted((tmp_path / "seen").glob("*.png"))
    assert len(seen) == len(files) and Image.open(seen[0]).size == (28, 28)


def test_images_are_read_faithfully_and_within_bounds(trained, data_dir, tmp_path):
    ckpt, _, log_dir = trained
    raw = shipped("mnist", data_dir=data_dir).dataset_cls(str(data_dir), train=False)
    seven = Image.fromarray(255 - raw.data[0].numpy()).resize((84, 84))  # black on white, a 7
    Image.fromarray(np.asarray(seven, dtype=np.uint16) * 257).save(tmp_path / "sixteen.png")  # 16-bit gray
    seven.convert("P").save(tmp_path / "palette.png")
    blank = Image.new("L", (84, 84), 255)
    blank.save(tmp_path / "anim.gif", save_all=True, append_images=[seven], duration=100)  # a blank first frame
    specks = [blank.copy() for _ in range(MAX_FRAMES)]  # no ink, each frame other than the last (GIF merges those)
    for k, speck in enumerate(specks):
        speck.putpixel((k % 84, k // 84), 250)
    specks[0].save(tmp_path / "late.gif", save_all=True, append_images=[*specks[1:], seven], duration=100)
    rotated = seven.rotate(90, expand=True)  # stored on its side (PIL turns anticlockwise); EXIF says so
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: stored turned 90° anticlockwise, to be turned clockwise to view
    rotated.save(tmp_path / "exif.jpg", exif=exif, quality=95)
    Image.fromarray(np.asarray(seven, dtype=np.float32) / 255).save(tmp_path / "float.tif")  # floats in [0, 1]
    not_numbers = np.asarray(seven, dtype=np.float32)
    not_numbers[0, 0] = np.nan
    Image.fromarray(not_numbers).save(tmp_path / "nan.tif")
    seven.save(tmp_path / "drawing.png", format="EPS")  # Pillow would hand it to Ghostscript
    blank.save(tmp_path / "blank.png")
    Image.new("L", (1, 1), 0).save(tmp_path / "dot.png")
    speck = blank.copy()
    speck.paste(0, (40, 40, 43, 42))  # a 3×2 speck of dust on a blank sheet
    speck.save(tmp_path / "speck.png")
    Image.new("1", (8000, 6250), 1).save(tmp_path / "photo.png")  # 50 MP: under Pillow's bomb limit, over ours
    Image.new("1", (12000, 12000), 1).save(tmp_path / "bomb.png")  # 144 MP of white, a few hundred KB
    with open(tmp_path / "huge.png", "wb") as f:
        f.truncate(MAX_BYTES + 1)  # sparse: no disk used, but read whole it would be
    os.mkfifo(tmp_path / "fifo.png")  # reading it would wait for a writer that never comes
    names = ["sixteen.png", "palette.png", "anim.gif", "exif.jpg", "float.tif", "nan.tif", "drawing.png"]
    names += ["late.gif", "blank.png", "dot.png", "speck.png", "photo.png", "bomb.png", "huge.png", "fifo.png"]
    done = run_script("predict.py", f"ckpt_path={ckpt}", *(str(tmp_path / n) for n in names), "--json", log_dir=log_dir)
    assert done.returncode == 1 and "Traceback" not in done.stderr  # some inputs refused, the others answered
    rows = predicted(done)
    for name in ("sixteen.png", "palette.png", "anim.gif", "exif.jpg", "float.tif"):
        assert rows[name].get("class") == "7 - seven", (name, rows[name])
    assert rows["nan.tif"]["error"] == "pixels that are not numbers (NaN or infinity)"
    assert rows["drawing.png"]["error"].startswith("not an image in a format read here (PNG, JPEG")
    for name in ("late.gif", "blank.png", "dot.png"):  # late.gif: its seven comes after MAX_FRAMES blank frames
        assert rows[name]["error"].startswith("no ink found"), rows[name]
    assert rows["speck.png"]["error"] == "no digit found: the only ink is a 3×2-pixel mark (a digit spans 4 or more)"
    assert rows["photo.png"]["error"] == "8000×6250 pixels is over the limit of 40,000,000"
    assert "over the limit" in rows["bomb.png"]["error"]
    assert rows["huge.png"]["error"] == f"{MAX_BYTES + 1:,} bytes is over the limit of {MAX_BYTES:,}"
    assert rows["fifo.png"]["error"] == "not a regular file"


def test_the_table_shows_each_input_on_one_line(trained, digits_on_disk, tmp_path):
    """A file name may hold a newline or a terminal's escape sequence: the table writes them out escaped. And it
    may be as long as the file system allows: its view is saved under a shorter one."""
    ckpt, _, log_dir = trained
    odd = tmp_path / ("two\nlines \x1b[31mred" + "x" * 230 + ".png")
    odd.write_bytes((digits_on_disk / "d1.png").read_bytes())
    done = run_script("predict.py", f"ckpt_path={ckpt}", str(odd), f"save_inputs={tmp_path / 'seen'}", log_dir=log_dir)
    assert done.returncode == 0, done.stderr[-2000:]
    assert [Image.open(p).size for p in (tmp_path / "seen").iterdir()] == [(28, 28)]
    _, row = done.stdout.strip().split("\n")  # the header and one row
    assert row.startswith(f"{tmp_path}/two\\nlines \\x1b[31mred{'x' * 230}.png ") and "\x1b" not in done.stdout
    # a list that can hold such a name: `find -print0`'s, each path ended by a NUL
    listing = tmp_path / "list0"
    with open(listing, "wb") as out:
        subprocess.run(["find", str(tmp_path), "-name", "*.png", "-print0"], stdout=out, check=True)
    by_list = run_script("predict.py", f"ckpt_path={ckpt}", f"inputs_from={listing}", "--json", log_dir=log_dir)
    assert by_list.returncode == 0, by_list.stderr[-2000:]
    assert sorted(r["input"] for r in json.loads(by_list.stdout)) == sorted(map(str, tmp_path.rglob("*.png")))


def test_a_list_of_inputs_is_lines_or_nul_ended_names_and_nothing_else(tmp_path):
    """Lines are stripped (and a UTF-8 byte-order mark dropped); `find -print0`'s names are taken exactly; an image,
    or a list saved as UTF-16 (with or without its byte-order mark), is refused rather than read as names."""
    Image.new("L", (28, 28)).save(tmp_path / "image.png")
    image = (tmp_path / "image.png").read_bytes()
    lists = {
        b"a.png\n  b c.png \n\n": ["a.png", "b c.png"],
        "\ufeffa.png\r\nb.png\r\n".encode(): ["a.png", "b.png"],  # as Notepad saves UTF-8
        b"a.png\0 b c.png \0two\nlines.png\0": ["a.png", " b c.png ", "two\nlines.png"],
        "a.png\r\nb.png\r\n".encode("utf-16"): "is UTF-16 text; expected UTF-8",
        "a.png\nb.png\n".encode("utf-16-le"): "expected a text file of paths",
        image: "expected a text file of paths",
    }
    for data, expected in lists.items():
        (tmp_path / "list").write_bytes(data)
        cfg = OmegaConf.create({"inputs_from": str(tmp_path / "list")})
        if isinstance(expected, str):
            with pytest.raises(DigitsError, match=expected):
                input_entries(cfg)
        else:
            assert input_entries(cfg) == expected


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ("low_confidence=2", "low_confidence=2 is not allowed; expected a probability in [0, 1]"),
        ("low_confidence=high", "low_confidence='high' is not allowed; expected a probability in [0, 1]"),
        ("format=xml", "format='xml' is not allowed; expected table or json"),
        (
            "inputs_from=d1.png",
            "inputs_from='d1.png' is not allowed; expected a text file of paths, one per line or each ended by a "
            "NUL byte",
        ),
    ],
)
def test_a_bad_predict_option_is_one_line(trained, digits_on_disk, option, message):
    ckpt, _, _ = trained
    cmd = [sys.executable, str(ROOT / "predict.py"), f"ckpt_path={ckpt}", "d1.png", option]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=digits_on_disk)
    assert done.returncode == 1 and not done.stdout
    assert done.stderr.strip().splitlines() == [f"error: {message}"]


def test_a_labelled_folder_gives_the_accuracy_of_its_rows(trained, data_dir, tmp_path):
    """`<label>/` folders, named by class index, full name or short name, label the images in them."""
    ckpt, _, log_dir = trained
    raw = shipped("mnist", data_dir=data_dir).dataset_cls(str(data_dir), train=False)
    folders = {7: "7", 2: "two", 1: "1 - one"}
    for i in range(60):
        label = int(raw.targets[i])
        if label in folders:
            (tmp_path / folders[label]).mkdir(exist_ok=True)
            Image.fromarray(raw.data[i].numpy()).resize((56, 56)).save(tmp_path / folders[label] / f"{i}.png")
    (tmp_path / "unlabelled").mkdir()
    Image.fromarray(raw.data[0].numpy()).save(tmp_path / "unlabelled" / "x.png")
    report = tmp_path.parent / f"{tmp_path.name}_report"
    done = run_script(
        "predict.py", f"ckpt_path={ckpt}", str(tmp_path), f"report_dir={report}", "--json", log_dir=log_dir
    )
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(done.stdout)
    labelled = [r for r in rows if "true" in r]
    assert len(labelled) == len(rows) - 1 >= 10 and "true" not in predicted(done)["x.png"]
    assert {r["true"] for r in labelled} == {"7 - seven", "2 - two", "1 - one"}
    right = sum(r["class"] == r["true"] for r in labelled)
    assert done.stderr.strip().splitlines()[-1] == (
        f"accuracy {100 * right / len(labelled):.2f} % ({right} of {len(labelled)} labelled images)"
    )
    # what eval.py writes for the test set, over these images
    summary = json.loads((report / "labelled.json").read_text())
    assert (summary["images"], summary["right"]) == (len(labelled), right)
    assert torch.tensor(summary["confusion_matrix"]).sum() == len(labelled)
    assert_real_png(report / "confusion_matrix.png")
    if right < len(labelled):
        assert_real_png(report / "misclassified.png")
