"""The conversion matrix (``actlab.convert.matrix``): unmodified torchvision and timm classifiers with random
weights x {iieu_b, dpa, meta_acon}: convert, one SGD training step, one eval forward. The converted counts
are pinned; the loss, every gradient and the eval output must be finite and every new parameter must get
a gradient. A fast subset runs by default; the whole matrix with ``pytest -m matrix`` or ``make test-all``.
"""
from __future__ import annotations

import pytest

from actlab.convert import matrix

ACTS = ("iieu_b", "dpa", "meta_acon")
# model: (activation calls, converted by iieu_b, dpa, meta_acon)
EXPECTED = {
    "tv/resnet18": (17, 9, 17, 17), "tv/resnet50": (49, 33, 49, 49), "tv/resnext50_32x4d": (49, 33, 49, 49),
    "tv/mobilenet_v2": (35, 35, 35, 35), "tv/mobilenet_v3_small": (33, 33, 33, 33), "tv/vgg11_bn": (10, 10, 10, 10),
    "tv/alexnet": (7, 7, 7, 7), "tv/shufflenet_v2_x1_0": (37, 37, 37, 37), "tv/squeezenet1_1": (26, 26, 26, 26),
    "tv/googlenet": (57, 57, 57, 57), "tv/densenet121": (120, 59, 120, 120), "tv/efficientnet_b0": (49, 49, 49, 49),
    "tv/efficientnet_v2_s": (102, 102, 102, 102), "tv/regnet_y_400mf": (65, 49, 65, 65),
    "tv/mnasnet0_5": (35, 35, 35, 35), "tv/convnext_tiny": (18, 18, 18, 18), "tv/swin_t": (12, 12, 12, 12),
    "tv/maxvit_t": (56, 56, 56, 56), "tv/vit_b_16": (12, 12, 12, 12), "timm/resnet26": (25, 17, 25, 25),
    "timm/vit_tiny_patch16_224": (12, 12, 12, 12), "timm/deit_tiny_patch16_224": (12, 12, 12, 12),
    "timm/cait_xxs24_224": (6, 6, 6, 6), "timm/pvt_v2_b0": (8, 8, 8, 8), "timm/tnt_s_patch16_224": (6, 6, 6, 6),
    "timm/eva02_tiny_patch14_224": (12, 12, 12, 12), "timm/edgenext_xx_small": (12, 12, 12, 12),
    "timm/levit_128s": (25, 14, 25, 25), "timm/coat_tiny": (26, 26, 26, 26), "timm/convnext_atto": (12, 12, 12, 12),
    "timm/mobilevit_xxs": (34, 34, 34, 34), "timm/poolformer_s12": (12, 12, 12, 12),
    "timm/resmlp_12_224": (12, 12, 12, 12), "timm/mixer_s16_224": (16, 16, 16, 16),
    "timm/swin_tiny_patch4_window7_224": (12, 12, 12, 12), "timm/xcit_nano_12_p16_224": (29, 29, 29, 29),
    "timm/gcvit_xxtiny": (34, 34, 34, 34), "timm/coatnet_0_rw_224": (30, 21, 30, 30), "timm/fastvit_t8": (18, 11, 18, 18),
    "timm/regnetx_002": (40, 27, 40, 40), "timm/ghostnet_100": (42, 42, 42, 42), "timm/rexnet_100": (46, 33, 46, 46),
    "timm/lcnet_050": (30, 30, 30, 30), "timm/nf_resnet26": (25, 0, 25, 25), "timm/repvgg_a0": (22, 0, 22, 22),
    "timm/dla34": (33, 21, 33, 33), "timm/hrnet_w18_small": (75, 40, 72, 72), "timm/inception_v3": (94, 94, 94, 94),
}
# one of each kind of site: a shared ReLU split per call, channels-last MLPs, an in-place Dropout after a
# site, class-token pooling, conv outputs seen as tokens, a gated MLP, a Linear + BatchNorm producer, a
# shared Mlp module
FAST = ("tv/resnet18", "tv/convnext_tiny", "tv/mobilenet_v3_small", "timm/vit_tiny_patch16_224", "timm/pvt_v2_b0",
        "timm/eva02_tiny_patch14_224", "timm/levit_128s", "timm/coat_tiny")
CASES = [pytest.param(model, act, marks=() if model in FAST else (pytest.mark.matrix,), id=f"{model}-{act}")
         for model in EXPECTED for act in ACTS]


def test_every_model_of_the_matrix_is_pinned():
    assert set(EXPECTED) == set(matrix.MODELS)
    assert len(EXPECTED) >= 36


@pytest.mark.parametrize("model,act", CASES)
def test_conversion_matrix(model, act):
    result = matrix.run_case(model, act)
    calls, *converted = EXPECTED[model]
    assert result.calls == calls, result
    assert result.converted == converted[ACTS.index(act)], result.kept
    assert result.finite, "non-finite loss, gradient or eval output"
    assert not result.without_grad, f"new parameters without a finite gradient: {result.without_grad[:5]}"
    if act != "dpa" and result.converted:
        assert result.new_parameters > 0


def test_table_marks_failed_cases_and_names_why_sites_stayed():
    ok = matrix.CaseResult("m", "iieu_b", calls=3, converted=2, kept={"no producer": 1}, finite=True)
    bad = matrix.CaseResult("m", "dpa", calls=3, converted=3, finite=False)
    text = matrix.table([ok, bad], ("iieu_b", "dpa"))
    row = text.splitlines()[-1]
    assert row == "| m | 3 | 2 | 3 (!) | 1 x no producer |"
    assert matrix.reason_kind("its input comes from stages.0.mlp.ln1 (LinearNorm), not a Conv2d/Linear") == \
        "its input comes from a LinearNorm, not a Conv2d/Linear"
