"""IIEU-B: Instantaneous Importance Estimation Unit, basic form.

At a site ``x_pre -> P (Conv2d | Linear | transformers' Conv1D) -> [norm] -> x_t -> IIEU``::

    S    = x_t / ((||w_c|| + eps) * (||patch|| + eps))   # term-S, norm-decoupled similarity
    nu   = sigmoid(LN_C(GAP(x_t)))                      # term-B, per (sample, channel)
    rho  = S + nu
    out  = s(rho) * x_t,   s(r) = r if r >= eta_c else eta_c * exp(r - eta_c)

``patch`` is the receptive field of the output location in ``x_pre`` over the channels of the filter's
group (zero padding counted as zeros). A patch whose RMS is below 1e-6 has no direction: its term-S is
set to 0 (``zero_patch="silence"``, the default); ``zero_patch="published"`` keeps the papers'
``1 / (||x|| + 1e-8)``, which multiplies such patches by about 1e8.

Unlike the published code, grouped and depthwise convolutions take the patch norm over the group's own
channels only (the published code normed over all input channels there).

Memory: the autograd function keeps ``x_pre`` (which the producer keeps for its own backward anyway),
per-channel / per-location values and ``x_t``, unless ``x_t`` is the untouched output of a plain
BatchNorm, or of a Linear producer without a norm: then it keeps what that module keeps anyway and
replays it in backward. Everything else is recomputed in backward. Norms, term-B and the adjuster run in float32
(float64 for float64 inputs), also under autocast. The elementwise math runs on actlab's kernel layer
(``actlab.activations.kernels``).
"""
from ..dense import is_dense
from ..registry import LAYOUTS, ActivationSpec, Site, SiteMismatch, register
from .function import IIEUFunction, TermB, iieu_b, iieu_b_plain
from .module import IIEUB, inverse_filter_norms
from .patches import SILENT_RMS, ConvPatches, LinearPatches, inverse_patch_norm

__all__ = ["IIEUB", "IIEUFunction", "ConvPatches", "LinearPatches", "SILENT_RMS", "TermB", "iieu_b", "iieu_b_plain",
           "inverse_filter_norms", "inverse_patch_norm"]

def _from_site(site: Site, **kwargs) -> IIEUB:
    if site.layout == "nhwc" and not is_dense(site.producer):
        raise SiteMismatch("a map stored channels last is an IIEU-B site only after a Linear")
    return IIEUB(site.channels, **kwargs).bind(site.producer, norm=site.norm, out_slice=site.producer_slice)


register(ActivationSpec("iieu_b", IIEUB, needs_channels=True, needs_producer=True, from_site=_from_site,
                        layouts=LAYOUTS,
                        summary="IIEU-B: norm-decoupled feature-filter similarity re-calibration"))
