"""actlab with Lightning's Trainer: the DPA mixin passes targets and adds the channel loss."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import actlab

lightning = pytest.importorskip("lightning")
from actlab.integrations.lightning import DPAMixin  # noqa: E402


def network():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(8, 4))
    return actlab.convert(net, "dpa", num_classes=4, example_input=torch.randn(2, 3, 8, 8), interval=1)


class Plain(lightning.LightningModule):
    def __init__(self, dict_batches: bool = False):
        super().__init__()
        self.net, self.dict_batches, self.losses = network(), dict_batches, []

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = (batch["image"], batch["labels"]) if self.dict_batches else batch
        return F.cross_entropy(self(x), y)

    def on_before_backward(self, loss):
        self.losses.append(loss.detach())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class WithDPA(DPAMixin, Plain):
    dpa_weight = 5.0

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.expected.append((loss + 5.0 * actlab.dpa_loss(self)).detach())  # what the mixin should return
        return loss

    def on_fit_start(self):
        self.expected = []


def loader(dict_batches: bool):
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 3, 8, 8, generator=g), torch.randint(0, 4, (16,), generator=g)
    data = [{"image": x[i], "labels": y[i]} for i in range(16)] if dict_batches else list(zip(x, y))
    return torch.utils.data.DataLoader(data, batch_size=8)


def fit(module, dict_batches=False):
    trainer = lightning.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                                enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, loader(dict_batches))
    return module


@pytest.mark.parametrize("dict_batches", [False, True], ids=["tuples", "dicts"])
def test_the_mixin_trains_dpa_in_lightnings_trainer(dict_batches):
    """Lightning's Trainer stops a plain module at its first step ("needs class targets"); with the mixin
    it trains: the memories update, and the loss Lightning differentiates is the task loss plus the
    channel loss (checked against the task loss of the same forward)."""
    with pytest.raises(RuntimeError, match="needs class targets"):
        fit(Plain(dict_batches), dict_batches)
    module = fit(WithDPA(dict_batches), dict_batches)
    site = next(m for m in module.modules() if isinstance(m, actlab.DPA))
    assert site.value_memory.abs().sum() > 0 and site.grad_memory.abs().sum() > 0
    assert len(module.losses) == 2 and all(torch.isfinite(loss) for loss in module.losses)
    torch.testing.assert_close(torch.stack(module.losses), torch.stack(module.expected), rtol=0, atol=0)
