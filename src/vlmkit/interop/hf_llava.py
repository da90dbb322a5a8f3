"""Export vlmkit models to transformers' LLaVA format, and import LLaVA checkpoints as vlmkit models.

On disk the export uses LLaVA's original key layout (``vision_tower.vision_model.*``,
``multi_modal_projector.linear_{1,2}.*``, ``language_model.model.*``, ``language_model.lm_head.weight``), which
transformers 4.57+, 5.x and vLLM all read. Imports accept that layout and the ``model.``-prefixed one.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, LlavaConfig, LlavaForConditionalGeneration, PreTrainedTokenizerBase

from vlmkit.config import LMConfig, ProjectorConfig, VisionConfig, VLMConfig
from vlmkit.errors import CheckpointError, ConfigError
from vlmkit.models.vlm import VisionLanguageModel
from vlmkit.processing.chat import ImageLayout
from vlmkit.processing.images import ImageTransformConfig
from vlmkit.processing.processor import VLMProcessor

log = logging.getLogger(__name__)

# Wraps any string-content chat template so it also accepts content parts (what transformers' processors pass):
# image parts become "<image>", parts are joined with newlines, exactly as vlmkit's own processor does.
PARTS_TO_TEXT = (
    "{%- set vlmkit_ns = namespace(messages=[]) -%}"
    "{%- for message in messages -%}"
    "{%- set part_ns = namespace(text='') -%}"
    "{%- if message['content'] is string -%}{%- set part_ns.text = message['content'] -%}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if not loop.first -%}{%- set part_ns.text = part_ns.text + '\\n' -%}{%- endif -%}"
    "{%- if part['type'] in ('image', 'image_url') -%}{%- set part_ns.text = part_ns.text + '<image>' -%}"
    "{%- elif part['type'] == 'text' -%}{%- set part_ns.text = part_ns.text + part['text'] -%}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- set vlmkit_ns.messages = vlmkit_ns.messages + [{'role': message['role'], 'content': part_ns.text}] -%}"
    "{%- endfor -%}"
    "{%- set messages = vlmkit_ns.messages -%}"
)
_MARKER = "vlmkit_ns"

# The ``after_each_question`` image layout (vlmkit.processing.chat.place_images) in Jinja, on string messages:
# each user turn becomes its text pieces, stripped and joined by newlines, then its images, or those of the latest
# user turn that had some. Applying it to messages already laid out changes nothing.
AFTER_EACH_QUESTION = (
    "{#- vlmkit image_layout: after_each_question -#}"
    "{%- set layout_ns = namespace(messages=[], shown=0) -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}"
    "{%- set pieces = message['content'].split('<image>') -%}"
    "{%- if pieces | length > 1 -%}{%- set layout_ns.shown = pieces | length - 1 -%}{%- endif -%}"
    "{%- set text_ns = namespace(parts=[]) -%}"
    "{%- for piece in pieces -%}{%- if piece.strip() -%}"
    "{%- set text_ns.parts = text_ns.parts + [piece.strip()] -%}{%- endif -%}{%- endfor -%}"
    "{%- set text_ns.parts = text_ns.parts + ['<image>'] * layout_ns.shown -%}"
    "{%- set layout_ns.messages = layout_ns.messages + [{'role': 'user', 'content': text_ns.parts | join('\n')}] -%}"
    "{%- else -%}{%- set layout_ns.messages = layout_ns.messages + [message] -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- set messages = layout_ns.messages -%}"
)
LAYOUT_TEMPLATES: dict[ImageLayout, str] = {"as_written": "", "after_each_question": AFTER_EACH_QUESTION}
_LAYOUT_MARKER = "vlmkit image_layout: "


def parts_template(template: str, image_layout: ImageLayout = "as_written") -> str:
    """``template`` made to accept content parts and to place images as ``image_layout`` says (idempotent)."""
    if _MARKER in template:
        return template
    return PARTS_TO_TEXT + LAYOUT_TEMPLATES[image_layout] + template


def template_layout(template: str | None) -> ImageLayout:
    """The image layout an exported template applies (``as_written`` for any other template)."""
    if template and _LAYOUT_MARKER in template:
        name = template.split(_LAYOUT_MARKER, 1)[1].split(" ", 1)[0].strip("-#} ")
        for layout in LAYOUT_TEMPLATES:
            if name == layout:
                return layout
    return "as_written"


def check_expressible(model: VisionLanguageModel) -> None:
    """Raise :class:`ConfigError` saying why transformers' Llava can't hold this model, if it can't."""
    views = model.config.views.name
    if views != "single":
        hint = " (LLaVA-NeXT's AnyRes: export it as hf-llava-next)" if views == "anyres" else ""
        raise ConfigError(
            f"transformers' LLaVA takes one view per image; this model uses the {views!r} views strategy{hint}"
        )
    check_parts(model)


