"""Finding activation sites in existing models and swapping them (``actlab.convert``)."""
from .converter import (ConversionReport, ScaleCheck, SiteRecord, SiteSplit, check, conversion_report, convert,
                        load_converted)
from .record import RECORD_KEY
from .trace import ACTIVATION_TYPES, NORM_TYPES, activation_types, default_example_input, trace_activations

__all__ = [
    "ACTIVATION_TYPES", "NORM_TYPES", "activation_types", "ConversionReport", "ScaleCheck", "SiteRecord", "SiteSplit", "check",
    "conversion_report",
    "convert", "load_converted", "RECORD_KEY", "default_example_input", "trace_activations",
]
