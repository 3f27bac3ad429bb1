"""The robustness suite (degraded held-out images, digits in fonts) and the augmentations that train for it."""

import json

import pytest
import torch
from omegaconf import open_dict

from digits.augment import Augment, gaussian_blur, random_low_res, resample
from digits.data import shipped
from digits.robustness import CORRUPTIONS, SHIFT, font_digits, is_digits, score, suite
from digits.train import train


def dots(n: int = 64) -> torch.Tensor:
    """Normalised-looking images (background -1) with one bright pixel in the middle."""
    images = torch.full((n, 1, 28, 28), -1.0)
    images[:, 0, 14, 14] = 3.0
    return images


def test_blur_spreads_each_image_by_its_own_sigma_and_keeps_its_ink():
    ink = dots(3) + 1
    blurred = gaussian_blur(ink, torch.tensor([0.0, 1.0, 2.0]))
    assert torch.equal(blurred[0], ink[0])  # sigma 0: as it was, to the bit
    assert torch.allclose(blurred.sum((1, 2, 3)), ink.sum((1, 2, 3)), rtol=1e-4)  # the ink's total kept
    peaks = blurred.amax((1, 2, 3))
    assert peaks[0] > peaks[1] > peaks[2]
    rows = blurred[1, 0, :, 14] / blurred[1, 0, :, 14].sum()
    spread = (rows * (torch.arange(28.0) - 14) ** 2).sum().sqrt()
    assert spread == pytest.approx(1.0, abs=0.05)  # a Gaussian of sigma 1 along each axis


def test_low_res_softens_about_half_the_images_the_same_way_for_the_same_seed():
    ink = torch.zeros(256, 1, 28, 28)
    ink[:, 0, 6:22, 13:15] = 1.0  # a sharp bar
    out = random_low_res(ink, 8, torch.Generator().manual_seed(0))
    changed = (out != ink).flatten(1).any(1)
    assert 96 < int(changed.sum()) < 160
    assert (out[changed].amax((1, 2, 3)) < 1.0).all()  # soft strokes: no pixel fully lit any more
    assert torch.equal(out, random_low_res(ink, 8, torch.Generator().manual_seed(0)))
    assert torch.allclose(resample(ink, 28), ink, atol=1e-6)


def test_contrast_and_elastic_keep_the_background_and_stay_near_the_ink():
    images = dots(256)
    faint = Augment(contrast=0.6, fill=-1.0)(images, torch.Generator().manual_seed(0))
    peak = faint.amax((1, 2, 3)) + 1  # ink at 4 scaled by 0.4 to 1
    assert peak.min() >= 4 * 0.4 - 1e-5 and peak.max() <= 4 + 1e-5 and peak.std() > 0.3
    assert (faint[:, 0, 0, 0] == -1).all()
    bent = Augment(elastic=2.0, fill=-1.0)(images, torch.Generator().manual_seed(0))
    ys, xs = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")
    ink = bent[:, 0] + 1
    cy, cx = ((ink * ys).sum((1, 2)) / ink.sum((1, 2)), (ink * xs).sum((1, 2)) / ink.sum((1, 2)))
    moved = ((cy - 14) ** 2 + (cx - 14) ** 2).sqrt()
    assert moved.max() <= 2 * 2**0.5 + 0.1 and moved.std() > 0.2  # each its own way, within the field's reach
    assert (bent[:, 0, 0, 0] == -1).all()


def test_stroke_thickens_some_images_and_thins_others_each_by_its_own_weight():
    bars = torch.full((512, 1, 28, 28), -1.0)
    bars[:, 0, 6:22, 12:16] = 3.0  # a 4-pixel-wide stroke, ink 4 above the background
    out = Augment(stroke=1.0, fill=-1.0)(bars, torch.Generator().manual_seed(0))
    ink = (out + 1).sum((1, 2, 3)) / (bars + 1).sum((1, 2, 3))
    # a full step thicker covers 18×6 pixels instead of 16×4, a full step thinner 15×3
    assert ink.max() <= 18 * 6 / 64 + 1e-5 and ink.min() >= 15 * 3 / 64 - 1e-5
    assert (ink > 1.2).sum() > 100 and (ink < 0.85).sum() > 100 and ink.std() > 0.2
    assert (out[:, 0, 0, 0] == -1).all() and (out[:, 0, 14, 13:15] == 3).all()  # background and core kept
    assert torch.equal(Augment(stroke=0.0, fill=-1.0)(bars, torch.Generator()), bars)


def test_degrade_leaves_the_other_images_sharp_and_at_full_contrast():
    images = dots(2000)
    for degrade, untouched_share in ((1.0, 0.0), (0.5, 0.25)):  # blur and contrast each skip 1 - degrade of them
        out = Augment(blur=1.5, contrast=0.7, degrade=degrade, fill=-1.0)(images, torch.Generator().manual_seed(0))
        untouched = (out - images).abs().flatten(1).amax(1) < 1e-5
        assert untouched.float().mean().item() == pytest.approx(untouched_share, abs=0.04), degrade


def test_augmentations_refuse_values_out_of_range_naming_them(make_cfg):
    from digits.errors import DigitsError

    for key, value, allowed in (
        ("low_res", 2, "4 to 27"),
        ("blur", 5, "sigma of 3"),
        ("contrast", 1.0, "not including, 1"),
        ("elastic", -1, "4 pixels"),
        ("stroke", 1.5, r"to 1 \(a pixel thicker or thinner\)"),
        ("degrade", 0, r"share of the images in \(0, 1\]"),
    ):
        with pytest.raises(DigitsError, match=f"{key}={value!r} is not allowed.*{allowed}"):
            Augment(**{key: value})
    with pytest.raises(DigitsError, match=r"blur=1\.0 is not allowed; expected 0 with loader=torch"):
        shipped("mnist", loader="torch", blur=1.0)


