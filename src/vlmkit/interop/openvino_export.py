"""Export a vlmkit model to OpenVINO: three compiled-ready models, the processor, and a config that says so.

The folder holds what OpenVINO's VLM pipelines hold (optimum-intel's file names):

- ``openvino_vision_embeddings_model.xml`` — vision tower + projector: ``pixel_values (N, 3, S, S)`` → the
  projected image features ``(N, tokens, hidden)``;
- ``openvino_text_embeddings_model.xml`` — the LM's token embedding: ``input_ids (B, L)`` → ``(B, L, hidden)``;
- ``openvino_language_model.xml`` — the decoder and head with a **stateful** KV cache (OpenVINO variables, one per
  layer's keys and values): ``inputs_embeds``, ``attention_mask`` (the cache's length plus the new tokens),
  ``position_ids`` → ``logits`` of the last position;
- the tokenizer and ``processor_config.json`` (vlmkit's own processor encodes prompts, so templates, image
  layouts and placeholders are exactly the native model's), and ``config.json`` with ``vlmkit_runtime:
  openvino`` (what :mod:`vlmkit.backends.openvino` detects) and what the engine needs (context, stop ids).

Weights are fp32, or compressed by NNCF (``int8``: 8-bit asymmetric per channel for every model; ``int4``: the
LM's linear layers 4-bit asymmetric in groups, its embedding and head and the vision part 8-bit). The conversion
uses ``openvino.convert_model`` on torch modules with example inputs (optimum-intel would pull another
transformers version); the cache is made stateful with OpenVINO's own transformation, as optimum-intel does.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import warnings
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from vlmkit.config import config_to_dict
from vlmkit.errors import ConfigError
from vlmkit.models.vlm import VisionLanguageModel
from vlmkit.processing.processor import VLMProcessor

log = logging.getLogger(__name__)

Weights = Literal["fp32", "int8", "int4"]
WEIGHTS: tuple[str, ...] = ("fp32", "int8", "int4")
VISION_FILE = "openvino_vision_embeddings_model.xml"
EMBEDDINGS_FILE = "openvino_text_embeddings_model.xml"
LM_FILE = "openvino_language_model.xml"
RUNTIME = "openvino"
EXPORT_VERSION = 1
INT4_GROUP = 128

OPENVINO_MISSING = (
    "OpenVINO is not installed: pip install 'vlmkit[openvino]' (openvino and nncf) to export to or run OpenVINO models"
)


def require_openvino() -> Any:
    """The ``openvino`` module, or a :class:`ConfigError` saying how to install it."""
    try:
        import openvino
    except ImportError as exc:
        raise ConfigError(OPENVINO_MISSING) from exc
    return openvino


def check_exportable(model: VisionLanguageModel) -> None:
    """Refuse what the OpenVINO export does not cover (with the reason), before anything is written."""
    views = model.config.views.name
    if views != "single":
        raise ConfigError(
            f"the OpenVINO export supports the 'single' image views strategy (one view per image); this model uses "
            f"{views!r}, whose views are laid out per image size; export it with --to hf-llava-next instead"
        )
    config = model.language_model.config
    kinds = set(getattr(config, "layer_types", None) or ["full_attention"])
    if kinds != {"full_attention"}:
        raise ConfigError(
            f"the OpenVINO export supports LMs whose layers all use full attention; this one has {sorted(kinds)}"
        )
    if model.language_model.get_output_embeddings() is None:
        raise ConfigError("the OpenVINO export needs an LM with an output head (get_output_embeddings)")


class _Vision(nn.Module):
    def __init__(self, model: VisionLanguageModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.encode_images(pixel_values)  # type: ignore[return-value]  # single views: one tensor


class _Embeddings(nn.Module):
    def __init__(self, embeddings: nn.Module) -> None:
        super().__init__()
        self.embeddings = embeddings

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embeddings(input_ids)


class _Decoder(nn.Module):
    """The LM over explicit past keys/values (made stateful after conversion), with its own 4-D mask.

    The mask is built from shapes (causal over the cache's columns, and the 2-D ``attention_mask``), so the
    traced graph is right for every prompt and cache length; transformers takes a 4-D mask as it is.
    """

    def __init__(self, lm: nn.Module, layers: int) -> None:
        super().__init__()
        self.lm = lm
        self.layers = layers

    def forward(
        self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor, *past: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer

        cache = DynamicCache()
        cache.layers = []
        for i in range(self.layers):
            layer = DynamicLayer()
            layer.lazy_initialization(past[2 * i], past[2 * i + 1])
            layer.keys, layer.values = past[2 * i], past[2 * i + 1]
            cache.layers.append(layer)
        past_length = past[0].shape[2]
        queries = torch.arange(inputs_embeds.shape[1]) + past_length
        keys = torch.arange(attention_mask.shape[1])
        allowed = (keys[None, :] <= queries[:, None])[None, None] & attention_mask[:, None, None, :].bool()
        dtype = inputs_embeds.dtype
        mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
        out = self.lm(
            inputs_embeds=inputs_embeds, attention_mask=mask, position_ids=position_ids, cache=cache,
            use_cache=True, logits_to_keep=1,
        )  # fmt: skip
        layers: list[Any] = list(cache.layers)
        present = [t for layer in layers for t in (layer.keys, layer.values)]
        return (out.logits, *present)


def _name(ports: Any, names: list[str]) -> None:
    for port, name in zip(ports, names, strict=True):
        port.get_tensor().set_names({name})


def _stateful(ov_model: Any, layers: int) -> None:
    """Turn the past/present pairs into OpenVINO variables, initialised empty with the batch of the input."""
    import numpy as np
    import openvino.opset13 as ops
    from openvino._offline_transformations import apply_make_stateful_transformation

    pairs = {f"past.{i}.{k}": f"present.{i}.{k}" for i in range(layers) for k in ("key", "value")}
    apply_make_stateful_transformation(ov_model, pairs)
    shape = ops.shape_of(ov_model.input("inputs_embeds"), output_type="i64")
    batch = ops.gather(shape, ops.constant([0]), ops.constant(0))
    for op in ov_model.get_ops():
        if op.get_type_name() == "ReadValue":
            dims = [d.min_length for d in op.get_output_partial_shape(0)]
            parts = [batch if j == 0 else ops.constant(np.array([d], dtype=np.int64)) for j, d in enumerate(dims)]
            zero = ops.constant(0.0, dtype=op.get_output_element_type(0))
            op.set_arguments([ops.broadcast(zero, ops.concat(parts, axis=0))])
    ov_model.validate_nodes_and_infer_types()


def _cache_geometry(config: Any) -> tuple[int, int, int]:
    layers = int(config.num_hidden_layers)
    heads = int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
    return layers, heads, head_dim


def convert(model: VisionLanguageModel, processor: VLMProcessor) -> dict[str, Any]:
    """The three OpenVINO models (uncompressed): ``{"vision", "embeddings", "lm"}``."""
    ov = require_openvino()
    lm = model.language_model
    size = processor.image_config.size
    hidden = int(lm.config.hidden_size)
    layers, heads, head_dim = _cache_geometry(lm.config)
    with torch.no_grad(), warnings.catch_warnings():
        # the tracer warns of Python branches on shapes; each is taken the same way for every shape here (the
        # example prompt has several tokens and a non-empty cache, the general path). Tracing also reads every
        # attribute of the modules, deprecated ones included (transformers and torch then warn of themselves).
        for category in (torch.jit.TracerWarning, FutureWarning, DeprecationWarning):
            warnings.simplefilter("ignore", category)
        vision = ov.convert_model(
            _Vision(model).eval(), example_input=(torch.zeros(2, 3, size, size),),
            input=[ov.PartialShape([-1, 3, size, size])],
        )  # fmt: skip
        _name(vision.inputs, ["pixel_values"])
        _name(vision.outputs, ["image_features"])
        embeddings = ov.convert_model(
            _Embeddings(lm.get_input_embeddings()).eval(), example_input=(torch.zeros(1, 4, dtype=torch.long),),
            input=[ov.PartialShape([-1, -1])],
        )  # fmt: skip
        _name(embeddings.inputs, ["input_ids"])
        _name(embeddings.outputs, ["inputs_embeds"])
        past = [torch.zeros(1, heads, 3, head_dim) for _ in range(2 * layers)]
        example = (torch.zeros(1, 5, hidden), torch.ones(1, 8, dtype=torch.long), torch.arange(3, 8)[None], *past)
        shapes = [[-1, -1, hidden], [-1, -1], [-1, -1]] + [[-1, heads, -1, head_dim]] * (2 * layers)
        decoder = ov.convert_model(
            _Decoder(lm, layers).eval(), example_input=example, input=[ov.PartialShape(s) for s in shapes]
        )
    cache_names = [f"past.{i}.{k}" for i in range(layers) for k in ("key", "value")]
    _name(decoder.inputs, ["inputs_embeds", "attention_mask", "position_ids", *cache_names])
    _name(decoder.outputs, ["logits", *[n.replace("past", "present") for n in cache_names]])
    _stateful(decoder, layers)
    return {"vision": vision, "embeddings": embeddings, "lm": decoder}


def _int4_group(model: Any) -> int:
    """NNCF's group size for 4-bit weights: 128, or the largest power of two dividing every input width."""
    widths = set()
    for op in model.get_ops():
        if op.get_type_name() == "MatMul":
            weight = op.input_value(1).get_node()
            if weight.get_type_name() == "Constant":
                shape = list(weight.get_output_partial_shape(0).to_shape())
                if len(shape) == 2:
                    widths.add(int(shape[1]))
    group = INT4_GROUP
    while group > 8 and any(w % group for w in widths):
        group //= 2
    return group if not any(w % group for w in widths) else -1


def compress(models: dict[str, Any], weights: Weights) -> dict[str, Any]:
    """NNCF weight compression (data-free) of the converted models; ``fp32`` returns them unchanged."""
    if weights == "fp32":
        return models
    try:
        import nncf
    except ImportError as exc:
        raise ConfigError(OPENVINO_MISSING) from exc
    from nncf.common.logging.logger import nncf_logger, set_log_level

    int8 = nncf.CompressWeightsMode.INT8_ASYM
    level = nncf_logger.level
    set_log_level(logging.WARNING)  # NNCF's tables and progress bars go to stdout: keep it for the command's output
    try:
        with contextlib.redirect_stdout(sys.stderr):
            out = {name: nncf.compress_weights(m, mode=int8) for name, m in models.items() if name != "lm"}
            if weights == "int8":
                out["lm"] = nncf.compress_weights(models["lm"], mode=int8)
            else:
                # ratio 1.0: every linear layer of the decoder in 4 bits; the head (and embeddings) stay 8-bit
                # (NNCF's default for the first and last layers)
                mode, group = nncf.CompressWeightsMode.INT4_ASYM, _int4_group(models["lm"])
                out["lm"] = nncf.compress_weights(models["lm"], mode=mode, group_size=group, ratio=1.0)
    finally:
        set_log_level(level)
    return out


def runtime_config(weights: str) -> dict[str, str]:
    """Compile properties saved with the export: fp32 runs in fp32 throughout (its greedy output is the PyTorch
    model's); compressed weights take the CPU plugin's defaults (bf16 activations where the CPU has them, u8 KV
    cache), as OpenVINO's published figures do."""
    return {"INFERENCE_PRECISION_HINT": "f32", "KV_CACHE_PRECISION": "f32"} if weights == "fp32" else {}


def export_openvino(
    model: VisionLanguageModel, processor: VLMProcessor, out: str | Path, weights: Weights = "fp32"
) -> Path:
    """Write ``out`` (see the module docstring); ``vlmkit.load(out)`` runs it with the OpenVINO backend."""
    check_export(model, weights)
    return write_openvino(convert(model, processor), model, processor, out, weights)


def check_export(model: VisionLanguageModel, weights: str = "fp32") -> None:
    """Everything :func:`export_openvino` refuses, checked before any work."""
    if weights not in WEIGHTS:
        raise ConfigError(f"weights must be one of {', '.join(WEIGHTS)}, got {weights!r}")
    check_exportable(model)
    if model.device.type != "cpu" or model.dtype != torch.float32:
        raise ConfigError(
            f"export a model on the CPU in float32 (this one is on {model.device} in {model.dtype}): "
            "vlmkit.load(name, device='cpu', dtype='fp32')"
        )


def write_openvino(
    models: dict[str, Any], model: VisionLanguageModel, processor: VLMProcessor, out: str | Path, weights: Weights
) -> Path:
    """Compress :func:`convert`'s models (they are changed: pass clones to write several exports) and write the
    folder."""
    ov = require_openvino()
    models = compress(models, weights)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name, file in (("vision", VISION_FILE), ("embeddings", EMBEDDINGS_FILE), ("lm", LM_FILE)):
        ov.save_model(models[name], str(out / file), compress_to_fp16=False)
    processor.save_pretrained(out)
    lm = model.language_model
    layers, heads, head_dim = _cache_geometry(lm.config)
    generation = getattr(lm, "generation_config", None)
    eos = getattr(generation, "eos_token_id", None)
    model.config.vision.hf_config = model.vision_tower.model.config.to_dict()
    model.config.lm.hf_config = lm.config.to_dict()
    config = {
        "vlmkit_runtime": RUNTIME,
        "export_version": EXPORT_VERSION,
        "weights": weights,
        "files": {"vision": VISION_FILE, "embeddings": EMBEDDINGS_FILE, "language_model": LM_FILE},
        "runtime_config": runtime_config(weights),
        "context_length": int(getattr(lm.config, "max_position_embeddings", 0) or 1 << 30),
        "vocab_size": int(lm.get_output_embeddings().weight.shape[0]),
        "hidden_size": int(lm.config.hidden_size),
        "image_token_id": model.image_token_id,
        "eos_token_ids": [eos] if isinstance(eos, int) else list(eos or []),
        "cache": {"layers": layers, "kv_heads": heads, "head_dim": head_dim},
        "source": config_to_dict(model.config),
    }
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    log.info("exported to %s (OpenVINO, %s weights)", out, weights)
    return out
