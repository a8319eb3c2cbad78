"""Name -> factory registry of activations.

Each entry says whether the activation needs the site's channel count, which tensor layouts it accepts
and whether it needs a producing layer (IIEU-B reads the producer's input and filters).
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Callable

import torch.nn as nn

# conv maps (B, C, H, W), flat features (B, C), tokens (B, N, C), maps stored channels last (B, *S, C)
LAYOUTS = ("nchw", "nc", "nlc", "nhwc")


@dataclass(frozen=True)
class Site:
    """Everything ``convert`` found out about one activation call: the one description of a site that
    every activation reads to decide whether it can sit there and how it is built (``ActivationSpec.build``).

    Args:
        channels: the input's channel count; None where its layout has no channel dim actlab knows.
        layout: the input's layout: one of ``LAYOUTS``, or ``"none"`` (no shape seen) / ``"<rank>-d"``.
        in_shape: the input's shape in the example forward, whose batch size is ``batch``.
        batch: the example forward's batch size.
        producer: the Conv2d / Linear (or transformers ``Conv1D``) that made the input, or None.
        no_producer: why there is no producer (e.g. "its input is made by a residual add"), when None.
        norm: the norm between the producer and the activation, or None.
        num_classes: the model's class count (None when unknown).
        class_token: the input is (B, N, C) tokens with the class token first, and the model classifies
            from that token.
        producer_slice: ``(start, stop)`` when the input is only those output features of a Linear
            producer (a gated MLP's ``fc1(x).chunk(2, -1)``), else None.
    """

    channels: int | None
    layout: str
    in_shape: tuple[int, ...] | None
    batch: int
    producer: nn.Module | None = None
    no_producer: str = ""
    norm: nn.Module | None = None
    num_classes: int | None = None
    class_token: bool = False
    producer_slice: tuple[int, int] | None = None


class SiteMismatch(ValueError):
    """The activation cannot sit at this site; the message says why (the site is then left as it was)."""


@dataclass(frozen=True)
class ActivationSpec:
    """What the registry knows about one activation.

    Args:
        name: canonical lower-case name.
        factory: callable returning the module; receives ``channels=`` when ``needs_channels``.
        needs_channels: the module has per-channel state and must know the channel count.
        layouts: input layouts it accepts (subset of ``LAYOUTS``). ``"nhwc"`` (maps stored channels last, the
            MLPs of ConvNeXt and Swin) only for a factory that takes ``nhwc=True``.
        needs_producer: the module must be bound to the Conv2d/Linear that feeds it (IIEU-B).
        needs_num_classes: the module keeps per-class state (DPA).
        summary: one line for ``actlab list``.
        from_site: ``from_site(site, **kwargs) -> module`` for activations that take more from the site
            than its channel count (default: ``factory(channels=site.channels, **kwargs)``); raises
            ``SiteMismatch`` where it cannot sit.
    """

    name: str
    factory: Callable[..., nn.Module]
    needs_channels: bool = False
    layouts: tuple[str, ...] = ("nchw", "nc", "nlc")
    needs_producer: bool = False
    needs_num_classes: bool = False
    summary: str = ""
    aliases: tuple[str, ...] = field(default=())
    from_site: Callable[..., nn.Module] | None = None

    def build(self, site: Site | None, kwargs: dict) -> nn.Module:
        """The module for one site, or ``SiteMismatch`` saying why this activation cannot sit there. The
        one place that decides it: the layout, the producer, then ``from_site`` for what else it reads.

        Args:
            site: the site; None for an activation module the example forward never called (only an
                activation without per-channel state can replace it).
            kwargs: the user's settings for the activation.
        """
        if site is None:
            if self.needs_channels:
                raise SiteMismatch("not called during the example forward, so its channel count is unknown")
            return self.create(None, kwargs)
        if self.needs_producer and site.producer is None:
            raise SiteMismatch(site.no_producer or f"{self.name} needs the Conv2d or Linear that produces its input")
        if self.needs_channels and (site.channels is None or site.layout not in self.layouts):
            raise SiteMismatch(f"{self.name} does not take this input layout (shape {site.in_shape})")
        if self.from_site is not None:
            return self.from_site(site, **kwargs)
        if site.layout == "nhwc" and self.needs_channels:
            kwargs = {**kwargs, "nhwc": True}
        return self.create(site.channels, kwargs)

    def create(self, channels: int | None, kwargs: dict) -> nn.Module:
        """The module from its factory alone: ``channels=`` goes to activations with per-channel state
        (ValueError when it is missing or not positive) and is ignored by the others."""
        if not self.needs_channels:
            return self.factory(**kwargs)
        if channels is None:
            raise ValueError(f"activation {self.name!r} has per-channel state: pass channels=")
        if int(channels) <= 0:
            raise ValueError(f"channels must be positive, got {channels}")
        return self.factory(channels=int(channels), **kwargs)

    # set from the site (by build, from what convert found), never by a user's settings
    SITE_ARGUMENTS = ("channels", "num_classes", "producer", "capture", "nhwc")

    def check_kwargs(self, kwargs: dict) -> None:
        """Raise ValueError naming the settings this activation does not take, and any setting that is a
        non-finite number (a NaN threshold would silently turn a unit into the identity)."""
        bad = sorted(k for k, v in kwargs.items() if isinstance(v, float) and not math.isfinite(v))
        if bad:
            raise ValueError(f"activation {self.name!r}: setting(s) {bad} must be finite numbers, got "
                             + ", ".join(f"{k}={kwargs[k]!r}" for k in bad))
        params = inspect.signature(self.factory).parameters
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            return
        accepted = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
                    and n not in self.SITE_ARGUMENTS]
        unknown = sorted(k for k in kwargs if k not in accepted)
        if unknown:
            raise ValueError(f"activation {self.name!r} takes no setting(s) {unknown}; "
                             f"it takes {accepted or 'none'}")


_REGISTRY: dict[str, ActivationSpec] = {}
_ALIASES: dict[str, str] = {}


def _canonical(name: str) -> str:
    return name.strip().lower().replace("-", "_")


def register(spec: ActivationSpec) -> ActivationSpec:
    """Add ``spec``; a name or alias that is already taken raises instead of overwriting."""
    for key in (spec.name, *spec.aliases):
        key = _canonical(key)
        if key in _REGISTRY or key in _ALIASES:
            raise ValueError(f"activation name {key!r} is already registered")
    _REGISTRY[_canonical(spec.name)] = spec
    for alias in spec.aliases:
        _ALIASES[_canonical(alias)] = _canonical(spec.name)
    return spec


def get_spec(name: str) -> ActivationSpec:
    """Look up a name or alias (case-insensitive, '-' == '_')."""
    if not isinstance(name, str):
        raise TypeError(f"activation name must be a string, got {type(name).__name__}")
    key = _canonical(name)
    key = _ALIASES.get(key, key)
    if key not in _REGISTRY:
        known = ", ".join(sorted(_REGISTRY))
        raise KeyError(f"unknown activation {name!r}; registered: {known}")
    return _REGISTRY[key]


def list_activations() -> list[str]:
    """Canonical names of every registered activation, sorted."""
    return sorted(_REGISTRY)


def create_activation(name: str, channels: int | None = None, **kwargs) -> nn.Module:
    """Build the activation ``name``.

    Args:
        name: a registered name or alias (see ``list_activations()``).
        channels: channel count of the site; required by per-channel activations.
        **kwargs: passed to the activation's constructor (e.g. ``num_classes`` for DPA).
    """
    return get_spec(name).create(channels, kwargs)
