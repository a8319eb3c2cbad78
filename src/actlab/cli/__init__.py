"""The ``actlab`` command line: train, eval, list."""
from .main import main

__all__ = ["main"]
