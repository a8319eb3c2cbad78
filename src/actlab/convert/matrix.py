"""The conversion matrix: unmodified torchvision and timm classifiers x activations.

Each case builds one architecture with random weights (no download), converts it with ``actlab.convert``,
runs one training step (forward with targets, cross-entropy plus DPA's channel loss, backward, SGD step)
and one eval forward, and records what the conversion reached and whether everything stayed finite.
``tests/convert/test_matrix.py`` pins the counts; ``docs/models.md`` holds the table of a run:

    python -m actlab.convert.matrix [--acts iieu_b,dpa,meta_acon] [--models resnet18,swin_t] [--out docs/models.md]
"""
from __future__ import annotations

import argparse
import re
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..activations import dpa_loss, targets
from ..machine import FIGURES_HELP, command_line, record_figure, summary
from .converter import conversion_report, convert

ACTIVATIONS = ("iieu_b", "dpa", "meta_acon")
NUM_CLASSES = 10


@dataclass(frozen=True)
class ZooModel:
    """One classifier as its library builds it, at a small input it accepts.

    Args:
        library: "torchvision" or "timm".
        arch: the library's name for it.
        size: input height and width.
        kwargs: constructor settings that shrink it to ``size`` (timm ``img_size``) or drop auxiliary heads.
    """

    library: str
    arch: str
    size: int
    kwargs: dict = field(default_factory=dict)

    def build(self) -> nn.Module:
        if self.library == "torchvision":
            import torchvision

            return getattr(torchvision.models, self.arch)(num_classes=NUM_CLASSES, **self.kwargs)
        import timm

        return timm.create_model(self.arch, pretrained=False, num_classes=NUM_CLASSES, **self.kwargs)


def _tv(arch: str, size: int = 64, **kwargs) -> tuple[str, ZooModel]:
    return f"tv/{arch}", ZooModel("torchvision", arch, size, kwargs)


def _timm(arch: str, size: int = 64, **kwargs) -> tuple[str, ZooModel]:
    return f"timm/{arch}", ZooModel("timm", arch, size, kwargs)


MODELS: dict[str, ZooModel] = dict([
    _tv("resnet18"), _tv("resnet50"), _tv("resnext50_32x4d"), _tv("mobilenet_v2"), _tv("mobilenet_v3_small"),
    _tv("vgg11_bn", 32), _tv("alexnet"), _tv("shufflenet_v2_x1_0"), _tv("squeezenet1_1"),
    _tv("googlenet", aux_logits=False, init_weights=True), _tv("densenet121"), _tv("efficientnet_b0"),
    _tv("efficientnet_v2_s"), _tv("regnet_y_400mf"), _tv("mnasnet0_5"), _tv("convnext_tiny"), _tv("swin_t"),
    _tv("maxvit_t", 224),
    _tv("vit_b_16", 32, image_size=32),
    _timm("resnet26"), _timm("vit_tiny_patch16_224", 32, img_size=32, patch_size=8),
    _timm("deit_tiny_patch16_224", 32, img_size=32, patch_size=8),
    _timm("cait_xxs24_224", 32, img_size=32, patch_size=8, depth=4), _timm("pvt_v2_b0"),
    _timm("tnt_s_patch16_224", 32, img_size=32, patch_size=8, depth=3), _timm("eva02_tiny_patch14_224", 56, img_size=56),
    _timm("edgenext_xx_small"), _timm("levit_128s", img_size=64), _timm("coat_tiny", img_size=64),
    _timm("convnext_atto"), _timm("mobilevit_xxs"), _timm("poolformer_s12"), _timm("resmlp_12_224", img_size=64),
    _timm("mixer_s16_224", img_size=64), _timm("swin_tiny_patch4_window7_224", img_size=64, window_size=2),
    _timm("xcit_nano_12_p16_224", img_size=64), _timm("gcvit_xxtiny", img_size=64),
    _timm("coatnet_0_rw_224", img_size=64), _timm("fastvit_t8"), _timm("regnetx_002"), _timm("ghostnet_100"),
    _timm("rexnet_100"), _timm("lcnet_050"), _timm("nf_resnet26"), _timm("repvgg_a0"), _timm("dla34"),
    _timm("hrnet_w18_small"), _timm("inception_v3", 128),
])


@dataclass
class CaseResult:
    """What one conversion reached and how its training step went."""

    model: str
    activation: str
    calls: int = 0  # activation calls in one forward (sites before conversion)
    converted: int = 0
    functional: int = 0  # functional activations left as they were
    aliases: int = 0
    kept: dict[str, int] = field(default_factory=dict)  # reason -> count
    new_parameters: int = 0
    without_grad: list[str] = field(default_factory=list)  # new parameters that got no (finite) gradient
    finite: bool = False  # loss, every gradient, the eval output
    seconds: float = 0.0
    error: str = ""


