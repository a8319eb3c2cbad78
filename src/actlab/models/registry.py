"""Model registry: build an architecture, then give every activation site the requested activation."""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from ..activations import get_spec, list_activations
from ..convert import convert
from . import bottleneck, cifar, mobile, transformers

IIEU_DC = "iieu_dc"  # IIEU-B everywhere plus the Dynamic Coupler at every residual fusion


@dataclass(frozen=True)
class ModelSpec:
    """How to build one architecture.

    Args:
        name: registry name.
        builder: ``builder(num_classes=, image_size=, in_channels=, **kw) -> nn.Module`` with its native
            activation (``native_act``) at every site.
        native_act: the registered activation the builder uses (``"relu"`` or ``"gelu"``).
        residual: the builder takes ``fuse=`` ("add" | "coupler"), so ``iieu_dc`` applies.
        iieu_placement: the builder takes ``iieu_placement=`` (the IIEU paper's bottleneck placement).
        summary: one line for ``actlab list models``.
        family: ``"cnn"`` or ``"transformer"`` (which training recipe suits it).
        options: the architecture keywords a run config may set (``width``, ``dropout``,
            ``drop_path_rate``); None: any (timm / torchvision models, whose builders check them).
    """

    name: str
    builder: Callable[..., nn.Module]
    native_act: str
    residual: bool = False
    iieu_placement: bool = False
    summary: str = ""
    family: str = "cnn"
    options: tuple[str, ...] | None = ()


def _sized(fn):  # builders that take no image_size
    return lambda image_size=None, **kw: fn(**kw)


MODELS: dict[str, ModelSpec] = {s.name: s for s in [
    ModelSpec("resnet20", _sized(cifar.resnet20), "relu", residual=True, summary="CIFAR ResNet-20 (He et al.)"),
    ModelSpec("resnet18", _sized(cifar.resnet18), "relu", residual=True, summary="ResNet-18, CIFAR form"),
    ModelSpec("vgg11", _sized(cifar.vgg11), "relu", summary="VGG-11 with BatchNorm, CIFAR form"),
    ModelSpec("alexnet", _sized(cifar.alexnet), "relu", summary="AlexNet, CIFAR form (3x3 convs, BatchNorm)"),
    ModelSpec("resnet14", bottleneck.resnet14, "relu", residual=True, iieu_placement=True,
              summary="IIEU paper's bottleneck ResNet-14"),
    ModelSpec("resnet26", bottleneck.resnet26, "relu", residual=True, iieu_placement=True,
              summary="IIEU paper's bottleneck ResNet-26"),
    ModelSpec("resnet50", bottleneck.resnet50, "relu", residual=True, iieu_placement=True,
              summary="bottleneck ResNet-50 (IIEU placement with iieu_b / iieu_dc)"),
    ModelSpec("mobilenet_v2", mobile.mobilenet_v2, "relu6", residual=True,
              summary="torchvision MobileNetV2, width= and dropout= options",
              options=("width", "dropout")),
    ModelSpec("shufflenet_v2", mobile.shufflenet_v2, "relu", summary="torchvision ShuffleNetV2 1.0x"),
    ModelSpec("vit_tiny", transformers.vit_tiny, "gelu", summary="timm ViT-Tiny (patch 4 at 32x32)", family="transformer", options=("drop_path_rate",)),
    ModelSpec("cait_xxs24", transformers.cait_xxs24, "gelu", summary="timm CaiT-XXS24", family="transformer", options=("drop_path_rate",)),
    ModelSpec("pvt_tiny", transformers.pvt_tiny, "gelu", summary="timm pvt_v2_b0, stand-in for PVT-Tiny", family="transformer", options=("drop_path_rate",)),
    ModelSpec("tnt_small", transformers.tnt_small, "gelu", summary="timm TNT-S", family="transformer", options=("drop_path_rate",)),
    ModelSpec("vit_micro", transformers.vit_micro, "gelu", summary="tiny ViT for CPU runs (64 wide, 4 deep)", family="transformer", options=("drop_path_rate",)),
]}

# model variants: names that `act` takes besides the registered activations, each the activation put at
# every site plus a change of the architecture itself
VARIANTS = {IIEU_DC: "iieu_b"}


# any classifier of these libraries by name ("timm:convnext_atto", "torchvision:resnet50"), random init
LIBRARIES = ("timm", "torchvision")
_TRANSFORMER_NAMES = re.compile(r"vit|deit|cait|swin|tnt|pvt|beit|eva|xcit|coat|levit|mixer|mlp|former|crossvit|twins|"
                                r"gcvit|edgenext|mobilevit|fastvit|hiera|davit|nest|sequencer")


def list_models() -> list[str]:
    """The zoo's names (``timm:NAME`` and ``torchvision:NAME`` take any classifier of those libraries)."""
    return sorted(MODELS)


def _library_spec(name: str) -> ModelSpec:
    library, _, arch = name.partition(":")
    if library not in LIBRARIES or not arch:
        raise ValueError(f"unknown model {name!r}; choose from {list_models()} or timm:NAME / torchvision:NAME")
    if library == "timm":
        import timm

        if not timm.is_model(arch):
            raise ValueError(f"timm has no model {arch!r} (timm.list_models() lists them)")
    else:
        import torchvision

        if arch not in torchvision.models.list_models(module=torchvision.models):
            raise ValueError(f"torchvision has no classifier {arch!r} (torchvision.models.list_models() lists them)")
    family = "transformer" if _TRANSFORMER_NAMES.search(arch) else "cnn"
    return ModelSpec(name, functools.partial(_build_library, library, arch), native_act="",
                     summary=f"{library} {arch}, random init, converted to the activation", family=family,
                     options=None)


