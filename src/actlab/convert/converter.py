"""``actlab.convert``: swap every activation site of an existing model for a registered activation."""
from __future__ import annotations

import copy
import math
import re
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from fnmatch import fnmatch

import torch.nn as nn

from ..activations.base import ActivationModule
from ..activations.layout import site_layout
from ..activations.registry import ActivationSpec, Site, SiteMismatch, get_spec
from .functional import rewrite_functional
from .record import RECORD_KEY, ConversionCall, calls_of, record_in, remember
from .trace import ActivationCall, Trace, activation_types, example_arguments, trace_activations


class SiteSplit(nn.Module):
    """Stands in for an activation module that its owner calls several times in one forward (torchvision's
    ResNet blocks reuse ``self.relu``): the k-th call of each owner forward goes to ``sites[k]``.

    The owner's forward pre-hook resets the counter, so a forward that stopped half-way cannot shift calls.
    """

    def __init__(self, sites: list[nn.Module], owner: nn.Module):
        super().__init__()
        self.sites = nn.ModuleList(sites)
        self._next = 0
        self._reset_handle = owner.register_forward_pre_hook(self._reset)

    def _reset(self, module, args) -> None:
        self._next = 0

    def forward(self, x, *args, **kwargs):
        i = self._next
        if i >= len(self.sites):
            raise RuntimeError(f"a split activation was called {i + 1} times in one forward of its owner, but "
                               f"it was converted for {len(self.sites)} calls")
        self._next = i + 1
        return self.sites[i](x, *args, **kwargs)


@dataclass
class SiteRecord:
    name: str
    original: str
    converted: bool
    new: str = ""
    reason: str = ""
    producer: str = ""
    norm: str = ""
    shape: tuple | None = None
    note: str = ""  # how the new module reads its site (e.g. DPA pooling the class token)
    module: nn.Module | None = field(default=None, repr=False, compare=False)  # the new module (converted sites)
    replaced: nn.Module | None = field(default=None, repr=False, compare=False)  # the module it replaced


@dataclass
class ConversionReport:
    """What ``convert`` changed and what it left alone, and why. ``print(report)`` shows a table."""

    activation: str
    sites: list[SiteRecord] = field(default_factory=list)
    functional: list[str] = field(default_factory=list)
    aliases: list[tuple[str, str]] = field(default_factory=list)  # (other name, the name its sites are under)

    @property
    def converted(self) -> list[SiteRecord]:
        return [s for s in self.sites if s.converted]

    @property
    def kept(self) -> list[SiteRecord]:
        return [s for s in self.sites if not s.converted]

    @property
    def active(self) -> list[SiteRecord]:
        """The sites that run the activation now: converted, or already it with these settings."""
        return [s for s in self.sites if s.converted or s.reason == ALREADY]

    def __str__(self) -> str:
        lines = [f"actlab.convert -> {self.activation}: {len(self.converted)} site(s) converted, "
                 f"{len(self.kept)} left as they were"]
        width = max([len(s.name) for s in self.sites] + [4])
        for s in self.sites:
            if s.converted:
                via = f"  <- {s.producer}" + (f" -> {s.norm}" if s.norm else "") if s.producer else ""
                note = f"  ({s.note})" if s.note else ""
                lines.append(f"  converted  {s.name:<{width}}  {s.original} -> {s.new}{via}{note}")
        for s in self.kept:
            lines.append(f"  kept       {s.name:<{width}}  {s.original}: {s.reason}")
        for alias, name in self.aliases:
            lines.append(f"  alias      {alias:<{width}}  the same module object as {name} (its sites are listed there)")
        for note in self.functional:
            lines.append(f"  not seen   {note}")
        return "\n".join(lines)


def conversion_report(model: nn.Module) -> ConversionReport:
    """The report of the last ``convert`` applied to ``model``."""
    report = getattr(model, "_actlab_report", None)
    if report is None:
        raise ValueError("this model was not converted by actlab.convert")
    return report


@dataclass
class _Slot:
    """The k-th call position of one registration within its owner's forward."""

    name: str
    original: nn.Module
    call: ActivationCall | None  # None: never called during the example forward
    inconsistent: str = ""
    caller: nn.Module | None = None  # the module whose forward makes the calls that are distinct sites


def _names_by_module(model: nn.Module) -> dict[int, list[str]]:
    """Every name each module is registered under (a shared module has several)."""
    names: dict[int, list[str]] = defaultdict(list)
    for name, module in model.named_modules(remove_duplicate=False):
        if name:
            names[id(module)].append(name)
    return names


