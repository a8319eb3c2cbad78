"""Find activation sites by running one forward pass with hooks.

For every call of an activation module we record the registration it was called through (owner module
and attribute), the input shape, and where its input tensor came from: the module call that produced
it, followed back through pass-through modules (Identity, Dropout) and one norm layer. Provenance uses
tensor identity *and* the tensor's version counter, so a map modified in place after its producer ran
(``out += identity`` in a ResNet block) is not mistaken for the producer's output.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode

from ..activations.base import ActivationModule
from ..activations.dense import is_dense, is_plain_dense
from .functional import FUNCTIONAL_ACTIVATIONS

_TORCH_ACTS: tuple[type, ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.ELU, nn.CELU, nn.SELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Softplus, nn.Hardswish, ActivationModule,
)
NORM_TYPES: tuple[type, ...] = (
    nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm,
    nn.LocalResponseNorm,
) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())
PASS_THROUGH: tuple[type, ...] = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout)

def _timm_types() -> tuple[tuple[type, ...], tuple[type, ...]]:
    """timm's own activation and drop-path classes, when timm is installed."""
    try:
        from timm.layers import activations as ta
        from timm.layers import drop as td
    except ImportError:  # pragma: no cover - timm is a dependency, but keep the converter usable without it
        return (), ()
    acts = tuple(getattr(ta, n) for n in ("Swish", "Mish", "GELU", "GELUTanh", "QuickGELU", "HardSwish", "PReLU")
                 if isinstance(getattr(ta, n, None), type))
    drops = tuple(getattr(td, n) for n in ("DropPath", "DropBlock2d") if isinstance(getattr(td, n, None), type))
    return acts, drops


_TIMM_ACTS, _TIMM_DROPS = _timm_types()
ACTIVATION_TYPES: tuple[type, ...] = _TORCH_ACTS + _TIMM_ACTS
PASS_THROUGH = PASS_THROUGH + _TIMM_DROPS

# Hugging Face transformers' activation classes (transformers.activations), sites when transformers is loaded
_HF_ACTS = ("GELUActivation", "NewGELUActivation", "FastGELUActivation", "QuickGELUActivation", "GELUTanh",
            "PytorchGELUTanh", "ClippedGELUActivation", "AccurateGELUActivation", "SiLUActivation",
            "MishActivation", "ReLUSquaredActivation")


def activation_types() -> tuple[type, ...]:
    """The module classes ``convert`` treats as activations: ``ACTIVATION_TYPES`` (torch's, timm's, actlab's)
    and, once ``transformers`` is imported (an HF model exists), its activation classes (``GELUActivation``,
    ``NewGELUActivation``, ``QuickGELUActivation``, ``SiLUActivation``, ...)."""
    hf = sys.modules.get("transformers.activations")
    if hf is None:
        return ACTIVATION_TYPES
    return ACTIVATION_TYPES + tuple(getattr(hf, n) for n in _HF_ACTS if isinstance(getattr(hf, n, None), type))


def is_producer(module: nn.Module) -> bool:
    """A plain Conv2d, Linear or transformers ``Conv1D`` (subclasses that change the forward, e.g. weight
    standardisation, are not)."""
    if isinstance(module, nn.Conv2d):
        return type(module).forward is nn.Conv2d.forward and module.padding_mode == "zeros"
    return is_plain_dense(module)


@dataclass
class ModuleCall:
    seq: int
    module: nn.Module
    name: str
    source: "ModuleCall | None"  # call that produced this call's first input
    in_shape: tuple | None


@dataclass
class ActivationCall:
    """One call of an activation module during the trace."""

    seq: int
    module: nn.Module
    owner: nn.Module
    owner_name: str
    attr: str
    owner_invocation: int  # seq of the call of the running module it happened in
    in_shape: tuple | None
    caller: nn.Module | None = None  # that running module (== owner unless reached through a ModuleList)
    producer: nn.Module | None = None
    producer_name: str = ""
    norm: nn.Module | None = None
    norm_name: str = ""
    no_site_reason: str = ""  # why this call has no Conv2d/Linear producer
    channels_last: bool = False  # made by a Linear (or a LayerNorm over the last dim): (B, *, C)
    frames: dict[int, int] = field(default_factory=dict)  # id(module) -> seq of its running call, whole stack
    producer_slice: tuple[int, int] | None = None  # the input is these output features of a Linear producer
    dtype: torch.dtype | None = None  # of the input: a new module is made in it, on its device
    device: torch.device | None = None

    @property
    def registration(self) -> str:
        return f"{self.owner_name}.{self.attr}" if self.owner_name else self.attr