def check_parts(model: VisionLanguageModel) -> None:
    """What :func:`check_expressible` checks besides the views: projector and LM layout (LLaVA-NeXT shares them)."""
    name = model.config.projector.name
    if name != "mlp2x_gelu":
        raise ConfigError(
            f"transformers' Llava has a Linear-GELU-Linear projector only ('mlp2x_gelu'); this model's projector is "
            f"{name!r}, which it can't express"
        )
    tower = model.vision_tower
    if tower.select_strategy == "default" and tower.prefix_tokens != 1:
        raise ConfigError(
            f"LLaVA's 'default' feature selection drops one CLS token; this tower has {tower.prefix_tokens} prefix "
            "tokens (a CLS and register tokens), which it would keep as image features"
        )
    prefix = model.language_model.base_model_prefix
    if prefix != "model" or not hasattr(model.language_model, "lm_head"):
        raise ConfigError(
            f"the LM {type(model.language_model).__name__} keeps its body under {prefix!r}, not 'model' with an "
            "'lm_head'; LLaVA's on-disk layout (language_model.model.*, language_model.lm_head) can't hold it"
        )


def llava_config(model: VisionLanguageModel) -> LlavaConfig:
    """The LlavaConfig equivalent of a vlmkit model."""
    return LlavaConfig(**llava_config_kwargs(model))


def llava_config_kwargs(model: VisionLanguageModel) -> dict[str, Any]:
    """The settings LLaVA's config (and LLaVA-NeXT's, which adds its pinpoints) takes from a vlmkit model."""
    tower = model.vision_tower
    text = model.language_model.config
    return dict(
        vision_config=tower.model.config.to_dict(),
        text_config=text.to_dict(),
        image_token_id=model.image_token_id,
        projector_hidden_act="gelu",
        vision_feature_select_strategy=tower.select_strategy,
        vision_feature_layer=tower.feature_layer,
        image_seq_length=tower.num_tokens(),
        multimodal_projector_bias=True,
        tie_word_embeddings=bool(getattr(text, "tie_word_embeddings", False)),
    )


def llava_state_dict(
    model: VisionLanguageModel, layout: str = "original", extra: dict[str, str] | None = None
) -> dict[str, torch.Tensor]:
    """Weights under LLaVA names: ``original`` (on-disk, every version) or ``model`` (transformers 4.52+ memory).

    ``extra`` names more vlmkit weights by their original LLaVA-family name (e.g. LLaVA-NeXT's ``image_newline``),
    which the ``model`` layout puts under ``model.``."""
    extra = extra or {}
    out: dict[str, torch.Tensor] = {}
    tied = bool(getattr(model.language_model.config, "tie_word_embeddings", False))
    for key, value in model.state_dict().items():
        if key.startswith("vision_tower.model."):
            rest = key[len("vision_tower.model.") :]
            new = f"vision_tower.vision_model.{rest}" if layout == "original" else f"model.vision_tower.{rest}"
        elif key.startswith("projector."):
            index, rest = key[len("projector.") :].split(".", 1)
            linear = {"0": "linear_1", "2": "linear_2"}[index]
            new = f"multi_modal_projector.{linear}.{rest}"
            new = new if layout == "original" else f"model.{new}"
        elif key.startswith("language_model.model."):
            rest = key[len("language_model.model.") :]
            new = key if layout == "original" else f"model.language_model.{rest}"
        elif key == "language_model.lm_head.weight":
            if tied and layout == "original":
                continue
            new = key if layout == "original" else "lm_head.weight"
        elif key in extra:
            new = extra[key] if layout == "original" else f"model.{extra[key]}"
        else:
            raise ConfigError(f"weight {key!r} has no place in LLaVA's layout")
        out[new] = value.detach().contiguous()
    return out