def _call_scope(model: nn.Module, names: list[str]) -> nn.Module:
    """The deepest module holding every registration of a shared module (coat's one Mlp used as mlp2, mlp3
    and mlp4 of a block): one forward of it makes the calls that are the shared module's distinct sites."""
    common = []
    for level in zip(*(name.split(".")[:-1] for name in names)):
        if len(set(level)) > 1:
            break
        common.append(level[0])
    return model.get_submodule(".".join(common)) if common else model


def _slots(trace: Trace, model: nn.Module, names: dict[int, list[str]]) -> dict[str, list[_Slot]]:
    per_invocation: dict[str, dict[int, list[ActivationCall]]] = defaultdict(lambda: defaultdict(list))
    scopes: dict[str, nn.Module | None] = {}
    for call in trace.calls:
        reg = call.registration
        if reg not in scopes:
            shared = len(names.get(id(call.owner), ())) > 1 or len(names.get(id(call.module), ())) > 1
            scopes[reg] = _call_scope(model, names[id(call.module)]) if shared else None
        scope = scopes[reg]
        invocation = call.frames.get(id(scope), call.owner_invocation) if scope is not None else call.owner_invocation
        per_invocation[reg][invocation].append(call)
    out: dict[str, list[_Slot]] = {}
    for reg, invocations in per_invocation.items():
        runs = list(invocations.values())
        first = runs[0]
        slots = []
        for k, call in enumerate(first):
            name = reg if len(first) == 1 else f"{reg}[{k}]"
            slot = _Slot(name, call.module, call, caller=scopes[reg] or call.caller)
            for run in runs[1:]:
                other = run[k] if k < len(run) else None
                if other is None or other.producer is not call.producer or \
                        site_layout(other.in_shape, other.channels_last) != site_layout(call.in_shape,
                                                                                        call.channels_last):
                    slot.inconsistent = "its owner calls it differently from one forward to the next"
            if any(len(r) != len(first) for r in runs):
                slot.inconsistent = "its owner calls it a varying number of times per forward"
            slots.append(slot)
        out[reg] = slots
    return out


def _class_token(trace: Trace, call: ActivationCall, batch: int) -> bool:
    """Whether the site's (B, N, C) tokens carry a class token at index 0 that the model classifies from:
    in the example forward the model itself read token 0 of a (B, N, *) token tensor (its head's
    ``x[:, 0]``; the site's width may differ, as in an MLP). A one-token site then is the class token
    alone (CaiT's class-attention blocks)."""
    shape = call.in_shape
    if shape is None or len(shape) != 3 or shape[0] != batch or not trace.first_token_reads:
        return False
    return shape[1] == 1 or shape[1] in trace.first_token_reads


def _infer_num_classes(model: nn.Module) -> int | None:
    n = getattr(model, "num_classes", None)
    return n if isinstance(n, int) and n > 0 else None


def _site(call: ActivationCall | None, trace: Trace, batch: int, num_classes: int | None) -> Site | None:
    """What the example forward showed of one call's site (None: the module was never called)."""
    if call is None:
        return None
    channels, layout = site_layout(call.in_shape, call.channels_last)
    return Site(channels, layout, None if call.in_shape is None else tuple(call.in_shape), batch,
                producer=call.producer, no_producer=call.no_site_reason, norm=call.norm, num_classes=num_classes,
                class_token=_class_token(trace, call, batch), producer_slice=call.producer_slice)


def _build(spec: ActivationSpec, call: ActivationCall | None, trace: Trace, batch: int,
           num_classes: int | None, kwargs: dict) -> tuple[nn.Module | None, str]:
    """The new module for one call, or (None, reason it stays as it was): the activation decides from its
    site (``ActivationSpec.build``)."""
    try:
        module = spec.build(_site(call, trace, batch, num_classes), dict(kwargs))
    except SiteMismatch as exc:
        return None, str(exc)
    if call is None:
        return module, ""
    # made where the site runs: a model already on a GPU or in float64 gets its new modules there too
    dtype = call.dtype if call.dtype is not None and call.dtype.is_floating_point else None
    return module.to(device=call.device, dtype=dtype), ""