@dataclass
class Trace:
    calls: list[ActivationCall] = field(default_factory=list)
    functional: list[str] = field(default_factory=list)
    functional_owners: dict[str, nn.Module] = field(default_factory=dict)  # name -> module whose forward calls one
    # token counts N of the (B, N, C) tensors whose first token the model took on its own (x[:, 0]): the
    # class token it classifies from
    first_token_reads: set[int] = field(default_factory=set)
    batch: int = 0


def _first_tensor(args) -> torch.Tensor | None:
    for a in args:
        if isinstance(a, torch.Tensor):
            return a
    return None


class _Tracer:
    def __init__(self, model: nn.Module, act_types: tuple[type, ...]):
        self.model, self.act_types = model, act_types
        self.names: dict[int, str] = {}
        for name, m in model.named_modules():
            self.names.setdefault(id(m), name)
        self.stack: list[ModuleCall] = []
        self.produced: dict[int, tuple[ModuleCall, int]] = {}
        # storage ptr -> (latest call, its output, the output's version then): views of it are traced back
        self.outputs: dict[int, tuple[ModuleCall, torch.Tensor, int]] = {}
        self.alive: list[torch.Tensor] = []  # keep traced tensors alive so their ids stay unique
        self.last_seq: dict[int, int] = {}
        self.seq = 0
        self.trace = Trace()
        self.handles = []

    def is_act(self, m: nn.Module) -> bool:
        return isinstance(m, self.act_types)

    def source(self, t: torch.Tensor | None) -> ModuleCall | None:
        if t is None:
            return None
        entry = self.produced.get(id(t))
        if entry is not None and entry[1] == t._version:
            return entry[0]
        return self.reshaped_source(t)

    def install(self) -> None:
        def walk(module: nn.Module) -> None:
            self.handles.append(module.register_forward_pre_hook(self.pre))
            self.handles.append(module.register_forward_hook(self.post))
            if self.is_act(module):
                return  # an activation's internals are not sites
            for child in module.children():
                walk(child)

        walk(self.model)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()

    def pre(self, module: nn.Module, args) -> None:
        x = _first_tensor(args)
        call = ModuleCall(self.seq, module, self.names.get(id(module), "?"), self.source(x),
                          tuple(x.shape) if x is not None else None)
        self.seq += 1
        self.last_seq[id(module)] = call.seq
        if self.is_act(module) and not isinstance(module, nn.ModuleList):
            self._record_activation(call, x)
        self.stack.append(call)

    def post(self, module: nn.Module, args, output) -> None:
        call = self.stack.pop()
        if not isinstance(output, torch.Tensor):
            return
        self.alive.append(output)
        known = self.source(output)
        if isinstance(module, PASS_THROUGH):
            src = call.source
            if src is not None:
                self.produced[id(output)] = (src, output._version)
            return
        if known is not None and known.seq > call.seq:
            return  # a container returning its child's output unchanged: the child is the producer
        reshaped = self.reshaped_source(output, call)
        if reshaped is not None:  # a container returning its child's output reshaped (levit's LinearNorm)
            self.produced[id(output)] = (reshaped, output._version)
            return
        self.produced[id(output)] = (call, output._version)
        self.outputs[output.untyped_storage().data_ptr()] = (call, output, output._version)

    def reshaped_source(self, t: torch.Tensor, container: ModuleCall | None = None) -> ModuleCall | None:
        """The call (made inside ``container``, when given) whose unchanged output ``t`` is a reshaped view
        of: same memory, same elements in the same order (``x.flatten(0, 1)``, ``reshape_as(x)``)."""
        entry = self.outputs.get(t.untyped_storage().data_ptr())
        if entry is None:
            return None
        call, out, version = entry
        inside = container is None or call.seq > container.seq
        same_elements = (inside and t.numel() == out.numel() and t.is_contiguous() and out.is_contiguous()
                         and t.storage_offset() == out.storage_offset())
        return call if same_elements and t._version == version else None

    def linear_slice_source(self, t: torch.Tensor | None) -> tuple[ModuleCall | None, tuple[int, int] | None]:
        """The Linear call and ``(start, stop)`` when ``t`` is an unchanged slice of that call's output
        along its features (a gated MLP's ``fc1(x).chunk(2, dim=-1)``), else (None, None)."""
        if t is None or t.dim() < 2:
            return None, None
        entry = self.outputs.get(t.untyped_storage().data_ptr())
        if entry is None or not is_dense(entry[0].module):
            return None, None
        call, out, version = entry
        start = t.storage_offset() - out.storage_offset()
        is_slice = (out.is_contiguous() and t.shape[:-1] == out.shape[:-1] and t.stride() == out.stride()
                    and 0 <= start and start + t.shape[-1] <= out.shape[-1] and t._version == version)
        return (call, (start, start + t.shape[-1])) if is_slice else (None, None)

    def conv_tokens_source(self, t: torch.Tensor | None) -> ModuleCall | None:
        """The Conv2d call whose unchanged (B, C, H, W) output ``t`` is, seen as tokens (B, H*W, C) through
        ``flatten(2).transpose(1, 2)`` (PVT-v2's depthwise-conv MLP)."""
        if t is None or t.dim() != 3:
            return None
        entry = self.outputs.get(t.untyped_storage().data_ptr())
        if entry is None or not isinstance(entry[0].module, nn.Conv2d) or entry[1].dim() != 4:
            return None
        call, out, version = entry
        b, c, h, w = out.shape
        same_layout = (t.shape == (b, h * w, c) and out.stride(2) == w * out.stride(3)
                       and t.stride() == (out.stride(0), out.stride(3), out.stride(1))
                       and t.storage_offset() == out.storage_offset())
        return call if same_layout and t._version == version else None

    def _owner(self, module: nn.Module) -> tuple[ModuleCall | None, nn.Module | None, str, str]:
        """The innermost running module holding ``module`` as a child, directly or through a ModuleList /
        ModuleDict that is indexed rather than called: (its call, the holder, holder's name, attribute)."""
        for frame in reversed(self.stack):
            for attr, child in frame.module._modules.items():
                if child is module:
                    return frame, frame.module, frame.name, attr
                if isinstance(child, (nn.ModuleList, nn.ModuleDict)):
                    for key, item in child._modules.items():
                        if item is module:
                            return frame, child, f"{frame.name}.{attr}" if frame.name else attr, key
        return None, None, "", ""

    def _record_activation(self, call: ModuleCall, x: torch.Tensor | None) -> None:
        owner, holder, holder_name, attr = self._owner(call.module)
        if owner is None:
            return  # the model itself is an activation, or the call came from outside the module tree
        act = ActivationCall(call.seq, call.module, holder, holder_name, attr, owner.seq, call.in_shape,
                             caller=owner.module, frames={id(f.module): f.seq for f in self.stack},
                             dtype=x.dtype if x is not None else None, device=x.device if x is not None else None)
        src = call.source
        if src is None and isinstance(owner.module, NORM_TYPES) and holder is owner.module:
            # an activation inside a norm module (timm's BatchNormAct2d): the norm is the site's norm
            act.norm, act.norm_name = owner.module, owner.name
            src = owner.source
        elif src is not None and isinstance(src.module, NORM_TYPES):
            act.norm, act.norm_name = src.module, src.name
            src = src.source
        if not act.norm_name and (src is None or not is_producer(src.module)):
            src = self.conv_tokens_source(x) or src
        if src is None and not act.norm_name:
            src, act.producer_slice = self.linear_slice_source(x)
        act.channels_last = _channels_last(src, act.norm, call.in_shape)
        if src is None:
            act.no_site_reason = "its input is made by tensor code (e.g. a residual add), not by a module"
        elif not is_producer(src.module):
            what = type(src.module).__name__
            act.no_site_reason = f"its input comes from {src.name or 'the model'} ({what}), not a Conv2d/Linear" + \
                (" through a norm" if act.norm_name else "")
        elif self.last_seq.get(id(src.module)) != src.seq:
            act.no_site_reason = f"its producer {src.name} was called again before this activation ran"
        else:
            act.producer, act.producer_name = src.module, src.name
            if act.producer_slice is not None:
                act.producer_name += f"[{act.producer_slice[0]}:{act.producer_slice[1]}]"
        self.trace.calls.append(act)


