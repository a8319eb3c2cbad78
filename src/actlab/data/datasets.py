"""Dataset builders. Every dataset yields ``(image, label)`` with image a normalised float tensor
(C, H, W) after its transform; ``DatasetInfo`` says what a model needs to know about it."""
from __future__ import annotations

import dataclasses
import os
import pickle
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .transforms import Augment, eval_transform, train_transform

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    num_classes: int
    image_size: int
    in_channels: int = 3


class TensorImages(Dataset):
    """uint8 images (N, C, H, W) with int64 labels (N,), transformed per sample."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: Callable | None = None):
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        if labels.shape != (images.shape[0],):
            raise ValueError(f"labels must be ({images.shape[0]},), got {tuple(labels.shape)}")
        self.images, self.labels, self.transform = images, labels.long(), transform

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int):
        img = self.images[i]
        return (self.transform(img) if self.transform else img.float() / 255), int(self.labels[i])


# ----------------------------------------------------------------------------------------- digits

DIGITS_TEST_FRACTION = 0.2


def digits_arrays(image_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's bundled 8x8 handwritten digits (1797, values 0..16) as uint8 (N, 3, S, S) images on a
    black background (grey repeated over 3 channels, so every model takes them), bilinear resize."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.from_numpy(bunch.images).float().div(16.0).unsqueeze(1)  # [0, 1]
    x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    x = (x.clamp(0, 1) * 255).round().to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    return x, torch.from_numpy(bunch.target).long()


def build_digits(data_dir, size, train_t, test_t, download=False):
    x, y = digits_arrays(size)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))  # fixed split, same everywhere
    n_test = int(round(len(y) * DIGITS_TEST_FRACTION))
    test_idx, train_idx = perm[:n_test], perm[n_test:]
    # raw [0, 1] pixels, no mean subtraction: the black background stays exactly zero (IIEU-B's zero patches)
    train = TensorImages(x[train_idx], y[train_idx], train_t)
    test = TensorImages(x[test_idx], y[test_idx], test_t)
    return train, test, DatasetInfo("digits", 10, size)


# -------------------------------------------------------------------------------------- synthetic

def synthetic_arrays(n: int, num_classes: int, image_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Learnable generated images: a fixed smooth template per class plus per-sample noise and shift."""
    g = torch.Generator().manual_seed(1234)  # templates are shared by train and test
    templates = F.interpolate(torch.rand(num_classes, 3, 4, 4, generator=g), size=(image_size, image_size),
                              mode="bilinear", align_corners=False)
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, num_classes, (n,), generator=g)
    x = templates[y] + 0.25 * torch.randn(n, 3, image_size, image_size, generator=g)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8), y


def build_synthetic(data_dir, size, train_t, test_t, download=False, n_train=512, n_test=128, num_classes=10):
    train = TensorImages(*synthetic_arrays(n_train, num_classes, size, seed=0), train_t)
    test = TensorImages(*synthetic_arrays(n_test, num_classes, size, seed=1), test_t)
    return train, test, DatasetInfo("synthetic", num_classes, size)


# ------------------------------------------------------------------------------------------ CIFAR

CIFAR_LAYOUT = {  # folder, train files, test file, label key
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], "test_batch", "labels"),
    "cifar100": ("cifar-100-python", ["train"], "test", "fine_labels"),
}


