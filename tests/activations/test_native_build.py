"""Where actlab's C++ CPU kernels come from: the build made at install (``setup.py``) is loaded when it
serves this torch, Python, CPU and source; otherwise the build on first use goes to a folder of its own."""
from __future__ import annotations

import json
import os
import shutil

import pytest

from actlab.activations.kernels import build, native


def test_the_kernels_built_at_install_are_the_ones_loaded():
    """`make` installs with --no-build-isolation, so setup.py compiles the kernels against this torch and
    nothing is built on first use."""
    path, why = native.installed_library()
    assert path is not None, f"no usable build from the install: {why} (install with `make venv`)"
    assert native.available() and native.origin() == "installed", native.build_error()


def installed(folder, **changes):
    """A folder laid out as an install leaves it: the sources, a library file and its build record."""
    for name in build.SOURCES:
        shutil.copy(os.path.join(build.HERE, name), folder)
    library = folder / f"{build.LIBRARY}.cpython-311-x86_64-linux-gnu.so"
    library.write_bytes(b"")
    (folder / build.BUILD_INFO).write_text(json.dumps({**build.build_info(str(folder)), **changes}))
    return str(library)


def test_a_build_that_fits_is_taken(tmp_path):
    library = installed(tmp_path)
    assert native.installed_library(str(tmp_path)) == (library, None)


@pytest.mark.parametrize("changes,reason", [({"torch": "2.0.0"}, "torch 2.0.0"), ({"python": "cpython-39"}, "Python"),
                                            ({"sources": "0123456789ab"}, "kernel sources")])
def test_a_build_for_another_torch_python_or_source_is_refused(tmp_path, changes, reason):
    installed(tmp_path, **changes)
    path, why = native.installed_library(str(tmp_path))
    assert path is None and reason in why


def test_an_avx2_build_is_refused_on_a_cpu_without_avx2():
    here = {"torch": "2.14.1", "python": "cpython-311", "sources": "x", "avx2": False}
    assert "AVX2" in build.mismatch({**here, "avx2": True}, here)
    assert build.mismatch(here, {**here, "avx2": True}) is None  # a plain build runs anywhere


def test_no_build_record_means_no_installed_build(tmp_path):
    installed(tmp_path)
    (tmp_path / build.BUILD_INFO).unlink()
    path, why = native.installed_library(str(tmp_path))
    assert path is None and "--no-build-isolation" in why


def test_builds_on_first_use_have_a_folder_per_version_python_torch_cpu_and_source(tmp_path, monkeypatch):
    monkeypatch.setenv("ACTLAB_KERNEL_CACHE", str(tmp_path))
    info = build.build_info()
    folder = build.jit_directory("0.1.0")
    assert os.path.dirname(folder) == str(tmp_path)
    for part in ("actlab0.1.0", info["python"], info["torch"].replace("+", "_"), info["sources"]):
        assert part in os.path.basename(folder)
    assert build.jit_directory("0.2.0") != folder