def _matches(name: str, patterns) -> bool:
    if patterns is None:
        return False
    if isinstance(patterns, str):
        patterns = [patterns]
    base = name.split("[")[0]
    return any(fnmatch(name, p) or fnmatch(base, p) for p in patterns)


def convert(model: nn.Module, name: str, *, num_classes: int | None = None, include=None, exclude=None,
            example_input=None, act_types: tuple[type, ...] | None = None, strict: bool = False,
            functional: bool = True, **kwargs) -> nn.Module:
    """Replace every activation site of ``model`` with the registered activation ``name``, in place.

    Sites are found by one eval-mode forward on ``example_input``. Every call of an activation becomes a
    site with its own module: a module that its owner calls several times is split (``SiteSplit``).
    A site that already is the requested activation with the same settings keeps its module, and so
    its trained parameters and memories; a conversion to another activation or other settings replaces it.

    Args:
        model: any nn.Module (torchvision, timm, your own).
        name: registered activation (see ``actlab.list_activations()``).
        num_classes: class count for DPA's memories (default: ``model.num_classes`` when it exists).
        include: fnmatch pattern(s) of site names to convert (default: all), e.g. ``"layer4.*"``.
        exclude: fnmatch pattern(s) of site names to leave alone.
        example_input: a batch the model accepts: a tensor, a tuple of positional inputs, or a dict of
            keyword arguments (a Hugging Face model's ``{"input_ids": ..., "attention_mask": ...}``); default
            a random (2, 3, H, W) batch sized from the model's config (224 when unknown).
        act_types: module classes treated as activations (default ``convert.activation_types()``: torch's,
            timm's, actlab's and, once transformers is imported, Hugging Face's activation classes).
        strict: raise if any site that was not excluded stays unconverted, if the example forward called
            no activation module, if ``include`` matches no site, or if functional activations remain.
        functional: make functional activations (``F.relu(x)``, ``torch.relu``, ``x.relu()`` ... in a
            forward) sites: each module whose own forward calls them is rewritten with torch.fx, its
            children kept, each call replaced by a call of a new activation module on it. The model's own
            forward (it is converted in place) and modules fx cannot trace keep theirs, with a note.
        **kwargs: passed to each new activation (e.g. ``tau=`` for DPA, ``zero_patch=`` for IIEU-B);
            numbers must be finite.
    Returns:
        ``model`` itself, converted. ``actlab.conversion_report(model)`` says what changed and why.

    New modules take the train / eval mode of the module they replace. A module rewritten for its
    functional activations none of which converts is put back as it was, and a conversion that raises
    (``strict`` included) leaves the model as it found it. ``actlab.check(model, example_input)``
    compares each converted site's output scale with the original model's.
    """
    spec = get_spec(name)
    spec.check_kwargs(kwargs)
    if spec.needs_num_classes:
        num_classes = num_classes if num_classes is not None else _infer_num_classes(model)
        if num_classes is None:
            raise ValueError(f"convert(..., {spec.name!r}) needs num_classes= (DPA keeps per-class memories)")
    act_types = act_types or activation_types()
    rewrites, swaps = [], []
    try:  # all or nothing: a conversion that fails half-way puts every module back
        trace, from_functional, untraced = _functional_sites(model, example_input, act_types, functional, rewrites)
        report = ConversionReport(spec.name, functional=[_with_reason(note, untraced) for note in trace.functional])
        plan = _Plan(spec, trace, num_classes, kwargs, include, exclude, from_functional)
        for reg, reg_slots in _all_slots(model, trace, act_types, report).items():
            _convert_registration(model, reg, reg_slots, plan, report, swaps)
        _restore_unconverted_rewrites(model, rewrites, report)
        _note_nested_sites(model, report)
        if strict:
            _check_strict(report, include)
    except BaseException:
        for owner, attr, old, new in reversed(swaps):
            _detach(new, keep=list(old.modules()))  # what the new container reuses of the old stays hooked
            setattr(owner, attr, old)
        for rewrite in reversed(rewrites):
            rewrite.undo(model)
        raise
    object.__setattr__(model, "_actlab_report", report)
    remember(model, ConversionCall.of(spec.name, kwargs, num_classes, include, exclude, functional, example_input))
    if not strict:
        _warn_if_mostly_kept(report)
    return model


