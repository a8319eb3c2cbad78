"""Test-wide settings."""
import os

import torch

# Without a GPU, the Triton kernels run on CPU tensors through Triton's interpreter (test_triton.py); the
# variable must be set before the kernels are defined.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
