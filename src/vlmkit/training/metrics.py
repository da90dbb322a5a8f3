"""Run records: ``metrics.jsonl`` (one JSON object per step and per stage event) and optional TensorBoard."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from vlmkit.errors import ConfigError

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Every record of a ``metrics.jsonl`` (a run folder or the file)."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def truncate_metrics(path: str | Path, step: int) -> None:
    """Drop records after global ``step`` (a resumed run rewrites them)."""
    path = Path(path)
    if path.is_file():
        kept = [r for r in read_metrics(path) if r.get("step", 0) <= step]
        path.write_text("".join(json.dumps(r) + "\n" for r in kept))


class MetricsWriter:
    """Appends records to ``metrics.jsonl`` and, with ``tensorboard``, step scalars to ``OUTPUT/tensorboard``."""

    def __init__(self, run_dir: str | Path, *, enabled: bool = True, tensorboard: bool = False) -> None:
        self.path = Path(run_dir) / METRICS_FILE
        self.enabled = enabled
        self._file = None
        self._tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a", encoding="utf-8")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:
                raise ConfigError(
                    "tensorboard: true needs the tensorboard package: pip install 'vlmkit[tensorboard]'"
                ) from exc
            self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))

    def write(self, record: dict[str, Any]) -> None:
        if self._file is None:
            return
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None and record.get("event") == "step":
            for key in ("loss", "lr", "grad_norm", "samples_per_s", "tokens_per_s"):
                if isinstance(record.get(key), int | float):
                    self._tb.add_scalar(f"train/{key}", record[key], record["step"])

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