def load_converted(model: nn.Module, state_dict: dict, *, strict: bool = True, example_input=None, **convert_kwargs):
    """Load a converted model's ``state_dict`` into a model of the same architecture that was not converted:
    convert it as the state_dict's record says (its ``actlab_conversion`` entry), then load.

    Args:
        model: the architecture as built (e.g. ``timm.create_model(name)``), unconverted.
        state_dict: a ``state_dict()`` of the converted model, or a checkpoint's (keys may carry a wrapper's
            prefix such as ``module.``, which stays in the keys loaded).
        strict: as ``load_state_dict``'s.
        example_input: the batch to find the sites with, where the record has none (the conversion was
            given a non-tensor example, e.g. a dict of keyword arguments).
        **convert_kwargs: further ``convert`` arguments the record cannot hold (``act_types=``).
    Returns:
        what ``model.load_state_dict`` returns.
    Raises:
        ValueError: the state_dict holds no conversion record, or the model is converted differently.
    """
    found = record_in(state_dict)
    if found is None:
        raise ValueError(f"the state_dict holds no {RECORD_KEY!r} entry: it was not saved from a model converted by "
                         "actlab.convert (load it with model.load_state_dict)")
    _, calls = found
    if not calls_of(model):
        for call in calls:
            example = call.example() if call.example_input is not None else example_input
            convert(model, call.activation, num_classes=call.num_classes, include=call.include, exclude=call.exclude,
                    example_input=example, functional=call.functional, **convert_kwargs, **call.kwargs)
    return model.load_state_dict(state_dict, strict=strict)


def _functional_sites(model, example_input, act_types, functional: bool, rewrites: list):
    """The trace of the example forward, after making functional activations modules (``functional``;
    the modules rewritten are appended to ``rewrites`` as soon as they are swapped in):
    (trace, {site name: functional name}, {module name: why it was not rewritten})."""
    trace = trace_activations(model, example_input, act_types)
    from_functional, untraced = {}, {}
    if functional and trace.functional_owners:
        for rewrite in rewrite_functional(model, trace.functional_owners):
            if rewrite.replaced:
                rewrites.append(rewrite)
            untraced[rewrite.name or "the model's forward"] = rewrite.error
            from_functional.update({f"{rewrite.name}.{attr}": attr.rstrip("_0123456789") for attr in rewrite.replaced})
        if from_functional:
            trace = trace_activations(model, example_input, act_types)
    return trace, from_functional, untraced


@dataclass
class _Plan:
    """What every registration of one conversion is converted with."""

    spec: ActivationSpec
    trace: Trace
    num_classes: int | None
    kwargs: dict
    include: object
    exclude: object
    from_functional: dict  # site name -> the functional activation it was made from


def _all_slots(model: nn.Module, trace: Trace, act_types, report: ConversionReport) -> dict[str, list[_Slot]]:
    """Every call position of every activation registration: those the example forward called, then
    modules it never called (their aliases listed in ``report``)."""
    names = _names_by_module(model)
    slots = _slots(trace, model, names)
    listed = {id(s.original): reg for reg, reg_slots in slots.items() for s in reg_slots}
    for reg, mod in model.named_modules(remove_duplicate=False):
        if not reg or not isinstance(mod, act_types) or reg in slots or _inside_activation(model, reg, act_types):
            continue
        if id(mod) in listed:  # another name of a module already listed: never swapped through this name
            report.aliases.append((reg, listed[id(mod)]))
            continue
        slots[reg] = [_Slot(reg, mod, None)]
        listed[id(mod)] = reg
    return slots


