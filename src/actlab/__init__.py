"""actlab: selective re-calibration activations (IIEU, DPA) and baselines, drop-in for PyTorch models."""
from .activations import (
    DPA,
    IIEUB,
    DynamicCoupler,
    create_activation,
    dpa_loss,
    list_activations,
    targets,
)
from .convert import ConversionReport, check, conversion_report, convert, load_converted

__version__ = "0.1.0"

__all__ = [
    "DPA", "IIEUB", "ConversionReport", "DynamicCoupler", "check", "conversion_report", "convert", "create_activation",
    "dpa_loss", "list_activations", "load_converted", "targets",
]
