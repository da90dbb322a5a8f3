"""DDP: two gloo processes under torchrun reach the parameters of one process with the same global batch."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from test_training_support import make_assets, run_config, step_records
from vlmkit.training import train
from vlmkit.training.metrics import read_metrics

TOLERANCE = 1e-6
"""Max absolute parameter difference allowed after 3 AdamW steps (fp32; gradients are summed in another order)."""


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    assets = make_assets(tmp_path / "assets", n=16)
    stage = {"data": [{"path": str(assets.mixed)}], "policy": {"projector": "full", "language_model": "full"},
             "lr": 1e-3, "steps": 3, "group_by_length": True}  # fmt: skip
    single = train(run_config(assets, tmp_path / "one", {**stage, "batch_size": 4}))

    config = tmp_path / "ddp.yaml"
    config.write_text(yaml.safe_dump(run_config(assets, tmp_path / "two", {**stage, "batch_size": 2})))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # exactly the documented command: torchrun --nproc_per_node=2 -m vlmkit train CONFIG
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "vlmkit",
               "train", str(config)]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    losses = [r["loss"] for r in step_records(read_metrics(tmp_path / "two"))]
    assert losses == pytest.approx(single.losses, abs=1e-5)
    one = load_file(str(single.final_dir / "model.safetensors"))
    two = load_file(str(tmp_path / "two" / "final" / "model.safetensors"))
    diff = max(float((one[k] - two[k]).abs().max()) for k in one)
    assert diff < TOLERANCE
    assert any(not torch.equal(one[k], load_file(str(assets.base / "model.safetensors"))[k]) for k in one)
    # only rank 0 wrote: one metrics record per step
    assert len(losses) == 3
