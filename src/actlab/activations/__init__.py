"""Activation modules and their registry. Importing this package registers every activation."""
from . import acon, basic, dpa, dyrelu, frelu, gdn, iieu, smu  # noqa: F401  (registration side effects)
from .base import ActivationModule
from .coupler import DynamicCoupler
from .dpa import DPA, dpa_loss, sequential_ema_, targets, threshold_unit
from .iieu import IIEUB, iieu_b
from .registry import ActivationSpec, Site, SiteMismatch, create_activation, get_spec, list_activations, register

__all__ = [
    "ActivationModule", "ActivationSpec", "DPA", "DynamicCoupler", "IIEUB", "Site", "SiteMismatch",
    "create_activation", "dpa_loss",
    "get_spec", "iieu_b", "list_activations", "register", "sequential_ema_", "targets", "threshold_unit",
]
