"""DPA: Dual-Perspective Activation.

Forward is TAU, ``0 if x < tau else x`` (a NaN stays NaN, as through ReLU). During training with
targets, each site keeps per-class memories of the pooled pre-activation (``value_memory``, PreA-FM) and
of the sign of the pooled output gradient (``grad_memory``, PostA-BM), updated every ``interval``-th
forward with an exponential rule applied sample by sample in batch order; a sample whose pooled values
are not finite updates no memory. Channels that the memories flag as irrelevant for a sample's class
but that still respond are penalised by the channel loss, read with ``dpa_loss(model)``.

State rule: the memories and the update schedule (``count``) change only in a training-mode forward that
carries targets and builds an autograd graph. Eval mode, ``torch.no_grad()`` and
``torch.inference_mode()`` run plain TAU and need no targets.

The memories are buffers (saved in checkpoints). Updates are computed in closed form over the batch
(no loop over samples, no host synchronisation) and equal the sequential rule within float32 rounding.
Under torch.distributed every rank applies the same update to the global batch (rank-major), so memories
stay identical across ranks.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn as nn

from .base import ActivationModule
from .kernels import ops as _ops  # noqa: F401  (registers torch.ops.actlab)
from .kernels import backend, runs_like_cuda
from .kernels import composite
from .layout import global_pool
from .registry import LAYOUTS, ActivationSpec, Site, SiteMismatch, register


class _ThresholdUnit(torch.autograd.Function):
    """TAU: x if x >= tau else 0; the gradient passes where x >= tau (x == tau included).

    Keeps only the bit-packed pass mask (1/32 of a float32 map), never the output: the output is a tensor of
    its own that the next operation may modify in place (``Dropout(inplace=True)``) without changing this
    gradient.
    """

    @staticmethod
    def forward(ctx, x, tau):
        dense = x.contiguous()
        ctx.save_for_backward(backend(dense).pass_mask(dense, tau))
        if tau == 0:
            return torch.relu(x)
        return torch.where(x < tau, torch.zeros_like(x), x)  # NaN passes, as through ReLU

    @staticmethod
    def backward(ctx, grad):
        (passes,) = ctx.saved_tensors
        grad = grad.contiguous()
        return backend(grad).masked_grad(grad, passes), None


class _EagerDPAForward(torch.autograd.Function):
    """One DPA site's forward in eager training, one call of the chosen kernels (``dpa_forward``): TAU, the
    pooled response v and, on ordinary steps, the channel mask; the backward is ``tau_pool_backward``.
    Keeps only the packed pass mask (see ``_ThresholdUnit``)."""

    @staticmethod
    def forward(ctx, x, tau, tokens, cls, memories, labels, count):
        out, v, passes, mask = backend(x).dpa_forward(x, tau, tokens, memories, labels, count, cls)
        ctx.tokens, ctx.cls, ctx.shape, ctx.dtype = tokens, cls, x.shape, x.dtype
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(passes)
        if mask is not None:
            ctx.mark_non_differentiable(mask)
        return out, v, mask

    @staticmethod
    def backward(ctx, grad_out, grad_v, grad_mask):
        (passes,) = ctx.saved_tensors
        if grad_out is None and grad_v is None:
            return (None,) * 7
        if grad_out is None:  # only the channel loss reached the unit
            grad_out = grad_v.new_zeros(ctx.shape, dtype=ctx.dtype)
        grad_out = grad_out.contiguous()
        grad_x = backend(grad_out).tau_pool_backward(grad_out, passes, grad_v, ctx.tokens, ctx.cls)
        return grad_x, None, None, None, None, None, None


def threshold_unit(x: torch.Tensor, tau: float = 0.0) -> torch.Tensor:
    """TAU(x). Plain ops when no gradient is needed (identical values; exports as Relu for tau = 0)."""
    if torch.is_grad_enabled() and x.requires_grad and not torch.compiler.is_compiling() \
            and not torch.jit.is_tracing():
        return _ThresholdUnit.apply(x, tau)
    if tau == 0.0:
        return torch.relu(x)
    return torch.where(x < tau, torch.zeros_like(x), x)  # NaN passes, as through ReLU


def sequential_ema_(memory: torch.Tensor, labels: torch.Tensor, values: torch.Tensor,
                    alpha: float) -> torch.Tensor:
    """Apply ``memory[y_i] += alpha * (values_i - memory[y_i])`` for i in batch order, in place; a sample
    whose values are not all finite is left out.

    Computed in closed form (``kernels.composite.closed_form_ema``): no loop over the batch and no host
    synchronisation; equal to the sample-by-sample rule within float32 rounding.

    Args:
        memory: (K, C) float tensor, updated in place.
        labels: (B,) int64 class indices in [0, K).
        values: (B, C) new values.
    Returns:
        (B, C): row i is ``memory[labels[i]]`` right after sample i's own update.
    """
    return composite.ema_update_(memory, labels, values, alpha)


_DPA_GROUP = None


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _dpa_group():
    """A process group of its own, so DPA's collectives never interleave with DDP's gradient buckets."""
    global _DPA_GROUP
    if _DPA_GROUP is None:
        _DPA_GROUP = dist.new_group()
    return _DPA_GROUP


def _all_gather_rows(rows: torch.Tensor, sizes: list[int], fill: float = 0) -> torch.Tensor:
    """Every rank's ``rows`` (sizes[rank] rows; fewer are padded with ``fill``) concatenated rank-major.
    One functional all-gather, which torch.compile traces into its graph as it runs eagerly."""
    top = max(sizes)
    padded = rows.new_full((top, *rows.shape[1:]), fill)
    padded[: rows.shape[0]] = rows
    gathered = funcol.wait_tensor(funcol.all_gather_tensor(padded, 0, _dpa_group()))
    if all(n == top for n in sizes):
        return gathered
    return torch.cat([c[:n] for c, n in zip(gathered.split(top), sizes)])


class _StepLabels:
    """The class labels of one forward, shared by every DPA site of the model (``targets`` makes one), so
    what depends only on the labels is done once per step, not once per site: under torch.distributed the
    global batch's labels, and the class order (a stable sort) that the GPU memory update runs in.

    Under torch.distributed with a ``capacity`` every rank pads its rows to it (labels 0, values NaN: a
    sample with a non-finite value updates no memory), so the gathers have one size on every rank and need
    no host read; without one the ranks' batch sizes are exchanged once per step (one host read)."""

    def __init__(self, y: torch.Tensor, capacity: int | None = None, token_mask: torch.Tensor | None = None):
        self.y = y
        self.capacity = capacity
        self.token_mask = token_mask  # (B, N) float32, 1 at the tokens (B, N, C) inputs are pooled over
        self._global: tuple[torch.Tensor, list[int] | None, int] | None = None
        self._order: tuple[torch.Tensor, torch.Tensor] | None = None

    def on(self, device: torch.device) -> torch.Tensor:
        """The labels on ``device`` (copied there once)."""
        if self.y.device != device:
            self.y = self.y.to(device)
        return self.y

    def _sizes(self, group) -> list[int]:
        world = dist.get_world_size(group)
        if self.capacity is not None:
            return [self.capacity] * world
        size = torch.tensor([self.y.shape[0]], device=self.y.device)
        sizes = [torch.zeros_like(size) for _ in range(world)]
        dist.all_gather(sizes, size, group=group)
        return [int(n) for n in sizes]

    def _gathered(self) -> tuple[torch.Tensor, list[int] | None, int]:
        if self._global is None:
            if not _distributed():
                self._global = (self.y, None, 0)
            else:
                group = _dpa_group()
                sizes = self._sizes(group)
                rank = dist.get_rank(group)
                self._global = (_all_gather_rows(self.y, sizes), sizes, sum(sizes[:rank]))
        return self._global

    def gather(self, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """All ranks' (labels, values) concatenated rank-major, and this rank's row offset."""
        labels, sizes, offset = self._gathered()
        if sizes is None:
            return labels, values, 0
        return labels, _all_gather_rows(values, sizes, fill=float("nan")), offset

    def order(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The global labels sorted stably, and the sample index of each."""
        if self._order is None:
            self._order = torch.sort(self._gathered()[0], stable=True)
        return self._order


class DPA(ActivationModule):
    """Dual-Perspective Activation for one site: the threshold unit (TAU) ``0 if x < tau else x``, with
    per-class memories of each channel's pooled input (``value_memory``) and of the sign of its pooled
    output gradient (``grad_memory``) that flag the channels irrelevant for a class; ``dpa_loss`` penalises
    those that still respond. A training forward needs the class targets (``actlab.targets``).

    Args:
        channels: C.
        num_classes: K, rows of the memories.
        tau: the threshold of TAU.
        interval: memories update on every ``interval``-th training forward with targets.
        alpha: weight of the newest sample in the memory update.
        token_pool: how (B, N, C) inputs are pooled: ``"mean"`` over tokens or ``"cls"`` (token 0, for
            models that classify from a class token). ``convert`` sets it per site.
        rows_per_sample: k, the input rows per sample (1; k for TNT-style inner blocks whose leading dim
            is k * B, sample-major). ``convert`` sets it from the example forward; any other leading dim
            is an error, so labels of the wrong length are never paired with the wrong samples.
        nhwc: inputs of rank >= 3 carry their channels last, (L, *S, C), pooled over every position
            (ConvNeXt / Swin MLPs). ``convert`` sets it per site.

    Buffers: ``value_memory`` (K, C), ``grad_memory`` (K, C), ``count`` (scalar).
    Shapes: (L, C, H, W), (L, C) or (L, N, C) -> same, with L = k * B; with ``nhwc``, (L, *S, C) -> same.
    """

    def __init__(self, channels: int, num_classes: int, tau: float = 0.0, interval: int = 5,
                 alpha: float = 0.9, token_pool: str = "mean", rows_per_sample: int = 1, nhwc: bool = False):
        super().__init__()
        self.nhwc = bool(nhwc)
        if num_classes is None or int(num_classes) <= 0:
            raise ValueError("DPA needs num_classes (a positive int): its memories have one row per class")
        if token_pool not in ("mean", "cls"):
            raise ValueError(f"token_pool must be 'mean' or 'cls', got {token_pool!r}")
        if interval < 1:
            raise ValueError(f"interval must be >= 1, got {interval}")
        if int(rows_per_sample) < 1:
            raise ValueError(f"rows_per_sample must be >= 1, got {rows_per_sample}")
        self.rows_per_sample = int(rows_per_sample)
        self.channels, self.num_classes = channels, int(num_classes)
        self.tau, self.interval, self.alpha, self.token_pool = float(tau), int(interval), float(alpha), token_pool
        self.register_buffer("value_memory", torch.zeros(self.num_classes, channels))
        self.register_buffer("grad_memory", torch.zeros(self.num_classes, channels))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))
        self.site = "<dpa>"
        self._count_cache: int | None = 0  # host copy of `count`: no device read in a forward
        self._targets: torch.Tensor | None = None  # traced graphs: the labels (the shared buffer, in a block)
        self._labels: _StepLabels | None = None  # eager: the labels, shared by the model's sites
        self._capacity: int | None = None  # traced graphs under torch.distributed: ``targets``' capacity
        self._label_buffer: torch.Tensor | None = None  # where ``targets`` copies the labels (shared)
        # (v, mask) of the last training forward, () when it masked nothing, None after an eval forward
        self._loss_terms: tuple[torch.Tensor, ...] | None = None
        # (labels, schedule count) of the last eager training forward: what activation checkpointing's
        # recompute of that forward in backward runs with
        self._last_step: tuple[_StepLabels, int] | None = None

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        loaded = state_dict.get(prefix + "count")
        # the host copy from the checkpoint's own tensor (on the CPU as a rule: no device read)
        self._count_cache = int(loaded) if isinstance(loaded, torch.Tensor) else None

    @property
    def position(self) -> int:
        """Where the schedule stands: ``count``, 0 right after an update step (read from the host copy that
        eager training keeps, so without a device read)."""
        return self._count_cache if self._count_cache is not None else int(self.count)

    def _next_count(self) -> int:
        """Advance the host copy of ``count`` (eager mode: no device read per forward) and return it; the
        caller stores it in the buffer (the forward kernel does, in the same launch)."""
        if self._count_cache is None:
            self._count_cache = int(self.count)
        self._count_cache = (self._count_cache + 1) % self.interval
        return self._count_cache

    def _fused_layout(self, x: torch.Tensor, batch: int) -> tuple[torch.Tensor, bool] | None:
        """x as the fused kernels' (B, C, *S) maps or (B, N, C) tokens, without a copy, or None (flat
        features, rows grouped k per sample, a layout that would need a copy)."""
        if x.shape[0] != batch or x.dim() < 3:
            return None
        if self.nhwc and x.dim() > 3:
            return (x.view(batch, -1, x.shape[-1]), True) if x.is_contiguous() else None
        if x.dim() == 4:
            if x.is_contiguous():
                return x, False
            if x.is_contiguous(memory_format=torch.channels_last):  # (B, H, W, C) in memory: tokens
                b, c, h, w = x.shape
                return x.permute(0, 2, 3, 1).view(b, h * w, c), True
            return None
        if x.dim() == 3 and x.is_contiguous():
            return x, True
        return None

    def _tau_pool(self, x: torch.Tensor, batch: int, memories, labels: torch.Tensor, count: int,
                  token_mask: torch.Tensor | None = None):
        """Eager: TAU(x), the pooled response (B, C) float32 (over the tokens of ``token_mask``) and, given
        ``memories`` (value, grad), the channel mask at ``labels`` (else None); stores ``count``. One kernel
        where the layout allows and no token mask applies."""
        fused = None if self._masks(x, token_mask) else self._fused_layout(x, batch)
        if fused is None:
            self.count.fill_(count)
            v = self.pool(x, batch, token_mask)
            mask = None
            if memories is not None:
                with torch.no_grad():
                    mask = backend(v).dpa_mask(v, memories[0], memories[1], labels, self.tau, True)
            return threshold_unit(x, self.tau), v, mask
        flat, tokens = fused
        cls = self.token_pool == "cls" and x.dim() == 3
        out, v, mask = _EagerDPAForward.apply(flat, self.tau, tokens, cls, memories, labels, (self.count, count))
        if out.shape != x.shape:  # back from (B, H*W, C) to the channels_last map, or from (B, N, C) to NHWC
            out = out.view(x.shape[0], *x.shape[2:], x.shape[1]).permute(0, 3, 1, 2) if not self.nhwc \
                else out.view(x.shape)
        return out, v, mask

    def _traced_tau_pool(self, x: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """torch.compile: TAU(x) and the pooled response through the registered operation."""
        fused = self._fused_layout(x, batch)
        if fused is None or (self.token_pool == "cls" and x.dim() == 3):
            return threshold_unit(x, self.tau), self.pool(x, batch)
        flat, tokens = fused
        flat = flat.flatten(2) if not tokens else flat
        out, v, _ = torch.ops.actlab.tau_pool(flat, self.tau, tokens)
        if x.dim() == 4 and tokens and not self.nhwc:
            b, c, h, w = x.shape
            return out.view(b, h, w, c).permute(0, 3, 1, 2), v
        return out.view(x.shape), v

    def pool(self, x: torch.Tensor, batch: int, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Pooled response (B, C) in float32: spatial mean, class token or token mean (over the tokens where
        ``token_mask`` (B, N) is 1, when given), then the mean over the k rows of each sample when the
        leading dim is k * B."""
        if x.dim() < 2 or (x.dim() > 4 and not self.nhwc):
            raise ValueError(f"DPA site {self.site!r}: cannot pool a tensor of shape {tuple(x.shape)}; "
                             "expected (B, C, H, W), (B, N, C) or (B, C)")
        if x.dim() == 3 and self.token_pool == "cls":
            v = x[:, 0].float()
        elif token_mask is not None and self._masks(x, token_mask):
            v = torch.einsum("bnc,bn->bc", x.float(), token_mask) / token_mask.sum(1, keepdim=True).clamp_min(1.0)
        else:
            v = global_pool(x, torch.float32, nhwc=self.nhwc)
        if v.shape[1] != self.channels:
            raise ValueError(f"DPA site {self.site!r}: expected {self.channels} channels, got shape {tuple(x.shape)}")
        if v.shape[0] != batch:
            v = v.view(batch, self.rows_per_sample, -1).mean(1)
        return v

    def _masks(self, x: torch.Tensor, token_mask: torch.Tensor | None) -> bool:
        """Whether ``token_mask`` applies to this site's input: (B, N, C) tokens pooled by their mean."""
        if token_mask is None or x.dim() != 3 or self.token_pool == "cls" or self.nhwc:
            return False
        if tuple(token_mask.shape) != tuple(x.shape[:2]):
            raise ValueError(f"DPA site {self.site!r}: the attention mask {tuple(token_mask.shape)} does not match its "
                             f"{tuple(x.shape[:2])} tokens (B, N)")
        return True

    def _check_rows(self, x: torch.Tensor, batch: int) -> None:
        rows = x.shape[0]
        if rows != batch * self.rows_per_sample:
            per = "" if self.rows_per_sample == 1 else f" x {self.rows_per_sample} rows per sample"
            raise ValueError(f"DPA site {self.site!r}: the targets hold {batch} labels{per}, but the input has "
                             f"{rows} rows (shape {tuple(x.shape)}); pass one label per sample of this batch")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and torch.is_grad_enabled()):
            # eval, no_grad and inference_mode: plain TAU; memories and count change only in a training
            # forward that builds a graph (else the schedule would shift and only one memory would update)
            self._loss_terms = None
            return threshold_unit(x, self.tau)
        compiling = torch.compiler.is_compiling()
        if not compiling and self._labels is None and self._last_step is not None and _in_backward():
            return self._recompute(x)  # activation checkpointing recomputes the forward in backward
        self._loss_terms = None
        if (self._targets if compiling else self._labels) is None:
            raise RuntimeError(
                f"DPA site {self.site!r}: a training forward needs class targets. Wrap it in "
                "`with actlab.targets(model, y): model(x)`, or call model.eval() for inference.")
        if compiling:
            if self._labels is not None and self._labels.token_mask is not None:
                raise NotImplementedError(f"DPA site {self.site!r}: targets(..., attention_mask=) runs in eager "
                                          "training only, not under torch.compile")
            return self._traced_forward(x, self._targets.to(x.device))
        return self._eager_forward(x, self._labels)

    def _eager_forward(self, x: torch.Tensor, labels: _StepLabels) -> torch.Tensor:
        y = labels.on(x.device)
        self._check_rows(x, y.shape[0])
        count = self._next_count()
        self._last_step = (labels, count)
        update = count == 0
        memories = None if update else (self.value_memory, self.grad_memory)
        out, v, mask = self._tau_pool(x, y.shape[0], memories, y, count, labels.token_mask)
        if update:
            with torch.no_grad():
                rows = self._update_value_memory(labels, v)
                mask = backend(v).dpa_mask(v, rows, self.grad_memory, y, self.tau, False)
        if not runs_like_cuda(x) and not bool(mask.any()):
            # nothing masked: no term, which spares backward a full-size gradient through the pooling
            # (on GPUs the check would cost a device sync, so there the graph is kept)
            self._loss_terms = ()
        else:
            self._loss_terms = (v, mask)  # dpa_loss sums all sites' terms in a few operations
        if update and out.requires_grad:
            out.register_hook(self._grad_memory_hook(labels))
        return out

    def _recompute(self, x: torch.Tensor) -> torch.Tensor:
        """The last training forward again, as activation checkpointing recomputes it in backward: its labels
        and schedule position, the same operations (so the same tensors saved for backward), and nothing
        advanced or updated (the memories, the schedule and the channel loss's terms stay as that forward
        left them)."""
        labels, count = self._last_step
        y = labels.on(x.device)
        memories = None if count == 0 else (self.value_memory, self.grad_memory)
        return self._tau_pool(x, y.shape[0], memories, y, count, labels.token_mask)[0]

    def _update_value_memory(self, labels: _StepLabels, v: torch.Tensor) -> torch.Tensor:
        """The value memory's update by the (global) batch; returns this rank's rows (B, C)."""
        all_labels, values, offset = labels.gather(v)
        order = labels.order() if runs_like_cuda(v) else None
        rows = backend(values).ema_update_(self.value_memory, all_labels, values, self.alpha, order)
        return rows if rows.shape[0] == v.shape[0] else rows[offset: offset + v.shape[0]]

    def _grad_memory_hook(self, labels: _StepLabels):
        done = []

        def hook(grad: torch.Tensor) -> None:
            if done:  # a second backward through the same graph must not count twice
                return
            done.append(True)
            with torch.no_grad():
                all_labels, values, _ = labels.gather(self.pool(grad, labels.y.shape[0], labels.token_mask))
                order = labels.order() if runs_like_cuda(values) else None
                backend(values).ema_update_(self.grad_memory, all_labels, values, self.alpha, order,
                                                              signs=True, after=False)

        return hook

    def _traced_forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The forward as torch.compile traces it: the schedule advanced on the device, the memory update
        applied where a 0-dim bool tensor says so (no data-dependent Python value). Its bookkeeping is one
        operation of the kernel layer (``dpa_step_``), opaque to the compiler, which then has less to
        compile."""
        self._check_rows(x, y.shape[0])
        out, v = self._traced_tau_pool(x, y.shape[0])
        labels = _StepLabels(y, self._capacity) if _distributed() else None
        with torch.no_grad():
            if labels is not None:
                mask, update = self._traced_global_update(v.detach(), labels)
            else:
                mask, update = torch.ops.actlab.dpa_step_(self.value_memory, self.count, self.grad_memory,
                                                          v.detach().contiguous(), y, self.alpha, self.interval,
                                                          self.tau)
        self._loss_terms = (v, mask)
        if out.requires_grad:
            out.register_hook(self._traced_grad_hook(y, update, labels))
        return out

    def _traced_global_update(self, v: torch.Tensor, labels: _StepLabels) -> tuple[torch.Tensor, torch.Tensor]:
        """``dpa_step_`` on the global batch (torch.distributed)."""
        self.count.copy_((self.count + 1) % self.interval)
        update = self.count == 0
        all_labels, values, offset = labels.gather(v)
        rows = torch.ops.actlab.ema_update_(self.value_memory, all_labels, values.contiguous(), self.alpha, update)
        rows = rows[offset: offset + v.shape[0]]
        return composite.dpa_mask(v, rows, self.grad_memory, labels.y, self.tau, False), update

    def _traced_grad_hook(self, y: torch.Tensor, update: torch.Tensor, labels: _StepLabels | None):
        """The hook as torch.compile traces it into the backward graph (update applied on the device; under
        torch.distributed by the global batch, as in eager training)."""
        memory, alpha = self.grad_memory, self.alpha

        def hook(grad: torch.Tensor) -> None:
            with torch.no_grad():
                pooled = self.pool(grad, y.shape[0])
                all_labels = y
                if labels is not None:
                    all_labels, pooled, _ = labels.gather(pooled)
                torch.ops.actlab.ema_update_(memory, all_labels, pooled.contiguous(), alpha, update, signs=True)

        return hook

    def site_note(self) -> str:
        notes = (["pools the class token"] if self.token_pool == "cls" else []) + \
            ([f"{self.rows_per_sample} rows per sample"] if self.rows_per_sample > 1 else [])
        return ", ".join(notes)

    def extra_repr(self) -> str:
        return (f"{self.channels}, num_classes={self.num_classes}, tau={self.tau}, interval={self.interval}, "
                f"alpha={self.alpha}, token_pool={self.token_pool!r}"
                + (f", rows_per_sample={self.rows_per_sample}" if self.rows_per_sample != 1 else "")
                + (", nhwc=True" if self.nhwc else ""))


def _dpa_sites(model: nn.Module) -> list[DPA]:
    return [m for m in model.modules() if isinstance(m, DPA)]


def _token_mask(attention_mask: torch.Tensor | None, y: torch.Tensor) -> torch.Tensor | None:
    """An attention mask as the sites pool with it: (B, N) float32 on the labels' device."""
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2 or attention_mask.shape[0] != y.shape[0]:
        shape = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask).__name__
        raise ValueError(f"targets: attention_mask must be (B, N) with B = {y.shape[0]} labels, got {shape}")
    return (attention_mask != 0).to(device=y.device, dtype=torch.float32)


