"""The IIEU-B module: binds to its site's producer, captures the producer input, picks a path."""
from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from ..base import ActivationModule
from ..dense import dense_features, dense_filters, is_dense
from ..kernels import backend
from ..kernels.composite import compute_dtype
from .function import (PATHS, BatchNormReplay, IIEUFunction, IIEULinearFunction, IIEUNormFunction, InputTap,
                       LinearReplay, LinearSite, NormSite, ProducerInputTap, TermB, TrainSite, UnitSite, iieu_b_rho,
                       path)
from .operation import iieu_unit_traced
from .patches import ConvPatches, LinearPatches, Patches, autocast_off, silent_threshold


class InverseFilterNorms(torch.autograd.Function):
    """inv_w = 1 / (||w_c|| + eps) in one pass over the filters (the kernels' row norms), with a one-pass
    backward: the weight's gradient is ``-grad_c * inv_w_c^2 / ||w_c|| * w_c`` (0 for an all-zero filter),
    where the chain rule through ``norm`` makes three weight-sized passes and a view autograd cannot add
    into."""

    @staticmethod
    def forward(ctx, weight, eps):
        rows = weight.contiguous()  # (C_out, ...): the kernels read each filter as one row
        inv, sumsq = backend(rows).rows_inv_norm(rows, eps, -1.0)
        ctx.eps = eps
        ctx.save_for_backward(rows, sumsq)
        return inv.to(compute_dtype(weight))

    @staticmethod
    def backward(ctx, grad_inv):
        rows, sumsq = ctx.saved_tensors
        grad = backend(rows).rows_inv_norm_backward(rows, sumsq, grad_inv.contiguous().to(sumsq.dtype), ctx.eps, -1.0)
        return grad, None


def inverse_filter_norms(weight: torch.Tensor, eps: float) -> torch.Tensor:
    """(C_out, ...) filters -> 1 / (||w_c|| + eps), (C_out,), float32 or float64."""
    mode = path() if weight.requires_grad and torch.is_grad_enabled() else "plain"
    if mode == "train":
        return InverseFilterNorms.apply(weight, eps)
    if mode == "traced_train":  # one operation of the kernel layer with its gradient formula
        inv, _ = torch.ops.actlab.rows_inv_norm(weight.reshape(weight.shape[0], -1).contiguous(), eps, -1.0)
        return inv.to(compute_dtype(weight))
    return 1.0 / (weight.flatten(1).to(compute_dtype(weight)).norm(dim=1) + eps)