def _image_processor(processor: VLMProcessor):
    from transformers.models.llava import image_processing_pil_llava

    config = processor.image_config
    return image_processing_pil_llava.LlavaImageProcessorPil(
        do_pad=config.resize_mode == "pad",
        do_resize=True,
        size={"height": config.size, "width": config.size},
        do_center_crop=False,
        crop_size={"height": config.size, "width": config.size},
        do_rescale=True,
        do_normalize=True,
        image_mean=list(config.mean),
        image_std=list(config.std),
        do_convert_rgb=True,
    )


def export_hf_llava(model: VisionLanguageModel, processor: VLMProcessor, out: str | Path) -> Path:
    """Write a folder that ``LlavaForConditionalGeneration`` and ``AutoProcessor`` load with ``from_pretrained``."""
    from transformers import LlavaProcessor

    check_expressible(model)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = llava_config(model)
    config.save_pretrained(out)
    weights = llava_state_dict(model, "original")
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    save_hf_processor(LlavaProcessor, _image_processor(processor), model, processor, out)
    log.info("exported to %s (transformers LLaVA format, %d tensors)", out, len(weights))
    return out


def save_hf_processor(
    processor_class: type, image_processor: Any, model: VisionLanguageModel, processor: VLMProcessor, out: Path
) -> None:
    """Write a LLaVA-family transformers processor (the chat template made to take content parts, images placed
    as vlmkit places them) and ``generation_config.json`` (vlmkit's stop and pad ids) into ``out``."""
    tokenizer = processor.tokenizer
    template = parts_template(processor.chat.template, processor.image_layout)
    tower = model.vision_tower
    hf_processor = processor_class(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=tower.model.config.patch_size,
        vision_feature_select_strategy=tower.select_strategy,
        num_additional_image_tokens=1 if tower.has_cls else 0,
        chat_template=template,
        image_token=processor.image_token,
    )
    original = tokenizer.chat_template
    tokenizer.chat_template = template
    try:
        hf_processor.save_pretrained(out)
    finally:
        tokenizer.chat_template = original
    generation = {"eos_token_id": processor.stop_token_ids, "pad_token_id": processor.pad_token_id}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")


