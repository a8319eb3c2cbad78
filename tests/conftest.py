"""Test-wide settings."""
import os

# IIEU-B's compiled kernels take seconds to compile per input shape; the suite tests the eager kernels
# everywhere and the compiled ones against them in test_iieu.py::test_compiled_kernels_match_eager.

# DPA likewise: the suite runs its PyTorch ops; test_dpa.py compares the native kernel against them.

