"""Native CPU kernels, built on first use with torch.utils.cpp_extension (a C++ compiler and ninja).

``iieu_cpu()`` returns the ``torch.ops.actlab_iieu`` namespace and ``dpa_cpu()`` the ``torch.ops.actlab_dpa``
one (both built as one library), or ``None`` with the reason in ``build_error()`` when it cannot be built
here (no compiler, unsupported platform). The build takes
about half a minute once per machine and torch version; later processes load it from
``~/.cache/torch_extensions`` (``TORCH_EXTENSIONS_DIR`` moves it).
"""
from __future__ import annotations

import logging
import os
import sys
import threading
import warnings

import torch

_SOURCES = [os.path.join(os.path.dirname(__file__), name) for name in ("iieu_cpu.cpp", "dpa_cpu.cpp")]
_lock = threading.Lock()
_state: dict[str, object] = {}


def _cflags() -> list[str]:
    flags = ["-O3", "-fopenmp"]
    # at::vec picks its AVX2 implementation from this macro; the matching -m flags are only safe where
    # torch itself found AVX2 (wrong flags crash with an illegal instruction instead of raising)
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        flags += ["-mavx2", "-mfma", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"]
    return flags


def _loaded() -> bool:
    with _lock:
        if "ok" not in _state:
            _state["ok"], _state["error"] = _build()
        return bool(_state["ok"])


def iieu_cpu():
    """The IIEU-B CPU ops (``planes_forward/backward``, ``rows_forward/backward``), or None."""
    return torch.ops.actlab_iieu if _loaded() else None


def dpa_cpu():
    """DPA's fused conv-site ops (``tau_pool_forward/backward``), or None."""
    return torch.ops.actlab_dpa if _loaded() else None


def build_error() -> str | None:
    return _state.get("error")


_warned: set[str] = set()


def ops_or_fallback(ops, strict: bool, what: str, fallback: str):
    """``ops`` when the library was built; otherwise raise (``strict``: the user asked for native) or
    warn once per ``what`` that it runs on ``fallback`` instead, and return None."""
    if ops is None:
        if strict:
            raise RuntimeError(f"{what} native kernels could not be built: {build_error()}")
        if what not in _warned:
            _warned.add(what)
            warnings.warn(f"{what}: native CPU kernels unavailable ({build_error()}); using {fallback}.",
                          RuntimeWarning)
    return ops


def _build():
    # torch logs a CUDA_HOME warning on CPU-only machines on import; it does not concern a CPU kernel
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension

        name = "actlab_cpu_kernels"
        built = os.path.exists(os.path.join(cpp_extension._get_build_directory(name, False), f"{name}.so"))
        if not built:
            print("actlab: building the IIEU-B and DPA CPU kernels (once per machine, about 30 s)...", file=sys.stderr)
        cpp_extension.load(name=name, sources=_SOURCES, extra_cflags=_cflags(), is_python_module=False)
        return True, None
    except Exception as exc:  # noqa: BLE001 - any build failure means "use the other kernels"
        return False, f"{type(exc).__name__}: {exc}"
