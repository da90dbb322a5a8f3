"""Atomic training checkpoints: written to a hidden temporary folder, then renamed into place.

A checkpoint ``OUTPUT/checkpoints/step-00000120/`` holds:

* ``model/``: a plain vlmkit checkpoint (LoRA merged) that :func:`vlmkit.load_pretrained` reads;
* ``adapter/<component>/``: each LoRA adapter as peft saves it (only while a component has LoRA);
* ``training_state.safetensors``: the exact training module with unmerged LoRA weights (only with LoRA);
* ``trainer_state.pt``: optimizer, scheduler, gradient scaler, RNG states of every rank (python, numpy, torch,
  CUDA), the position (stage, step in stage, global step) and the stage objective's own state (``objective``;
  e.g. temporary heads) — loadable with ``weights_only=True``;
* ``checkpoint.json``: the position and the full training config, readable.

Only folders named ``step-<8 digits>`` are checkpoints; the rename is atomic, so a kill at any instant leaves
the previous checkpoint complete and the next run removes any leftover temporary folder. A checkpoint damaged
anyway (a ``trainer_state.pt`` cut short when the data never reached the disk, say) is passed over on resume
for the one before it, with a warning (:func:`load_resume`).
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vlmkit.errors import CheckpointError

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
MODEL_DIR = "model"
TRAINER_STATE = "trainer_state.pt"
TRAINING_STATE = "training_state.safetensors"
META_FILE = "checkpoint.json"
_NAME = re.compile(r"^step-(\d{8})$")
_TMP_PREFIXES = (".tmp-", ".old-")


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under ``root`` (a run's ``checkpoints/`` folder), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def checkpoint_step(path: str | Path) -> int:
    match = _NAME.match(Path(path).name)
    if not match:
        raise CheckpointError(f"{path} is not a training checkpoint folder (step-NNNNNNNN)")
    return int(match.group(1))


def clean_stale(root: str | Path) -> list[Path]:
    """Remove temporary folders left by an interrupted save; returns what was removed."""
    root = Path(root)
    stale = [p for p in root.iterdir() if p.name.startswith(_TMP_PREFIXES)] if root.is_dir() else []
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
        log.info("removed the unfinished checkpoint %s", path)
    return stale


def write_atomic(final: Path, write: Callable[[Path], None]) -> Path:
    """Run ``write(tmp)`` into a temporary sibling folder, then rename it to ``final`` (replacing it)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if final.exists():
        old = final.parent / f".old-{final.name}-{os.getpid()}"
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final


def prune(root: str | Path, keep_last: int | None) -> list[Path]:
    """Delete all but the newest ``keep_last`` checkpoints; returns the deleted ones."""
    if keep_last is None:
        return []
    old = list_checkpoints(root)[:-keep_last]
    for path in old:
        shutil.rmtree(path, ignore_errors=True)
    return old


# ---------------------------------------------------------------------------------------------------- RNG


def rng_state() -> dict[str, Any]:
    """This process's RNG states (python, numpy, torch, CUDA) in a ``weights_only``-loadable form."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, torch.from_numpy(np.asarray(keys, dtype=np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------------------- load


def _resume_candidates(resume: str | Path | bool, output_dir: str | Path) -> tuple[list[Path], bool]:
    """The checkpoints ``resume`` may use, newest first, and whether it named one checkpoint folder."""
    target = Path(output_dir) if isinstance(resume, bool) else Path(resume)  # callers pass no False
    if _NAME.match(target.name) and target.is_dir():
        return [target], True
    for root in (target / CHECKPOINT_DIR, target):
        found = list_checkpoints(root)
        if found:
            return found[::-1], False
    raise CheckpointError(f"nothing to resume: no checkpoint (step-NNNNNNNN) in {target}")


def resolve_resume(resume: str | Path | bool | None, output_dir: str | Path) -> Path | None:
    """The checkpoint to resume: a checkpoint folder, a run folder (its latest), or True (the output folder's
    latest). None/False: no resume. A resume with nothing to resume from raises CheckpointError. Whether the
    checkpoint can be read is not checked: :func:`load_resume` does."""
    if resume is None or resume is False:
        return None
    return _resume_candidates(resume, output_dir)[0][0]


def _readable_state(path: str | Path) -> dict[str, Any]:
    """The trainer state of a checkpoint folder, once its ``trainer_state.pt`` and ``checkpoint.json`` are
    known to read; a CheckpointError naming the damaged or missing file otherwise."""
    state = read_trainer_state(path)
    read_meta(path)
    if not isinstance(state, dict) or not isinstance(state.get("position"), dict):
        raise CheckpointError(f"{Path(path) / TRAINER_STATE}: not a vlmkit trainer state (no position)")
    return state


def load_resume(resume: str | Path | bool | None, output_dir: str | Path) -> tuple[Path, dict[str, Any]] | None:
    """The checkpoint to resume (see :func:`resolve_resume`) and its trainer state; None/False: no resume.

    With ``resume`` True or a run folder, a latest checkpoint that cannot be read (a truncated
    ``trainer_state.pt`` after a crash or a full disk, say) is passed over for the one before it, with a warning
    naming the damaged file and the checkpoint used instead; with no readable checkpoint left, a CheckpointError
    names every damaged file. A checkpoint folder given explicitly is used or refused, never replaced.
    """
    if resume is None or resume is False:
        return None
    candidates, explicit = _resume_candidates(resume, output_dir)
    problems: list[str] = []
    for path in candidates:
        try:
            state = _readable_state(path)
        except CheckpointError as exc:
            if explicit:
                others = [p.name for p in list_checkpoints(path.parent) if p != path]
                hint = f"; resume from another checkpoint there ({', '.join(others)})" if others else ""
                raise CheckpointError(f"{exc}{hint}") from exc
            problems.append(str(exc))
            continue
        if problems:
            log.warning("%s; resuming from the previous readable checkpoint %s instead", "; ".join(problems), path)
        return path, state
    raise CheckpointError(
        f"nothing to resume: no readable checkpoint in {candidates[0].parent} ({'; '.join(problems)})"
    )


def read_trainer_state(path: str | Path) -> dict[str, Any]:
    """The ``trainer_state.pt`` of a checkpoint folder; a CheckpointError naming the file when it is missing or
    cannot be read (truncated, empty, not a torch file)."""
    file = Path(path) / TRAINER_STATE
    if not file.is_file():
        raise CheckpointError(f"{path}: no {TRAINER_STATE}; not a complete training checkpoint")
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle/zip errors come in many types; all mean a damaged file
        size = file.stat().st_size
        raise CheckpointError(
            f"{file}: cannot be read; the file is damaged or truncated ({size} bytes: {exc})"
        ) from exc


def write_meta(folder: Path, position: dict[str, Any], config: dict[str, Any]) -> None:
    meta = {**position, "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "config": config}
    (folder / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")


def read_meta(path: str | Path) -> dict[str, Any]:
    """The ``checkpoint.json`` of a checkpoint folder; a CheckpointError naming the file when it is missing or
    is not a JSON object."""
    file = Path(path) / META_FILE
    if not file.is_file():
        raise CheckpointError(f"{path}: no {META_FILE}; not a complete training checkpoint")
    try:
        meta = json.loads(file.read_bytes())
    except (ValueError, OSError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise CheckpointError(f"{file}: cannot be read; the file is damaged or truncated ({exc})") from exc
    if not isinstance(meta, dict):
        raise CheckpointError(f"{file}: cannot be read; expected a JSON object, got {type(meta).__name__}")
    return meta