def _channels_last(src: ModuleCall | None, norm: nn.Module | None, shape: tuple | None) -> bool:
    """Whether the activation's input has its channels last: it comes from a Linear, or through a norm
    over the last dim only (a plain LayerNorm / RMSNorm, whose forward is not re-ordered by a subclass)."""
    if shape is None or len(shape) < 2:
        return False
    if src is not None and is_dense(src.module):
        return True
    plain_norms = (nn.LayerNorm,) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())
    return (isinstance(norm, plain_norms) and type(norm).forward in (t.forward for t in plain_norms)
            and tuple(norm.normalized_shape) == (shape[-1],))


class _FunctionalSpy(TorchFunctionMode):
    """Notes functional activations (F.relu(x) in a forward) that module swapping cannot reach."""

    def __init__(self, tracer: _Tracer):
        super().__init__()
        self.tracer = tracer

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self._note_first_token(func, args)
        entry = FUNCTIONAL_ACTIVATIONS.get(func)
        name = entry.name if entry is not None else None
        if name is not None and self.tracer.stack and not self.tracer.is_act(self.tracer.stack[-1].module):
            frame = self.tracer.stack[-1]
            note = f"{frame.name or 'the model' + chr(39) + 's forward'}: functional {name} (not a module; left as is)"
            if note not in self.tracer.trace.functional:
                self.tracer.trace.functional.append(note)
            self.tracer.trace.functional_owners.setdefault(frame.name, frame.module)
        return func(*args, **(kwargs or {}))


    def _note_first_token(self, func, args) -> None:
        if func is torch.Tensor.__getitem__ and len(args) == 2:
            t, key = args
            picks = isinstance(key, tuple) and len(key) >= 2 and key[0] == slice(None) and \
                isinstance(key[1], int) and key[1] == 0 and all(k == slice(None) or k is Ellipsis for k in key[2:])
        elif func in (torch.select, torch.Tensor.select) and len(args) == 3:
            t, picks = args[0], args[1] == 1 and args[2] == 0
        else:
            return
        inside_act = self.tracer.stack and self.tracer.is_act(self.tracer.stack[-1].module)
        if picks and isinstance(t, torch.Tensor) and t.dim() == 3 and not inside_act:
            self.tracer.trace.first_token_reads.add(t.shape[1])


