"""Builds actlab's C++ CPU kernels at install, against the torch of the environment installed into.

The build needs that torch importable, so install without build isolation (``make`` does):
``pip install --no-build-isolation .``. Without it (or without a C++ compiler) actlab installs all the
same and builds the kernels on first use (``actlab.activations.kernels.native``).
"""
import importlib.util
import json
import os
import sys

from setuptools import setup

KERNELS = os.path.join("src", "actlab", "activations", "kernels")


def _recipe():
    """``build.py`` of the kernels, loaded from its file (actlab is not installed yet)."""
    spec = importlib.util.spec_from_file_location("actlab_kernel_build", os.path.join(KERNELS, "build.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _say(message: str) -> None:
    print(f"actlab setup: {message}", file=sys.stderr)


def _kernel_build():
    """(ext_modules, cmdclass) that build the kernels, or ([], {}) where torch is not importable."""
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        _say("torch is not importable in this build (pip's build isolation): the C++ CPU kernels will be built "
             "on first use; `pip install --no-build-isolation` builds them now")
        return [], {}
    recipe = _recipe()

    class BuildKernels(BuildExtension):
        """torch's BuildExtension, writing the build's record beside the library; a failed compile leaves
        the kernels to be built on first use instead of failing the install."""

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as exc:  # noqa: BLE001 - e.g. no C++ compiler: actlab still works
                _say(f"building the C++ CPU kernels failed ({type(exc).__name__}: {exc}); they will be built on "
                     "first use")

        def run(self):
            super().run()
            for ext in self.extensions:  # beside the library where it ends up (the source tree when editable)
                library = self.get_ext_fullpath(ext.name)
                if os.path.exists(library):
                    with open(os.path.join(os.path.dirname(library), recipe.BUILD_INFO), "w") as f:
                        json.dump(recipe.build_info(KERNELS), f)

    sources = [os.path.join(KERNELS, name) for name in recipe.SOURCES]
    extension = CppExtension(f"actlab.activations.kernels.{recipe.LIBRARY}", sources,
                             extra_compile_args=recipe.cflags(), extra_link_args=["-fopenmp"])
    return [extension], {"build_ext": BuildKernels}


ext_modules, cmdclass = _kernel_build()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
