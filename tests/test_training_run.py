"""Training runs end to end on a tiny model: policies, accumulation, records, checkpoints, resume, LoRA, signals."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time

import pytest
import torch
import yaml
from safetensors.torch import load_file

from test_training_support import cli_command, make_assets, parse_cli, run_config, step_records
from vlmkit.errors import CheckpointError, ConfigError
from vlmkit.models.compose import load_pretrained
from vlmkit.training import Trainer, TrainingError, load_adapter, load_config, train
from vlmkit.training import checkpoint as ckpt
from vlmkit.training.metrics import read_metrics


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_assets(tmp_path_factory.mktemp("assets"))


def _weights(folder) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def test_align_stage_trains_only_the_projector(assets, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="vlmkit.training")
    result = train(run_config(assets, tmp_path))
    before, after = _weights(assets.base), _weights(result.final_dir)
    for name, tensor in before.items():
        changed = not torch.equal(tensor, after[name])
        assert changed == name.startswith("projector."), name
    # the stage start names what trains and how much
    assert "training projector (3,936 parameters)" in caplog.text
    assert "policy vision=frozen, projector=full, language_model=frozen" in caplog.text
    [stage] = result.stages
    assert stage.trainable["projector"] == {"trainable": 3936, "total": 3936}
    assert stage.trainable["language_model"]["trainable"] == 0
    # metrics.jsonl: one record per step, a stage_start and a stage_end; the loss/lr plot
    records = read_metrics(tmp_path)
    steps = step_records(records)
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert [r["loss"] for r in steps] == pytest.approx(result.losses)
    for key in ("loss", "lr", "lrs", "grad_norm", "samples_per_s", "tokens_per_s", "tokens", "epoch"):
        assert key in steps[0]
    assert steps[0]["lr"] == pytest.approx(1e-2 * 0.5) and steps[1]["lr"] == pytest.approx(1e-2)  # warmup 1
    start = next(r for r in records if r["event"] == "stage_start")
    assert start["trainable"]["projector"]["trainable"] == 3936 and 0 <= start["padding_after"] <= 1
    assert stage.plot is not None and stage.plot.is_file() and stage.plot.read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "config.yaml").is_file()
    assert ckpt.list_checkpoints(tmp_path / "checkpoints")[-1].name == "step-00000003"


def test_grad_accumulation_equals_the_big_batch(assets, tmp_path):
    stage = {"data": [{"path": str(assets.mixed)}], "policy": {"projector": "full", "language_model": "full"},
             "lr": 1e-3, "steps": 2, "batch_size": 4}  # fmt: skip
    big = train(run_config(assets, tmp_path / "big", stage))
    small = train(run_config(assets, tmp_path / "small", {**stage, "batch_size": 2, "grad_accum": 2}))
    assert big.losses == pytest.approx(small.losses, abs=1e-6)
    a, b = _weights(big.final_dir), _weights(small.final_dir)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-6


def test_module_lr_and_two_stages(assets, tmp_path):
    config = run_config(
        assets,
        tmp_path,
        {"name": "align", "steps": 1},
        {"name": "instruct", "data": [{"path": str(assets.mixed), "weight": 3}, {"path": str(assets.captions)}],
         "policy": {"projector": "full", "language_model": "full"}, "lr": 1e-3, "module_lr": {"projector": 5e-3},
         "steps": 2, "warmup_steps": 0, "packing": True},
    )  # fmt: skip
    result = train(config)
    assert [s.name for s in result.stages] == ["align", "instruct"] and result.global_step == 3
    steps = step_records(read_metrics(tmp_path))
    assert steps[1]["lrs"]["projector"] == pytest.approx(5e-3) and steps[1]["lrs"]["language_model"] == 1e-3
    assert result.stages[1].padding_after < result.stages[1].padding_before
    assert (tmp_path / "plots" / "0-align.png").is_file() and (tmp_path / "plots" / "1-instruct.png").is_file()


def test_resume_repeats_the_uninterrupted_losses(assets, tmp_path):
    """Stop in the middle of a LoRA stage with dropout (RNG in use), resume: every per-step loss is the same."""
    stages = (
        {"name": "align", "steps": 2},
        {"name": "instruct", "data": [{"path": str(assets.mixed)}], "steps": 4, "lr": 5e-3,
         "policy": {"projector": "full", "language_model": "lora"}, "lora": {"r": 4, "dropout": 0.2}},
    )  # fmt: skip
    full = train(run_config(assets, tmp_path / "full", *stages))
    config = run_config(assets, tmp_path / "parts", *stages, save_every=100)
    first = train(config, callbacks=[lambda r: r.get("event") == "step" and r["step"] == 4])
    assert first.interrupted and first.global_step == 4 and first.checkpoint.name == "step-00000004"
    resumed = train(config, resume=True)
    assert not resumed.interrupted and resumed.global_step == 6
    assert first.losses + resumed.losses == pytest.approx(full.losses, abs=1e-6, rel=0)
    assert [r["step"] for r in step_records(read_metrics(tmp_path / "parts"))] == [1, 2, 3, 4, 5, 6]
    a, b = _weights(full.final_dir), _weights(resumed.final_dir)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-6


def test_lora_adapter_and_merged_checkpoint_agree(assets, tmp_path):
    stage = {"name": "instruct", "data": [{"path": str(assets.mixed)}], "steps": 3, "lr": 2e-2,
             "policy": {"projector": "frozen", "language_model": "lora"},
             "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj", "o_proj"]}}  # fmt: skip
    trainer = Trainer(load_config(run_config(assets, tmp_path, stage)))
    result = trainer.run()
    adapter = result.final_dir / "adapter" / "language_model"
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    last = result.checkpoint
    assert (last / "adapter" / "language_model" / "adapter_config.json").is_file()
    assert (last / ckpt.TRAINING_STATE).is_file()

    _, processor = load_pretrained(assets.base)
    batch = processor([[{"role": "user", "content": "Is there a red circle?"}]], train=False)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    trainer.model.eval()
    with torch.no_grad():
        unmerged = trainer.model(**inputs).logits
        merged_model, _ = load_pretrained(result.final_dir)
        merged = merged_model(**inputs).logits
        base, _ = load_pretrained(assets.base)
        base_logits = base(**inputs).logits
        load_adapter(base, result.final_dir / "adapter")  # the base model + the saved adapter
        with_adapter = base.eval()(**inputs).logits
    assert (unmerged - base_logits).abs().max() > 1e-3  # LoRA learned something
    assert (merged - unmerged).abs().max() < 1e-5
    assert (with_adapter - unmerged).abs().max() < 1e-5


def test_checkpoints_are_atomic_and_pruned(assets, tmp_path, monkeypatch):
    config = run_config(assets, tmp_path, {"steps": 4}, save_every=1, keep_last=2)
    train(config)
    found = ckpt.list_checkpoints(tmp_path / "checkpoints")
    assert [p.name for p in found] == ["step-00000003", "step-00000004"]
    meta = ckpt.read_meta(found[-1])
    assert meta["global_step"] == 4 and meta["stage"] == "align" and meta["config"]["seed"] == 0
    state = ckpt.read_trainer_state(found[-1])
    assert {"optimizer", "scheduler", "rng", "position"} <= set(state) and state["position"]["stage_step"] == 4

    # a crash in the middle of a save: the temporary folder goes, the previous checkpoint stays complete
    real_save = torch.save

    def crash(obj, path, *a, **k):
        if str(path).endswith(ckpt.TRAINER_STATE):
            raise OSError("disk full")
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        train(run_config(assets, tmp_path, {"steps": 6}, save_every=5, keep_last=2), resume=True)
    monkeypatch.undo()
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "checkpoints")] == ["step-00000003", "step-00000004"]
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")]
    # a kill leaves a temporary folder behind: it is not a checkpoint and the next run removes it
    stale = tmp_path / "checkpoints" / ".tmp-step-00000005-123"
    (stale / "model").mkdir(parents=True)
    assert ckpt.resolve_resume(True, tmp_path).name == "step-00000004"
    model, _ = load_pretrained(ckpt.resolve_resume(True, tmp_path) / "model")
    assert model is not None
    assert ckpt.clean_stale(tmp_path / "checkpoints") == [stale] and not stale.exists()
    with pytest.raises(ConfigError, match="already holds checkpoints.*--resume"):
        train(config)
    with pytest.raises(CheckpointError, match="nothing to resume"):
        ckpt.resolve_resume(True, tmp_path / "elsewhere")


def test_out_of_memory_says_what_to_change(assets, tmp_path, monkeypatch):
    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(Trainer, "_micro_step", oom)
    with pytest.raises(TrainingError, match=r"batch_size 4.*batch_size 2 with grad_accum 2"):
        train(run_config(assets, tmp_path))
    assert not ckpt.list_checkpoints(tmp_path / "checkpoints")


def test_gradient_checkpointing_and_bf16_run(assets, tmp_path):
    stage = {"data": [{"path": str(assets.mixed)}], "policy": {"projector": "full", "language_model": "full"},
             "steps": 1, "lr": 1e-3}  # fmt: skip
    plain = train(run_config(assets, tmp_path / "a", stage))
    checkpointed = train(run_config(assets, tmp_path / "b", {**stage, "gradient_checkpointing": True}))
    assert checkpointed.losses == pytest.approx(plain.losses, abs=1e-6)
    bf16 = train(run_config(assets, tmp_path / "c", {**stage, "precision": "bf16"}))
    assert bf16.losses[0] == pytest.approx(plain.losses[0], rel=2e-2)


def test_cli_arguments(assets, tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(run_config(assets, tmp_path / "run")))
    args = parse_cli(str(path), "--set", "stages.0.steps=1", "--no-progress")
    assert args.resume is None and args.overrides == ["stages.0.steps=1"]
    assert args.func(args) == 0
    assert "stage align: 1 steps" in capsys.readouterr().out
    assert parse_cli(str(path), "--resume").resume is True
    assert parse_cli(str(path), "--resume", "runs/x").resume == "runs/x"


def test_sigterm_writes_a_checkpoint_and_exits_cleanly(assets, tmp_path):
    config = run_config(assets, tmp_path / "run", {"steps": 10_000, "lr": 1e-4})
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, ["src", os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen(cli_command(str(path)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and len(step_records(read_metrics(metrics))) < 2:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "stopped by SIGTERM" in err and "--resume" in err
    [last] = ckpt.list_checkpoints(tmp_path / "run" / "checkpoints")
    assert ckpt.checkpoint_step(last) == len(step_records(read_metrics(metrics))) >= 2
    assert not (tmp_path / "run" / "final").exists()


def test_a_micro_batch_no_trainable_weight_sees_fails_nothing(assets, tmp_path):
    """Text-only samples while only the projector trains: their loss reaches no trainable weight, so they give a
    zero gradient (not torch's "element 0 of tensors does not require grad") and the run goes on."""
    data = tmp_path / "text_only.jsonl"
    data.write_text("".join(row + "\n" for row in assets.mixed.read_text().splitlines() if '"text-' in row))
    stage = {"data": [{"path": str(data)}], "batch_size": 2, "steps": 2}
    result = train(run_config(assets, tmp_path / "run", stage))
    records = step_records(read_metrics(tmp_path / "run"))
    assert [r["grad_norm"] for r in records] == [0.0, 0.0]
    assert len(result.losses) == 2 and all(loss > 0 for loss in result.losses)
