"""A converted model's state_dict records its conversion; load_converted rebuilds a plain model from it."""
from __future__ import annotations

import io

import pytest
import torch
import torch.nn as nn
import torchvision
from safetensors.torch import load, save

import actlab
from actlab.convert import RECORD_KEY, load_converted
from actlab.convert.record import decode

X = torch.randn(2, 3, 32, 32)


def resnet(seed=0):
    torch.manual_seed(seed)
    return torchvision.models.resnet18(num_classes=10)


def twice_converted():
    """DPA on layer4, then IIEU-B on the rest with a setting: two recorded calls."""
    model = resnet()
    actlab.convert(model, "dpa", num_classes=10, include="layer4.*", example_input=X)
    actlab.convert(model, "iieu_b", exclude="layer4.*", example_input=X, zero_patch="published")
    return model


def outputs(model):
    model.eval()
    with torch.no_grad():
        return model(X)


def test_the_record_lists_the_calls_and_rebuilds_a_plain_model():
    model = twice_converted()
    state = model.state_dict()
    calls = decode(state[RECORD_KEY])
    assert [(c.activation, c.include, c.exclude, c.kwargs) for c in calls] == [
        ("dpa", ["layer4.*"], None, {}), ("iieu_b", None, ["layer4.*"], {"zero_patch": "published"})]
    assert calls[0].num_classes == 10 and calls[0].example_input == [{"shape": [2, 3, 32, 32], "dtype": "float32"}]
    plain = resnet(seed=1)
    with pytest.raises(RuntimeError, match=RECORD_KEY):  # strict loading names what it does not know
        plain.load_state_dict(state)
    assert load_converted(plain, state).missing_keys == []
    torch.testing.assert_close(outputs(plain), outputs(model), rtol=0, atol=0)
    assert plain.state_dict()[RECORD_KEY].tolist() == state[RECORD_KEY].tolist()


@pytest.mark.parametrize("fmt", ["torch", "safetensors"])
def test_the_record_survives_checkpoint_formats_and_wrapper_prefixes(fmt):
    model = twice_converted()
    state = {f"module.{k}": v for k, v in model.state_dict().items()}  # as DDP's state_dict names them
    if fmt == "torch":
        buffer = io.BytesIO()
        torch.save(state, buffer)
        buffer.seek(0)
        state = torch.load(buffer, weights_only=True)
    else:
        state = load(save({k: v.contiguous() for k, v in state.items()}))
    wrapped = nn.Sequential()
    wrapped.add_module("module", resnet(seed=2))
    load_converted(wrapped.module, {k.removeprefix("module."): v for k, v in state.items()})
    torch.testing.assert_close(outputs(wrapped.module), outputs(model), rtol=0, atol=0)


def test_loading_into_a_differently_converted_model_fails_naming_both():
    state = twice_converted().state_dict()
    other = actlab.convert(resnet(), "iieu_b", example_input=X)
    with pytest.raises(RuntimeError, match="converted by convert\\(model, 'dpa'.*this model was converted by "
                                           "convert\\(model, 'iieu_b'\\)"):
        other.load_state_dict(state, strict=False)


def test_load_converted_needs_a_record():
    with pytest.raises(ValueError, match=RECORD_KEY):
        load_converted(resnet(), resnet().state_dict())
