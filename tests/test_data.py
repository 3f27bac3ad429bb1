import shutil
import subprocess
import sys
from subprocess import PIPE

import pytest
import torch

from digits.augment import Augment
from digits.data import DeviceLoader, EpochSampler, shipped
from digits.errors import DigitsError


@pytest.fixture(params=["mnist", "fashion"])
def datamodule(request, data_dir):
    dm = shipped(request.param, data_dir=data_dir, val_size=5_000, train_size=0.5, seed=3)
    dm.prepare_data()
    dm.setup()
    return dm


def test_splits_have_the_asked_sizes_and_are_disjoint(datamodule):
    train, val = datamodule.split_indices()
    assert (len(train), len(val)) == (27_500, 5_000)
    assert len(set(train.tolist()) | set(val.tolist())) == 32_500
    assert len(datamodule.test_dataloader().sampler) == 10_000


def test_split_is_fixed_by_the_seed(data_dir):
    a, b, c = (shipped("mnist", data_dir=data_dir, seed=s).split_indices()[1] for s in (1, 1, 2))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_images_are_normalised_per_dataset(datamodule):
    images, labels = datamodule.load_tensors(train=True)
    assert images.shape == (60_000, 1, 28, 28)
    assert abs(images.mean().item()) < 0.01
    assert abs(images.std().item() - 1) < 0.01
    assert labels.unique().tolist() == list(range(10))
    assert len(datamodule.class_names) == 10


def test_class_names_differ_between_datasets(data_dir):
    assert shipped("mnist", data_dir=data_dir).class_names[0].startswith("0")
    assert shipped("fashion", data_dir=data_dir).class_names[0] == "T-shirt/top"


def test_device_and_torch_loaders_serve_the_same_images(data_dir):
    device_dm, torch_dm = (
        shipped("mnist", data_dir=data_dir, loader=lo, eval_batch_size=256) for lo in ("device", "torch")
    )
    for dm in (device_dm, torch_dm):
        dm.setup()
    (xd, yd), (xt, yt) = next(iter(device_dm.val_dataloader())), next(iter(torch_dm.val_dataloader()))
    assert torch.equal(yd, yt)
    torch.testing.assert_close(xd, xt, atol=1e-5, rtol=0)


def test_epoch_sampler_covers_every_index_once_in_a_seeded_order():
    sampler = EpochSampler(1000, shuffle=True, seed=7)
    first = sampler.indices()
    assert sorted(first.tolist()) == list(range(1000))
    assert torch.equal(first, EpochSampler(1000, shuffle=True, seed=7).indices())
    sampler.set_epoch(1)
    assert not torch.equal(first, sampler.indices())


def test_epoch_sampler_shards_are_disjoint_even_and_cover_the_set():
    shards = [EpochSampler(1001, shuffle=True, seed=0, rank=r, world_size=4).indices() for r in range(4)]
    assert {len(s) for s in shards} == {251}
    assert set(torch.cat(shards).tolist()) == set(range(1001))
    unpadded = [EpochSampler(1001, shuffle=False, seed=0, rank=r, world_size=4, even=False).indices() for r in range(4)]
    assert sorted(torch.cat(unpadded).tolist()) == list(range(1001))


def test_device_loader_batches():
    x, y = torch.arange(10.0).view(10, 1), torch.arange(10)
    loader = DeviceLoader(x, y, batch_size=4, sampler=EpochSampler(10, shuffle=False, seed=0))
    assert len(loader) == 3
    assert [b[1].tolist() for b in loader] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_device_loader_hands_several_batches_per_call_and_resumes_between_them():
    x, y = torch.arange(10.0).view(10, 1), torch.arange(10)
    loader = DeviceLoader(x, y, batch_size=2, sampler=EpochSampler(10, shuffle=False, seed=0), steps_per_call=2)
    calls = list(loader)
    assert len(loader) == 3 and loader.steps == 5
    assert [c.labels.tolist() for c in calls] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert [c.images.flatten().tolist() for c in calls] == [c.labels.float().tolist() for c in calls]
    assert {c.batch_size for c in calls} == {2}
    assert loader.state_dict() == {"epoch": 0, "batches_trained": 5}  # counted in batches, not calls
    loader.load_state_dict({"epoch": 0, "batches_trained": 3})  # stopped after the third batch
    assert [c.labels.tolist() for c in loader] == [[6, 7, 8, 9]]


