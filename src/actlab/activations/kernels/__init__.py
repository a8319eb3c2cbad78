"""actlab's kernel layer: every fused operation of IIEU-B and DPA, registered once with ``torch.library``.

Each operation (``torch.ops.actlab.*``, defined in ``ops.py``) has three implementations behind one
dispatch, each a module implementing the whole kernel-backend interface (``interface.py``): actlab's C++
kernels for float32 CPU tensors (``native.py``), Triton kernels for CUDA tensors (``triton_kernels.py``),
and the plain-PyTorch composite (``composite.py``) that is the reference and the fallback. ``backend(x)``
below is the one place that chooses among them. Fake (meta) implementations and autograd formulas are registered with them, so
``torch.compile`` traces through the operations without a graph break.

``set_kernels(mode)`` chooses for both methods at once (also the environment variable
``ACTLAB_KERNELS``):

* ``"auto"`` (default): C++ on CPU, Triton on CUDA, each falling back to the composite with one warning
  when it cannot be built or imported here.
* ``"native"``: the same, but a missing build raises instead of falling back.
* ``"eager"``: the composite everywhere.
* ``"triton"``: Triton on every device, for testing the Triton kernels on CPU tensors under Triton's
  interpreter (``TRITON_INTERPRET=1``).

``set_emulate_cuda(True)`` (also ``ACTLAB_EMULATE_CUDA=1``, with ``TRITON_INTERPRET=1``) runs on CPU
tensors exactly the code that CUDA tensors run: the Triton kernels and every branch that depends on
the device (``runs_like_cuda``), so a machine without a GPU executes, and ``actlab.perf.gpu_cost``
counts, what a GPU would be given.
"""
from __future__ import annotations

import os
import warnings

MODES = ("auto", "native", "eager", "triton")
_mode = os.environ.get("ACTLAB_KERNELS", "auto")
_emulate_cuda = os.environ.get("ACTLAB_EMULATE_CUDA", "0") not in ("", "0")
_warned: set[str] = set()


def set_emulate_cuda(on: bool) -> None:
    """Run the CUDA code path on CPU tensors (Triton kernels under ``TRITON_INTERPRET=1`` and the CUDA
    side of every device-dependent branch), or stop doing so."""
    global _emulate_cuda
    _emulate_cuda = bool(on)


def emulating_cuda() -> bool:
    return _emulate_cuda


def runs_like_cuda(x) -> bool:
    """Whether tensor ``x`` takes the CUDA code path: a CUDA tensor, or any tensor while emulating."""
    return x.device.type == "cuda" or _emulate_cuda


def set_kernels(mode: str) -> None:
    """Choose the implementation of the fused operations: "auto", "native", "eager" or "triton"."""
    global _mode
    if mode not in MODES:
        raise ValueError(f"kernels must be one of {MODES}, got {mode!r}")
    _mode = mode


def kernel_mode() -> str:
    """The current mode; an invalid ACTLAB_KERNELS value is reported here, where it is first used."""
    if _mode not in MODES:
        raise ValueError(f"ACTLAB_KERNELS must be one of {MODES}, got {_mode!r}")
    return _mode


def _unavailable(what: str, reason: str | None):
    if kernel_mode() == "native":
        raise RuntimeError(f"actlab {what} kernels are not available here: {reason}")
    if what not in _warned:
        _warned.add(what)
        warnings.warn(f"actlab: {what} kernels unavailable ({reason}); using the PyTorch composite instead. "
                      "Choose explicitly with actlab.activations.kernels.set_kernels().", RuntimeWarning)


def backend(x, cpu_native: bool = True):
    """The module implementing the operations for tensor ``x``: ``native``, ``triton_kernels`` or
    ``composite``. ``cpu_native``: the C++ kernel applies to this call (float32, a layout it handles).
    Resolved once per (mode, device type, dtype, cpu_native): eager training asks at every site."""
    key = (_mode, _emulate_cuda, x.device.type, x.dtype, cpu_native)
    chosen = _BACKENDS.get(key)
    if chosen is None:
        chosen = _BACKENDS[key] = _resolve(x, cpu_native)
    return chosen


_BACKENDS: dict[tuple, object] = {}


def _resolve(x, cpu_native: bool):
    from . import composite, native

    mode = kernel_mode()
    if mode == "eager" or x.dtype == composite.torch.float64:
        return composite
    if mode == "triton" or runs_like_cuda(x):
        if x.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError("actlab: the CUDA code path on CPU tensors (ACTLAB_EMULATE_CUDA=1 or kernels "
                               "'triton') needs Triton's interpreter: set TRITON_INTERPRET=1 before Python starts")
        triton_kernels, reason = _triton()
        if triton_kernels is not None:
            return triton_kernels
        _unavailable("Triton", reason)
        return composite
    if x.device.type == "cpu" and cpu_native and x.dtype == composite.torch.float32:
        if native.available():
            return native
        _unavailable("C++ CPU", native.build_error())
    return composite


_TRITON: dict[str, object] = {}


def _triton():
    if "module" not in _TRITON:
        try:
            from . import triton_kernels

            _TRITON["module"], _TRITON["reason"] = triton_kernels, None
        except Exception as exc:  # noqa: BLE001 - no triton, or one that does not load on this platform
            _TRITON["module"], _TRITON["reason"] = None, f"{type(exc).__name__}: {exc}"
    return _TRITON["module"], _TRITON["reason"]
