"""actlab inside timm: any timm model with an actlab activation, actlab's zoo as timm models, and timm's own
scripts (``train.py``, ``validate.py``) running them.

* ``create_timm_model("resnet50", "iieu_b")``: ``timm.create_model`` then ``actlab.convert``, the example
  batch sized from the model's pretrained config (its ``input_size``) or the ``img_size`` / ``in_chans``
  given.
* Importing this module registers timm model names: ``actlab`` (any timm architecture:
  ``timm.create_model("actlab", arch="resnet50", act="iieu_b")``) and ``actlab_NAME`` for each model of
  actlab's zoo (``timm.create_model("actlab_resnet26", act="iieu_dc", num_classes=100, img_size=32)``).
  timm's ``act_layer=`` cannot name an actlab activation: IIEU-B needs its site's producer and DPA its
  class count, which a layer built from a name does not have; the conversion finds both.
* ``DPAClassificationTask``: timm's ``ClassificationTask`` (the training step of timm's ``train.py``) with
  DPA's class targets routed to the forward and its channel loss added; ``dpa_task(base)`` does the same
  to any timm task that trains on class labels (``DPA_TASKS``: the classification task and the logit,
  feature and token distillation tasks, the student trained with DPA).
* ``python -m actlab.integrations.timm [--dpa-weight W] SCRIPT [ARGS]`` registers the names, puts the DPA
  tasks in timm's place (``timm.task.ClassificationTask`` and the distillation tasks), then runs a timm
  script as its ``__main__``: ``python -m
  actlab.integrations.timm train.py DATA --model actlab --model-kwargs arch=resnet18 act=dpa``.
  Checkpoints its ``CheckpointSaver`` writes hold the conversion record, so ``validate.py --checkpoint``
  (run the same way, same model arguments) and ``timm.models.load_checkpoint`` load them, and
  ``actlab.load_converted`` loads them into a plain ``timm.create_model(arch)``.
"""
from __future__ import annotations

import argparse
import runpy
import sys

import timm
import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import register_model

from ..activations import dpa_loss, targets
from ..convert import convert
from ..models import create_model as create_zoo_model
from ..models import list_models as list_zoo_models

try:  # timm's training tasks (the step of its train.py) arrived in timm 1.0.2x
    import timm.task as timm_tasks
except ImportError:  # pragma: no cover - older timm
    timm_tasks = None
# the tasks whose forward(input, target) trains ``trainable_module`` on class labels (not the multi-label one)
TASKS = ("ClassificationTask", "LogitDistillationTask", "FeatureDistillationTask", "TokenDistillationTask")

PREFIX = "actlab_"


def create_timm_model(name: str, act: str, *, pretrained: bool = False, act_kwargs: dict | None = None,
                      example_input=None, **kwargs) -> nn.Module:
    """``timm.create_model(name, pretrained=pretrained, **kwargs)`` with ``act`` at every activation site.

    Args:
        name: a timm model name (``timm.list_models()``).
        act: a registered actlab activation (``actlab.list_activations()``).
        pretrained: timm's (its weights are loaded before the conversion; the new activations start from
            their own initial values).
        act_kwargs: passed to every new activation (e.g. ``{"tau": 0.1}`` for DPA).
        example_input: the batch the sites are found with; default a random (2, C, H, W) batch from
            ``in_chans`` / ``img_size`` when given, else the model's pretrained config ``input_size``.
        **kwargs: timm's (``num_classes``, ``in_chans``, ``img_size``, ``drop_path_rate`` ...).
    Returns:
        the converted model; ``actlab.conversion_report(model)`` says what changed, and its state_dict
        records the conversion.
    """
    model = timm.create_model(name, pretrained=pretrained, **kwargs)
    if example_input is None:
        example_input = torch.randn(2, *_input_size(model, kwargs))
    return convert(model, act, example_input=example_input, **(act_kwargs or {}))


def _input_size(model: nn.Module, kwargs: dict) -> tuple[int, int, int]:
    channels, height, width = getattr(model, "pretrained_cfg", {}).get("input_size", (3, 224, 224))
    size = kwargs.get("img_size")
    if size is not None:
        height, width = (size, size) if isinstance(size, int) else size
    return kwargs.get("in_chans", channels), height, width


def actlab(pretrained: bool = False, arch: str | None = None, act: str | None = None, act_kwargs: dict | None = None,
           pretrained_cfg=None, **kwargs) -> nn.Module:
    """timm entrypoint ``actlab``: the timm model ``arch`` with the actlab activation ``act``
    (``create_timm_model``)."""
    if arch is None or act is None:
        raise ValueError("timm model 'actlab' needs arch= (a timm model name) and act= (an actlab activation), "
                         "e.g. timm.create_model('actlab', arch='resnet50', act='iieu_b'); from timm's scripts: "
                         "--model actlab --model-kwargs arch=resnet50 act=iieu_b")
    return create_timm_model(arch, act, pretrained=pretrained, act_kwargs=act_kwargs, **kwargs)