def _in_backward() -> bool:
    """Whether an autograd backward is running (where activation checkpointing recomputes forwards)."""
    task = getattr(torch._C, "_current_graph_task_id", None)  # torch's own checkpointing asks the same
    return task is not None and task() != -1


def hard_labels(y):
    """Class indices from targets: ``y`` itself, or for soft targets (B, K) (mixup, CutMix, label smoothing)
    the most probable class of each row."""
    if isinstance(y, torch.Tensor) and y.dim() == 2 and y.is_floating_point():
        return y.argmax(1)
    return y


def _check_label_tensor(y) -> None:
    """What needs no read of the values: a (B,) integer tensor."""
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"targets must be a tensor of class indices, got {type(y).__name__}")
    if y.dim() != 1 or y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
        raise ValueError(f"DPA needs integer class indices (B,) or soft targets (B, K), got {tuple(y.shape)} "
                         f"{y.dtype}")


def check_targets(model: nn.Module, y: torch.Tensor) -> None:
    """Raise a clear error when ``y`` cannot serve as the labels of ``model``'s DPA sites: not a (B,)
    integer tensor, or a class outside a site's [0, num_classes). One host read of y's bounds (free for
    CPU labels, which is where the trainer checks them)."""
    sites = _dpa_sites(model)
    if not sites:
        return
    _check_label_tensor(y)
    if y.numel():
        lo, hi = torch.stack(torch.aminmax(y)).tolist()  # one host read for both bounds
        for site in sites:
            if lo < 0 or hi >= site.num_classes:
                raise ValueError(f"DPA site {site.site!r}: targets out of range [0, {site.num_classes}) "
                                 f"(min {lo}, max {hi})")


