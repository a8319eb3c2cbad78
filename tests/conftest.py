"""Test-wide settings."""
import hashlib
import os
import pathlib
import tempfile

import torch

# Without a GPU, the Triton kernels run on CPU tensors through Triton's interpreter (test_triton.py); the
# variable must be set before the kernels are defined.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _source_digest() -> str:
    src = pathlib.Path(__file__).resolve().parents[1] / "src" / "actlab" / "activations"  # the autograd code
    digest = hashlib.sha256()
    for path in sorted(src.rglob("*")):
        if path.suffix in (".py", ".cpp"):
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


# torch.compile's on-disk caches key a compiled backward on the forward graph, not on the Python autograd
# formulas of actlab's custom operations: a cache written by other actlab sources could replay an old
# backward. One cache directory per state of the activations' sources, where all that autograd code lives.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), f"actlab_test_inductor_{_source_digest()}"))

# Under pytest-xdist (`make test` runs the default suite on one worker per core) each worker gets its share
# of the cores as torch threads: workers with a thread per core each would spin against one another.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))