def _zoo_entrypoint(zoo_name: str):
    def entrypoint(pretrained: bool = False, act: str = "relu", num_classes: int = 1000, in_chans: int = 3,
                   img_size: int = 224, act_kwargs: dict | None = None, pretrained_cfg=None,
                   pretrained_cfg_overlay=None, cache_dir=None, **kwargs) -> nn.Module:
        if pretrained:
            raise ValueError(f"timm model {PREFIX + zoo_name!r}: actlab's zoo has no pretrained weights")
        model = create_zoo_model(zoo_name, act, num_classes, image_size=img_size, in_channels=in_chans,
                                 act_kwargs=act_kwargs, **kwargs)
        model.pretrained_cfg = {"input_size": (in_chans, img_size, img_size), "num_classes": num_classes,
                                "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD, "crop_pct": 0.875,
                                "interpolation": "bilinear", "architecture": PREFIX + zoo_name}
        return model

    entrypoint.__name__ = entrypoint.__qualname__ = PREFIX + zoo_name
    entrypoint.__module__ = __name__
    entrypoint.__doc__ = (f"timm entrypoint {PREFIX + zoo_name!r}: actlab's {zoo_name!r} with act= at every site "
                          "(actlab.models.create_model).")
    return entrypoint


class DPATask:
    """What makes a timm training task train DPA: its training forward (the student's, in a distillation
    task) runs inside ``actlab.targets(task.trainable_module, target)`` and ``dpa_weight *
    actlab.dpa_loss`` is added to its ``"loss"``. Soft targets (timm's mixup / CutMix) count as each row's
    most probable class. Evaluation forwards, and models without DPA sites, run as the task's own. Put it
    first among the bases: ``class MyTask(DPATask, timm.task.ClassificationTask)``; ``dpa_task(base)``
    makes that class.

    Args:
        *args: the task's own (for ``ClassificationTask``: model, criterion).
        dpa_weight: the channel loss's weight (1 for CIFAR-10, 5 for CIFAR-100 in the DPA paper); default
            the class attribute ``default_dpa_weight`` (1).
        **kwargs: the task's own (``criterion_kwargs``, ``device``, ``dtype``, ``verbose``, a distillation
            task's ``teacher_model``, ...).
    """

    default_dpa_weight = 1.0

    def __init__(self, *args, dpa_weight: float | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.dpa_weight = self.default_dpa_weight if dpa_weight is None else dpa_weight

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        model = self.trainable_module
        if not (model.training and torch.is_grad_enabled()):
            return super().forward(input, target)
        with targets(model, target):
            result = super().forward(input, target)
        result["loss"] = result["loss"] + self.dpa_weight * dpa_loss(model)
        return result


def dpa_task(base: type) -> type:
    """The DPA version of a timm training task class (``DPATask`` first among its bases), named ``DPA`` + its
    name: ``dpa_task(timm.task.LogitDistillationTask)(student, teacher_model=..., dpa_weight=5)``."""
    return type(f"DPA{base.__name__}", (DPATask, base), {"__module__": __name__, "__doc__": DPATask.__doc__})


DPA_TASKS = {name: dpa_task(getattr(timm_tasks, name)) for name in TASKS if hasattr(timm_tasks, name)}
DPAClassificationTask = DPA_TASKS.get("ClassificationTask")


def register() -> list[str]:
    """Register ``actlab`` and ``actlab_NAME`` (actlab's zoo) as timm model names; idempotent. Returns them.

    Raises:
        ValueError: one of the names is timm's own or another package's.
    """
    entrypoints = [actlab] + [_zoo_entrypoint(name) for name in list_zoo_models()]
    names = []
    for fn in entrypoints:
        if timm.is_model(fn.__name__):
            owner = timm.models.model_entrypoint(fn.__name__)
            if not getattr(owner, "actlab_entrypoint", False):
                raise ValueError(f"timm already has a model named {fn.__name__!r} ({owner.__module__}); actlab "
                                 "does not overwrite it")
        else:
            fn.actlab_entrypoint = True
            register_model(fn)
        names.append(fn.__name__)
    return names


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m actlab.integrations.timm``."""
    parser = argparse.ArgumentParser(prog="python -m actlab.integrations.timm", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dpa-weight", type=float, default=1.0,
                        help="weight of DPA's channel loss in timm's training tasks (default 1)")
    parser.add_argument("script", help="a timm script (train.py, validate.py, ...) or any Python file")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="the script's own arguments")
    return parser


def main(argv: list[str] | None = None) -> int:
    """``python -m actlab.integrations.timm [--dpa-weight W] SCRIPT [ARGS]``: register the names, make timm's
    tasks of ``DPA_TASKS`` the DPA ones (``dpa_weight=W``), run SCRIPT as ``__main__`` with ARGS."""
    parser = build_parser()
    options = parser.parse_args(sys.argv[1:] if argv is None else argv)
    register()
    for name, task in DPA_TASKS.items():  # what `from timm.task import ...` in the script then gets
        setattr(timm_tasks, name, type(task.__name__, (task,), {"default_dpa_weight": options.dpa_weight,
                                                                "__module__": __name__}))
    sys.argv = [options.script, *options.args]
    runpy.run_path(options.script, run_name="__main__")
    return 0


register()

if __name__ == "__main__":
    sys.exit(main())
