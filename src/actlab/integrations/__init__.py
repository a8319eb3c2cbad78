"""actlab inside other libraries' training code: ``actlab.integrations.timm`` (timm model names, timm's
scripts) and ``actlab.integrations.hf`` (Hugging Face ``save_pretrained`` directories). Each is imported on
its own, so actlab does not import those libraries until asked."""
