"""How actlab's C++ CPU kernels are built: the sources, the compiler flags, and the record of one build
(``BUILD_INFO``, written beside the library) that says which torch, Python and CPU it serves.

Used by ``setup.py`` (the build at install) and by ``native.py`` (which loads that build, or builds on
first use where the installed one is missing or was made for another torch, Python, CPU or source).
This file imports nothing of actlab, so ``setup.py`` can load it before actlab is installed.
"""
from __future__ import annotations

import hashlib
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCES = ("iieu_cpu.cpp", "dpa_cpu.cpp")
LIBRARY = "_cpu_kernels"  # the extension's name inside actlab.activations.kernels
BUILD_INFO = "_cpu_kernels.json"
_AVX2 = ("AVX2", "AVX512")


def source_paths(folder: str = HERE) -> list[str]:
    return [os.path.join(folder, name) for name in SOURCES]


def avx2() -> bool:
    """Whether this CPU runs torch's AVX2 code (the kernels' vector paths then use AVX2 too)."""
    return torch.backends.cpu.get_cpu_capability() in _AVX2


def cflags(with_avx2: bool | None = None) -> list[str]:
    flags = ["-O3", "-fopenmp"]
    # at::vec picks its AVX2 implementation from this macro; the matching -m flags are only safe where
    # torch itself found AVX2 (wrong flags crash with an illegal instruction instead of raising)
    if avx2() if with_avx2 is None else with_avx2:
        flags += ["-mavx2", "-mfma", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"]
    return flags


def source_digest(folder: str = HERE) -> str:
    """A digest of the kernel sources (12 hex digits): a build serves only the sources it was made from."""
    digest = hashlib.sha256()
    for path in source_paths(folder):
        with open(path, "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()[:12]


def build_info(folder: str = HERE) -> dict:
    """What a build made now, here, serves: torch, Python, whether it uses AVX2, the sources' digest."""
    return {"torch": torch.__version__, "python": sys.implementation.cache_tag, "avx2": avx2(),
            "sources": source_digest(folder)}


def mismatch(built: dict, here: dict) -> str | None:
    """Why a build described by ``built`` cannot serve ``here`` (both ``build_info`` dicts), or None."""
    for key, what in (("torch", "torch"), ("python", "Python"), ("sources", "kernel sources")):
        if built.get(key) != here[key]:
            return f"it was built for {what} {built.get(key)}, this is {here[key]}"
    if built.get("avx2") and not here["avx2"]:
        return "it was built with AVX2, which this CPU lacks"
    return None


def jit_directory(version: str) -> str:
    """Where a build on first use goes: one folder per actlab version, Python, torch, CPU kind and sources
    (``$ACTLAB_KERNEL_CACHE``, else ``$XDG_CACHE_HOME/actlab/kernels``, else ``~/.cache/actlab/kernels``), so
    two checkouts or environments never rebuild or lock each other's."""
    root = os.environ.get("ACTLAB_KERNEL_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "actlab", "kernels")
    info = build_info()
    name = (f"actlab{version}-{info['python']}-torch{info['torch']}-{'avx2' if info['avx2'] else 'base'}-"
            f"{info['sources']}")
    return os.path.join(root, name.replace("+", "_"))