def _convert_registration(model, reg: str, reg_slots: list[_Slot], plan: _Plan, report: ConversionReport,
                          swaps: list) -> None:
    """Decide and build every call position of one registration, then swap it in (``swaps`` records
    (owner, attribute, old module, new module) for undoing)."""
    owner, attr = _resolve(model, reg)
    new_modules, changed = [], False
    for slot in reg_slots:
        call = slot.call
        original = plan.from_functional.get(slot.name.split("[")[0])
        record = SiteRecord(slot.name, f"functional {original}" if original else type(slot.original).__name__, False,
                            shape=call.in_shape if call else None,
                            producer=call.producer_name if call else "", norm=call.norm_name if call else "")
        module, reason = None, ""
        if plan.exclude is not None and _matches(slot.name, plan.exclude):
            reason = "excluded by pattern"
        elif plan.include is not None and not _matches(slot.name, plan.include):
            reason = "not matched by include"
        elif slot.inconsistent:
            reason = slot.inconsistent
        else:
            module, reason = _build(plan.spec, call, plan.trace, plan.trace.batch or 1, plan.num_classes,
                                    dict(plan.kwargs))
            if module is not None and _same_activation(module, slot.original):
                _detach(module, keep=[])  # unused: the site keeps its module and trained parameters
                module, reason = None, ALREADY
        if module is None:
            record.reason = reason
            has_state = any(True for _ in slot.original.parameters()) or any(True for _ in slot.original.buffers())
            module = slot.original if (has_state or len(reg_slots) == 1) else copy.deepcopy(slot.original)
        else:
            changed = True
            module.train(slot.original.training)  # the model's train / eval mode stays as it was
            record.converted, record.new = True, type(module).__name__
            record.note = module.site_note() if isinstance(module, ActivationModule) else ""
            record.module, record.replaced = module, slot.original
            if hasattr(module, "site"):
                module.site = slot.name
        report.sites.append(record)
        new_modules.append(module)
    if changed or len(reg_slots) > 1:
        caller = reg_slots[0].caller or owner
        replacement = new_modules[0] if len(new_modules) == 1 else SiteSplit(new_modules, caller)
        if isinstance(replacement, SiteSplit):  # the container takes the mode of the module it replaces
            replacement.training = replacement.sites.training = reg_slots[0].original.training
        old = getattr(owner, attr)
        _detach(old, keep=new_modules)
        setattr(owner, attr, replacement)
        swaps.append((owner, attr, old, replacement))


def _restore_unconverted_rewrites(model: nn.Module, rewrites, report: ConversionReport) -> None:
    """A module rewritten for its functional activations, none of whose sites converted, is put back as
    it was (the very object): a conversion changes nothing it does not report."""
    for rewrite in rewrites:
        prefixes = [place + "." for place in rewrite.places]
        if not any(s.converted and s.name.startswith(tuple(prefixes)) for s in report.sites):
            rewrite.undo(model)


def _note_nested_sites(model: nn.Module, report: ConversionReport) -> None:
    """Converted sites inside another activation's module (timm's StarReLU computes ``s * relu(x)**2 + b``
    with an inner ReLU) say so: the new activation is then one part of that formula."""
    for record in report.converted:
        parts = record.name.split("[")[0].split(".")
        for i in range(len(parts) - 1, 0, -1):
            holder = model.get_submodule(".".join(parts[:i]))
            if _ACTIVATION_NAME.search(type(holder).__name__):
                note = (f"inside {type(holder).__name__} {'.'.join(parts[:i])}, an activation of its own: "
                        f"its output goes through that module's formula")
                record.note = f"{record.note}; {note}" if record.note else note
                break


# class names of activation modules (StarReLU, QuickGELU, SquaredReLU, HardSwishMe, GELUActivation, ...)
_ACTIVATION_NAME = re.compile(r"(ReLU\d*|GELU|SiLU|Swish|Mish|ELU|Sigmoid|Tanh|Softplus|Activation)(Me)?$")


ALREADY = "already this activation with these settings (kept, with its trained parameters)"


def _with_reason(note: str, untraced: dict[str, str]) -> str:
    """A functional-activation note with why its module could not be rewritten."""
    where = note.split(": functional")[0]
    return f"{note}: {untraced[where]}" if untraced.get(where) else note


def _same_activation(new: nn.Module, old: nn.Module) -> bool:
    """Re-converting a site to what it already is must not reset what it learned."""
    return type(new) is type(old) and new.extra_repr() == old.extra_repr()


def _warn_if_mostly_kept(report: ConversionReport) -> None:
    """One warning when fewer than half of the activation calls a conversion could take were converted,
    and when the example forward called no activation that actlab recognises at all."""
    eligible = [s for s in report.sites if s.reason not in ("excluded by pattern", "not matched by include", ALREADY)]
    converted = sum(s.converted for s in eligible)
    calls = len(eligible) + len(report.functional)
    if not report.sites and not report.functional:
        warnings.warn(f"actlab.convert -> {report.activation}: the example forward called no activation that actlab "
                      "recognises (modules of actlab.convert.ACTIVATION_TYPES or functional relu/gelu/...), so nothing "
                      "was converted; pass act_types=(YourActivation,) for the model's own activation classes",
                      stacklevel=3)
        return
    if calls and converted < calls / 2:
        reasons = Counter(s.reason for s in eligible if not s.converted)
        reasons.update("functional activation (not a module)" for _ in report.functional)
        top = "; ".join(f"{n} x {r}" for r, n in reasons.most_common(3))
        warnings.warn(f"actlab.convert -> {report.activation}: only {converted} of {calls} activation calls converted "
                      f"({top}); actlab.conversion_report(model) lists every site", stacklevel=3)