def test_several_batches_per_call_are_augmented_as_one_per_call():
    images = torch.randn(50, 1, 28, 28, generator=torch.Generator().manual_seed(0))

    def served(steps_per_call: int) -> torch.Tensor:
        augment = Augment(translate=2, low_res=8, blur=1.0, fill=-0.4)  # low_res draws its side once per batch
        sampler = EpochSampler(50, shuffle=True, seed=0)
        loader = DeviceLoader(images, torch.arange(50), 8, sampler, augment, steps_per_call=steps_per_call)
        return torch.cat([batch[0] for batch in loader])

    assert torch.equal(served(1), served(3)) and not torch.equal(served(1), images)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"batch_size": 0}, "batch_size=0"),
        ({"val_size": 70_000}, "val_size=70000"),
        ({"val_size": 0}, "val_size=0"),
        ({"train_size": 60_000}, "train_size=60000"),
        ({"loader": "ffcv"}, "loader='ffcv'"),
    ],
)
def test_bad_datamodule_arguments(kwargs, message):
    with pytest.raises(DigitsError, match=message):
        shipped("mnist", **kwargs)


def test_corrupt_archive_is_reported_by_name(data_dir, tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for f in (data_dir / "MNIST" / "raw").glob("*.gz"):
        (raw / f.name).write_bytes(f.read_bytes())
    (raw / "t10k-labels-idx1-ubyte.gz").write_bytes(b"not a gzip file")
    with pytest.raises(DigitsError, match=r"t10k-labels-idx1-ubyte.gz fails its md5 check"):
        shipped("mnist", data_dir=tmp_path, download=False).prepare_data()


def test_missing_file_without_download_is_reported_by_name(tmp_path):
    with pytest.raises(DigitsError, match=r"train-images-idx3-ubyte.gz is missing"):
        shipped("fashion", data_dir=tmp_path, download=False).prepare_data()


@pytest.mark.slow
def test_runs_starting_at_once_on_a_fresh_data_dir_each_read_whole_files(tmp_path, data_dir):
    """torchvision extracts the .gz files in place: without the data dir's lock, a second run would read one
    half-written."""
    raw = tmp_path / "data" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for gz in (data_dir / "MNIST" / "raw").glob("*.gz"):
        shutil.copy(gz, raw)
    code = (
        "from digits.data import shipped; "
        f"dm = shipped('mnist', data_dir={str(tmp_path / 'data')!r}); dm.prepare_data(); dm.setup(); "
        "print(len(dm.tensors('train')[1]), len(dm.tensors('test')[1]))"
    )
    runs = [subprocess.Popen([sys.executable, "-c", code], stdout=PIPE, stderr=PIPE, text=True) for _ in range(3)]
    outputs = [run.communicate(timeout=300) for run in runs]
    assert [run.returncode for run in runs] == [0, 0, 0], [err[-600:] for _, err in outputs]
    assert [out.split() for out, _ in outputs] == [["55000", "10000"]] * 3


@pytest.mark.parametrize("limit", [{"limit_train_batches": 3}, {"fast_dev_run": True}])
def test_a_count_of_training_batches_counts_optimizer_steps(data_dir, limit):
    """Lightning counts the calls to training_step; where a run limits them by number, each call is one batch."""
    from functools import partial

    import lightning as L

    from digits.models import MLP
    from digits.module import Classifier

    datamodule = shipped("mnist", data_dir=data_dir, train_size=2000, val_size=500, steps_per_call=8)
    module = Classifier(MLP(hidden_size=16), optimizer=partial(torch.optim.Adam, lr=1e-3))
    trainer = L.Trainer(
        accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, **limit,
    )  # fmt: skip
    trainer.fit(module, datamodule=datamodule)
    assert trainer.global_step == (3 if "limit_train_batches" in limit else 1)  # of 16 batches in the epoch