def _check_on_device(sites: list[DPA], y: torch.Tensor) -> None:
    """The range check of ``check_targets`` queued on the device: no host read; a class out of range
    raises at the next synchronisation (a device-side assertion with this message)."""
    if not y.numel():
        return
    lo, hi = torch.aminmax(y)
    for classes in sorted({site.num_classes for site in sites}):
        torch._assert_async((lo >= 0) & (hi < classes),
                            f"actlab.targets: a class index outside [0, {classes}) reached a DPA site")


def _label_buffer(sites: list[DPA], y: torch.Tensor) -> torch.Tensor:
    """The sites' shared label buffer for a batch like y: one int64 tensor on the sites' device, made
    again only when the batch size changes (or the sites moved), so its address stays fixed."""
    device = sites[0].value_memory.device
    buffer = sites[0]._label_buffer
    if buffer is None or buffer.shape != y.shape or buffer.device != device \
            or any(site._label_buffer is not buffer for site in sites):
        buffer = torch.empty(y.shape, dtype=torch.long, device=device)
        for site in sites:
            site._label_buffer = buffer
    return buffer


@contextmanager
def targets(model: nn.Module, y: torch.Tensor, validate: bool = True, capacity: int | None = None,
            attention_mask: torch.Tensor | None = None) -> Iterator[None]:
    """Route class labels ``y`` (B,) to every DPA site of ``model`` for the forwards inside the block. Soft
    targets (B, K) (mixup, CutMix, label smoothing) give the most probable class of each row; where the
    loop has the hard labels, pass those.

    The labels are copied into one buffer that every site reads, kept from step to step (its address
    changes only with the batch size), so a compiled graph or a captured CUDA graph never holds ``y``
    itself. A backward that follows a later ``targets`` block would see the later labels: run each
    forward's backward before the next forward with targets (as training loops do).

    ``validate``: check the class range first. Labels on the CPU are checked on the host
    (``check_targets``, a ValueError naming the site); labels on a GPU are checked on the device, with no
    host read, and an error surfaces at the next synchronisation. The tensor's shape and dtype are always
    checked.

    ``capacity``: under torch.distributed, the largest batch any rank passes (the loader's batch size,
    the same on every rank). Each rank's rows are padded to it, so the memory updates gather the global
    batch with no host read; without it the ranks' batch sizes are exchanged once per step.

    ``attention_mask``: (B, N), nonzero at the real tokens of a padded text batch (a Hugging Face
    tokenizer's): sites whose input is (B, N, C) tokens pooled by their mean pool over those tokens only,
    so padding reaches no memory and no channel loss (eager training; those sites then run the unfused
    pooling)."""
    sites = _dpa_sites(model)
    if not sites:
        yield
        return
    y = hard_labels(y)
    _check_label_tensor(y)
    if capacity is not None and y.shape[0] > capacity:
        raise ValueError(f"targets: a batch of {y.shape[0]} labels does not fit capacity={capacity} (the largest "
                         "batch any rank passes)")
    if validate and not runs_like_cuda(y):
        check_targets(model, y)
    labels = _label_buffer(sites, y)
    labels.copy_(y, non_blocking=True)
    if validate and runs_like_cuda(y):
        _check_on_device(sites, labels)
    shared = _StepLabels(labels, capacity, _token_mask(attention_mask, y))
    if _distributed():
        _dpa_group()  # made here, outside any compiled forward, by every rank alike
    for site in sites:
        site._labels, site._targets, site._capacity = shared, labels, capacity
    try:
        yield
    finally:
        for site in sites:
            site._targets = site._labels = None


