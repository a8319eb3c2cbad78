"""actlab's C++ CPU kernels.

The functions below take and return what their namesakes in ``composite.py`` do (float32 CPU tensors,
contiguous). ``available()`` loads the library once and says whether it could; ``build_error()`` says
why not (no compiler, unsupported platform), ``origin()`` where it came from.

The library is built at install (``pip install --no-build-isolation``, as ``make`` does: the build needs
the torch it will run with). Where that build is missing, or was made for another torch, Python, CPU or
source, it is built on first use with ``torch.utils.cpp_extension`` (a C++ compiler and ninja; about a
minute on 2 cores, said on stderr) into a folder of its own per actlab version, Python, torch, CPU kind
and source (``build.jit_directory``), where later processes find it.
"""
from __future__ import annotations

import glob
import importlib.machinery
import importlib.metadata
import json
import logging
import os
import sys
import threading
import time

import torch

from . import build, composite

_lock = threading.Lock()
_state: dict[str, object] = {}


def _loaded() -> bool:
    with _lock:
        if "ok" not in _state:
            _state["ok"], _state["error"] = _load()
        return bool(_state["ok"])


def available() -> bool:
    """Whether the C++ library is built and loaded (building it on the first call)."""
    return _loaded()


def build_error() -> str | None:
    return _state.get("error")


def origin() -> str | None:
    """Where the loaded library came from: ``"installed"`` (built at install), ``"built on first use"``
    (a build in ``build.jit_directory``), or None (not loaded)."""
    _loaded()
    return _state.get("origin")


def _planes(t):
    """A planes tensor (B, C, *S) as the C++ kernels read it, (B, C, P) (a view)."""
    return t if t.dim() == 3 else t.flatten(2)


def iieu_forward(x, inv, inv_w, nu, eta):
    ops = torch.ops.actlab_iieu
    if x.dim() == 2:
        return ops.rows_forward(x, inv, inv_w, nu, eta)
    return ops.planes_forward(_planes(x), _planes(inv), inv_w, nu, eta).view(x.shape)


def iieu_backward(grad_out, x, inv, inv_w, nu, eta, grad_into_x: bool = False):
    """As composite.iieu_backward; ``grad_into_x``: x is the caller's temporary, overwritten by grad_x."""
    ops = torch.ops.actlab_iieu
    if x.dim() == 2:
        grads = ops.rows_backward(grad_out, x, inv, inv_w, nu, eta, grad_into_x)
    else:
        grads = ops.planes_backward(_planes(grad_out), _planes(x), _planes(inv), inv_w, nu, eta, grad_into_x)
    grad_x, grad_inv, grad_w, grad_nu, grad_eta = grads
    return grad_x.view(x.shape), grad_inv.view(inv.shape), grad_w, grad_nu, grad_eta * (1 - eta)


_NONE = torch.empty(0)


def iieu_bn_sums(grad_out, c, inv, inv_w, nu, eta, xs, xb, hs, hb):
    """As composite.iieu_bn_sums, for contiguous float32 planes."""
    grad_inv, grad_w, grad_nu, grad_eta, *sums = torch.ops.actlab_iieu.planes_bn_sums(
        _planes(grad_out), _planes(c), _planes(inv), inv_w, nu, eta, xs, xb, hs, hb)
    return (grad_inv.view(inv.shape), grad_w, grad_nu, grad_eta * (1 - eta), *sums)


def iieu_bn_grad(grad_out, c, inv, inv_w, nu, eta, xs, xb, a, k1, k2):
    """As composite.iieu_bn_grad, for contiguous float32 planes."""
    return torch.ops.actlab_iieu.planes_bn_grad(_planes(grad_out), _planes(c), _planes(inv), inv_w, nu, eta, xs, xb, a,
                                                k1.contiguous(), k2).view(c.shape)


def batch_moments(x):
    """As composite.batch_moments, for a contiguous float32 x (B, C, *S)."""
    return tuple(torch.ops.actlab_iieu.plane_moments(x.view(x.shape[0], x.shape[1], -1)))


