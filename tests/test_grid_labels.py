"""The grid_labels objective: per-cell labels from ShapesWorld truth, pooling, and its training stage."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from test_training_support import make_assets, run_config, step_records
from vlmkit.data.shapes import CELLS, COLOURS, SHAPES, WORDS, sample_scene
from vlmkit.errors import ConfigError, DataError
from vlmkit.training import checkpoint as ckpt
from vlmkit.training import train
from vlmkit.training.grid_labels import IGNORE, cell_labels, pool_to_grid, stack_targets, truth_of
from vlmkit.training.metrics import read_metrics

GRID_STAGE = {
    "name": "vision",
    "objective": "grid_labels",
    "policy": {"vision": "full", "projector": "frozen", "language_model": "frozen"},
    "lr": 1e-2,
    "steps": 6,
    "batch_size": 8,
}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_assets(tmp_path_factory.mktemp("assets"))


def _scene_with_word():
    return next(s for s in (sample_scene("train", 0, i) for i in range(50)) if s.word is not None)


def test_cell_labels_follow_the_scene():
    scene = _scene_with_word()
    labels, boxes, has_box = cell_labels(scene.to_dict())
    assert labels["cell"] == list(range(9))
    for c, cell in enumerate(CELLS):
        obj = scene.object_at(cell)
        if obj is not None:
            assert labels["kind"][c] == 1
            assert SHAPES[labels["shape"][c]] == obj.shape and list(COLOURS)[labels["colour"][c]] == obj.colour
            assert boxes[c] == pytest.approx([v / scene.image_size for v in obj.bbox]) and has_box[c]
            assert labels["word"][c] == IGNORE
        elif cell == scene.word.cell:
            assert labels["kind"][c] == 2 and WORDS[labels["word"][c]] == scene.word.text
            assert labels["shape"][c] == IGNORE and not has_box[c]
        else:
            assert labels["kind"][c] == 0 and labels["shape"][c] == IGNORE and not has_box[c]
    batch = stack_targets([cell_labels(scene.to_dict()), cell_labels(sample_scene("train", 0, 1).to_dict())])
    assert batch.labels["shape"].shape == (2, 9) and batch.boxes.shape == (2, 9, 4)
    assert batch.has_box.dtype == torch.bool


def test_bad_truth_and_missing_truth_are_clear_errors():
    with pytest.raises(DataError, match="not a ShapesWorld scene"):
        cell_labels({"image_size": 64, "objects": [{"shape": "blob", "colour": "red", "size": "small"}]})

    class Plain:
        id, meta = "x-1", {}

    with pytest.raises(DataError, match="sample 'x-1' has no meta.truth.*ShapesWorld records"):
        truth_of(Plain(), "stage 'vision'")


def test_pool_to_grid_averages_each_cell():
    # a 6x6 patch grid whose every patch holds its cell's index: the pooled cell i is exactly i
    cell_of = torch.tensor([[(r // 2) * 3 + c // 2 for c in range(6)] for r in range(6)], dtype=torch.float32)
    features = torch.stack([cell_of.flatten(), -cell_of.flatten()], dim=-1)[None]  # (1, 36, 2)
    pooled = pool_to_grid(features)
    assert pooled.shape == (1, 9, 2)
    assert torch.equal(pooled[0, :, 0], torch.arange(9.0)) and torch.equal(pooled[0, :, 1], -torch.arange(9.0))
    with pytest.raises(DataError, match="square grid of patch features, got 10 tokens"):
        pool_to_grid(torch.zeros(1, 10, 4))


def test_grid_stage_trains_the_tower_alone_then_the_lm_stage_keeps_it(assets, tmp_path):
    instruct = {"name": "instruct", "data": [{"path": str(assets.captions)}], "steps": 2,
                "policy": {"vision": "frozen", "projector": "full", "language_model": "full"}}  # fmt: skip
    grid = {**GRID_STAGE, "data": [{"path": str(assets.captions)}]}
    result = train(run_config(assets, tmp_path, grid, instruct))
    base = load_file(str(assets.base / "model.safetensors"))
    [after_grid, _] = ckpt.list_checkpoints(tmp_path / "checkpoints")
    vision_done = load_file(str(after_grid / ckpt.MODEL_DIR / "model.safetensors"))
    final = load_file(str(result.final_dir / "model.safetensors"))
    changed = {name for name, tensor in base.items() if not torch.equal(tensor, vision_done[name])}
    assert changed and all(name.startswith("vision_tower.") for name in changed)
    assert "vision_tower.model.embeddings.patch_embedding.weight" in changed
    for name in base:
        if name.startswith("vision_tower."):
            assert torch.equal(vision_done[name], final[name]), name  # frozen in the LM stage
    steps = [r for r in step_records(read_metrics(tmp_path)) if r["stage"] == "vision"]
    assert [r["stage_step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    assert {"kind", "shape", "colour", "size", "cell", "box_error"} <= set(steps[0]["accuracy"])
    assert steps[-1]["loss"] < steps[0]["loss"]
    assert result.stages[0].plot is not None and result.stages[0].plot.is_file()


def test_grid_stage_policy_and_data_are_checked(assets, tmp_path):
    wrong = {**GRID_STAGE, "data": [{"path": str(assets.captions)}], "policy": {"vision": "full", "projector": "full"}}
    with pytest.raises(ConfigError, match="grid_labels trains the vision tower alone"):
        train(run_config(assets, tmp_path / "a", wrong))
    no_truth = {**GRID_STAGE, "data": [{"path": str(assets.mixed)}], "batch_size": 2}
    with pytest.raises(DataError, match="has no meta.truth"):
        train(run_config(assets, tmp_path / "b", no_truth))


def test_grid_stage_resumed_midway_repeats_the_uninterrupted_run(assets, tmp_path):
    """Stopped inside the stage, the run checkpoints the tower, the heads and the optimizer; resuming it repeats
    every per-step loss and accuracy of the uninterrupted run, and ends with the same weights."""
    grid = {**GRID_STAGE, "data": [{"path": str(assets.captions)}]}
    full = train(run_config(assets, tmp_path / "full", grid))
    config = run_config(assets, tmp_path / "parts", grid)
    first = train(config, callbacks=[lambda r: r.get("event") == "step" and r["step"] == 3])
    assert first.interrupted and first.checkpoint.name == "step-00000003"
    assert "heads" in ckpt.read_trainer_state(first.checkpoint)["objective"]
    resumed = train(config, resume=True)
    assert first.losses + resumed.losses == full.losses
    steps = step_records(read_metrics(tmp_path / "parts"))
    assert [r["stage_step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    assert [r["accuracy"] for r in steps] == [r["accuracy"] for r in step_records(read_metrics(tmp_path / "full"))]
    a, b = load_file(str(full.final_dir / "model.safetensors")), load_file(str(resumed.final_dir / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