def _build_library(library: str, arch: str, num_classes: int, image_size: int, in_channels: int = 3,
                   **kw) -> nn.Module:
    """A timm / torchvision classifier, randomly initialised (no download). A model whose patch embedding
    fixes the input size (ViTs) is built for ``image_size``."""
    if library == "timm":
        import timm

        model = timm.create_model(arch, pretrained=False, num_classes=num_classes, in_chans=in_channels, **kw)
        embed = getattr(model, "patch_embed", None)
        fixed = getattr(embed, "img_size", None)
        if fixed is not None and tuple(fixed) != (image_size, image_size) and "img_size" not in kw:
            model = timm.create_model(arch, pretrained=False, num_classes=num_classes, in_chans=in_channels,
                                      img_size=image_size, **kw)
        return model
    import torchvision

    if in_channels != 3:
        raise ValueError(f"torchvision:{arch} takes 3-channel images; this dataset has {in_channels}")
    if arch in AUX_HEADS:  # their training forward returns (logits, aux...): a classifier gives logits
        kw.setdefault("aux_logits", False)
    model = torchvision.models.get_model(arch, weights=None, num_classes=num_classes, **kw)
    if isinstance(getattr(model, "image_size", None), int) and model.image_size != image_size and "image_size" not in kw:
        model = torchvision.models.get_model(arch, weights=None, num_classes=num_classes, image_size=image_size, **kw)
    return model


AUX_HEADS = ("googlenet", "inception_v3")  # torchvision classifiers built without their auxiliary heads


def model_acts() -> list[str]:
    """Every name a model's ``act`` takes: the registered activations and the model variants."""
    return sorted([*list_activations(), *VARIANTS])


def site_activation(act: str) -> str:
    """The registered activation that ``act`` puts at every site (a variant's own, else ``act``)."""
    return VARIANTS.get(act, act)


def get_model_spec(name: str) -> ModelSpec:
    if name in MODELS:
        return MODELS[name]
    if ":" in name:
        return _library_spec(name)
    raise ValueError(f"unknown model {name!r}; choose from {list_models()} or timm:NAME / torchvision:NAME")


def unsupported(model: str, act: str) -> str | None:
    """Why ``model`` cannot take ``act`` (None when it can)."""
    if act == IIEU_DC and not get_model_spec(model).residual:
        if ":" in model:
            return f"iieu_dc replaces actlab's own residual fusion modules, which {model} does not have"
        return f"iieu_dc replaces residual adds; {model} has none"
    return None


def create_model(name: str, act: str = "relu", num_classes: int = 10, *, image_size: int = 32,
                 in_channels: int = 3, act_kwargs: dict | None = None, **kw) -> nn.Module:
    """Build ``name`` with activation ``act`` at every activation site.

    Args:
        name: one of ``list_models()``, or ``timm:NAME`` / ``torchvision:NAME`` for any classifier of those
            libraries (random init; every activation call converted to ``act``).
        act: a registered activation, or ``"iieu_dc"`` (IIEU-B plus the Dynamic Coupler at every residual
            fusion; residual models only). For the bottleneck ResNets ``iieu_b`` / ``iieu_dc`` also switch
            to the IIEU paper's placement.
        num_classes: the data's class count.
        image_size: the data's image height and width.
        in_channels: the data's channel count.
        act_kwargs: passed to every new activation (e.g. ``{"tau": 0.1}`` for DPA).
        **kw: passed to the architecture (``width=`` for mobilenet_v2, ``drop_path_rate=`` for transformers).
    Returns:
        the model; ``model.actlab_config`` holds the arguments that rebuild it.
    """
    spec = get_model_spec(name)
    if act not in VARIANTS:
        get_spec(act)  # unknown names fail here, naming the choices
    reason = unsupported(name, act)
    if reason:
        raise ValueError(f"{reason}; models that take it: {[m for m in MODELS if unsupported(m, act) is None]}")
    site_act = site_activation(act)
    arch_kw = dict(kw)
    if spec.residual:
        arch_kw.setdefault("fuse", "coupler" if act == IIEU_DC else "add")
    if spec.iieu_placement:
        arch_kw.setdefault("iieu_placement", site_act == "iieu_b")
    model = spec.builder(num_classes=num_classes, image_size=image_size, in_channels=in_channels, **arch_kw)
    if site_act != spec.native_act:
        example = torch.randn(2, in_channels, image_size, image_size)
        convert(model, site_act, num_classes=num_classes, example_input=example, **(act_kwargs or {}))
    model.actlab_config = {"name": name, "act": act, "num_classes": num_classes, "image_size": image_size,
                           "in_channels": in_channels, "act_kwargs": dict(act_kwargs or {}), **kw}
    return model


def model_stats(model: nn.Module, image_size: int = 32, in_channels: int = 3) -> dict[str, int]:
    """Parameters and FLOPs of one (1, C, S, S) forward (FLOPs count a multiply-add as 2, convs and matmuls
    only, as torch.utils.flop_counter does). Runs with autograd on: FlopCounterMode's module tracker fails
    under no_grad on models that expand parameters (timm CaiT's class token)."""
    params = sum(p.numel() for p in model.parameters())
    was_training = model.training
    model.eval()
    try:
        with FlopCounterMode(display=False) as counter:
            model(torch.zeros(1, in_channels, image_size, image_size, device=next(model.parameters()).device))
    finally:
        model.train(was_training)
    return {"params": params, "flops": int(counter.get_total_flops())}


__all__ = ["MODELS", "ModelSpec", "create_model", "get_model_spec", "list_activations", "list_models", "model_stats"]
