"""actlab with Hugging Face transformers models built from configs (no download): their activation classes
are sites, the example batch is a dict of keyword arguments, tiny BERT / Llama / GPT-2 models train with
IIEU-B and DPA, and save_pretrained directories load back converted."""
from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F

import actlab

transformers = pytest.importorskip("transformers")
from actlab.integrations.hf import DPATrainer, from_pretrained  # noqa: E402

LABELS = 3


def tiny(kind: str):
    torch.manual_seed(0)
    if kind == "bert":
        config = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                         intermediate_size=64, num_labels=LABELS, hidden_dropout_prob=0.0,
                                         attention_probs_dropout_prob=0.0)  # deterministic training forwards
        return transformers.BertForSequenceClassification(config)
    if kind == "llama":
        config = transformers.LlamaConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                          intermediate_size=64, num_labels=LABELS, pad_token_id=0)
        return transformers.LlamaForSequenceClassification(config)
    config = transformers.GPT2Config(vocab_size=50, n_embd=32, n_layer=2, n_head=2, num_labels=LABELS, pad_token_id=0,
                                     bos_token_id=1, eos_token_id=1)
    return transformers.GPT2ForSequenceClassification(config)


def batch(n=4, length=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 50, (n, length), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, torch.arange(n) % LABELS


def train(model, steps=3):
    """A few AdamW steps (targets and the channel loss where DPA sits); the losses."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    inputs, y = batch()
    losses = []
    model.train()
    for _ in range(steps):
        with actlab.targets(model, y):
            logits = model(**inputs).logits
        loss = F.cross_entropy(logits, y) + actlab.dpa_loss(model)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("kind,act,sites", [("bert", "iieu_b", 2), ("bert", "dpa", 2), ("llama", "iieu_b", 2),
                                            ("llama", "dpa", 2), ("gpt2", "iieu_b", 2),
                                            ("gpt2", "dpa", 2)])
def test_tiny_text_models_convert_from_a_dict_batch_and_train(kind, act, sites):
    """The MLPs' activations (transformers' GELUActivation, SiLU, NewGELUActivation classes) become sites,
    found with a dict of keyword arguments; training steps change the activations' parameters or memories
    and the loss stays finite."""
    model = tiny(kind)
    inputs, _ = batch(2)
    actlab.convert(model, act, num_classes=LABELS, example_input=inputs)
    report = actlab.conversion_report(model)
    assert len(report.converted) == sites and not report.kept, str(report)
    before = {k: v.clone() for k, v in model.state_dict().items() if "act" in k and v.is_floating_point()}
    losses = train(model, steps=5)  # DPA's memories update on every 5th step
    assert all(torch.isfinite(torch.tensor(losses)))
    after = model.state_dict()
    assert before and any(not torch.equal(v, after[k]) for k, v in before.items())


def test_gpt2_conv1d_producers_are_iieu_b_sites_that_equal_the_linear_ones():
    """GPT-2's MLP is made by transformers' Conv1D (a Linear with its weight stored (in, out)): IIEU-B binds
    to it, and a unit at a Conv1D site gives the output and gradients of a unit at the nn.Linear with the
    transposed weight (float64)."""
    model = tiny("gpt2")
    actlab.convert(model, "iieu_b", example_input=batch(2)[0])
    sites = actlab.conversion_report(model).converted
    assert [s.producer for s in sites] == ["transformer.h.0.mlp.c_fc", "transformer.h.1.mlp.c_fc"]

    torch.manual_seed(0)
    conv1d = transformers.pytorch_utils.Conv1D(6, 5).double()
    with torch.no_grad():
        conv1d.bias.normal_()
    linear = torch.nn.Linear(5, 6).double()
    with torch.no_grad():
        linear.weight.copy_(conv1d.weight.t())
        linear.bias.copy_(conv1d.bias)
    results = []
    for producer in (conv1d, linear):
        unit = actlab.IIEUB(6).double().bind(producer)
        torch.manual_seed(1)
        with torch.no_grad():
            unit.eta.uniform_(0.2, 0.8)  # the same thresholds for both, some responses below them
        x = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
        out = unit(producer(x))
        out.backward(torch.randn_like(out))
        weight_grad = producer.weight.grad if producer is linear else producer.weight.grad.t()
        results.append((out, x.grad, weight_grad, producer.bias.grad, unit.eta.grad))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind,act", [("bert", "iieu_b"), ("llama", "dpa")])
def test_save_pretrained_directories_load_back_converted(kind, act, tmp_path):
    """save_pretrained of a trained converted model writes the record into the weights and config.json;
    actlab's from_pretrained loads the directory converted (same outputs); the class's own from_pretrained
    loads the unconverted model."""
    model = tiny(kind)
    inputs, _ = batch(2)
    actlab.convert(model, act, num_classes=LABELS, example_input=inputs)
    train(model, steps=2)
    model.save_pretrained(tmp_path)
    config = json.load(open(os.path.join(tmp_path, "config.json")))
    assert json.loads(config["actlab_conversion"])["calls"][0]["activation"] == act
    loaded = from_pretrained(type(model), str(tmp_path))
    model.eval()
    loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, model(**inputs).logits, rtol=0, atol=0)
    plain = type(model).from_pretrained(str(tmp_path))
    assert not any(isinstance(m, actlab.activations.ActivationModule) for m in plain.modules())


def test_from_pretrained_refuses_an_unconverted_directory(tmp_path):
    tiny("bert").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="actlab_conversion"):
        from_pretrained(transformers.BertForSequenceClassification, str(tmp_path))


def test_the_dpa_trainer_passes_targets_and_adds_the_channel_loss(tmp_path):
    """transformers' Trainer on a DPA model fails at its first step ("needs class targets"); DPATrainer
    trains it: 6 steps, the memories updated on the 5th, the losses finite."""
    pytest.importorskip("accelerate")
    model = tiny("bert")
    actlab.convert(model, "dpa", num_classes=LABELS, example_input=batch(2)[0])
    inputs, y = batch(8)
    data = [{"input_ids": inputs["input_ids"][i], "attention_mask": inputs["attention_mask"][i], "labels": y[i]}
            for i in range(8)]
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=4,
                                          learning_rate=1e-2, use_cpu=True, report_to=[], save_strategy="no",
                                          logging_steps=1, disable_tqdm=True)
    with pytest.raises(RuntimeError, match="needs class targets"):
        transformers.Trainer(model=model, args=args, train_dataset=data).train()
    trainer = DPATrainer(model=model, args=args, train_dataset=data, dpa_weight=5.0)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))
    sites = [m for m in model.modules() if isinstance(m, actlab.DPA)]
    assert sites and all(s.value_memory.abs().sum() > 0 for s in sites)


@pytest.mark.parametrize("kind", ["llama"])
def test_an_attention_mask_keeps_padding_out_of_the_memories(kind):
    """4 pad tokens after each sequence: with the attention mask passed to targets, DPA's memories are those
    of the unpadded batch (the real tokens' activations are the same); without it the padding shifts them.
    (BERT's sites pool its class token, which padding does not reach.)"""
    ids = batch(2, length=7)[0]["input_ids"]
    y = torch.tensor([0, 2])
    padded = torch.cat([ids, torch.zeros(2, 4, dtype=torch.long)], 1)
    mask = torch.cat([torch.ones(2, 7, dtype=torch.long), torch.zeros(2, 4, dtype=torch.long)], 1)
    memories = []
    for inputs, token_mask in (({"input_ids": ids}, None), ({"input_ids": padded, "attention_mask": mask}, mask),
                               ({"input_ids": padded, "attention_mask": mask}, None)):
        model = tiny(kind)
        actlab.convert(model, "dpa", num_classes=LABELS, example_input={"input_ids": ids}, interval=1)
        model.train()
        with actlab.targets(model, y, attention_mask=token_mask):
            logits = model(**inputs).logits
        (logits.sum() + actlab.dpa_loss(model)).backward()
        memories.append(torch.cat([b.flatten() for n, b in model.named_buffers() if n.endswith("memory")]))
    assert memories[0].abs().sum() > 0
    torch.testing.assert_close(memories[1], memories[0], rtol=1e-5, atol=1e-6)
    assert (memories[2] - memories[0]).abs().max() > 1e-3
    with pytest.raises(ValueError, match="attention_mask must be"):
        with actlab.targets(model, y, attention_mask=mask[:1]):
            pass
