"""What ``convert`` did to a model, carried in its ``state_dict``, so that a checkpoint says how to rebuild it.

A converted model's ``state_dict()`` holds one more entry, ``actlab_conversion``: a uint8 tensor of JSON
that lists its ``convert`` calls in order (activation, its settings, ``include`` / ``exclude``, the
example input's shapes and dtypes). A tensor, so every checkpoint format carries it (``torch.save``,
safetensors, timm's ``CheckpointSaver``). Loading such a state_dict into a converted model takes the
entry off and checks it against the model's own conversion; loading it into a model that was not
converted fails (strict loading names the entry and actlab's parameters as unexpected), and
``actlab.load_converted(model, state_dict)`` converts the model first.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn

RECORD_KEY = "actlab_conversion"
FORMAT = 1


@dataclass(frozen=True)
class ConversionCall:
    """One ``convert`` call as it can be replayed: the arguments that decide what it builds.

    ``example_input``: the shapes and dtypes of the example batch (one entry per positional input, or per
    keyword argument with its ``name``), or None where ``convert`` built its default batch.
    """

    activation: str
    kwargs: dict
    num_classes: int | None
    include: list | None
    exclude: list | None
    functional: bool
    example_input: list | None

    @classmethod
    def of(cls, activation: str, kwargs: dict, num_classes, include, exclude, functional: bool,
           example_input) -> "ConversionCall":
        return cls(activation, dict(kwargs), num_classes, _patterns(include), _patterns(exclude), functional,
                   _describe(example_input))

    def example(self):
        """A batch of the recorded shapes and dtypes (None: ``convert``'s default batch): random floats, ones
        for integer and bool inputs (token ids and attention masks that every model accepts)."""
        if self.example_input is None:
            return None
        tensors = {e.get("name", i): _example_tensor(e["shape"], getattr(torch, e["dtype"]))
                   for i, e in enumerate(self.example_input)}
        if any("name" in e for e in self.example_input):
            return tensors
        values = tuple(tensors.values())
        return values[0] if len(values) == 1 else values


def _example_tensor(shape, dtype: torch.dtype) -> torch.Tensor:
    if dtype.is_floating_point:
        return torch.randn(shape).to(dtype)
    return torch.ones(shape, dtype=dtype)


def _patterns(patterns) -> list | None:
    if patterns is None:
        return None
    return [patterns] if isinstance(patterns, str) else list(patterns)


def _describe(example_input) -> list | None:
    if example_input is None:
        return None
    if isinstance(example_input, dict):
        named = list(example_input.items())
    else:
        inputs = example_input if isinstance(example_input, (tuple, list)) else (example_input,)
        named = [(None, t) for t in inputs]
    if not all(isinstance(t, torch.Tensor) for _, t in named):
        return None  # not tensors only: loading asks for an example_input
    return [{"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch."), **({"name": n} if n else {})}
            for n, t in named]


def calls_of(model: nn.Module) -> list[ConversionCall]:
    """The ``convert`` calls applied to ``model``, in order (empty when it was not converted)."""
    return list(getattr(model, "_actlab_conversions", ()))


def remember(model: nn.Module, call: ConversionCall) -> None:
    """Add ``call`` to the model's conversion record; the first one hooks the record into its state_dict."""
    first = not hasattr(model, "_actlab_conversions")
    object.__setattr__(model, "_actlab_conversions", [*calls_of(model), call])
    if first:
        model.register_state_dict_post_hook(_write_record)
        model.register_load_state_dict_pre_hook(_read_record)
    config = getattr(model, "config", None)
    if hasattr(config, "to_json_string"):  # a Hugging Face model: its config.json says it too
        config.actlab_conversion = bytes(encode(calls_of(model)).tolist()).decode()


def encode(calls: list[ConversionCall]) -> torch.Tensor:
    data = json.dumps({"format": FORMAT, "calls": [asdict(c) for c in calls]}, sort_keys=True, default=repr).encode()
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).clone()


def decode(record: torch.Tensor) -> list[ConversionCall]:
    """The calls of an ``actlab_conversion`` entry."""
    if not isinstance(record, torch.Tensor) or record.dtype != torch.uint8 or record.dim() != 1:
        raise ValueError(f"{RECORD_KEY!r} is not an actlab conversion record (a 1-D uint8 tensor)")
    payload = json.loads(bytes(record.tolist()).decode())
    if payload.get("format") != FORMAT:
        raise ValueError(f"{RECORD_KEY!r} has format {payload.get('format')!r}; this actlab reads format {FORMAT}")
    return [ConversionCall(**c) for c in payload["calls"]]


def record_in(state_dict: dict) -> tuple[str, list[ConversionCall]] | None:
    """(the key's prefix, the calls) of the conversion record in ``state_dict``, or None without one. The
    prefix is what a wrapper put before the model's keys (``module.`` for DDP)."""
    keys = [k for k in state_dict if k == RECORD_KEY or k.endswith("." + RECORD_KEY)]
    if not keys:
        return None
    if len(keys) > 1:
        raise ValueError(f"state_dict holds {len(keys)} conversion records ({keys}); load each model's own")
    return keys[0][: -len(RECORD_KEY)], decode(state_dict[keys[0]])


def _write_record(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    state_dict[prefix + RECORD_KEY] = encode(calls_of(module))


def _read_record(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict, strict: bool,
                 missing_keys: list, unexpected_keys: list, error_msgs: list) -> None:
    record = state_dict.pop(prefix + RECORD_KEY, None)
    if record is None:
        return
    theirs, ours = decode(record), decode(encode(calls_of(module)))  # ours as the record holds them
    if theirs != ours:
        error_msgs.append(f"the state_dict was saved from a model converted by {_summary(theirs)}, this model was "
                          f"converted by {_summary(ours)}")


def _summary(calls: list[ConversionCall]) -> str:
    return " then ".join(f"convert(model, {c.activation!r}" + "".join(f", {k}={v!r}" for k, v in sorted(c.kwargs.items()))
                         + (f", include={c.include}" if c.include else "") + ")" for c in calls) or "nothing"
