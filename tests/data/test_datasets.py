"""Datasets: the offline ones, and CIFAR / ImageFolder read from small files in the real on-disk formats."""
import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from actlab.data import build_datasets, make_loaders
from actlab.data.datasets import CIFAR_LAYOUT


def test_digits_fixed_split_raw_pixels():
    train, test, info = build_datasets("digits", augment=False)
    assert (len(train), len(test)) == (1797 - 359, 359)
    assert (info.num_classes, info.image_size) == (10, 32)
    x, y = test[0]
    assert x.shape == (3, 32, 32) and 0 <= y < 10
    assert x.min() == 0.0 and x.max() <= 1.0  # raw [0, 1] pixels: the black background stays exactly 0
    again = build_datasets("digits", augment=False)[1]
    assert torch.equal(again.images, test.images)  # the split is fixed
    assert not set(map(bytes, train.images.numpy()[:, 0])) & set(map(bytes, test.images.numpy()[:, 0]))


def test_digits_augmentation_keeps_orientation():
    from actlab.data.transforms import describe

    train, _, _ = build_datasets("digits")
    steps = describe(train.transform)
    assert "RandomCrop(size=(32, 32), padding=2)" in steps
    assert not any("Flip" in s for s in steps)  # a flipped 2 is no 2


def write_cifar(root, name, n_train, n_test, classes):
    folder, train_files, test_file, key = CIFAR_LAYOUT[name]
    os.makedirs(os.path.join(root, folder))
    rng = np.random.default_rng(0)
    expected = {}
    for fname, n in [(f, n_train) for f in train_files] + [(test_file, n_test)]:
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = rng.integers(0, classes, n).tolist()
        with open(os.path.join(root, folder, fname), "wb") as f:
            pickle.dump({"data": data, key: labels, "filenames": [b"x"] * n}, f)
        expected[fname] = (data, labels)
    return expected


@pytest.mark.parametrize("name,classes", [("cifar10", 10), ("cifar100", 100)])
def test_cifar_reads_the_python_batches(tmp_path, name, classes):
    expected = write_cifar(str(tmp_path), name, 6, 4, classes)
    train, test, info = build_datasets(name, str(tmp_path), augment=False)
    folder, train_files, test_file, _ = CIFAR_LAYOUT[name]
    assert len(train) == 6 * len(train_files) and len(test) == 4 and info.num_classes == classes
    data, labels = expected[test_file]
    assert torch.equal(test.images[2], torch.from_numpy(data[2].reshape(3, 32, 32)))  # channel-major rows
    assert test.labels.tolist() == labels
    x, _ = train[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32


def test_cifar_missing_and_corrupt_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"cifar-10-batches-py.*data_batch_1.*--data-dir"):
        build_datasets("cifar10", str(tmp_path))
    write_cifar(str(tmp_path), "cifar10", 2, 2, 10)
    with open(tmp_path / "cifar-10-batches-py" / "data_batch_3", "wb") as f:
        f.write(b"not a pickle")
    with pytest.raises(ValueError, match="data_batch_3 is not a readable CIFAR batch"):
        build_datasets("cifar10", str(tmp_path))


def test_imagefolder_train_val(tmp_path):
    for split, n in (("train", 3), ("val", 2)):
        for c, colour in (("cat", (255, 0, 0)), ("dog", (0, 0, 255))):
            os.makedirs(tmp_path / split / c)
            for i in range(n):
                Image.new("RGB", (40, 30), colour).save(tmp_path / split / c / f"{i}.jpg")
    train, test, info = build_datasets("imagefolder", str(tmp_path), image_size=24)
    assert (len(train), len(test), info.num_classes) == (6, 4, 2)
    x, y = test[0]
    assert x.shape == (3, 24, 24) and y == 0
    assert x[0].mean() > x[2].mean()  # red stays red through the transform (normalised)
    with pytest.raises(FileNotFoundError, match=r"train/train not found"):
        build_datasets("imagefolder", str(tmp_path / "train"))
    with pytest.raises(ValueError, match="needs --data-dir"):
        build_datasets("imagenet")


def test_unknown_dataset():
    with pytest.raises(ValueError, match="unknown dataset 'mnist'"):
        build_datasets("mnist")


def test_loader_order_depends_only_on_seed_and_epoch():
    train, test, _ = build_datasets("synthetic", augment=False)
    orders = []
    for _ in range(2):
        loader, _ = make_loaders(train, test, 64, seed=3)
        loader.sampler.set_epoch(1)
        orders.append(torch.cat([y for _, y in loader]))
    assert torch.equal(*orders)
    loader.sampler.set_epoch(2)
    assert not torch.equal(orders[0], torch.cat([y for _, y in loader]))
    with pytest.raises(ValueError, match="larger than the training set"):
        make_loaders(train, test, 10_000)


