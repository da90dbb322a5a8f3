"""The objective seam: objectives are registered by name, checked by the config, and run by the one step loop."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import nn

from test_training_support import make_assets, run_config, step_records
from vlmkit.errors import ConfigError
from vlmkit.training import checkpoint as ckpt
from vlmkit.training import load_config, train
from vlmkit.training.config import StageConfig
from vlmkit.training.metrics import read_metrics
from vlmkit.training.model import apply_policy
from vlmkit.training.objectives import OBJECTIVES, StageRun, StageSetup, StepBatch


class QuietProjector:
    """A trivial third objective: the projector learns to map seeded random features to zero."""

    def check(self, stage: StageConfig, where: str) -> None:
        if stage.policy.projector != "full":
            raise ConfigError(f"{where}: test_quiet_projector trains the projector; set policy.projector: full")

    def start(self, run: StageRun) -> StageSetup:
        self.run, self.seen = run, 0
        apply_policy(run.model, run.stage)
        self.width = next(m for m in run.model.projector.modules() if isinstance(m, nn.Linear)).in_features
        params = [p for p in run.model.projector.parameters() if p.requires_grad]
        groups = [{"params": params, "lr": run.stage.lr, "weight_decay": 0.0, "name": "projector"}]
        return StageSetup(run.model.projector, groups, run.stage.steps or 1, run.stage.batch_size, 0)

    def batches(self, start: int) -> Iterator[StepBatch]:
        for step in range(start, self.run.stage.steps or 1):
            generator = torch.Generator().manual_seed(1000 * self.run.seed + step)
            features = torch.randn(self.run.stage.batch_size, 4, self.width, generator=generator)
            yield StepBatch(iter([features]), record={"samples": self.run.stage.batch_size})

    def loss(self, module: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, Any]]:
        self.seen += 1
        return module(batch.to(self.run.env.device)).pow(2).mean(), {"seen": self.seen}

    def state_dict(self) -> dict[str, Any]:
        return {"seen": self.seen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seen = state.get("seen", 0)


QUIET = {"name": "quiet", "objective": "test_quiet_projector", "steps": 4, "lr": 1e-2, "batch_size": 2}


@pytest.fixture(autouse=True, scope="module")
def _quiet_objective():
    with OBJECTIVES.temporary("test_quiet_projector", QuietProjector):  # other tests see the built-ins only
        yield


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_assets(tmp_path_factory.mktemp("assets"), n=8)


def test_an_unknown_objective_is_refused_listing_the_valid_ones(assets, tmp_path):
    config = run_config(assets, tmp_path, {"objective": "contrastive"})
    with pytest.raises(ConfigError, match=r"stages\.0 \(align\)\.objective: unknown objective 'contrastive'; valid "
                                          r"names: grid_labels, lm\b"):  # fmt: skip
        load_config(config)
    assert {"lm", "grid_labels"} <= set(OBJECTIVES.names())


def test_an_objective_checks_its_own_stage_config(assets, tmp_path):
    frozen = {**QUIET, "policy": {"vision": "full", "projector": "frozen", "language_model": "frozen"}}
    with pytest.raises(ConfigError, match="test_quiet_projector trains the projector"):
        load_config(run_config(assets, tmp_path, frozen))


def test_a_registered_objective_runs_through_the_same_loop(assets, tmp_path):
    """Records, checkpoints, the objective's own state, stop and exact resume: all from the generic loop."""
    stages = (QUIET, {"name": "align", "steps": 1})
    full = train(run_config(assets, tmp_path / "full", *stages))
    assert [s.name for s in full.stages] == ["quiet", "align"] and full.global_step == 5
    assert full.losses[3] < full.losses[0]
    records = read_metrics(tmp_path / "full")
    start = next(r for r in records if r["event"] == "stage_start")
    assert start["objective"] == "test_quiet_projector" and start["lrs"] == {"projector": 1e-2}
    quiet = [r for r in step_records(records) if r["stage"] == "quiet"]
    assert [r["seen"] for r in quiet] == [1, 2, 3, 4] and quiet[0]["lrs"].keys() == {"projector"}
    assert (tmp_path / "full" / "plots" / "0-quiet.png").is_file()

    config = run_config(assets, tmp_path / "parts", *stages, save_every=3)
    first = train(config, callbacks=[lambda r: r.get("event") == "step" and r["step"] == 2])
    assert first.interrupted and first.checkpoint.name == "step-00000002"
    assert ckpt.read_trainer_state(first.checkpoint)["objective"] == {"seen": 2}
    resumed = train(config, resume=True)
    assert first.losses + resumed.losses == full.losses
    assert [r["seen"] for r in step_records(read_metrics(tmp_path / "parts")) if r["stage"] == "quiet"] == [1, 2, 3, 4]
    names = [p.name for p in ckpt.list_checkpoints(tmp_path / "parts" / "checkpoints")]
    assert names == ["step-00000002", "step-00000003", "step-00000004", "step-00000005"]