def run_case(name: str, activation: str, seed: int = 0) -> CaseResult:
    """Convert ``MODELS[name]`` to ``activation``, one SGD training step and one eval forward."""
    spec = MODELS[name]
    result = CaseResult(name, activation)
    start = time.perf_counter()
    torch.manual_seed(seed)
    model = spec.build()
    x = torch.randn(2, 3, spec.size, spec.size)
    y = torch.tensor([1, 7])
    before = {id(p) for p in model.parameters()}
    kwargs = {"interval": 1} if activation == "dpa" else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the report says it all; the warning is for interactive users
        convert(model, activation, num_classes=NUM_CLASSES, example_input=x, **kwargs)
    report = conversion_report(model)
    result.calls, result.converted = len(report.sites), len(report.converted)
    result.functional, result.aliases = len(report.functional), len(report.aliases)
    result.kept = dict(Counter(reason_kind(s.reason) for s in report.kept).most_common())
    new = [(n, p) for n, p in model.named_parameters() if id(p) not in before]
    result.new_parameters = len(new)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    model.train()
    with targets(model, y):
        out = model(x)
    loss = F.cross_entropy(out, y) + dpa_loss(model)
    loss.backward()
    result.without_grad = [n for n, p in new if p.grad is None or not torch.isfinite(p.grad).all()]
    grads_finite = all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    optimizer.step()
    model.eval()
    with torch.no_grad():
        evaluated = model(x)
    result.finite = bool(torch.isfinite(loss)) and grads_finite and bool(torch.isfinite(evaluated).all())
    result.seconds = time.perf_counter() - start
    return result


def reason_kind(reason: str) -> str:
    """A kept site's reason without the module names, so that like reasons count together."""
    return re.sub(r"comes from \S+ \((\w+)\)", r"comes from a \1", reason).split(";")[0]


def table(results: list[CaseResult], activations: tuple[str, ...]) -> str:
    """Markdown: one row per model, converted / activation calls per activation, and why sites stayed."""
    by_model: dict[str, dict[str, CaseResult]] = {}
    for r in results:
        by_model.setdefault(r.model, {})[r.activation] = r
    lines = ["| model | activation calls | " + " | ".join(activations) + " | left as they were (first activation) |",
             "|---" * (len(activations) + 3) + "|"]
    for model, cases in by_model.items():
        first = next(iter(cases.values()))
        cells = []
        for act in activations:
            r = cases.get(act)
            if r is None:
                cells.append("-")
            elif r.error:
                cells.append(f"error: {r.error[:40]}")
            else:
                ok = "" if r.finite and not r.without_grad else " (!)"
                cells.append(f"{r.converted}{ok}")
        calls = f"{first.calls}" + (f" + {first.functional} functional" if first.functional else "") + \
            (f" ({first.aliases} aliases)" if first.aliases else "")
        kept = "; ".join(f"{n} x {reason}" for reason, n in first.kept.items()) or "-"
        lines.append(f"| {model} | {calls} | " + " | ".join(cells) + f" | {kept} |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m actlab.convert.matrix``."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--acts", default=",".join(ACTIVATIONS))
    parser.add_argument("--models", default="", help="comma-separated keys of MODELS (default: all)")
    parser.add_argument("--out", default="", help="write the markdown table (with its machine line) here")
    parser.add_argument("--figures", metavar="FOLDER", help=FIGURES_HELP)
    return parser


def main(argv=None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    activations = tuple(a for a in args.acts.split(",") if a)
    names = [m for m in args.models.split(",") if m] or list(MODELS)
    unknown = [m for m in names if m not in MODELS]
    if unknown:
        raise SystemExit(f"unknown model(s) {unknown}; known: {', '.join(MODELS)}")
    results = []
    for name in names:
        for act in activations:
            try:
                r = run_case(name, act)
            except Exception as exc:  # noqa: BLE001 - a failing case is a row of the table, not the end of the run
                r = CaseResult(name, act, error=f"{type(exc).__name__}: {exc}")
            print(f"{name:38s} {act:10s} {r.converted:4d}/{r.calls:<4d} finite={r.finite} "
                  f"no-grad={len(r.without_grad)} {r.seconds:.1f}s {r.error[:80]}", flush=True)
            results.append(r)
    text = f"{summary('cpu')}; {time.strftime('%Y-%m-%d')}; one run per case.\n\n{table(results, activations)}\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    if args.figures:
        record_figure(args.figures, command_line("actlab.convert.matrix", argv),
                      f"One run per case.\n\n{table(results, activations)}")


if __name__ == "__main__":
    main()