def test_suite_degrades_a_fixed_sample_and_draws_the_fonts(data_dir):
    dm = shipped("mnist", data_dir=str(data_dir))
    dm.prepare_data()
    images, labels = dm.load_tensors(train=False)
    sets = suite(images, labels, dm.mean, dm.std, 300, fonts=(dm.frame_box, dm.frame_by_mass))
    assert set(sets) == {*CORRUPTIONS, "fonts"}
    again = suite(images, labels, dm.mean, dm.std, 300)
    for name in CORRUPTIONS:
        assert sets[name][0].shape == (300, 1, 28, 28) and torch.equal(sets[name][1], again[name][1])
        assert torch.equal(sets[name][0], again[name][0])
    # `shifted` moves each sampled image SHIFT pixels, each of the eight ways for some of them
    original = (images * dm.std + dm.mean)[torch.randperm(10_000, generator=torch.Generator().manual_seed(0))[:300]]
    shifted = sets["shifted"][0] * dm.std + dm.mean
    inner = slice(SHIFT, 28 - SHIFT)
    moves = [(dy, dx) for dy in (-SHIFT, 0, SHIFT) for dx in (-SHIFT, 0, SHIFT) if dy or dx]
    used = set()
    for before, after in zip(original[:, 0], shifted[:, 0], strict=True):
        fits = [
            (dy, dx)
            for dy, dx in moves
            if torch.allclose(after[SHIFT + dy : 28 - SHIFT + dy, SHIFT + dx : 28 - SHIFT + dx], before[inner, inner])
        ]
        assert len(fits) >= 1
        used.update(fits)
    assert used == set(moves)
    drawn, digits, n_fonts = font_digits(dm.frame_box, dm.frame_by_mass)
    assert n_fonts >= 1 and len(drawn) == 10 * n_fonts  # Pillow's own font at least
    assert digits[:10].tolist() == list(range(10)) and drawn.amax((1, 2)).min() == 1.0
    assert is_digits(dm.class_names) and not is_digits(shipped("fashion").class_names)


def test_score_is_each_sets_accuracy_and_the_mean_of_the_corruptions():
    class Guess(torch.nn.Module):  # says "3" to a bright image, "0" otherwise
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            bright = (x.flatten(1).mean(1) > 0).long()
            return torch.nn.functional.one_hot(bright * 3, 10).float() + self.w

    sets = {name: (torch.full((4, 1, 28, 28), -1.0), torch.tensor([0, 0, 0, 3])) for name in CORRUPTIONS}
    sets["thick"] = (torch.full((4, 1, 28, 28), 1.0), torch.tensor([3, 3, 0, 0]))
    sets["fonts"] = (torch.full((2, 1, 28, 28), 1.0), torch.tensor([3, 3]))
    accuracy = score(Guess(), sets, batch_size=3)
    assert accuracy["low_res_8"] == 0.75 and accuracy["thick"] == 0.5 and accuracy["fonts"] == 1.0
    n = len(CORRUPTIONS)
    assert accuracy["mean"] == pytest.approx(((n - 1) * 0.75 + 0.5) / n)


@pytest.mark.slow
def test_training_with_the_degradations_beats_the_same_training_without_on_the_suite(make_cfg):
    """A short fixed-seed training of LeNet-5 on 10k images with `augment=digits` (shifts, low resolution, blur,
    faint ink) and with only its shifts, scored on degraded validation images (the suite's val split)."""
    base = ("data.train_size=10000", "trainer.max_epochs=2", "logger=none", "test=false")
    suite_on_val = ("callbacks.robustness.size=2000",)
    plain = train(make_cfg(*base, *suite_on_val, "augment=shift"))
    trained = train(make_cfg(*base, *suite_on_val, "augment=digits"))
    before, after = plain["robustness"]["val"], trained["robustness"]["val"]
    assert after["mean"] > before["mean"] + 0.05, (before, after)
    for name in ("low_res_8", "blur_1.5", "faint"):
        assert after[name] > before[name], (name, before, after)
    assert trained["best_val_acc"] > plain["best_val_acc"] - 0.01  # the clean images barely pay for it
    json.dumps(trained)  # metrics.json holds the suite's numbers as plain floats


def test_a_run_without_its_test_stage_scores_the_suite_on_validation_alone(make_cfg, tmp_path):
    """`test=false`, for runs that choose a recipe: no test metrics, and the suite on the validation images gives
    what the test stage gives for them from the same checkpoint."""
    quick = ("debug=quick", "model=mlp", "callbacks.test_results.figures=false", "callbacks.robustness.size=300")
    tested = train(make_cfg(*quick, "callbacks.robustness.splits=[val]", "logger=none"))
    chosen_cfg = make_cfg(*quick, "test=false", "logger=csv")
    with open_dict(chosen_cfg):
        chosen_cfg.paths.output_dir = str(tmp_path / "chosen")
    chosen = train(chosen_cfg)
    assert not any(key.startswith("test") for key in chosen)
    assert "test_acc" in tested
    assert list(chosen["robustness"]) == ["val"]
    assert chosen["robustness"]["val"] == tested["robustness"]["val"]
    assert chosen["best_val_acc"] == tested["best_val_acc"]
    logged = (tmp_path / "chosen" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "val_robust/mean" in logged and not any(tag.startswith(("test/", "robust/")) for tag in logged)
