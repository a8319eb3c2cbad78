"""actlab inside timm, with timm's own machinery: create_model by name, CheckpointSaver / load_checkpoint,
ModelEmaV3, resolve_data_config, and a script run through ``python -m actlab.integrations.timm``."""
from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap

import pytest
import timm
import torch
from timm.data import resolve_data_config
from timm.utils import CheckpointSaver, ModelEmaV3

import actlab
from actlab.convert.record import calls_of
from actlab.integrations.timm import DPA_TASKS, DPAClassificationTask, DPATask, create_timm_model, register

SMALL = torch.randn(2, 3, 32, 32)


def trained_step(model):
    """One SGD step, so the activations' parameters and memories differ from their initial values."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    with actlab.targets(model, y):
        loss = torch.nn.functional.cross_entropy(model(x), y) + actlab.dpa_loss(model)
    loss.backward()
    optimizer.step()
    return optimizer


def outputs(model, x=SMALL):
    model.eval()
    with torch.no_grad():
        return model(x)


def test_any_timm_model_by_name_with_an_actlab_activation():
    """timm.create_model("actlab", arch=, act=) and create_timm_model convert the sites (IIEU-B those with a
    producer: 9 of resnet18's 17, the 8 after residual adds have none); the default example batch comes
    from the model's pretrained config (224x224 for resnet18)."""
    by_name = timm.create_model("actlab", arch="resnet18", act="iieu_b", num_classes=10)
    report = actlab.conversion_report(by_name)
    assert report.activation == "iieu_b" and len(report.converted) == 9 and len(report.kept) == 8
    assert calls_of(by_name)[0].example_input == [{"shape": [2, 3, 224, 224], "dtype": "float32"}]
    direct = create_timm_model("resnet18", "dpa", num_classes=10, example_input=SMALL)
    assert len(actlab.conversion_report(direct).converted) == 17
    with pytest.raises(ValueError, match="arch="):
        timm.create_model("actlab", act="iieu_b")


def test_the_zoo_as_timm_models():
    """actlab_NAME for each zoo model, with timm's keywords (num_classes, in_chans, img_size), a pretrained
    config that timm's data pipeline reads, and no pretrained weights."""
    model = timm.create_model("actlab_resnet20", act="iieu_dc", num_classes=7, img_size=32)
    assert model(SMALL).shape == (2, 7)
    assert resolve_data_config(model=model)["input_size"] == (3, 32, 32)
    assert any(isinstance(m, actlab.DynamicCoupler) for m in model.modules())
    assert set(register()) >= {"actlab", "actlab_resnet20", "actlab_vit_tiny"}  # idempotent
    with pytest.raises(ValueError, match="no pretrained weights"):
        timm.create_model("actlab_resnet20", pretrained=True)


@pytest.mark.parametrize("act", ["iieu_b", "dpa"])
def test_checkpoint_saver_checkpoints_load_with_timm_and_into_a_plain_model(act, tmp_path):
    """A converted timm model trained a step, saved by timm's CheckpointSaver with a ModelEmaV3: timm's
    load_checkpoint loads it (and its EMA) into the same model by name; into a plain timm model it fails
    naming the conversion record, and actlab.load_converted converts that model and loads it."""
    model = timm.create_model("actlab", arch="resnet18", act=act, num_classes=10, example_input=SMALL)
    ema = ModelEmaV3(model, decay=0.5)
    optimizer = trained_step(model)
    ema.update(model, step=1)
    saver = CheckpointSaver(model, optimizer, model_ema=ema, checkpoint_dir=str(tmp_path),
                            recovery_dir=str(tmp_path), max_history=1)
    saver.save_checkpoint(epoch=0, metric=1.0)
    path = os.path.join(tmp_path, "checkpoint-0.pth.tar")
    want, want_ema = outputs(model), outputs(ema.module)

    again = timm.create_model("actlab", arch="resnet18", act=act, num_classes=10, example_input=SMALL)
    timm.models.load_checkpoint(again, path)
    torch.testing.assert_close(outputs(again), want, rtol=0, atol=0)
    timm.models.load_checkpoint(again, path, use_ema=True)
    torch.testing.assert_close(outputs(again), want_ema, rtol=0, atol=0)

    plain = timm.create_model("resnet18", num_classes=10)
    with pytest.raises(RuntimeError, match="actlab_conversion"):
        timm.models.load_checkpoint(plain, path)
    state = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
    assert actlab.load_converted(plain, state).unexpected_keys == []
    torch.testing.assert_close(outputs(plain), want, rtol=0, atol=0)


@pytest.mark.slow
def test_running_timm_scripts_through_the_runner(tmp_path):
    """python -m actlab.integrations.timm SCRIPT ARGS runs SCRIPT as __main__ with the names registered and
    its own arguments."""
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent("""
        import sys, timm, actlab
        model = timm.create_model(sys.argv[1], arch="resnet18", act=sys.argv[2], num_classes=4)
        print(__name__, type(model).__name__, len(actlab.conversion_report(model).converted))
    """))
    run = subprocess.run([sys.executable, "-m", "actlab.integrations.timm", str(script), "actlab", "silu"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["__main__", "ResNet", "17"]


def test_dpa_classification_task_passes_the_targets_and_adds_the_channel_loss():
    """timm's ClassificationTask stops DPA at its first training step; the DPA task gives the loss and the
    memories of the hand-written step (targets around the forward, the channel loss added) with mixup's soft
    targets read as their most probable class; in eval mode it runs without targets."""
    torch.manual_seed(0)
    model = create_timm_model("resnet18", "dpa", num_classes=4, example_input=SMALL, act_kwargs={"interval": 1})
    trained_step(model)  # the gradient memories hold signs now: the channel loss masks entries
    twin = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 4, (8,), generator=g)
    x, soft = timm.data.Mixup(mixup_alpha=0.8, num_classes=4)(x, y)
    criterion = timm.loss.SoftTargetCrossEntropy()
    with pytest.raises(RuntimeError, match="needs class targets"):
        timm.task.ClassificationTask(copy.deepcopy(model), criterion, verbose=False)(x, soft)

    task = DPAClassificationTask(model, criterion, dpa_weight=3.0, verbose=False)
    result = task(x, soft)
    with actlab.targets(twin, soft.argmax(1)):
        output = twin(x)
    channel = actlab.dpa_loss(twin)
    assert channel > 0
    torch.testing.assert_close(result["loss"], criterion(output, soft) + 3.0 * channel)
    result["loss"].backward()
    (criterion(output, soft) + 3.0 * channel).backward()
    memories = [k for k in model.state_dict() if k.endswith("memory")]
    for k in memories:
        torch.testing.assert_close(model.state_dict()[k], twin.state_dict()[k], msg=k)
    assert any(model.state_dict()[k].abs().sum() > 0 for k in memories if k.endswith("grad_memory"))

    model.eval()
    torch.testing.assert_close(task(x, soft)["output"], outputs(twin, x))


def test_every_dpa_task_is_its_timm_task_with_dpa_first():
    """The classification task and timm's three distillation tasks each have a DPA version, DPA's forward
    first in the method order, so the task's own loss is computed inside the targets block."""
    assert set(DPA_TASKS) == {"ClassificationTask", "LogitDistillationTask", "FeatureDistillationTask",
                              "TokenDistillationTask"}
    for name, task in DPA_TASKS.items():
        base = getattr(timm.task, name)
        assert issubclass(task, base) and task.__mro__[1] is DPATask and task.__name__ == f"DPA{name}"


def test_dpa_logit_distillation_trains_the_student_with_dpa():
    """Distilling into a DPA student: the plain timm task stops at its first training step; the DPA one
    gives the plain task's loss computed inside ``targets`` plus the weighted channel loss, and the student's
    memories of that step; the teacher takes no targets and changes nothing."""
    torch.manual_seed(0)
    student = create_timm_model("resnet18", "dpa", num_classes=4, example_input=SMALL, act_kwargs={"interval": 1})
    trained_step(student)  # the gradient memories hold signs now: the channel loss masks entries
    twin = copy.deepcopy(student)
    teacher = timm.create_model("resnet18", num_classes=4)
    teacher_state = copy.deepcopy(teacher.state_dict())
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 4, (8,), generator=g)
    criterion = torch.nn.CrossEntropyLoss()
    plain = timm.task.LogitDistillationTask(twin, teacher_model=teacher, criterion=criterion, temperature=2.0,
                                            verbose=False)
    with pytest.raises(RuntimeError, match="needs class targets"):
        plain(x, y)

    task = DPA_TASKS["LogitDistillationTask"](student, teacher_model=teacher, criterion=criterion,
                                              temperature=2.0, dpa_weight=2.0, verbose=False)
    result = task(x, y)
    with actlab.targets(twin, y):
        want = plain(x, y)
    channel = actlab.dpa_loss(twin)
    assert channel > 0
    torch.testing.assert_close(result["loss"], want["loss"] + 2.0 * channel)
    torch.testing.assert_close(result["kd_loss"], want["kd_loss"])
    result["loss"].backward()
    (want["loss"] + 2.0 * channel).backward()
    for k in [k for k in student.state_dict() if k.endswith("memory")]:
        torch.testing.assert_close(student.state_dict()[k], twin.state_dict()[k], msg=k)
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, teacher_state[k]), k


