"""The config glue's pure logic, fast: option checks that know a user's config dirs, run names, datasets."""

import pytest
from hydra.utils import instantiate

from digits.config import check_choices, override_args, run_settings
from digits.data import shipped
from digits.errors import DigitsError


@pytest.fixture
def user_conf(tmp_path):
    (tmp_path / "experiment").mkdir()
    (tmp_path / "experiment" / "mine.yaml").write_text("# @package _global_\n")
    return tmp_path


def test_override_args_leave_out_flags_and_their_values():
    args = ["-m", "--config-dir", "/c", "-cn", "train", "--cfg", "job", "experiment=mine", "seed=1"]
    assert override_args(args) == ["job", "experiment=mine", "seed=1"]


@pytest.mark.parametrize("form", ["space", "equals", "short", "searchpath"])
def test_an_option_of_a_users_config_dir_is_allowed(user_conf, form):
    flags = {
        "space": ["--config-dir", str(user_conf)],
        "equals": [f"--config-dir={user_conf}"],
        "short": ["-cd", str(user_conf)],
        "searchpath": [f"hydra.searchpath=[file://{user_conf}]"],
    }[form]
    check_choices([*flags, "experiment=mine", "model=mlp"])
    with pytest.raises(DigitsError, match=r"experiment='nope' is not allowed; expected one of \[.*'mine'"):
        check_choices([*flags, "experiment=nope"])


def test_every_value_of_a_swept_group_is_checked_before_anything_runs():
    check_choices(["-m", "experiment=lenet5,mnist_best"])
    with pytest.raises(DigitsError, match="experiment='mnist_bset' is not allowed"):
        check_choices(["-m", "experiment=lenet5,mnist_bset"])


def test_without_the_users_dir_its_options_are_unknown(user_conf):
    with pytest.raises(DigitsError, match="experiment='mine' is not allowed"):
        check_choices(["experiment=mine"])


def test_a_model_of_ones_own_needs_none_of_the_shipped_keys(make_cfg):
    cfg = make_cfg("model=mlp", "~model.hidden_size", "model._target_=torch.nn.Identity", "model.dropout=null")
    assert "model.hidden_size" not in run_settings(cfg) and run_settings(cfg)["model._target_"] == "torch.nn.Identity"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"dataset": "torchvision.datasets.CIFAR10"}, "dataset='torchvision.datasets.CIFAR10' is not allowed"),
        ({"dataset": "nowhere.Nothing"}, "dataset='nowhere.Nothing' is not allowed"),
        ({"std": 0}, "std=0 is not allowed"),
        ({"frame_box": 40}, "frame_box=40 is not allowed"),
    ],
)
def test_a_dataset_config_is_checked(kwargs, message):
    with pytest.raises(DigitsError, match=message):
        shipped("mnist", **kwargs)


def test_shipped_datasets_carry_their_statistics_and_framing():
    mnist, fashion = shipped("mnist"), shipped("fashion")
    assert (mnist.name, mnist.mean, mnist.frame_box, mnist.frame_by_mass) == ("MNIST", 0.1307, 20, True)
    assert (fashion.name, fashion.std, fashion.frame_box, fashion.frame_by_mass) == ("FashionMNIST", 0.353, 28, False)
    assert fashion.class_names[0] == "T-shirt/top" and fashion.batch_size == mnist.batch_size == 128


def _augmentation(make_cfg, *overrides: str) -> dict:
    augment = instantiate(make_cfg(*overrides).data).augment
    return {k: getattr(augment, k) for k in ("translate", "low_res", "blur", "contrast", "degrade", "flip")}


def test_each_dataset_brings_its_own_augmentation_and_an_augment_option_replaces_it_whole(make_cfg):
    digits_half = {"translate": 2, "low_res": 8, "blur": 1.5, "contrast": 0.7, "degrade": 0.5, "flip": False}
    shifts = {"translate": 2, "low_res": 0, "blur": 0.0, "contrast": 0.0, "degrade": 1.0, "flip": False}
    assert _augmentation(make_cfg) == _augmentation(make_cfg, "augment=digits_half") == digits_half
    assert _augmentation(make_cfg, "data=fashion") == _augmentation(make_cfg, "augment=shift") == shifts
    assert _augmentation(make_cfg, "data=fashion", "augment=digits") == digits_half | {"degrade": 1.0}
    assert _augmentation(make_cfg, "experiment=lenet5", "data=fashion") == shifts
    # the lab CNNs keep the recipe they were measured with: shifts, plus lab_cnn's blur
    assert _augmentation(make_cfg, "experiment=lab_cnn") == shifts | {"blur": 1.5}
