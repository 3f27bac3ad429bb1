import math

import pytest
import torch
from hydra.utils import instantiate

from digits.config import CONF_DIR
from digits.errors import DigitsError
from digits.models import MLP, ConvNet, count_parameters
from digits.train import train

# Trainable parameters from ../shared/spec/labs.md; lab_cnn, bn_cnn and elu_cnn derived by hand:
# lab  = (30·25+30) + (15·30·9+15) + (375·128+128) + (128·50+50) + (50·10+10)             =  59,933
# bn   = 640+128 + 36,928+128 + 36,928+128 + (1600·512+512)+1,024 + 5,130                 = 900,746
# elu  = 320 + 9,248 + 18,496 + 36,928 + (1024·256+256) + 2,570                            = 329,962
SEED_ARCHITECTURES = {
    "mlp_8": 6_370,
    "mlp_300": 238_510,
    "mlp_500_300": 545_810,
    "mlp_64_64": 55_050,
    "mlp_512_256": 535_818,
    "lenet5": 44_426,
    "keras_cnn": 1_199_882,
    "lab_cnn": 59_933,
    "bn_cnn": 900_746,
    "elu_cnn": 329_962,
}


# the framework's bars, as the README gives them
BEST_PRESETS = {"mnist_best": 330_858, "fashion_best": 330_858}


@pytest.mark.parametrize(("experiment", "params"), (SEED_ARCHITECTURES | BEST_PRESETS).items())
def test_seed_architecture_parameter_counts(make_cfg, experiment, params):
    net = instantiate(make_cfg(f"experiment={experiment}").model)
    assert count_parameters(net) == params


# every preset with its trainable parameters (the labs' counts where labs.md gives one) and its dataset
PRESETS = {
    "bn_cnn": (900_746, "FashionMNIST"),
    "cnn_recipe": (44_426, "MNIST"),
    "elu_cnn": (329_962, "MNIST"),
    "fashion_best": (330_858, "FashionMNIST"),
    "keras_cnn": (1_199_882, "MNIST"),
    "lab_cnn": (59_933, "MNIST"),
    "lenet5": (44_426, "MNIST"),
    "mlp_300": (238_510, "MNIST"),
    "mlp_500_300": (545_810, "MNIST"),
    "mlp_512_256": (535_818, "MNIST"),
    "mlp_64_64": (55_050, "MNIST"),
    "mlp_8": (6_370, "MNIST"),
    "mlp_sgd_recipe": (545_810, "MNIST"),
    "mnist_best": (330_858, "MNIST"),
    "mnist_fast": (119_770, "MNIST"),
}


def test_every_shipped_preset_is_listed():
    shipped = {p.stem for p in (CONF_DIR / "experiment").glob("*.yaml") if not p.stem.startswith("study_")}
    assert shipped == set(PRESETS)


@pytest.mark.parametrize("experiment", sorted(PRESETS))
def test_every_experiment_preset_trains_a_batch(make_cfg, experiment):
    metrics = train(make_cfg(f"experiment={experiment}", "debug=fast"))
    assert (metrics["params"], metrics["data"]) == PRESETS[experiment]
    assert math.isfinite(metrics["test_loss"])


@pytest.mark.parametrize("model", ["mlp", "cnn", "cnn_bn"])
def test_forward_shape(make_cfg, model):
    net = instantiate(make_cfg(f"model={model}").model).eval()
    assert net(torch.randn(5, 1, 28, 28)).shape == (5, 10)


@pytest.mark.parametrize("activation", ["relu", "sigmoid", "tanh", "elu", "leaky_relu"])
def test_every_activation_builds(activation):
    assert MLP(hidden_size=[16, 8], activation=activation)(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_kernel_size_is_checked_against_the_image_size():
    assert ConvNet(kernel_size=9)(torch.randn(1, 1, 28, 28)).shape == (1, 10)  # largest that fits LeNet
    with pytest.raises(DigitsError, match=r"kernel_size=10 is too large; expected 1 to 9"):
        ConvNet(kernel_size=10)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"hidden_size": -1}, "hidden_size=-1"),
        ({"hidden_size": [64, 0]}, r"hidden_size=\[64, 0\]"),
        ({"activation": "swish"}, "activation='swish'"),
        ({"dropout": 1.5}, "dropout=1.5"),
        ({"batch_norm": "no"}, "batch_norm='no'"),
    ],
)
def test_bad_mlp_arguments(kwargs, message):
    with pytest.raises(DigitsError, match=message):
        MLP(**kwargs)


def test_a_global_pool_gives_a_moved_digit_the_same_features():
    """With `global_pool` the dense layers see each channel's maximum over the last feature map: a digit moved by
    the net's whole pooling stride (4 pixels through LeNet's two pools) gives the same features, as long as every
    window of the last map that sees it, before and after, lies inside the image; flattened, it gives others."""
    torch.manual_seed(0)
    digit = torch.zeros(1, 1, 44, 44)  # the last map 8×8, its windows 16 pixels wide, 4 apart
    digit[..., 16:24, 16:20] = 1.0
    moved = digit.roll((4, 4), dims=(2, 3))
    pooled, flat = ConvNet(global_pool=True, in_shape=(1, 44, 44)), ConvNet(in_shape=(1, 44, 44))
    assert pooled.hidden[0].in_features == 16 and flat.hidden[0].in_features == 16 * 8 * 8
    assert torch.equal(pooled.features(digit), pooled.features(moved))
    assert not torch.equal(flat.features(digit), flat.features(moved))
    with pytest.raises(DigitsError, match="global_pool='yes'"):
        ConvNet(global_pool="yes")