def default_example_input(model: nn.Module) -> torch.Tensor:
    """A (2, C, H, W) random batch of the size the model expects (timm's patch size / config, else 224)."""
    ref = next(iter(model.parameters()), None)
    device = ref.device if ref is not None else None
    dtype = ref.dtype if ref is not None and ref.dtype.is_floating_point else torch.float32
    shape = (3, 224, 224)
    # a patch/pixel embedding that fixes the image size (timm ViT, CaiT, TNT, ...) wins over the config
    embed = next((m for m in model.modules() if getattr(m, "img_size", None) is not None), None)
    if embed is not None:
        size = embed.img_size
        proj = getattr(embed, "proj", None)
        chans = getattr(proj, "in_channels", 3)
        shape = (chans, *((size, size) if isinstance(size, int) else tuple(size)))
    else:
        cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
        if isinstance(cfg, dict) and "input_size" in cfg:
            shape = tuple(cfg["input_size"])
    generator = torch.Generator().manual_seed(0)
    return torch.randn(2, *shape, generator=generator, dtype=dtype).to(device)


def trace_activations(model: nn.Module, example_input=None,
                      act_types: tuple[type, ...] | None = None) -> Trace:
    """Run one eval-mode forward of ``model`` on ``example_input`` and record every activation call."""
    act_types = act_types or activation_types()
    if example_input is None:
        example_input = default_example_input(model)
    args, kwargs = example_arguments(example_input)
    tracer = _Tracer(model, act_types)
    tracer.install()
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), _FunctionalSpy(tracer):
            model(*args, **kwargs)
    except Exception as exc:
        shapes = [tuple(a.shape) for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        raise RuntimeError(f"convert: the example forward failed on input shapes {shapes} "
                           f"({type(exc).__name__}: {exc}); pass example_input= that the model accepts") from exc
    finally:
        tracer.remove()
        model.train(was_training)
    first = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
    tracer.trace.batch = first.shape[0] if first is not None and first.dim() else 0
    return tracer.trace


def example_arguments(example_input) -> tuple[tuple, dict]:
    """(args, kwargs) of a model call from an example input: a tensor, a tuple of positional inputs, or a
    dict of keyword arguments (what a Hugging Face model takes: ``{"input_ids": ..., "attention_mask": ...}``)."""
    if isinstance(example_input, dict):
        return (), dict(example_input)
    return (example_input if isinstance(example_input, tuple) else (example_input,)), {}