def _check_strict(report: ConversionReport, include) -> None:
    """strict=True: every site that was not deliberately left out is the requested activation, and the
    call did something: no sites, an include that matches none, or functional activations (which module
    swapping cannot reach) are errors too."""
    problems = []
    if not report.sites:
        problems.append("the example forward called no activation module")
    elif include is not None and all(s.reason == "not matched by include" for s in report.sites):
        problems.append(f"include={include!r} matched none of the {len(report.sites)} site(s)")
    left = [s for s in report.kept if s.reason not in ("excluded by pattern", "not matched by include", ALREADY)]
    if left:
        problems.append(f"{len(left)} site(s) left unconverted")
    if report.functional:
        problems.append(f"{len(report.functional)} functional activation(s) that module swapping cannot reach")
    if problems:
        raise ValueError(f"convert(strict=True): {'; '.join(problems)}\n{report}")


def _detach(old: nn.Module, keep: list[nn.Module]) -> None:
    """Remove the hooks of modules that a conversion replaces (a re-converted model keeps no stale hooks)."""
    kept = {id(m) for m in keep}
    for module in old.modules():
        if id(module) in kept:
            continue
        if isinstance(module, ActivationModule):
            module.release()
        elif isinstance(module, SiteSplit):
            module._reset_handle.remove()


def _resolve(model: nn.Module, dotted: str) -> tuple[nn.Module, str]:
    parent, _, attr = dotted.rpartition(".")
    return (model.get_submodule(parent) if parent else model), attr


def _inside_activation(model: nn.Module, reg: str, act_types) -> bool:
    parts = reg.split(".")
    for i in range(1, len(parts)):
        if isinstance(model.get_submodule(".".join(parts[:i])), act_types):
            return True
    return False


@dataclass
class ScaleCheck:
    """One converted site's output scale against the activation it replaced, on one batch."""

    name: str
    rms_new: float
    rms_original: float

    @property
    def ratio(self) -> float:
        if self.rms_original == 0:
            return 1.0 if self.rms_new == 0 else float("inf")
        return self.rms_new / self.rms_original


def check(model: nn.Module, example_input, factor: float = 10.0) -> list[ScaleCheck]:
    """The converted sites of ``model`` whose output scale (root mean square) on ``example_input``
    differs from the original model's at the same site by more than ``factor`` (either way), worst first.

    Two eval-mode forwards (DPA needs no labels there; the model's mode is restored): one with every
    converted site computing the activation it replaced, which is the original model, and one as
    converted. Each site is compared where it sits in the network, so a scale that grows from site to
    site shows up as it compounds: an activation that blows up or silences a network at initialisation
    (ACON's N(0, 1) draw on a network without normalisation) is named before a training run diverges."""
    import torch

    records = {id(r.module): r for r in conversion_report(model).converted if r.module is not None}
    rms: dict[str, list[float]] = {r.name: [] for r in records.values()}

    def as_original(module, args, output):
        return records[id(module)].replaced(args[0].clone())  # a clone: the replaced module may work in place

    def measure(module, args, output):
        rms[records[id(module)].name].append(float(output.detach().double().pow(2).mean().sqrt()))

    sites = [m for m in model.modules() if id(m) in records]
    args, kwargs = example_arguments(example_input)
    was_training = model.training
    model.eval()
    try:
        for swap in (True, False):
            handles = [m.register_forward_hook(as_original) for m in sites] if swap else []
            handles += [m.register_forward_hook(measure) for m in sites]  # after the swap: sees its output
            try:
                with torch.no_grad():
                    model(*args, **kwargs)
            finally:
                for h in handles:
                    h.remove()
    finally:
        model.train(was_training)
    found = [ScaleCheck(name, values[1], values[0]) for name, values in rms.items() if len(values) == 2]
    flagged = [c for c in found if not (1 / factor <= c.ratio <= factor)]
    return sorted(flagged, key=lambda c: -abs(math.log(c.ratio)) if 0 < c.ratio < float("inf") else -math.inf)


__all__ = ["ConversionReport", "ScaleCheck", "SiteRecord", "SiteSplit", "check", "conversion_report", "convert",
           "load_converted"]