def batchnorm_terms(c, weight, bias, eps: float):
    """As composite.batchnorm_terms, for a contiguous float32 c, its moments in one C++ pass."""
    return composite.batchnorm_terms(c, weight, bias, eps, moments=batch_moments)


term_b_forward = composite.term_b_forward  # a LayerNorm and a sigmoid over (B, C): torch's own kernels


def bn_site_stats(c, weight, bias, eps: float, running, ln_weight, ln_bias, ln_eps: float, filters,
                  filter_eps: float):
    """As composite.bn_site_stats, for a contiguous float32 c, its moments in one C++ pass."""
    return composite.bn_site_stats(c, weight, bias, eps, running, ln_weight, ln_bias, ln_eps, filters, filter_eps,
                                   moments=batch_moments)


def bn_site_forward(x, inv, eta, stats):
    """As composite.bn_site_forward, in C++."""
    return composite.bn_site_forward(x, inv, eta, stats, forward=iieu_forward)


def bn_site_backward(grad_out, c, inv, eta, stats, ln_weight, batch_stats: bool):
    """As composite.bn_site_backward, for contiguous float32 planes: both passes in C++."""
    return composite.bn_site_backward(grad_out, c, inv, eta, stats, ln_weight, batch_stats, sums=iieu_bn_sums,
                                      grad=iieu_bn_grad)


def bn_site_filter_grad(filters, stats, grad_inv_w, filter_eps: float):
    """As composite.bn_site_filter_grad, in one C++ pass over the filters."""
    return composite.bn_site_filter_grad(filters, stats, grad_inv_w, filter_eps, backward=rows_inv_norm_backward)


linear_site_stats = composite.linear_site_stats  # small reductions and one (S, K) x (K, C) product: torch's kernels


def linear_site_forward(x, eta, stats, k: int):
    """As composite.linear_site_forward, in C++."""
    return composite.linear_site_forward(x, eta, stats, k, forward=iieu_forward)


def linear_site_backward(grad_out, x, eta, stats, weight, has_bias: bool, ln_weight, filter_eps: float):
    """As composite.linear_site_backward, the pass over the rows in C++."""
    return composite.linear_site_backward(grad_out, x, eta, stats, weight, has_bias, ln_weight, filter_eps,
                                          backward=iieu_backward)


linear_site_input_grad = composite.linear_site_input_grad

def channel_sumsq(x, groups: int, ct: torch.dtype):
    """As composite.channel_sumsq, for a contiguous float32 x (B, C, *S) and ct float32."""
    b = x.shape[0]
    out = torch.ops.actlab_iieu.planes_channel_sumsq(x.view(b, x.shape[1], -1), groups)
    return out.view(b, groups, *x.shape[2:])


def channel_scale(x, scale, add=None, into_add: bool = False):
    """As composite.channel_scale, for contiguous float32 x (B, C, *S), scale (B, G, *S) and add (x's shape;
    contiguous when ``into_add``)."""
    add = _NONE if add is None else add if into_add else add.contiguous()
    return torch.ops.actlab_iieu.planes_channel_scale(x, scale.view(x.shape[0], scale.shape[1], -1), add, into_add)


def coupler_forward(main, shortcut, lam):
    """As composite.coupler_forward, for contiguous float32 maps (B, C, *S)."""
    w1, w2 = (w.contiguous() for w in lam.unbind(1))
    return torch.ops.actlab_iieu.coupler_forward(main, shortcut, w1, w2)


def coupler_sums(grad, out, shortcut):
    """As composite.coupler_sums, for contiguous float32 maps (B, C, *S)."""
    return tuple(torch.ops.actlab_iieu.coupler_sums(grad, out, shortcut))


def coupler_weight_grads(grad, out, shortcut, lam):
    """As composite.coupler_weight_grads, the sums over positions in one C++ pass."""
    sum_out, sum_shortcut = coupler_sums(grad, out, shortcut)
    w1, w2 = lam.unbind(1)
    return torch.stack([(sum_out - w2 * sum_shortcut) / w1, sum_shortcut], 1)


