"""The fused operations as ``torch.library`` custom ops: one dispatch, fake kernels, autograd formulas.

Shapes are those of ``composite.py`` (IIEU-B planes (B, C, P) / rows (R, C); DPA maps (B, C, P) /
tokens (B, N, C)); every tensor argument must be contiguous. ``ema_update_`` is DPA's sequential memory rule,
applied where a 0-dim device flag says so (no host synchronisation).
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import backend, composite


# every implementation reads its inputs as dense row-major arrays; the compiler must hand them over so
CONTIGUOUS = tuple(getattr(torch.Tag, name) for name in ("needs_contiguous_strides",) if hasattr(torch.Tag, name))


def dense(t: Tensor) -> Tensor:
    """A contiguous tensor of t's shape and dtype: what the implementations return. (``empty_like``
    would copy an input's strides, and the compiler would then read the real, contiguous output with
    those strides.)"""
    return t.new_empty(t.shape)


# --- IIEU-B elementwise forward / backward -------------------------------------------------------------

@torch.library.custom_op("actlab::iieu_forward", mutates_args=(), tags=CONTIGUOUS)
def iieu_forward(x: Tensor, inv: Tensor, inv_w: Tensor, nu: Tensor, eta: Tensor) -> Tensor:
    """out = s(x * inv_w * inv + nu) * x, x's dtype; s(r) = r above eta, eta * exp(r - eta) below."""
    return backend(x).iieu_forward(x, inv, inv_w, nu, eta)


@iieu_forward.register_fake
def _(x, inv, inv_w, nu, eta):
    return dense(x)