@pytest.mark.slow
def test_the_runner_puts_the_dpa_task_in_timms_place(tmp_path):
    """Through the runner, a script that imports timm's ClassificationTask (as timm's train.py does) gets
    the DPA task with --dpa-weight as its weight, and a training step of a DPA model runs."""
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent("""
        import timm, torch
        from timm.task import ClassificationTask
        model = timm.create_model("actlab", arch="resnet18", act="dpa", num_classes=4,
                                  example_input=torch.randn(2, 3, 32, 32))
        task = ClassificationTask(model=model, criterion=torch.nn.CrossEntropyLoss(), verbose=False)
        result = task(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3]))
        result["loss"].backward()
        print(type(task).__name__, task.dpa_weight, bool(torch.isfinite(result["loss"])))
        from timm.task import LogitDistillationTask
        print(LogitDistillationTask.__name__, LogitDistillationTask.default_dpa_weight)
    """))
    run = subprocess.run([sys.executable, "-m", "actlab.integrations.timm", "--dpa-weight", "5", str(script)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["DPAClassificationTask", "5.0", "True", "DPALogitDistillationTask", "5.0"]


@pytest.mark.parametrize("act,act_kwargs", [("dpa", {"interval": 2}), ("iieu_b", {})])
def test_timm_gradient_checkpointing_recomputes_the_activations_exactly(act, act_kwargs):
    """timm's set_grad_checkpointing: the recompute in backward runs DPA with the first forward's labels and
    schedule position and advances nothing, IIEU-B recomputes the same; three steps (DPA's update steps
    among them) give the parameters, gradients, memories and schedule of training without it (the
    BatchNorms' running statistics aside, which every recompute updates again)."""
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = create_timm_model("resnet18", act, num_classes=4, example_input=SMALL, act_kwargs=act_kwargs)
        model.set_grad_checkpointing(checkpointing)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        model.train()
        g = torch.Generator().manual_seed(1)
        for _ in range(3):
            x, y = torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 4, (4,), generator=g)
            with actlab.targets(model, y):
                loss = torch.nn.functional.cross_entropy(model(x), y) + actlab.dpa_loss(model)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        results.append(({k: v.clone() for k, v in model.state_dict().items()},
                        {n: p.grad.clone() for n, p in model.named_parameters()}))
    (state, grads), (state_ckpt, grads_ckpt) = results
    assert state.keys() == state_ckpt.keys()
    for k in state:  # (BatchNorm's running statistics are updated again by any recompute: torch's rule)
        if not k.endswith(("running_mean", "running_var", "num_batches_tracked")):
            torch.testing.assert_close(state_ckpt[k], state[k], rtol=1e-5, atol=1e-6, msg=k)
    for n in grads:
        torch.testing.assert_close(grads_ckpt[n], grads[n], rtol=1e-5, atol=1e-6, msg=n)
    if act == "dpa":
        assert any(v.abs().sum() > 0 for k, v in state.items() if k.endswith("grad_memory"))