def coupler_grads(grad, lam, add):
    """As composite.coupler_grads, for a contiguous float32 grad (B, C, *S)."""
    terms = (t.contiguous() for t in (*lam.unbind(1), *add.view(lam.shape).unbind(1)))
    return tuple(torch.ops.actlab_iieu.coupler_grads(grad, *terms))


# term-B's backward (small (B, C) work) and its spread over the positions: torch's own ops
term_b_backward_into_ = composite.term_b_backward_into_

# the coupler's pooling and weight network: small (B, 2C) work, torch's own ops
coupler_pool, coupler_weights, coupler_weights_backward = (composite.coupler_pool, composite.coupler_weights,
                                                           composite.coupler_weights_backward)


def coupler_fusion(main, shortcut, net):
    """As composite.coupler_fusion, the fusion in C++."""
    return composite.coupler_fusion(main, shortcut, net, forward=coupler_forward)


def coupler_fusion_backward(grad, out, shortcut, state, net):
    """As composite.coupler_fusion_backward, both passes over the maps in C++."""
    return composite.coupler_fusion_backward(grad.contiguous(), out, shortcut, state, net,
                                             weight_grads=coupler_weight_grads, grads=coupler_grads)


def inverse_norm(sumsq, eps: float, silent: float):
    """As composite.inverse_norm, in one pass for a contiguous float32 map."""
    if sumsq.dtype != torch.float32 or not sumsq.is_contiguous():
        return composite.inverse_norm(sumsq, eps, silent)
    return torch.ops.actlab_iieu.inv_norm_map(sumsq, eps, silent)


def inv_norm_grad_sumsq(sumsq, grad_inv, eps: float, silent: float):
    """As composite.inv_norm_grad_sumsq, in one pass for contiguous float32 maps."""
    if sumsq.dtype != torch.float32 or grad_inv.dtype != torch.float32 or not sumsq.is_contiguous():
        return composite.inv_norm_grad_sumsq(sumsq, grad_inv, eps, silent)
    return torch.ops.actlab_iieu.inv_norm_grad_map(sumsq, grad_inv.contiguous(), eps, silent)


def channel_inv_norm(x, groups: int, ct: torch.dtype, eps: float, silent: float):
    """As composite.channel_inv_norm: the sums of squares and the inverse norms in C++."""
    sumsq = channel_sumsq(x, groups, ct)
    return inverse_norm(sumsq, eps, silent), sumsq


def channel_norm_grad_scale(x, sumsq, grad_inv, eps: float, silent: float, add=None, into_add: bool = False):
    """As composite.channel_norm_grad_scale, in two C++ passes."""
    return channel_scale(x, 2 * inv_norm_grad_sumsq(sumsq, grad_inv, eps, silent), add, into_add)


def window_inv_norm(sq, window, eps: float, silent: float):
    """As composite.window_inv_norm, the inverse norms in C++."""
    sumsq = window.window_sum(sq)
    return inverse_norm(sumsq, eps, silent), sumsq


def window_inv_norm_backward(sumsq, grad_inv, hw, window, eps: float, silent: float):
    """As composite.window_inv_norm_backward, the inverse norms' gradient in C++."""
    return 2 * window.window_sum_backward(inv_norm_grad_sumsq(sumsq, grad_inv, eps, silent), hw)


def rows_inv_norm(x, eps: float, silent: float):
    inv, sumsq = torch.ops.actlab_iieu.rows_inv_norm(x.view(x.shape[0], -1), eps, silent)
    return inv, sumsq


def rows_inv_norm_backward(x, sumsq, grad_inv, eps: float, silent: float):
    grad = torch.ops.actlab_iieu.rows_inv_norm_backward(x.view(x.shape[0], -1), sumsq, grad_inv, eps, silent)
    return grad.view(x.shape)


def rows_norm_grad_scale(x, sumsq, grad_inv, eps: float, silent: float, add=None, into_add: bool = False):
    """As composite.rows_norm_grad_scale, the gradient in C++."""
    grad = rows_inv_norm_backward(x, sumsq, grad_inv, eps, silent)
    if add is None:
        return grad
    return add.add_(grad) if into_add else add + grad