class IIEUB(ActivationModule):
    """IIEU-B activation for one site.

    Args:
        channels: C, the producer's output channels.
        eta_init: initial per-channel threshold ``eta`` (shape (C,)).
        norm_init: initial weight of the term-B LayerNorm ``norm`` (bias starts at 0).
        eps: added to the filter and patch norms.
        zero_patch: ``"silence"`` (term-S = 0 for patches with RMS < 1e-6) or ``"published"`` (the published
            ``1 / (||x|| + k * eps)`` of a k x k patch, which multiplies an all-zero patch by about 1e8 / k).
        patch_channels: at grouped / depthwise convolutions, ``"group"`` (the patch is the window over the
            channels the filter sees) or ``"all"`` (the published code's rule: the window over every input
            channel, one norm shared by all output channels). Ungrouped sites are the same either way.
        producer: the Conv2d / Linear (or transformers ``Conv1D``) feeding this site; may also be bound later
            with ``bind``.
        capture: when bound, record the producer's input with a forward pre-hook so ``forward(x_t)``
            works inside an unmodified model. Without it, pass ``x_pre`` to ``forward`` yourself.
        recompute_linear: at a Linear site without a norm, recompute ``x_t`` in backward (one matmul)
            instead of keeping it for backward: one feature map less per site, for about 15-20 % more
            time of a ViT MLP block on a 2-core CPU (docs/performance.md). Sites after a BatchNorm always
            recompute (cheap); other sites keep ``x_t``.

    Shapes: conv site x_t (B, C, H', W'), x_pre (B, Cin, H, W); linear site x_t (B, *, C), x_pre (B, *, Cin).
    """

    # the published code keeps eta as (1, C, 1, 1), so timm's rule "decay all but 1-D parameters and
    # biases" decays it (weight_decay_rule="timm")
    PUBLISHED_MULTI_DIM = ("eta",)

    def __init__(self, channels: int, eta_init: float = 0.05, norm_init: float = 0.01, eps: float = 1e-8,
                 zero_patch: str = "silence", producer: nn.Module | None = None, capture: bool = True,
                 recompute_linear: bool = True, patch_channels: str = "group"):
        super().__init__()
        if zero_patch not in ("silence", "published"):
            raise ValueError(f"zero_patch must be 'silence' or 'published', got {zero_patch!r}")
        if patch_channels not in ("group", "all"):
            raise ValueError(f"patch_channels must be 'group' or 'all', got {patch_channels!r}")
        self.channels, self.eps, self.zero_patch, self.patch_channels = channels, eps, zero_patch, patch_channels
        self.recompute_linear = recompute_linear
        self.eta = nn.Parameter(torch.full((channels,), float(eta_init)))
        self.norm = nn.LayerNorm(channels, eps=1e-6)
        nn.init.constant_(self.norm.weight, norm_init)
        nn.init.zeros_(self.norm.bias)
        self.site = "<unbound>"
        object.__setattr__(self, "_producer", None)  # a reference, not a submodule: no duplicate weights
        self._out_slice: tuple[int, int] | None = None
        self._patches: Patches | None = None
        self._hooks: list = []
        self._x_pre: torch.Tensor | None = None
        self._tap: InputTap | None = None
        object.__setattr__(self, "_maker", None)  # the BatchNorm / Linear whose output x_t is replayed
        self._maker_io: tuple | None = None  # (input, output, output version, replay) of its last call
        if producer is not None:
            self.bind(producer, capture=capture)

    @property
    def producer(self) -> nn.Module | None:
        return self._producer

    @property
    def patches(self) -> Patches | None:
        """The bound site's patch geometry (``ConvPatches`` or ``LinearPatches``), None when unbound."""
        return self._patches

    def bind(self, producer: nn.Module, capture: bool = True, norm: nn.Module | None = None,
             out_slice: tuple[int, int] | None = None) -> "IIEUB":
        """Attach to the Conv2d / Linear whose output (after an optional norm) this unit activates.

        Args:
            producer: the nn.Conv2d, nn.Linear or transformers ``Conv1D`` (GPT-2's Linear with its weight stored
                (in, out)) of the site.
            capture: record the producer's input with a forward pre-hook (else pass ``x_pre`` yourself).
            norm: the site's norm, if any. The unit recomputes ``x_t`` in backward instead of keeping it
                (one feature map less per site) when ``x_t`` is the output of a plain BatchNorm, or of a
                Linear producer with no norm; other sites keep it.
            out_slice: ``(start, stop)``: the unit activates output features ``start:stop`` of a Linear
                producer only (the gate half of a gated MLP, ``fc1(x).chunk(2, -1)``); its filters are
                those rows of the weight.
        """
        if isinstance(producer, nn.Conv2d) and out_slice is None:
            patches = ConvPatches.from_conv(producer)
            if self.patch_channels == "all":  # one window over every input channel, whatever the groups
                patches = dataclasses.replace(patches, groups=1)
            out = producer.out_channels
        elif is_dense(producer):
            in_features, out_features = dense_features(producer)
            start, stop = out_slice if out_slice is not None else (0, out_features)
            if not 0 <= start < stop <= out_features:
                raise ValueError(f"IIEU-B site {self.site!r}: out_slice {out_slice} is not within the producer's "
                                 f"{out_features} output features")
            patches = LinearPatches(in_features, stop - start)
            out = stop - start
        else:
            raise TypeError(f"IIEU-B site {self.site!r}: producer must be nn.Conv2d, nn.Linear or transformers' "
                            f"Conv1D (out_slice: the dense ones only), got {type(producer).__name__}")
        if out != self.channels:
            raise ValueError(f"IIEU-B site {self.site!r}: producer has {out} output channels, unit has {self.channels}")
        self.unbind()
        object.__setattr__(self, "_producer", producer)
        self._patches, self._out_slice = patches, out_slice
        if capture:
            self._hooks.append(producer.register_forward_pre_hook(self._capture))
            # x_t recomputed in backward rather than kept, from what its maker keeps anyway
            if norm is not None and type(norm).forward is _BatchNorm.forward:
                self._watch_maker(norm, BatchNormReplay)
            elif norm is None and out_slice is None and self.recompute_linear and \
                    type(producer).forward is nn.Linear.forward:
                self._watch_maker(producer, LinearReplay)
        return self

    def patch_eps(self) -> float:
        """The eps of the patch norms: ``eps``, or with ``zero_patch="published"`` at a k x k conv site the
        published code's ``k * eps`` (its norm of a k x k patch is the RMS-pooled channel norm times k,
        plus eps, divided by k: ``1 / (||x|| + k * eps)``)."""
        if self.zero_patch == "published" and isinstance(self._patches, ConvPatches):
            return self.eps * self._patches.kernel_size[0]
        return self.eps

    def filters(self) -> torch.Tensor:
        """The producer's filters of this unit's channels: (C, ...) rows of its weight."""
        weight = self._producer.weight if isinstance(self._patches, ConvPatches) else dense_filters(self._producer)
        return weight if self._out_slice is None else weight[self._out_slice[0]:self._out_slice[1]]

    def release(self) -> None:
        self.unbind()

    def unbind(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks, self._x_pre, self._tap, self._patches, self._maker_io = [], None, None, None, None
        self._out_slice = None
        object.__setattr__(self, "_producer", None)
        object.__setattr__(self, "_maker", None)

    def _capture(self, module: nn.Module, args: tuple):
        """Record the producer's input; in eager training, route the producer's input through a tap that
        adds this unit's patch-norm gradient to the producer's own input gradient (see ProducerInputTap)."""
        x_pre = args[0]
        self._x_pre, self._tap = x_pre, None
        if isinstance(x_pre, torch.Tensor) and x_pre.requires_grad and path() == "train":
            self._tap = InputTap()
            plain = type(module).forward in (nn.Conv2d.forward, nn.Linear.forward)
            return (ProducerInputTap.apply(x_pre, self._tap, self._patches, plain), *args[1:])
        return None

    def _watch_maker(self, maker: nn.Module, replay_type) -> None:
        object.__setattr__(self, "_maker", maker)
        self._replay_type = replay_type
        self._hooks.append(maker.register_forward_hook(self._capture_maker))

    def _capture_maker(self, maker: nn.Module, args: tuple, output: torch.Tensor) -> None:
        if torch.compiler.is_compiling() or path() != "train":  # replays serve eager training only (the
            return  # compiler plans its own memory; no_grad / inference_mode tensors keep no version counter)
        self._maker_io = (args[0], output, output._version, self._replay_type.of_call(maker, output))

    def _maker_call(self, x_t: torch.Tensor):
        """(replay, the maker's input) of the maker's last call when x_t is, untouched, its output; else
        (None, None)."""
        io, self._maker_io = self._maker_io, None
        if io is None or io[1] is not x_t or io[2] != x_t._version:
            return None, None
        maker_input, _, _, replay = io
        return replay, maker_input

    def term_b(self, x_t: torch.Tensor) -> torch.Tensor:
        """nu = sigmoid(LN_C(GAP(x_t))), (B, C), float32."""
        with autocast_off(x_t.device.type):
            return self._term_b_from_gap(self._patches.gap(x_t))

    def _term_b_from_gap(self, gap: torch.Tensor) -> torch.Tensor:
        """nu from GAP (B, C), in gap's dtype."""
        z = F.layer_norm(gap, (self.channels,), self.norm.weight.to(gap.dtype), self.norm.bias.to(gap.dtype),
                         self.norm.eps)
        return torch.sigmoid(z)

    def forward(self, x_t: torch.Tensor, x_pre: torch.Tensor | None = None) -> torch.Tensor:
        tap = None
        if x_pre is None:
            x_pre, tap = self._x_pre, self._tap
            self._x_pre = self._tap = None
        if self._producer is None or x_pre is None:
            raise RuntimeError(
                f"IIEU-B site {self.site!r} has no producer input: IIEU-B needs the Conv2d/Linear that feeds it. "
                "Use actlab.convert(model, 'iieu_b'), or unit.bind(conv) and call the producer first, "
                "or pass x_pre explicitly.")
        return self._activate(x_t, x_pre, tap)

    def _activate(self, x_t: torch.Tensor, x_pre: torch.Tensor, tap: InputTap | None) -> torch.Tensor:
        if isinstance(self._patches, ConvPatches) and x_t.dim() == 3:
            return self._conv_tokens(x_t, x_pre, tap)
        self._patches.check(x_t, x_pre, self.site)
        silence = self.zero_patch == "silence"
        mode = path()
        if mode == "train":
            return self._train(x_t, x_pre, tap, silence)
        with autocast_off(x_t.device.type):
            inv_w = inverse_filter_norms(self.filters(), self.eps)
        if mode == "traced_train":  # one operation (term-B, patch norms and the unit) with its gradient formula
            return iieu_unit_traced(x_t, x_pre, inv_w, self.eta, self.norm.weight, self.norm.bias, self._patches,
                                    self.patch_eps(), silence, self.norm.eps)
        return PATHS[mode](x_t, x_pre, inv_w, self.term_b(x_t), self.eta, self._patches, self.patch_eps(), silence)

    def _train(self, x_t: torch.Tensor, x_pre: torch.Tensor, tap: InputTap | None, silence: bool) -> torch.Tensor:
        """Eager training: at a conv-BN site whose BatchNorm made x_t, one function differentiating through
        the filter norms, the BatchNorm and term-B (``IIEUNormFunction``); elsewhere ``IIEUFunction``, with
        x_t recomputed in backward when its maker allows."""
        replay, maker_input = self._maker_call(x_t)
        if replay is not None and replay.fuses(maker_input, x_t):
            return self._fused(replay, x_t, maker_input, x_pre, tap, silence)
        with autocast_off(x_t.device.type):
            inv_w = inverse_filter_norms(self.filters(), self.eps)
        replay_tensors, gap = replay.prepare(self._maker, maker_input, x_t) if replay is not None else ((), None)
        # term-B from a detached GAP: the autograd function adds that path's gradient itself
        with autocast_off(x_t.device.type):
            if gap is None:
                gap = self._patches.gap(x_t.detach())
        site = TrainSite(UnitSite(self._patches, self.patch_eps(), silence), replay, replay_tensors,
                         TermB(gap, self.norm.eps), tap)
        return IIEUFunction.apply(x_t, x_pre, inv_w, None, self.eta, self.norm.weight, self.norm.bias, site)

    def _fused(self, replay, x_t: torch.Tensor, maker_input: torch.Tensor, x_pre: torch.Tensor, tap: InputTap | None,
               silence: bool) -> torch.Tensor:
        """The unit differentiating through the maker of x_t itself: its BatchNorm (``IIEUNormFunction``) or,
        at a norm-less Linear site, the Linear's GAP (``IIEULinearFunction``)."""
        maker = self._maker
        if isinstance(replay, BatchNormReplay):
            site = NormSite(self._patches, self.patch_eps(), silence, self.eps, maker.eps, replay.running(maker),
                            self.norm.eps, tap)
            return IIEUNormFunction.apply(x_t, maker_input, x_pre, self.filters(), self.eta, self.norm.weight,
                                          self.norm.bias, maker.weight, maker.bias, site)
        site = LinearSite(self._patches, self.patch_eps(), silent_threshold(self._patches, silence), self.eps,
                          self.norm.eps, tap, replay)
        return IIEULinearFunction.apply(x_t, x_pre, maker.weight, maker.bias, self.eta, self.norm.weight, self.norm.bias,
                                        site)

    @torch.no_grad()
    def ii_score(self, x_t: torch.Tensor, x_pre: torch.Tensor | None = None) -> torch.Tensor:
        """rho = S + nu, the II-score before the adjuster, shaped like ``x_t`` (float32). Responses with
        ``rho < eta`` are the ones the adjuster suppresses (scaled by ``eta * exp(rho - eta) < eta``).
        ``x_pre`` defaults to the producer input captured for the coming forward (e.g. in a forward
        pre-hook on this unit)."""
        if x_pre is None:
            x_pre = self._x_pre
            if x_pre is None:
                raise RuntimeError(f"IIEU-B site {self.site!r}: no captured producer input; pass x_pre")
        if isinstance(self._patches, ConvPatches) and x_t.dim() == 3:  # PVT-style tokens of a conv site
            b, n, c = x_t.shape
            h, w = self._patches.output_hw(*x_pre.shape[2:])
            rho = self.ii_score(x_t.transpose(1, 2).reshape(b, c, h, w), x_pre)
            return rho.flatten(2).transpose(1, 2)
        self._patches.check(x_t, x_pre, self.site)
        x_t, x_pre = x_t.float(), x_pre.float()
        inv_w = inverse_filter_norms(self.filters().float(), self.eps)
        return iieu_b_rho(x_t, x_pre, inv_w, self.term_b(x_t), self._patches, self.patch_eps(),
                          self.zero_patch == "silence")

    def below_eta(self, rho: torch.Tensor) -> torch.Tensor:
        """Where the adjuster suppresses (rho < eta), for an ``ii_score`` of any layout: channels at dim 1
        of a conv map, last for tokens and linear sites."""
        channel_first = isinstance(self._patches, ConvPatches) and rho.dim() == 4
        return rho < (self.eta.float().view(-1, 1, 1) if channel_first else self.eta.float())

    def _conv_tokens(self, x_t: torch.Tensor, x_pre: torch.Tensor, tap: InputTap | None = None) -> torch.Tensor:
        """A conv site whose output reaches the unit as tokens (B, H*W, C), e.g. PVT-v2's depthwise MLP."""
        b, n, c = x_t.shape
        h, w = self._patches.output_hw(*x_pre.shape[2:]) if x_pre.dim() == 4 else (-1, -1)
        if h * w != n:
            raise ValueError(f"IIEU-B site {self.site!r}: {n} tokens do not match the producer's "
                             f"{h}x{w} output map")
        out = self._activate(x_t.transpose(1, 2).reshape(b, c, h, w), x_pre, tap)
        return out.flatten(2).transpose(1, 2)

    def extra_repr(self) -> str:
        prod = type(self._producer).__name__ if self._producer is not None else "unbound"
        if self._out_slice is not None:
            prod += f"[{self._out_slice[0]}:{self._out_slice[1]}]"
        extra = f", patch_channels={self.patch_channels!r}" if self.patch_channels != "group" else ""
        return f"{self.channels}, producer={prod}, zero_patch={self.zero_patch!r}{extra}"
