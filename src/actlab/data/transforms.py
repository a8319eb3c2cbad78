"""Training and test transforms on timm's data pipeline, so that a recipe names exactly the published
augmentation: timm's RandAugment / AutoAugment / AugMix strings, its RandomErasing modes, its
RandomResizedCrop and its eval resize-and-center-crop (``crop_pct``). The CIFAR-style pad-and-crop,
which timm does not have, replaces timm's crop with torchvision's ``RandomCrop(size, padding)``.

Images go in as uint8 tensors (C, H, W) or PIL images and come out as float tensors (C, size, size),
normalised with the dataset's mean and std when it has them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from torchvision import transforms as T
from torchvision.transforms import v2

CROPS = ("pad", "rrc", "none")
ERASE_MODES = ("const", "rand", "pixel")


@dataclass(frozen=True)
class Augment:
    """Training augmentation.

    Args:
        crop: "pad" (zero-pad by ``crop_padding``, random crop of the image size: CIFAR), "rrc" (timm's
            RandomResizedCrop with ``scale``: ImageNet, the DPA CIFAR recipes) or "none".
        crop_padding: pixels of padding for "pad".
        scale: RandomResizedCrop's area range for "rrc".
        flip: random horizontal flip with probability 0.5.
        auto_augment: a timm augmentation string, e.g. "rand-m9-mstd0.5-inc1" (RandAugment, timm's 0-10
            magnitude scale), "augmix-m5-w4-d2", "original" (AutoAugment); None for none.
        color_jitter: timm's color jitter strength (0: none; timm applies none when ``auto_augment`` is set).
        reprob: RandomErasing probability (after normalisation), ``remode`` its fill ("const", "rand",
            "pixel": per-pixel normal noise), ``recount`` the number of erased boxes.
        interpolation: of the resizing crops ("bilinear", "bicubic", "random").
    """

    crop: str = "pad"
    crop_padding: int = 4
    scale: tuple[float, float] = (0.08, 1.0)
    flip: bool = True
    auto_augment: str | None = None
    color_jitter: float = 0.0
    reprob: float = 0.0
    remode: str = "pixel"
    recount: int = 1
    interpolation: str = "bilinear"

    def __post_init__(self):
        if self.crop not in CROPS:
            raise ValueError(f"crop must be one of {CROPS}, got {self.crop!r}")
        if self.remode not in ERASE_MODES:
            raise ValueError(f"random erasing mode must be one of {ERASE_MODES}, got {self.remode!r}")
        if not 0 <= self.reprob <= 1:
            raise ValueError(f"random erasing probability must be in [0, 1], got {self.reprob}")


def _to_pil():
    """uint8 tensors to PIL (timm's augmentations work on PIL images); PIL images pass through."""
    return v2.ToPILImage()


def _fit(size: int, native_size: int | None) -> list:
    """Resize-and-center-crop to ``size`` unless the images already have it."""
    return [] if native_size == size else [T.Resize(size), T.CenterCrop(size)]


def train_transform(size: int, mean, std, augment: Augment | None, native_size: int | None = None):
    """The training transform: ``augment`` on timm's pipeline, or just the tensor conversion (and a resize
    to ``size``) when None. ``mean`` None: no normalisation (pixels in [0, 1])."""
    from timm.data import create_transform

    normalize = mean is not None
    fill = dict(mean=tuple(mean), std=tuple(std)) if normalize else dict(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    if augment is None:
        return T.Compose([_to_pil(), *_fit(size, native_size), *_final(mean, std)])
    primary, secondary, final = create_transform(
        size, is_training=True, scale=augment.scale, hflip=0.5 if augment.flip else 0.0,
        color_jitter=augment.color_jitter or None, auto_augment=augment.auto_augment,
        interpolation=augment.interpolation, re_prob=augment.reprob, re_mode=augment.remode,
        re_count=augment.recount, normalize=normalize, separate=True, **fill)
    if not normalize:  # timm's un-normalised output stays uint8 (for its GPU prefetcher): floats in [0, 1]
        from timm.data.random_erasing import RandomErasing

        erase = [RandomErasing(augment.reprob, mode=augment.remode, max_count=augment.recount, device="cpu")]
        final = T.Compose(_final(None, None) + (erase if augment.reprob > 0 else []))
    _safe_posterize(secondary)
    if augment.crop != "rrc":  # timm's primary is RandomResizedCrop + flip: keep its flip only
        crop = [T.RandomCrop(size, padding=augment.crop_padding)] if augment.crop == "pad" else []
        flips = [t for t in primary.transforms if isinstance(t, T.RandomHorizontalFlip)]
        primary = T.Compose([*_fit(size, native_size), *crop, *flips])
    return T.Compose([_to_pil(), primary, secondary, final])


def posterize(img, bits_to_keep, **_):
    """timm's posterize with the bit count clamped to what Pillow accepts (1 to 8): timm's increasing
    posterize asks for 0 bits at magnitude 10 (``rand-m9-mstd0.5`` draws it), which Pillow >= 11 refuses.
    One bit is the strongest posterize Pillow has; 8 or more leaves the image as it is."""
    from PIL import ImageOps

    if bits_to_keep >= 8:
        return img
    return ImageOps.posterize(img, max(1, int(bits_to_keep)))


def _augment_ops(transform) -> list:
    """Every timm AugmentOp inside ``transform`` (RandAugment's ops, AutoAugment's sub-policies, AugMix)."""
    found, stack = [], [transform]
    while stack:
        t = stack.pop()
        if hasattr(t, "aug_fn"):
            found.append(t)
            continue
        for attr in ("transforms", "ops", "policy"):
            items = getattr(t, attr, None)
            if isinstance(items, (list, tuple)):
                stack.extend(items)
        if isinstance(t, (list, tuple)):
            stack.extend(t)
    return found


def _safe_posterize(transform) -> None:
    """Swap timm's posterize for ``posterize`` in the augmentation ops of ``transform`` (no global patch)."""
    from timm.data import auto_augment

    for op in _augment_ops(transform):
        if op.aug_fn is auto_augment.posterize:
            op.aug_fn = posterize


def _final(mean, std) -> list:
    ops: list = [T.ToTensor()]
    if mean is not None:
        ops.append(T.Normalize(mean, std))
    return ops


def eval_transform(size: int, mean, std, crop_pct: float = 1.0, interpolation: str = "bilinear",
                   native_size: int | None = None):
    """The test view: resize the shorter side to floor(``size / crop_pct``), center crop ``size``, normalise
    (timm's eval view: crop_pct 0.875 gives 256 -> 224 and 36 -> 32; a 1e-6 margin keeps a crop_pct of
    32 / 36 written to 7 digits at 36). ``crop_pct`` 1 on images of the model's size: no resize at all."""
    from timm.data.transforms import str_to_interp_mode

    view = []
    if not (crop_pct == 1.0 and native_size == size):
        mode = str_to_interp_mode("bilinear" if interpolation == "random" else interpolation)
        view = [T.Resize(math.floor(size / crop_pct + 1e-6), interpolation=mode), T.CenterCrop(size)]
    return T.Compose([_to_pil(), *view, *_final(mean, std)])


def check_auto_augment(spec: str) -> None:
    """Raise ValueError naming the problem when timm cannot build the augmentation string ``spec``."""
    from timm.data import create_transform

    if not spec.startswith(("rand", "augmix", "original", "v0", "3a")):
        raise ValueError(f"auto_augment {spec!r}: expected a timm string starting with rand-, augmix-, original, "
                         "v0 or 3a (e.g. rand-m9-mstd0.5-inc1)")
    try:
        create_transform(8, is_training=True, auto_augment=spec)
    except Exception as exc:  # noqa: BLE001 - timm raises assorted errors for malformed strings
        raise ValueError(f"auto_augment {spec!r} is not a valid timm augmentation string ({exc})") from None


def describe(transform) -> list[str]:
    """The transform as one line per step, nested Compose flattened (for ``actlab train --dry-run``)."""
    steps = []
    for t in getattr(transform, "transforms", [transform]):
        if hasattr(t, "transforms") and not hasattr(t, "ops"):
            steps.extend(describe(t))
        else:
            steps.append(" ".join(repr(t).split()))
    return steps


__all__ = ["Augment", "CROPS", "ERASE_MODES", "check_auto_augment", "describe", "eval_transform", "train_transform"]