def read_cifar(root: str, name: str, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The CIFAR python-pickle batches under ``root`` (as unpacked from the official archive) as uint8
    (N, 3, 32, 32) images and labels. Missing or unreadable files raise naming the path."""
    folder, train_files, test_file, key = CIFAR_LAYOUT[name]
    images, labels = [], []
    for fname in train_files if train else [test_file]:
        path = os.path.join(root, folder, fname)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{name}: {path} not found. Pass --data-dir pointing to the folder that holds {folder}/, "
                f"or --download when online to fetch it there.")
        try:
            with open(path, "rb") as f:
                batch = pickle.load(f, encoding="latin1")
            images.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            labels.append(np.asarray(batch[key], dtype=np.int64))
        except Exception as exc:  # noqa: BLE001 - any unreadable batch is reported with its path
            raise ValueError(f"{name}: {path} is not a readable CIFAR batch ({type(exc).__name__}: {exc}); "
                             "delete it and download again") from exc
    x, y = torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels))
    if len(x) != len(y):
        raise ValueError(f"{name}: {len(x)} images but {len(y)} labels under {os.path.join(root, folder)}")
    return x, y


def _download_cifar(root: str, name: str) -> None:
    from torchvision import datasets

    cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    try:
        cls(root, train=True, download=True)  # verifies the archive's md5
    except Exception as exc:  # noqa: BLE001 - offline, proxy, disk full: say where and what
        raise RuntimeError(f"{name}: download into {root} failed ({type(exc).__name__}: {exc}). When offline, "
                           f"put the extracted {CIFAR_LAYOUT[name][0]}/ folder there and pass --data-dir.") from exc


def _cifar_builder(name: str, num_classes: int):
    def build(data_dir, size, train_t, test_t, download=False):
        root = data_dir or os.path.join("data", name)
        if download and not os.path.isdir(os.path.join(root, CIFAR_LAYOUT[name][0])):
            _download_cifar(root, name)
        train = TensorImages(*read_cifar(root, name, True), train_t)
        test = TensorImages(*read_cifar(root, name, False), test_t)
        return train, test, DatasetInfo(name, num_classes, size)
    return build


# ------------------------------------------------------------------------------- ImageFolder / ImageNet

def _imagefolder_builder(name: str):
    def build(data_dir, size, train_t, test_t, download=False):
        from torchvision.datasets import ImageFolder

        if download:
            raise ValueError(f"{name} cannot be downloaded by actlab; point --data-dir at a folder with "
                             "train/ and val/ subfolders of class folders")
        if not data_dir:
            raise ValueError(f"{name} needs --data-dir: a folder with train/ and val/ subfolders of class folders")
        folders = {}
        for split in ("train", "val"):
            path = os.path.join(data_dir, split)
            if not os.path.isdir(path):
                raise FileNotFoundError(f"{name}: {path} not found; expected {data_dir}/train/<class>/*.jpg and "
                                        f"{data_dir}/val/<class>/*.jpg")
            folders[split] = path
        train = ImageFolder(folders["train"], train_t)
        test = ImageFolder(folders["val"], test_t)
        if train.classes != test.classes:
            raise ValueError(f"{name}: train/ and val/ hold different class folders "
                             f"({len(train.classes)} vs {len(test.classes)})")
        return train, test, DatasetInfo(name, len(train.classes), size)
    return build


@dataclass(frozen=True)
class DatasetSpec:
    """How to build one dataset.

    Args:
        builder: ``builder(data_dir, size, train_transform, test_transform, download)`` ->
            (train, test, DatasetInfo).
        augment: its standard training augmentation.
        mean, std: normalisation (None: pixels stay in [0, 1]).
        size: its own image size (None: varies, as in ImageFolder); also the default model input size.
        eval_crop_pct: the test view's crop fraction (timm's crop_pct; 1: the whole image).
    """

    builder: Callable
    augment: Augment
    mean: tuple | None
    std: tuple | None
    size: int | None
    eval_crop_pct: float = 1.0


# raw [0, 1] pixels for digits, no mean subtraction: the black background stays exactly zero (IIEU-B's
# zero patches)
DATASETS: dict[str, DatasetSpec] = {
    "digits": DatasetSpec(build_digits, Augment(crop_padding=2, flip=False), None, None, 32),
    "synthetic": DatasetSpec(build_synthetic, Augment(crop_padding=2, flip=False), None, None, 32),
    "cifar10": DatasetSpec(_cifar_builder("cifar10", 10), Augment(), CIFAR_MEAN, CIFAR_STD, 32),
    "cifar100": DatasetSpec(_cifar_builder("cifar100", 100), Augment(), CIFAR_MEAN, CIFAR_STD, 32),
    "imagenet": DatasetSpec(_imagefolder_builder("imagenet"), Augment(crop="rrc"), IMAGENET_MEAN, IMAGENET_STD,
                            None, eval_crop_pct=0.875),
    "imagefolder": DatasetSpec(_imagefolder_builder("imagefolder"), Augment(crop="rrc"), IMAGENET_MEAN,
                               IMAGENET_STD, None, eval_crop_pct=0.875),
}
GENERATED = ("digits", "synthetic")  # made at the requested size


def list_datasets() -> list[str]:
    return sorted(DATASETS)


def _spec(name: str) -> DatasetSpec:
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose from {list_datasets()}")
    return DATASETS[name]


def dataset_transforms(name: str, *, image_size: int | None = None, augment: bool = True,
                       augment_options: dict | None = None, eval_crop_pct: float | None = None,
                       eval_interpolation: str = "bilinear", mean=None, std=None):
    """The (train, test) transforms ``build_datasets`` gives ``name``, without reading any data.

    Args:
        augment: the dataset's standard training augmentation (else none but what ``augment_options`` adds).
        augment_options: fields of ``Augment`` that replace the dataset's (e.g. ``{"auto_augment":
            "rand-m9-mstd0.5-inc1", "reprob": 0.25}``).
        eval_crop_pct: the test view's crop fraction (default: the dataset's); ``eval_interpolation`` its resize.
        mean, std: normalisation instead of the dataset's (a published recipe's constants).
    """
    spec = _spec(name)
    mean, std = (spec.mean, spec.std) if mean is None else (tuple(mean), tuple(std))
    size = image_size or spec.size or 224
    native = size if name in GENERATED else spec.size
    options = dict(augment_options or {})
    aug = None
    if augment or options:
        base = spec.augment if augment else Augment(crop="none", flip=False)
        aug = dataclasses.replace(base, **options)
    crop_pct = spec.eval_crop_pct if eval_crop_pct is None else eval_crop_pct
    return (train_transform(size, mean, std, aug, native),
            eval_transform(size, mean, std, crop_pct, eval_interpolation, native))


def build_datasets(name: str, data_dir: str | None = None, *, image_size: int | None = None,
                   augment: bool = True, augment_options: dict | None = None, eval_crop_pct: float | None = None,
                   eval_interpolation: str = "bilinear", mean=None, std=None, download: bool = False):
    """Train and test datasets and their ``DatasetInfo``.

    Args:
        name: one of ``list_datasets()``.
        data_dir: where the files are (CIFAR: the folder holding ``cifar-10-batches-py/``; ImageFolder:
            the folder holding ``train/`` and ``val/``). Offline datasets ignore it.
        image_size: resize to this (default: the dataset's own, 32 for digits/CIFAR, 224 for ImageFolder).
        augment: the dataset's standard training augmentation (else none but what ``augment_options`` adds).
        augment_options: fields of ``actlab.data.transforms.Augment`` that replace the dataset's (e.g.
            ``{"crop": "rrc", "auto_augment": "rand-m9-mstd0.5-inc1", "reprob": 0.25}``).
        eval_crop_pct: the test view's crop fraction (default: the dataset's).
        eval_interpolation: the test view's resize interpolation.
        mean: normalisation mean instead of the dataset's (a published recipe's constants).
        std: normalisation std instead of the dataset's.
        download: fetch CIFAR when missing (needs network).
    """
    spec = _spec(name)
    train_t, test_t = dataset_transforms(name, image_size=image_size, augment=augment,
                                         augment_options=augment_options, eval_crop_pct=eval_crop_pct,
                                         eval_interpolation=eval_interpolation, mean=mean, std=std)
    return spec.builder(data_dir, image_size or spec.size or 224, train_t, test_t, download)
