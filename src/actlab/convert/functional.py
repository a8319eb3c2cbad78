"""Functional activations (``F.relu(x)`` in a forward) made into modules, so that ``convert`` can swap them.

The module whose forward makes the call is rewritten with torch.fx, its children kept as they are (leaves
of the trace, so the module tree and the state_dict keys stay), each functional activation replaced by a
call of a new activation module registered on it. A module that fx cannot trace (control flow on tensor
values, ...) is left as it was, and the report says why.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class Functional:
    """One functional activation: the activation's name, a factory of the module that computes exactly
    what the call did (taking the call's non-input arguments as keywords, in-place flag included), and
    the names of the parameters the call may give positionally after the input."""

    name: str
    factory: Callable[..., nn.Module]
    positional: tuple[str, ...] = ()


def _functional_activations() -> dict[object, Functional]:
    """Every way a forward calls a functional activation -> what it is: torch functions, Tensor methods
    (as torch function overrides see them, and by name as fx records them)."""
    relu = Functional("relu", lambda inplace=False: nn.ReLU(inplace), ("inplace",))
    relu_ = Functional("relu", lambda: nn.ReLU(inplace=True))
    gelu = Functional("gelu", lambda approximate="none": nn.GELU(approximate=approximate))
    silu = Functional("silu", lambda inplace=False: nn.SiLU(inplace), ("inplace",))
    return {
        F.relu: relu, torch.relu: relu, torch.Tensor.relu: relu, "relu": relu,
        F.relu_: relu_, torch.relu_: relu_, torch.Tensor.relu_: relu_, "relu_": relu_,
        F.relu6: Functional("relu6", lambda inplace=False: nn.ReLU6(inplace), ("inplace",)),
        F.gelu: gelu, "gelu": gelu,
        F.silu: silu, "silu": silu,
        F.mish: Functional("mish", lambda inplace=False: nn.Mish(inplace), ("inplace",)),
        F.elu: Functional("elu", lambda alpha=1.0, inplace=False: nn.ELU(alpha, inplace), ("alpha", "inplace")),
        F.selu: Functional("selu", lambda inplace=False: nn.SELU(inplace), ("inplace",)),
        F.leaky_relu: Functional("leaky_relu", lambda negative_slope=0.01, inplace=False:
                                 nn.LeakyReLU(negative_slope, inplace), ("negative_slope", "inplace")),
        F.hardswish: Functional("hardswish", lambda inplace=False: nn.Hardswish(inplace), ("inplace",)),
        F.softplus: Functional("softplus", lambda beta=1.0, threshold=20.0: nn.Softplus(beta, threshold),
                               ("beta", "threshold")),
    }


FUNCTIONAL_ACTIVATIONS = _functional_activations()


class _ChildrenAsLeaves(fx.Tracer):
    """Traces one module's own forward: every child module stays one call."""

    def __init__(self, root: nn.Module):
        super().__init__()
        self.root_module = root

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return m is not self.root_module


@dataclass
class Rewrite:
    """What happened to one module whose forward calls functional activations."""

    name: str
    replaced: list[str]  # names of the new activation modules, relative to the module
    error: str = ""
    original: nn.Module | None = None  # the module before the rewrite (``undo`` puts it back)
    places: list[str] = field(default_factory=list)  # every name it was registered under in the model

    def undo(self, model: nn.Module) -> None:
        """Put the original module back under every name the rewrite replaced."""
        for place in self.places:
            parent_name, _, attr = place.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, attr, self.original)


def _new_module(node: fx.Node) -> tuple[str, nn.Module] | None:
    target = node.target if node.op in ("call_function", "call_method") else None
    entry = FUNCTIONAL_ACTIVATIONS.get(target)
    if entry is None or not node.args or not isinstance(node.args[0], fx.Node):
        return None
    name, factory = entry.name, entry.factory
    extra = dict(zip(entry.positional, node.args[1:]))
    extra.update(node.kwargs)
    if any(isinstance(v, fx.Node) for v in extra.values()):
        return None  # a setting computed from tensors: not a fixed module
    params = inspect.signature(factory).parameters
    if set(extra) - set(params):
        return None  # a setting the module form does not have
    module = factory(**extra)
    if getattr(module, "inplace", False) and _read_later(node.args[0], node):
        return None  # the in-place result is read through the input's name: an out-of-place site would change it
    return name, module


def _read_later(value: fx.Node, call: fx.Node) -> bool:
    """Whether a node after ``call`` in the graph reads ``value`` (and so sees what ``call`` did in place)."""
    order = {n: i for i, n in enumerate(call.graph.nodes)}
    return any(order[user] > order[call] for user in value.users if user is not call)


class Untraceable(Exception):
    """A module whose forward fx's graph cannot stand for exactly."""


def _trace_in_mode(module: nn.Module, training: bool) -> fx.Graph:
    was = [(m, m.training) for m in module.modules()]
    module.train(training)
    try:
        return _ChildrenAsLeaves(module).trace(module)
    finally:
        for m, flag in was:
            m.training = flag


def rewrite_module(module: nn.Module) -> tuple[nn.Module, list[str]]:
    """``module`` with each functional activation of its own forward replaced by a call of a new
    activation module (an ``fx.GraphModule`` of the same class name and children), or ``module`` itself
    when none is. Raises what fx raises when the forward cannot be traced, and ``Untraceable`` when its
    graph depends on ``self.training`` (a traced graph would freeze one branch)."""
    graph = _trace_in_mode(module, module.training)
    if str(graph) != str(_trace_in_mode(module, not module.training)):
        raise Untraceable("its forward branches on self.training")
    replaced = []
    for node in list(graph.nodes):
        made = _new_module(node)
        if made is None:
            continue
        base, new = made
        name, k = base, 1
        while hasattr(module, name) or name in replaced:
            name, k = f"{base}_{k}", k + 1
        replaced.append(name)
        new.train(module.training)
        module.add_module(name, new)
        with graph.inserting_after(node):
            call = graph.call_module(name, (node.args[0],))
        node.replace_all_uses_with(call)
        graph.erase_node(node)
    if not replaced:
        return module, []
    graph.lint()
    return fx.GraphModule(module, graph, class_name=type(module).__name__), replaced


def rewrite_functional(model: nn.Module, owners: dict[str, nn.Module]) -> list[Rewrite]:
    """Rewrite each module of ``owners`` (name -> module whose forward calls functional activations) in
    ``model``, in place. The model itself is not replaced (``convert`` works in place): its own functional
    calls stay, with a note."""
    done = []
    for name, module in owners.items():
        if not name:
            done.append(Rewrite(name, [], "the model is converted in place, so its own forward keeps them"))
            continue
        children = dict(module._modules)  # rewrite_module adds the new modules to it: the original stays as it was
        try:
            rewritten, replaced = rewrite_module(module)
        except Untraceable as exc:
            done.append(Rewrite(name, [], f"not rewritten: {exc}"))
            continue
        except Exception as exc:  # noqa: BLE001 - fx raises many kinds; any of them means "leave it"
            done.append(Rewrite(name, [], f"torch.fx cannot trace it ({type(exc).__name__}: {str(exc)[:80]})"))
            continue
        finally:
            module._modules.clear()
            module._modules.update(children)
        places = [n for n, m in model.named_modules(remove_duplicate=False) if m is module] if replaced else []
        for place in places:  # under every name a shared module has
            parent_name, _, attr = place.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, attr, rewritten)
        done.append(Rewrite(name, replaced, original=module, places=places))
    return done
