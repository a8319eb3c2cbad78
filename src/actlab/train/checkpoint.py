"""Checkpoints: written atomically, read with ``weights_only=True`` (no arbitrary unpickling)."""
from __future__ import annotations

import os
import random
import tempfile

import numpy as np
import torch

FORMAT = "actlab-checkpoint-1"
KEYS = ("config", "model", "model_config", "optimizer", "scaler", "rng", "epoch", "step", "history")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: missing, corrupt, or from another run configuration."""


def save_atomic(state: dict, path: str) -> None:
    """Write ``state`` to ``path`` so that a crash at any moment leaves the old file or the new one, never
    a torn one: a temporary file in the same folder, flushed to disk, then renamed over ``path``."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".checkpoint-", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def remove_temporaries(folder: str) -> list[str]:
    """Delete the temporary files of writes that a kill interrupted (``save_atomic`` never left the old
    checkpoint torn, but its half-written temporary stays); returns their names."""
    if not os.path.isdir(folder):
        return []
    names = [n for n in os.listdir(folder) if n.startswith(".checkpoint-") and n.endswith(".tmp")]
    for name in names:
        os.unlink(os.path.join(folder, name))
    return names


def load(path: str) -> dict:
    """Read a checkpoint written by ``save_atomic``; errors name the file and the problem."""
    if not os.path.isfile(path):
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - truncated, foreign or tampered files all end here
        raise CheckpointError(f"{path} is not a readable actlab checkpoint ({type(exc).__name__}: {exc})") from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an actlab checkpoint (format {state.get('format') if isinstance(state, dict) else type(state).__name__!r})")
    missing = [k for k in KEYS if k not in state]
    if missing:
        raise CheckpointError(f"{path} is an incomplete actlab checkpoint: missing {missing}")
    return state


def rng_state() -> dict:
    """Every RNG a training step draws from, as tensors and plain values (loadable with weights_only)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached": float(cached)},
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))
