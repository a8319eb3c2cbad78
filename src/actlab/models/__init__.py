"""The papers' architectures, each taking any registered activation.

    model = actlab.models.create_model("resnet20", act="iieu_b", num_classes=10, image_size=32)
    actlab.models.model_stats(model, image_size=32)   # {"params": ..., "flops": ...}
"""
from .registry import (ModelSpec, create_model, get_model_spec, list_models, model_acts, model_stats,
                       site_activation, unsupported)

__all__ = ["ModelSpec", "create_model", "get_model_spec", "list_models", "model_acts", "model_stats",
           "site_activation", "unsupported"]
