"""Every kernel backend implements the whole kernel-backend interface (``kernels/interface.py``): each
operation, with the interface's parameters in order (extra parameters only with defaults)."""
from __future__ import annotations

import inspect
import os

import pytest

from actlab.activations.kernels import composite, native
from actlab.activations.kernels.interface import KernelBackend

OPERATIONS = [name for name, _ in inspect.getmembers(KernelBackend, inspect.isfunction) if not name.startswith("_")]


def backends():
    found = [composite, native]
    if os.environ.get("TRITON_INTERPRET") == "1" or _has_cuda():
        from actlab.activations.kernels import triton_kernels

        found.append(triton_kernels)
    return found


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def test_the_interface_lists_the_operations():
    assert len(OPERATIONS) >= 30 and {"iieu_forward", "dpa_mask", "coupler_fusion"} <= set(OPERATIONS)


@pytest.mark.parametrize("module", backends(), ids=lambda m: m.__name__.rsplit(".", 1)[-1])
def test_every_backend_implements_every_operation(module):
    for name in OPERATIONS:
        fn = getattr(module, name, None)
        assert callable(fn), f"{module.__name__} lacks {name}"
        wanted = list(inspect.signature(getattr(KernelBackend, name)).parameters)[1:]  # without self
        params = list(inspect.signature(fn).parameters.values())
        assert [p.name for p in params[:len(wanted)]] == wanted, f"{module.__name__}.{name}"
        extra = params[len(wanted):]
        assert all(p.default is not inspect.Parameter.empty or p.kind is p.VAR_KEYWORD for p in extra), \
            f"{module.__name__}.{name}: extra parameters without defaults {[p.name for p in extra]}"
