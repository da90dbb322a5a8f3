"""LLaVA's projector checkpoints: ``mm_projector.bin`` (LLaVA's pretraining output, qresearch's
llama-3-vision-alpha) read as a vlmkit projector.

The file is a torch state dict of LLaVA's ``mm_projector``: ``model.mm_projector.{0,2,...}.weight`` / ``.bias``
for ``mlp{N}x_gelu`` (Linear, GELU, Linear, ...: vlmkit's ``mlp{N}x_gelu`` has the same layout) or
``model.mm_projector.weight`` / ``.bias`` for ``linear``. Also accepted: the keys without ``model.``, with
``base_model.model.`` before them (a LoRA run's ``non_lora_trainables.bin``), or bare (``0.weight``); a
``.safetensors`` file of the same keys. :meth:`VisionLanguageModel.load_projector
<vlmkit.models.vlm.VisionLanguageModel.load_projector>` takes such a file (or a folder holding
``mm_projector.bin``) as it takes a vlmkit projector folder; :func:`import_mm_projector` writes one.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from vlmkit.config import FORMAT_VERSION
from vlmkit.errors import CheckpointError

MM_PROJECTOR_FILES = ("mm_projector.bin", "mm_projector.safetensors")
_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?:model\.)?(?:mm_projector\.)?(?:(?P<index>\d+)\.)?(?P<param>weight|bias)$"
)


def find_mm_projector(path: str | Path) -> Path | None:
    """``path`` when it is a ``.bin`` / ``.pt`` / ``.safetensors`` file, the ``mm_projector`` file in it when it
    is a folder, else None."""
    path = Path(path)
    if path.is_file() and path.suffix in (".bin", ".pt", ".pth", ".safetensors"):
        return path
    if path.is_dir():
        return next((path / name for name in MM_PROJECTOR_FILES if (path / name).is_file()), None)
    return None


def _load_state(file: Path) -> dict[str, torch.Tensor]:
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(file))
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # a pickle that is not a plain state dict, a truncated file, ...
        raise CheckpointError(f"{file}: cannot be read as a projector state dict ({exc})") from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{file}: expected a state dict of tensors")
    return state


def read_mm_projector(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The projector in a LLaVA ``mm_projector`` file as ``(meta, state)``: ``meta`` as vlmkit's
    ``projector.json`` (``name``, ``in_features``, ``out_features``, ``views``), ``state`` keyed as vlmkit's
    projector (``0.weight``, ... or ``weight``, ``bias``)."""
    file = Path(path)
    state: dict[str, torch.Tensor] = {}
    for key, tensor in _load_state(file).items():
        if "mm_projector" not in key and not _KEY.match(key):
            continue  # a full model's other weights
        match = _KEY.match(key)
        if match is None:
            raise CheckpointError(f"{file}: unexpected projector key {key!r} (expected mm_projector.N.weight/bias)")
        index = match.group("index")
        state[f"{index}.{match.group('param')}" if index is not None else match.group("param")] = tensor.float()
    if not state:
        raise CheckpointError(f"{file}: no mm_projector weights found")
    indices = sorted({int(k.split(".")[0]) for k in state if k[0].isdigit()})
    if indices and any("." not in k for k in state):
        raise CheckpointError(f"{file}: mixes indexed and plain projector keys")
    if indices and indices != list(range(0, 2 * len(indices), 2)):
        raise CheckpointError(f"{file}: linear layers at {indices}; expected LLaVA's mlpNx_gelu (0, 2, 4, ...)")
    name = f"mlp{len(indices)}x_gelu" if indices else "linear"
    first = state["0.weight" if indices else "weight"]
    last = state[f"{indices[-1]}.weight" if indices else "weight"]
    if first.ndim != 2 or last.ndim != 2:
        raise CheckpointError(f"{file}: projector weights must be matrices")
    meta = {
        "format_version": FORMAT_VERSION,
        "name": name,
        "in_features": int(first.shape[1]),
        "out_features": int(last.shape[0]),
        "views": "single",
        "source": str(file),
    }
    return meta, state


def import_mm_projector(path: str | Path, out_folder: str | Path) -> Path:
    """Write the projector of a LLaVA ``mm_projector`` file as a vlmkit projector folder (``projector.json``,
    ``projector.safetensors``), which ``load_projector`` and a recipe's ``model.projector_checkpoint`` take."""
    from vlmkit.models.vlm import PROJECTOR_CONFIG, PROJECTOR_WEIGHTS

    found = find_mm_projector(path)
    if found is None:
        raise CheckpointError(f"{path}: no {' or '.join(MM_PROJECTOR_FILES)} found")
    meta, state = read_mm_projector(found)
    folder = Path(out_folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / PROJECTOR_CONFIG).write_text(json.dumps(meta, indent=2) + "\n")
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / PROJECTOR_WEIGHTS))
    return folder
