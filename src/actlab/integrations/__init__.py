"""actlab inside other libraries' training code: ``actlab.integrations.timm`` (timm model names, timm's
scripts), ``actlab.integrations.hf`` (Hugging Face ``save_pretrained`` directories, a ``Trainer`` for DPA)
and ``actlab.integrations.lightning`` (a ``LightningModule`` mixin for DPA). Each is imported on its own,
so actlab does not import those libraries until asked."""
