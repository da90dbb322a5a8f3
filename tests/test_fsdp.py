"""FSDP (``strategy: fsdp``): two gloo processes under torchrun reach the losses and parameters of one process with
the same global batch, and checkpoints resume across strategies (saved under fsdp, resumed in one process, and the
other way round) with the uninterrupted run's losses."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from test_training_support import make_assets, run_config, step_records
from vlmkit.errors import ConfigError
from vlmkit.training import checkpoint as ckpt
from vlmkit.training import train
from vlmkit.training.config import load_config
from vlmkit.training.distributed import DistEnv, decoder_layers, wrap
from vlmkit.training.metrics import read_metrics

LOSS_TOLERANCE = 1e-5
PARAM_TOLERANCE = 5e-5
"""Max absolute parameter difference after 4 AdamW steps at lr 1e-3 (5% of one step's largest update): rows of the
LM head that no target reaches get gradients so small that the order of the ranks' sums shows through Adam's
normalisation (1.2e-5 measured there, 6e-7 elsewhere). The grad norms catch a mis-scaled gradient (Adam hides it)."""


def _stages(batch_size: int, gradient_checkpointing: bool = False) -> list[dict]:
    """Align (projector only: the LM and tower frozen) on captions for 1 step, then projector + LM on a mix of
    image, two-image and text-only samples for 3."""
    common = {"lr": 1e-3, "batch_size": batch_size, "group_by_length": True, "warmup_steps": 1}
    return [
        {**common, "name": "align", "steps": 1},
        {**common, "name": "instruct", "steps": 3, "policy": {"projector": "full", "language_model": "full"},
         "gradient_checkpointing": gradient_checkpointing},
    ]  # fmt: skip


def _config(assets, out: Path, batch_size: int, **kw) -> dict:
    stages = _stages(batch_size, kw.pop("gradient_checkpointing", False))
    stages[0]["data"] = [{"path": str(assets.captions)}]  # a text-only micro-batch would reach no trainable weight
    stages[1]["data"] = [{"path": str(assets.mixed)}]
    return run_config(assets, out, *stages, save_every=2, **kw)


DRIVER = """
import sys
import torch.distributed as dist
from vlmkit.training import train

dist.init_process_group("gloo")  # one group for both runs (train leaves a group it did not create as it is)
for config, resume in zip(sys.argv[1::2], sys.argv[2::2]):
    train(config, resume=resume or None)
dist.destroy_process_group()
"""


def _torchrun(tmp_path: Path, *runs: tuple[dict, Path | None]) -> None:
    """``train(config, resume=...)`` of each run in turn, in two processes of one torchrun launch (one launch
    costs less than two on a small machine; the DDP test runs the documented ``-m vlmkit train`` command)."""
    (tmp_path / "driver.py").write_text(DRIVER)
    args = []
    for i, (config, resume) in enumerate(runs):
        (tmp_path / f"run{i}.yaml").write_text(yaml.safe_dump(config))
        args += [str(tmp_path / f"run{i}.yaml"), str(resume or "")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(tmp_path / "driver.py"), *args]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]


def _losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in step_records(read_metrics(run_dir))]


def _max_diff(a: Path, b: Path) -> float:
    one, two = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert one.keys() == two.keys()
    return max(float((one[k] - two[k]).abs().max()) for k in one)


@pytest.mark.slow
def test_fsdp_two_processes_match_one_and_resume_across_strategies(tmp_path):
    assets = make_assets(tmp_path / "assets", n=16)
    # the reference: one process, batch 4, uninterrupted (checkpoints at steps 1, 2 and 4)
    single = train(_config(assets, tmp_path / "one", batch_size=4))
    assert len(single.losses) == 4

    # two fsdp processes of batch 2: (1) from the start, the LM's activations recomputed; (3) resumed from the
    # one-process run's mid-stage checkpoint
    fsdp_dir, resumed_dir = tmp_path / "fsdp", tmp_path / "resumed-fsdp"
    one_mid = single.output_dir / "checkpoints" / ckpt.checkpoint_name(2)
    _torchrun(
        tmp_path,
        (_config(assets, fsdp_dir, 2, strategy="fsdp", gradient_checkpointing=True), None),
        (_config(assets, resumed_dir, 2, strategy="fsdp"), one_mid),
    )

    # 1. the same losses, gradient norms and weights as one process
    assert _losses(fsdp_dir) == pytest.approx(single.losses, abs=LOSS_TOLERANCE)
    grad_norms = [r["grad_norm"] for r in step_records(read_metrics(fsdp_dir))]
    assert grad_norms == pytest.approx([r["grad_norm"] for r in step_records(read_metrics(single.output_dir))],
                                       rel=1e-4)  # fmt: skip
    assert _max_diff(single.final_dir, fsdp_dir / "final") < PARAM_TOLERANCE
    base = load_file(str(assets.base / "model.safetensors"))
    final = load_file(str(fsdp_dir / "final" / "model.safetensors"))
    assert any(not torch.equal(final[k], base[k]) for k in base)  # it trained
    # checkpoints are vlmkit's usual folders: the full model and the full (unsharded) optimizer state
    mid = fsdp_dir / "checkpoints" / ckpt.checkpoint_name(2)
    assert (mid / ckpt.MODEL_DIR / "model.safetensors").is_file()
    one_state = ckpt.read_trainer_state(single.output_dir / "checkpoints" / ckpt.checkpoint_name(2))["optimizer"]
    fsdp_state = ckpt.read_trainer_state(mid)["optimizer"]
    assert fsdp_state["state"].keys() == one_state["state"].keys()
    for index, values in one_state["state"].items():
        for key, value in values.items():
            assert fsdp_state["state"][index][key].shape == value.shape
            assert torch.allclose(fsdp_state["state"][index][key], value, atol=1e-6), (index, key)

    # 2. saved under fsdp (mid-stage: Adam's moments matter), resumed in one process: the uninterrupted losses
    resumed = train(_config(assets, tmp_path / "resumed-one", batch_size=4), resume=mid)
    assert resumed.losses == pytest.approx(single.losses[2:], abs=LOSS_TOLERANCE)
    assert resumed.losses == pytest.approx(_losses(fsdp_dir)[2:], abs=LOSS_TOLERANCE)
    assert _max_diff(resumed.final_dir, fsdp_dir / "final") < PARAM_TOLERANCE

    # 3. saved in one process, resumed under fsdp in two
    assert _losses(resumed_dir) == pytest.approx(single.losses[2:], abs=LOSS_TOLERANCE)
    assert _max_diff(single.final_dir, resumed_dir / "final") < PARAM_TOLERANCE


def test_strategy_is_validated_by_name(tmp_path):
    assets_free = {"model": {"checkpoint": "tiny-random"}, "output_dir": str(tmp_path),
                   "stages": [{"data": [{"path": "x.jsonl"}]}]}  # fmt: skip
    assert load_config(assets_free).strategy == "ddp"
    assert load_config({**assets_free, "strategy": "fsdp"}).strategy == "fsdp"
    with pytest.raises(ConfigError, match=r"strategy: 'zero3' is not one of 'ddp', 'fsdp'"):
        load_config({**assets_free, "strategy": "zero3"})
    fp16 = {**assets_free, "strategy": "fsdp", "stages": [{"data": [{"path": "x.jsonl"}], "precision": "fp16"}]}
    with pytest.raises(ConfigError, match=r"stages\.0 \(stage\)\.precision: fp16 .* strategy 'fsdp'"):
        load_config(fp16)
    with pytest.raises(ConfigError, match="strategy: 'zero' is not one of 'ddp', 'fsdp'"):
        wrap(torch.nn.Linear(2, 2), DistEnv(), "zero")  # type: ignore[arg-type]


def test_fsdp_in_one_process_runs_the_model_itself_and_finds_the_decoder_layers():
    from conftest import compose_tiny

    model, _ = compose_tiny()
    parallel = wrap(model, DistEnv(), "fsdp")
    assert parallel.module is model and not parallel.sharded
    layers = decoder_layers(model)
    assert [type(m).__name__ for m in layers] == ["LlamaDecoderLayer"] * model.language_model.config.num_hidden_layers
    assert decoder_layers(torch.nn.Linear(2, 2)) == []
