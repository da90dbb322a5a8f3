"""Training: LLaVA-style stages (projector alignment, then instruction tuning), LoRA, exact resume, DDP.

``train(config, overrides=None, resume=None)`` runs a YAML/TOML config (see docs/training.md);
``vlmkit train CONFIG`` is the same from the command line. A stage's ``objective`` names what it trains and its
loss (:mod:`vlmkit.training.objectives`: ``lm``, ``grid_labels``, or one you register).
"""

from vlmkit.training.config import (
    DataSource,
    LoraSpec,
    ModelSpec,
    PolicySpec,
    StageConfig,
    TrainConfig,
    load_config,
)
from vlmkit.training.model import export_plain, load_adapter, merge_lora, save_adapters
from vlmkit.training.trainer import StageResult, Trainer, TrainingError, TrainResult, train

__all__ = [
    "DataSource",
    "LoraSpec",
    "ModelSpec",
    "PolicySpec",
    "StageConfig",
    "StageResult",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "TrainingError",
    "export_plain",
    "load_adapter",
    "load_config",
    "merge_lora",
    "save_adapters",
    "train",
]