def dpa_loss(model: nn.Module) -> torch.Tensor:
    """Channel loss of the model's last forward: mean of v**2 over the masked entries of all DPA sites
    (0 when there are none). Add ``lambda * dpa_loss(model)`` to the task loss.

    Under torch.distributed every rank must call it (it all-reduces the count of masked entries): the
    mean is over the global batch, scaled by the world size so that DDP's gradient averaging gives the
    single-process gradient. The value on one rank is then its share times the world size."""
    sites = [s for s in _dpa_sites(model) if s._loss_terms is not None]
    trained = [s._loss_terms for s in sites]
    if not trained:
        ref = next(iter(model.parameters()), None)
        return torch.zeros((), device=ref.device if ref is not None else None)
    terms = [t for t in trained if t]  # () : a site that masked nothing in this forward
    if terms:  # all sites at once: two concatenations and a few reductions, not kernels per site
        values = torch.cat([v for v, _ in terms], 1)  # (B, C) each, the same B: side by side, no views
        masks = torch.cat([m for _, m in terms], 1)
        zero = torch.zeros((), dtype=values.dtype, device=values.device)
        total = torch.where(masks, values.square(), zero).sum()
        count = masks.sum()
    else:
        device = sites[0].value_memory.device
        total = torch.zeros((), device=device)
        count = torch.zeros((), dtype=torch.long, device=device)
    if _distributed():
        # the mean over the *global* batch's masked entries: DDP averages gradients over ranks, so
        # world * local_sum / global_count makes the step equal to one process on the global batch
        global_count = count.detach().clone()
        dist.all_reduce(global_count, group=_dpa_group())
        return total * dist.get_world_size(_dpa_group()) / global_count.clamp_min(1)
    return total / count.clamp_min(1)


