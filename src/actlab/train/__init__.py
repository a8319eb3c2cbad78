"""Training: ``actlab.train.train(TrainConfig(...))`` or ``actlab train`` on the command line."""
from .checkpoint import CheckpointError
from .config import TrainConfig
from .loop import load_run_model, train
from .metrics import evaluate
from .run_folder import RunFolder
from .schedule import lr_at

__all__ = ["CheckpointError", "RunFolder", "TrainConfig", "evaluate", "load_run_model", "lr_at", "train"]