def tau_pool(x, tau: float, tokens: bool):
    ops = torch.ops.actlab_dpa
    return (ops.tau_pool_tokens_forward if tokens else ops.tau_pool_forward)(x, tau)


def tau_pool_backward(grad_out, passes, grad_v, tokens: bool, cls: bool = False):
    if not tokens and grad_out.dim() > 3:  # maps with their spatial dims
        return tau_pool_backward(grad_out.flatten(2), passes, grad_v, tokens).view(grad_out.shape)
    if cls:
        return composite.spread_pooled_grad(masked_grad(grad_out, passes), grad_v, tokens, cls)
    ops = torch.ops.actlab_dpa
    grad_v = None if grad_v is None else grad_v.contiguous()
    return (ops.tau_pool_tokens_backward if tokens else ops.tau_pool_backward)(grad_out, passes, grad_v)


def pass_mask(x, tau: float):
    return torch.ops.actlab_dpa.pass_mask(x, tau)


def dpa_forward(x, tau: float, tokens: bool, memories=None, labels=None, count=None, cls: bool = False):
    return composite.dpa_forward(x, tau, tokens, memories, labels, count, cls, pool=tau_pool)


def ema_update_(memory, labels, values, alpha: float, order=None, signs: bool = False, after: bool = True,
                enabled=None):
    """As composite.ema_update_ (small per-class work, torch's kernels). A step whose ``enabled`` flag is
    false does nothing but look the rows up: on the CPU reading the flag waits on no device, and a traced
    training step (which calls this on every step, see ``dpa_step_``) skips the closed form on the four
    steps of five that do not update."""
    if enabled is not None and not bool(enabled):
        return memory.index_select(0, labels) if after else None
    return composite.ema_update_(memory, labels, values, alpha, order, signs, after)


dpa_mask = composite.dpa_mask  # a few comparisons over (B, C): torch's kernels


def masked_grad(grad, passes):
    return torch.ops.actlab_dpa.masked_grad(grad, passes)


def installed_library(folder: str = build.HERE) -> tuple[str | None, str | None]:
    """(the library built at install in ``folder``, None) when it serves this torch, Python, CPU and
    source; else (None, why not)."""
    suffixes = tuple(importlib.machinery.EXTENSION_SUFFIXES)
    found = [p for p in glob.glob(os.path.join(folder, build.LIBRARY + "*")) if p.endswith(suffixes)]
    info = os.path.join(folder, build.BUILD_INFO)
    if not found or not os.path.exists(info):
        return None, "actlab was installed without them; `pip install --no-build-isolation` builds them at install"
    with open(info) as f:
        reason = build.mismatch(json.load(f), build.build_info(folder))
    if reason is not None:
        return None, f"the installed build does not fit: {reason}"
    return found[0], None


def _load() -> tuple[bool, str | None]:
    # torch logs a CUDA_HOME warning on CPU-only machines on import; it does not concern a CPU kernel
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    path, why = installed_library()
    try:
        if path is not None:
            torch.ops.load_library(path)
            _state["origin"] = "installed"
        else:
            _build_on_first_use(why)
            _state["origin"] = "built on first use"
        return True, None
    except Exception as exc:  # noqa: BLE001 - any build or load failure means "use the other kernels"
        return False, f"{type(exc).__name__}: {exc}"


def _build_on_first_use(why: str) -> None:
    from torch.utils import cpp_extension

    try:
        version = importlib.metadata.version("actlab")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    directory = build.jit_directory(version)
    os.makedirs(directory, exist_ok=True)
    name = "actlab_cpu_kernels"
    fresh = not os.path.exists(os.path.join(directory, name + ".so"))
    if fresh:
        print(f"actlab: building the C++ CPU kernels once (about a minute) into {directory}, because {why}",
              file=sys.stderr)
    start = time.perf_counter()
    cpp_extension.load(name=name, sources=build.source_paths(), extra_cflags=build.cflags(),
                       build_directory=directory, is_python_module=False)
    if fresh:
        print(f"actlab: C++ CPU kernels built in {time.perf_counter() - start:.0f} s", file=sys.stderr)
