"""Finding activation sites in existing models and swapping them (``actlab.convert``)."""
from .converter import ConversionReport, ScaleCheck, SiteRecord, SiteSplit, check, conversion_report, convert
from .trace import ACTIVATION_TYPES, NORM_TYPES, default_example_input, trace_activations

__all__ = [
    "ACTIVATION_TYPES", "NORM_TYPES", "ConversionReport", "ScaleCheck", "SiteRecord", "SiteSplit", "check",
    "conversion_report",
    "convert", "default_example_input", "trace_activations",
]