def test_timm_augmentation_options():
    """A recipe's augmentation is timm's, as named: RandAugment string, erasing mode, resized crop, eval view."""
    from actlab.data.transforms import describe

    train, test, _ = build_datasets("synthetic", augment_options={
        "auto_augment": "rand-m9-mstd0.5-inc1", "reprob": 0.25, "remode": "pixel", "crop": "rrc"},
        eval_crop_pct=32 / 36)
    steps = describe(train.transform)
    assert any(s.startswith("RandomResizedCropAndInterpolation(size=(32, 32), scale=(0.08, 1.0)") for s in steps)
    assert any(s.startswith("RandAugment(n=2, ops= AugmentOp(name=AutoContrast, p=0.5, m=9, mstd=0.5)") for s in steps)
    assert "RandomErasing(p=0.25, mode=pixel, count=(1, 1))" in steps
    assert describe(test.transform)[1:3] == ["Resize(size=36, interpolation=bilinear, max_size=None, antialias=True)",
                                             "CenterCrop(size=(32, 32))"]
    x, _ = train[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    with pytest.raises(ValueError, match="random erasing mode must be one of"):
        build_datasets("synthetic", augment_options={"remode": "zeros"})


def test_unaugmented_views_are_the_plain_pixels():
    """Without augmentation and with images already of the model's size, the test view is the image itself,
    in [0, 1] for the un-normalised offline sets (the digits' black background stays exactly 0)."""
    from actlab.data.datasets import digits_arrays

    _, test, _ = build_datasets("digits", augment=False)
    x, _ = test[0]
    assert x.dtype == torch.float32 and float(x.min()) == 0.0 and float(x.max()) <= 1.0
    images = {tuple(img.float().div(255).flatten()[:64].tolist()) for img in digits_arrays(32)[0]}
    assert tuple(x.flatten()[:64].tolist()) in images


def test_rank_slices_gathered_rank_major_are_the_single_process_batches():
    train, test, _ = build_datasets("synthetic", augment=False)  # 512 train, 128 test
    world, per_rank = 3, 40  # 512 // 120 = 4 global batches; 32 samples dropped
    single, _ = make_loaders(train, test, per_rank * world, seed=5)
    ranks = [make_loaders(train, test, per_rank, seed=5, rank=r, world=world) for r in range(world)]
    for epoch in (0, 1):
        single.sampler.set_epoch(epoch)
        for loader, _ in ranks:
            loader.sampler.set_epoch(epoch)
        expected = list(single.sampler)[: 4 * per_rank * world]
        slices = [list(loader.sampler) for loader, _ in ranks]
        assert all(len(s) == 4 * per_rank for s in slices) and len(single) == 4
        gathered = [i for step in range(4) for s in slices for i in s[step * per_rank:(step + 1) * per_rank]]
        assert gathered == expected
    shards = sorted(i for _, test_loader in ranks for i in test_loader.sampler)
    assert shards == list(range(len(test)))  # each test sample exactly once, no padding


def test_randaugment_at_full_magnitude_never_asks_pillow_for_zero_bits():
    """rand-m9-mstd0.5 draws magnitude 10 now and then, where timm's increasing posterize keeps 0 bits,
    which Pillow refuses; actlab's augmentation clamps it to 1 bit (m10 with no spread hits it every time
    posterize is drawn). The other ops still run as timm's."""
    import random

    from PIL import Image

    from actlab.data.transforms import Augment, posterize, train_transform

    transform = train_transform(16, None, None, Augment(crop="none", flip=False, auto_augment="rand-m10-mstd0-inc1"))
    image = torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8)
    random.seed(0)
    np.random.seed(0)
    for _ in range(200):  # 2 of 15 ops per image: posterize is drawn about 25 times
        assert transform(image).shape == (3, 16, 16)
    pil = Image.fromarray(image.permute(1, 2, 0).numpy())
    assert np.array_equal(np.asarray(posterize(pil, 0)), np.asarray(image.permute(1, 2, 0)) & 0x80)
    assert posterize(pil, 8) is pil


def test_a_seeded_sample_draws_as_under_its_seed_and_leaves_the_callers_streams():
    """``SeededSamples``: a sample's draws are those of Python's, NumPy's and torch's RNGs seeded with its
    ``sample_seed``, and the loading process's own streams continue as if nothing was drawn."""
    import random

    from actlab.data.loaders import SeededSamples, sample_seed

    class Draws(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return torch.rand(3), random.random(), float(np.random.rand())

    def streams():
        return torch.rand(2), random.random(), float(np.random.rand())

    def seed_all(t, r, n):
        torch.manual_seed(t), random.seed(r), np.random.seed(n)

    seed_all(123, 1, 2)
    got = SeededSamples(Draws(), seed=7)[(3, 2)]
    after = streams()
    seed_all(123, 1, 2)
    untouched = streams()
    s = sample_seed(7, 3, 2)
    seed_all(s, s, s % 2**32)
    expected = Draws()[2]
    assert torch.equal(got[0], expected[0]) and got[1:] == expected[1:]
    assert torch.equal(after[0], untouched[0]) and after[1:] == untouched[1:]
    seed_all(123, 1, 2)
    batch = SeededSamples(Draws(), seed=7).__getitems__([(3, 2), (0, 1)])  # how the DataLoader asks
    after = streams()
    assert torch.equal(batch[0][0], got[0]) and batch[0][1:] == got[1:]
    assert torch.equal(batch[1][0], SeededSamples(Draws(), seed=7)[1][0])  # key i alone is (epoch 0, i)
    assert torch.equal(after[0], untouched[0]) and after[1:] == untouched[1:]
