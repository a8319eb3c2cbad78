"""DDP through torchrun: two gloo processes on CPU end where one process on the global batch ends."""
import json
import os
import subprocess
import sys

import pytest
import torch

from actlab.train import TrainConfig, train
from actlab.train.checkpoint import load

# vit_micro has LayerNorm only (SyncBatchNorm has no CPU kernel), DPA sites exercise the synced memories;
# no augmentation because random crops are drawn per rank
RUN = dict(model="vit_micro", act="dpa", dataset="synthetic", image_size=16, epochs=2, lr=0.05, warmup_epochs=0.5,
           augment=False, device="cpu")


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch(ddp_dir: str, nodes: int, extra: tuple[str, ...] = ()) -> list[str]:
    """Two processes through torchrun: one agent with 2 processes (--standalone), or ``nodes`` = 2 agents
    of one process each meeting at a c10d rendezvous on localhost (two "nodes", as on a cluster). Returns
    the JSON lines printed."""
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in RUN.items()]
    train_cmd = ["-m", "actlab", "train", *flags, *extra, "--batch-size=32", f"--out={ddp_dir}", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = [sys.executable, "-m", "torch.distributed.run"]
    if nodes == 1:
        agents = [run + ["--standalone", "--nproc_per_node=2", *train_cmd]]
    else:
        port = _free_port()
        agents = [run + [f"--nnodes={nodes}", "--nproc_per_node=1", "--rdzv-backend=c10d",
                         f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=actlab-test", *train_cmd]
                  for _ in range(nodes)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for cmd in agents]
    printed = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        printed += [line for line in out.splitlines() if line.startswith("{")]
    return printed


@pytest.mark.parametrize("nodes,extra", [(1, ()), (2, ()), (1, ("--compile",))],
                         ids=["one_node", "two_nodes", "one_node_compiled"])
@pytest.mark.slow
def test_two_processes_match_one_process_on_the_global_batch(tmp_path, nodes, extra):
    """One agent with two processes, or two torchrun agents (nodes) with one each, eager or compiled: the run
    ends with the weights, DPA memories and metrics of one (eager) process on the global batch. Compiled,
    the memory updates gather the global batch inside the compiled graphs, forward and backward (before,
    each rank's gradient memory took its own half only, and the sizes were read on the host)."""
    ddp_dir, single_dir = str(tmp_path / "ddp"), str(tmp_path / "single")
    printed = _launch(ddp_dir, nodes, extra)
    assert len(printed) == 1  # global rank 0 reports, the other rank stays quiet

    single = train(TrainConfig(**RUN, batch_size=64, out=single_dir), quiet=True)
    with open(os.path.join(ddp_dir, "summary.json")) as f:
        ddp = json.load(f)
    assert ddp["world_size"] == 2 and ddp["steps"] == single["steps"] == 2 * (512 // 64)
    a, b = load(os.path.join(ddp_dir, "checkpoint.pt")), load(os.path.join(single_dir, "checkpoint.pt"))
    memories = [k for k in b["model"] if k.endswith(("value_memory", "grad_memory"))]
    assert memories and any(b["model"][k].abs().sum() > 0 for k in memories)
    for key, value in b["model"].items():
        # gradients are averaged over ranks in another summation order: equal up to float rounding
        torch.testing.assert_close(a["model"][key], value, rtol=1e-4, atol=1e-5, msg=key)
    assert ddp["top1"] == pytest.approx(single["top1"], abs=100 / 128 + 1e-9)  # at most one prediction flips
    assert ddp["loss"] == pytest.approx(single["loss"], rel=1e-4)
    rows_ddp = [json.loads(line) for line in open(os.path.join(ddp_dir, "log.jsonl"))]
    rows_single = [json.loads(line) for line in open(os.path.join(single_dir, "log.jsonl"))]
    assert all(r["train_channel_loss"] > 0 for r in rows_single)  # the channel loss took part
    for r, s in zip(rows_ddp, rows_single, strict=True):
        assert r["train_loss"] == pytest.approx(s["train_loss"], rel=1e-4)
        assert r["train_channel_loss"] == pytest.approx(s["train_channel_loss"], rel=1e-3, abs=1e-7)


def test_sync_bn_on_cpu_is_refused_with_a_reason(tmp_path, monkeypatch):
    from actlab.train import loop

    monkeypatch.setattr(loop, "setup", lambda kind: (loop.DistInfo(0, 2, 0), torch.device("cpu")))
    cfg = TrainConfig(model="resnet20", dataset="synthetic", image_size=16, epochs=1, batch_size=64,
                      sync_bn=True, out=str(tmp_path / "r"))
    with pytest.raises(ValueError, match="sync_bn needs CUDA"):
        train(cfg, quiet=True)