def _dpa(channels: int, num_classes: int | None = None, tau: float = 0.0, interval: int = 5, alpha: float = 0.9,
         token_pool: str = "mean", rows_per_sample: int = 1, nhwc: bool = False) -> DPA:
    return DPA(channels, num_classes, tau=tau, interval=interval, alpha=alpha, token_pool=token_pool,
               rows_per_sample=rows_per_sample, nhwc=nhwc)


def _from_site(site: Site, num_classes: int | None = None, **kwargs) -> DPA:
    """Pooling follows the site: the class token where the model classifies from one, k rows per sample
    where the leading dim is k times the batch (TNT's inner blocks)."""
    if site.in_shape[0] % site.batch:
        raise SiteMismatch(f"leading dim {site.in_shape[0]} is not a multiple of the batch {site.batch}")
    num_classes = num_classes if num_classes is not None else site.num_classes
    if num_classes is None:
        raise ValueError("DPA needs num_classes= (it keeps per-class memories)")
    kwargs.setdefault("token_pool", "cls" if site.class_token else "mean")
    kwargs.setdefault("rows_per_sample", site.in_shape[0] // site.batch)
    kwargs.setdefault("nhwc", site.layout == "nhwc")
    return _dpa(site.channels, num_classes, **kwargs)


register(ActivationSpec("dpa", _dpa, needs_channels=True, needs_num_classes=True, from_site=_from_site,
                        layouts=LAYOUTS,
                        summary="dual-perspective activation: TAU + per-class channel denoising"))