def to_transformers_llava(model: VisionLanguageModel) -> LlavaForConditionalGeneration:
    """An in-memory ``LlavaForConditionalGeneration`` with this model's exact weights (for parity and benchmarks)."""
    check_expressible(model)
    llava = LlavaForConditionalGeneration(llava_config(model)).to(model.dtype)  # type: ignore[arg-type]
    state = llava_state_dict(model, "model")
    missing, unexpected = llava.load_state_dict(state, strict=False)
    allowed = {"lm_head.weight"} if llava.config.tie_word_embeddings else set()
    if set(missing) - allowed or unexpected:
        raise CheckpointError(f"Llava weights don't line up: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if llava.config.tie_word_embeddings:
        llava.tie_weights()
    return llava.eval()


# -- import ---------------------------------------------------------------------------------------------------
_RENAMES = [  # (pattern, replacement) from either LLaVA layout to vlmkit names
    (r"^(model\.)?vision_tower\.(vision_model\.)?", "vision_tower.model."),
    (r"^(model\.)?multi_modal_projector\.linear_1\.", "projector.0."),
    (r"^(model\.)?multi_modal_projector\.linear_2\.", "projector.2."),
    (r"^model\.language_model\.", "language_model.model."),
    (r"^language_model\.model\.", "language_model.model."),
    (r"^(language_model\.)?lm_head\.", "language_model.lm_head."),
]


def _vlmkit_key(key: str) -> str:
    for pattern, replacement in _RENAMES:
        new, count = re.subn(pattern, replacement, key)
        if count:
            return new
    raise CheckpointError(f"LLaVA weight {key!r} has no vlmkit counterpart")


def is_hf_llava(folder: str | Path) -> bool:
    path = Path(folder) / "config.json"
    return path.is_file() and json.loads(path.read_text()).get("model_type") == "llava"


def _read_image_config(folder: Path, tower_size: int) -> ImageTransformConfig:
    data: dict = {}
    for name in ("preprocessor_config.json", "processor_config.json"):
        if (folder / name).is_file():
            loaded = json.loads((folder / name).read_text())
            data = loaded.get("image_processor", loaded)
            if "image_mean" in data:
                break
    if "image_mean" not in data:
        raise CheckpointError(f"{folder}: no image processor settings (image_mean/image_std) found")
    size = data.get("crop_size") if data.get("do_center_crop") else data.get("size")
    if isinstance(size, dict):
        size = size.get("height") or size.get("shortest_edge") or tower_size
    return ImageTransformConfig(
        size=int(size or tower_size),
        resize_mode="pad" if data.get("do_pad") else "resize",
        mean=tuple(data["image_mean"]),
        std=tuple(data["image_std"]),
    )


def load_hf_llava(folder: str | Path, dtype: torch.dtype | None = None) -> tuple[VisionLanguageModel, VLMProcessor]:
    """Load a transformers Llava checkpoint folder as a vlmkit model and processor (same logits)."""
    folder = Path(folder)
    hf = LlavaConfig.from_pretrained(folder)
    if hf.projector_hidden_act != "gelu":
        raise CheckpointError(f"{folder}: projector activation {hf.projector_hidden_act!r}; vlmkit maps only 'gelu'")
    config = VLMConfig(
        vision=VisionConfig(
            hf_config=hf.vision_config.to_dict(),  # type: ignore[union-attr]
            feature_layer=hf.vision_feature_layer,
            select_strategy=hf.vision_feature_select_strategy,
        ),
        lm=LMConfig(hf_config=hf.text_config.to_dict()),  # type: ignore[union-attr]
        projector=ProjectorConfig(name="mlp2x_gelu"),
        image_token_id=hf.image_token_id,
    )
    model = VisionLanguageModel.from_config(config, load_weights=False)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{folder}: no *.safetensors weights")
    state = {_vlmkit_key(k): v for f in files for k, v in load_file(str(f)).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = bool(getattr(hf.text_config, "tie_word_embeddings", False))
    if set(missing) - ({"language_model.lm_head.weight"} if tied else set()) or unexpected:
        raise CheckpointError(
            f"{folder}: weights don't match the config (missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    if tied:
        model.language_model.tie_weights()
    if dtype is not None:
        model.to(dtype)
    tokenizer: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(str(folder))
    template = _read_template(folder) or tokenizer.chat_template
    if template:
        tokenizer.chat_template = template
    processor = VLMProcessor(
        tokenizer,
        _read_image_config(folder, model.vision_tower.image_size),
        tokens_per_image=model.vision_tower.num_tokens(),
        image_token=tokenizer.convert_ids_to_tokens(hf.image_token_id),  # type: ignore[arg-type]
        image_layout=template_layout(template),
    )
    return model.eval(), processor


def _read_template(folder: Path) -> str | None:
    path = folder / "chat_template.jinja"
    if path.is_file():
        return path.read_text()
    path = folder / "chat_template.json"
    if path.is_file():
        return json.loads(path.read_text()).get("chat_template")
    return None