@torch.library.custom_op("actlab::iieu_backward", mutates_args=(), tags=CONTIGUOUS)
def iieu_backward(grad_out: Tensor, x: Tensor, inv: Tensor, inv_w: Tensor, nu: Tensor,
                  eta: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of ``iieu_forward`` w.r.t. (x, inv, inv_w, nu, eta), each shaped like its input."""
    return tuple(backend(x, cpu_native=grad_out.dtype == x.dtype).iieu_backward(grad_out, x, inv, inv_w, nu, eta))


@iieu_backward.register_fake
def _(grad_out, x, inv, inv_w, nu, eta):
    return (dense(x), dense(inv), dense(inv_w), dense(nu),
            dense(eta))


def _iieu_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _iieu_grad(ctx, grad_out):
    grads = torch.ops.actlab.iieu_backward(grad_out.contiguous(), *ctx.saved_tensors)
    return tuple(g if needed else None for g, needed in zip(grads, ctx.needs_input_grad))


iieu_forward.register_autograd(_iieu_grad, setup_context=_iieu_setup)


# --- inverse row norms of a Linear site's input -------------------------------------------------------

@torch.library.custom_op("actlab::rows_inv_norm", mutates_args=(), tags=CONTIGUOUS)
def rows_inv_norm(x: Tensor, eps: float, silent: float) -> tuple[Tensor, Tensor]:
    """x (R, K) -> (inv (R,), sumsq (R,)): 1 / (||x_r|| + eps), 0 below ``silent`` (< 0: never)."""
    return tuple(backend(x).rows_inv_norm(x, eps, silent))


@rows_inv_norm.register_fake
def _(x, eps, silent):
    dtype = composite.compute_dtype(x)
    return x.new_empty(x.shape[0], dtype=dtype), x.new_empty(x.shape[0], dtype=dtype)


@torch.library.custom_op("actlab::rows_inv_norm_backward", mutates_args=(), tags=CONTIGUOUS)
def rows_inv_norm_backward(x: Tensor, sumsq: Tensor, grad_inv: Tensor, eps: float, silent: float) -> Tensor:
    """dL/d x of ``rows_inv_norm`` from dL/d inv."""
    return backend(x).rows_inv_norm_backward(x, sumsq, grad_inv, eps, silent)


@rows_inv_norm_backward.register_fake
def _(x, sumsq, grad_inv, eps, silent):
    return dense(x)


def _norm_setup(ctx, inputs, output):
    x, ctx.eps, ctx.silent = inputs
    ctx.save_for_backward(x, output[1])


def _norm_grad(ctx, grad_inv, grad_sumsq):
    x, sumsq = ctx.saved_tensors
    if grad_inv is None:
        grad_inv = torch.zeros_like(sumsq)
    grad = torch.ops.actlab.rows_inv_norm_backward(x, sumsq, grad_inv.contiguous(), ctx.eps, ctx.silent)
    if grad_sumsq is not None:  # sumsq is returned for backward; its own gradient is 2 x
        grad = grad + (2 * x.to(sumsq.dtype) * grad_sumsq[:, None]).to(grad.dtype)
    return grad, None, None


rows_inv_norm.register_autograd(_norm_grad, setup_context=_norm_setup)


@torch.library.custom_op("actlab::inv_norm", mutates_args=(), tags=CONTIGUOUS)
def inv_norm(sumsq: Tensor, eps: float, silent: float) -> Tensor:
    """1 / (sqrt(sumsq) + eps), 0 where sqrt(sumsq) < silent (< 0: never); elementwise, any shape. Its
    gradient is 0 at a zero norm, where the plain ops' chain rule would give inf * 0 = NaN."""
    norm = sumsq.sqrt()
    inv = 1.0 / (norm + eps)
    return torch.where(norm < silent, torch.zeros_like(inv), inv) if silent >= 0 else inv


@inv_norm.register_fake
def _(sumsq, eps, silent):
    return dense(sumsq)


def _inv_norm_setup(ctx, inputs, output):
    sumsq, ctx.eps, ctx.silent = inputs
    ctx.save_for_backward(sumsq)


def _inv_norm_grad(ctx, grad_inv):
    (sumsq,) = ctx.saved_tensors
    return composite.inv_norm_grad_sumsq(sumsq, grad_inv, ctx.eps, ctx.silent), None, None


inv_norm.register_autograd(_inv_norm_grad, setup_context=_inv_norm_setup)


# --- the Dynamic Coupler's fusion ----------------------------------------------------------------------

def _coupler_kernels(main: Tensor, shortcut: Tensor):
    """C++ kernels for float32 CPU maps in (B, C, *S) order, contiguous; else the composite (or Triton)."""
    native_ok = main.dim() != 3 and main.is_contiguous() and shortcut.is_contiguous() and shortcut.dtype == main.dtype
    return backend(main, cpu_native=native_ok)


def coupler_fusion(main: Tensor, shortcut: Tensor, net: composite.CouplerNet) -> tuple[Tensor, Tensor]:
    """out = l1 * main + l2 * shortcut with (l1, l2) from the pooled branches through the weight network;
    returns (out, state), the state (the pooled branches and the weights, ``composite.coupler_state_parts``)
    what ``coupler_fusion_backward`` takes."""
    return _coupler_kernels(main, shortcut).coupler_fusion(main, shortcut, net)


def coupler_fusion_backward(grad: Tensor, out: Tensor, shortcut: Tensor, state: Tensor,
                            net: composite.CouplerNet) -> tuple[Tensor, Tensor, tuple]:
    """dL/d main, dL/d shortcut and dL/d each of ``net.tensors()`` from dL/d out, without ``main``."""
    return _coupler_kernels(out, shortcut).coupler_fusion_backward(grad, out, shortcut, state, net)


_NET = "Tensor in_weight, Tensor in_bias, Tensor fc1, Tensor eta, Tensor row_weight, Tensor row_bias, Tensor fc2, " \
       "Tensor out_weight, Tensor out_bias, float silent, float ln_eps, float row_eps, float eps"


def _net_of(tensors, scalars) -> composite.CouplerNet:
    silent, ln_eps, row_eps, eps = scalars
    return composite.CouplerNet(*tensors, silent=silent, ln_eps=ln_eps, row_eps=row_eps, eps=eps)


@torch.library.custom_op("actlab::coupler", mutates_args=(), tags=CONTIGUOUS,
                         schema=f"(Tensor main, Tensor shortcut, {_NET}) -> (Tensor, Tensor)")
def coupler(main, shortcut, *net):
    """The Dynamic Coupler's fusion, ``coupler_fusion``, for torch.compile: (out, state)."""
    return coupler_fusion(main, shortcut, _net_of(net[:9], net[9:]))


def _channels(x: Tensor) -> int:
    return x.shape[-1] if x.dim() == 3 else x.shape[1]


@coupler.register_fake
def _(main, shortcut, *net):
    b, c = main.shape[0], _channels(main)
    return dense(main), main.new_empty(4 * b * c, dtype=composite.compute_dtype(main))


@torch.library.custom_op("actlab::coupler_backward", mutates_args=(), tags=CONTIGUOUS,
                         schema=f"(Tensor grad, Tensor out, Tensor shortcut, Tensor state, {_NET}) -> Tensor[]")
def coupler_backward(grad, out, shortcut, state, *net):
    """``coupler_fusion_backward``: [dL/d main, dL/d shortcut, then one per network tensor], each a tensor of
    its own (an operation's outputs do not alias each other)."""
    grad_main, grad_shortcut, grad_params = coupler_fusion_backward(grad, out, shortcut, state,
                                                                    _net_of(net[:9], net[9:]))
    return [grad_main, grad_shortcut, *(g.clone() if g._is_view() else g.contiguous() for g in grad_params)]


@coupler_backward.register_fake
def _(grad, out, shortcut, state, *net):
    return [dense(grad), dense(grad), *(dense(t) for t in net[:9])]


def _coupler_setup(ctx, inputs, output):
    out, state = output
    ctx.save_for_backward(out, inputs[1], state, *inputs[2:11])
    ctx.scalars = inputs[11:]


def _coupler_grad(ctx, grad_out, grad_state):
    out, shortcut, state, *tensors = ctx.saved_tensors
    grads = torch.ops.actlab.coupler_backward(grad_out.contiguous(), out, shortcut, state, *tensors, *ctx.scalars)
    return (*(g if needed else None for g, needed in zip(grads, ctx.needs_input_grad)), None, None, None, None)


coupler.register_autograd(_coupler_grad, setup_context=_coupler_setup)


# --- DPA: TAU and the pooled response in one pass ------------------------------------------------------

@torch.library.custom_op("actlab::tau_pool", mutates_args=(), tags=CONTIGUOUS)
def tau_pool(x: Tensor, tau: float, tokens: bool) -> tuple[Tensor, Tensor, Tensor]:
    """TAU(x), the mean (float32; float64 for float64 x) over positions (x (B, C, P)) or tokens (x (B, N, C)), and the
    packed pass mask x >= tau (uint8, ceil(numel / 8))."""
    return tuple(backend(x).tau_pool(x, tau, tokens))


@tau_pool.register_fake
def _(x, tau, tokens):
    b, c = (x.shape[0], x.shape[2]) if tokens else x.shape[:2]
    return (dense(x), x.new_empty(b, c, dtype=composite.compute_dtype(x)),
            x.new_empty(composite.packed_size(x.numel()), dtype=torch.uint8))


@torch.library.custom_op("actlab::tau_pool_backward", mutates_args=(), tags=CONTIGUOUS)
def tau_pool_backward(grad_out: Tensor, passes: Tensor, grad_v: Tensor | None, tokens: bool) -> Tensor:
    """dL/d x of ``tau_pool``: grad_out where the pass mask is set, plus grad_v spread evenly over the pooled
    axis."""
    return backend(grad_out).tau_pool_backward(grad_out, passes, grad_v, tokens)


@tau_pool_backward.register_fake
def _(grad_out, passes, grad_v, tokens):
    return dense(grad_out)


def _tau_setup(ctx, inputs, output):
    x, _, ctx.tokens = inputs
    ctx.shape, ctx.dtype = x.shape, x.dtype
    ctx.save_for_backward(output[2])


def _tau_grad(ctx, grad_out, grad_v, grad_passes):
    (passes,) = ctx.saved_tensors
    if grad_out is None:
        grad_out = passes.new_zeros(ctx.shape, dtype=ctx.dtype)
    if grad_v is not None:
        grad_v = grad_v.contiguous()
    grad = torch.ops.actlab.tau_pool_backward(grad_out.contiguous(), passes, grad_v, ctx.tokens)
    return grad, None, None


tau_pool.register_autograd(_tau_grad, setup_context=_tau_setup)


# --- DPA: the per-class exponential memory -------------------------------------------------------------

@torch.library.custom_op("actlab::ema_update_", mutates_args=("memory",), tags=CONTIGUOUS)
def ema_update_(memory: Tensor, labels: Tensor, values: Tensor, alpha: float, enabled: Tensor,
                signs: bool = False) -> Tensor:
    """Where ``enabled`` (a 0-dim bool tensor), apply ``memory[y_i] += alpha * (values_i - memory[y_i])``
    for i in batch order, in place (``signs``: with the signs of the values, see
    ``composite.pooled_signs``). Returns (B, C): memory[y_i] right after sample i's own update (or
    memory[y_i] unchanged when not enabled). No host synchronisation and no data-dependent loop."""
    return backend(memory).ema_update_(memory, labels, values, alpha, signs=signs, enabled=enabled)


@ema_update_.register_fake
def _(memory, labels, values, alpha, enabled, signs=False):
    return memory.new_empty(labels.shape[0], memory.shape[1])


@torch.library.custom_op("actlab::dpa_step_", mutates_args=("value_memory", "count"), tags=CONTIGUOUS)
def dpa_step_(value_memory: Tensor, count: Tensor, grad_memory: Tensor, v: Tensor, labels: Tensor, alpha: float,
              interval: int, tau: float) -> tuple[Tensor, Tensor]:
    """One DPA site's bookkeeping in a traced training forward, as one operation: advance the schedule
    ``count`` (mod ``interval``) on the device; where it wraps to 0, update the value memory with the pooled
    response v (B, C); return DPA's channel mask (B, C) from the memory rows right after each sample's
    update, and the 0-dim update flag (for the gradient memory's update in backward)."""
    count.copy_((count + 1) % interval)
    update = count == 0
    rows = backend(value_memory).ema_update_(value_memory, labels, v, alpha, enabled=update)
    mask = backend(v).dpa_mask(v, rows, grad_memory, labels, tau, False)
    return mask, update


@dpa_step_.register_fake
def _(value_memory, count, grad_memory, v, labels, alpha, interval, tau):
    return v.new_empty(v.shape, dtype=torch.bool), count.new_empty((), dtype=torch.bool)
