"""VisionLanguageModel: vision tower + projector + causal LM, composed; the image-feature splice; save/load."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel

from vlmkit.config import FORMAT_VERSION, LMConfig, VLMConfig
from vlmkit.errors import CheckpointError, ConfigError, ImageTokenMismatchError
from vlmkit.models.projector import build_projector
from vlmkit.models.vision import VisionTower, hf_config_from_dict
from vlmkit.tokens import IGNORE_INDEX
from vlmkit.views import Geometry, build_assembler, projector_in

log = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"
PROJECTOR_WEIGHTS = "projector.safetensors"
PROJECTOR_CONFIG = "projector.json"
COMPONENTS = ("vision_tower", "projector", "language_model")
VIEWS_PREFIX = "image_views."
"""Key prefix of the views strategy's parameters in a projector-only checkpoint."""


def build_language_model(
    config: LMConfig, load_weights: bool = True, dtype: torch.dtype | None = None
) -> PreTrainedModel:
    """Any ``AutoModelForCausalLM``: ``from_pretrained(source)`` or built from ``hf_config``."""
    dtype = dtype or torch.float32
    if config.source and load_weights:
        return AutoModelForCausalLM.from_pretrained(config.source, dtype=dtype)
    if config.hf_config is not None:
        return AutoModelForCausalLM.from_config(hf_config_from_dict(config.hf_config, "lm"), dtype=dtype)
    if config.source:
        from transformers import AutoConfig

        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(config.source), dtype=dtype)
    raise ConfigError("language model needs a 'source' (hub id or folder) or an 'hf_config'")


@dataclass
class ComponentCount:
    trainable: int
    frozen: int

    @property
    def total(self) -> int:
        return self.trainable + self.frozen


def tokens_per_view(tower: VisionTower, projector: nn.Module) -> int:
    """Feature vectors of one view after the projector (a token-reducing projector says how many)."""
    tokens = tower.num_tokens()
    output_tokens = getattr(projector, "output_tokens", None)
    return int(output_tokens(tokens)) if callable(output_tokens) else tokens


def view_geometry(tower: VisionTower, projector: nn.Module, language_model: PreTrainedModel) -> Geometry:
    """What a views strategy needs to know of a model's parts."""
    return Geometry(
        view_size=tower.image_size, tokens_per_view=tokens_per_view(tower, projector),
        tower_dim=tower.hidden_size, lm_dim=int(language_model.config.hidden_size),
    )  # fmt: skip


class VisionLanguageModel(nn.Module):
    """A LLaVA-style VLM: ``vision_tower`` → ``projector`` → features spliced into ``language_model`` embeddings.

    Each ``<image>`` placeholder token in ``input_ids`` receives one image feature vector, in order (images in
    batch-row order, tokens of one image consecutive); the sequence length never changes.
    """

    def __init__(
        self,
        config: VLMConfig,
        vision_tower: VisionTower,
        projector: nn.Module,
        language_model: PreTrainedModel,
    ) -> None:
        super().__init__()
        if config.image_token_id is None:
            raise ConfigError("VLMConfig.image_token_id is not set; compose the model with a tokenizer")
        self.config = config
        self.vision_tower = vision_tower
        self.projector = projector
        self.language_model = language_model
        self.image_views = build_assembler(config.views, view_geometry(vision_tower, projector, language_model))
        """The views strategy's model half (``single``: pass-through; others hold e.g. learned separators)."""

    # -- construction ---------------------------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: VLMConfig, load_weights: bool = True, dtype: torch.dtype | None = None):
        """Build the three parts; ``load_weights`` loads pretrained tower/LM weights from their ``source``."""
        tower = VisionTower.from_config(config.vision, load_weights=load_weights, dtype=dtype)
        lm = build_language_model(config.lm, load_weights=load_weights, dtype=dtype)
        in_features = projector_in(config.views, tower.hidden_size)
        projector = build_projector(config.projector.name, in_features, lm.config.hidden_size)
        projector.to(dtype or torch.float32)
        return cls(config, tower, projector, lm)

    @property
    def image_token_id(self) -> int:
        return int(self.config.image_token_id)  # type: ignore[arg-type]

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.projector.parameters(), next(self.parameters())).dtype

    # -- images ---------------------------------------------------------------------------------------------
    def encode_images(
        self, pixel_values: torch.Tensor, image_sizes: torch.Tensor | None = None
    ) -> torch.Tensor | list[torch.Tensor]:
        """Pixels of every view → projected features: ``(N, tokens, lm_hidden)`` with the ``single`` views
        strategy, else a list of one ``(tokens_i, lm_hidden)`` tensor per image (``image_sizes``: ``(N, 2)``
        original heights and widths, which lay each image's views out)."""
        features = self.vision_tower(pixel_values.to(self.device)).to(self.dtype)
        if self.config.views.name == "single":
            return self.projector(features)
        if image_sizes is None:
            raise ConfigError(f"the {self.config.views.name!r} views strategy needs image_sizes with the pixels")
        sizes = [(int(h), int(w)) for h, w in image_sizes.tolist()]
        counts = [self.image_views.num_views(size) for size in sizes]
        if sum(counts) != features.shape[0]:
            raise ImageTokenMismatchError(f"{features.shape[0]} views given, but the image sizes make {sum(counts)}")
        out = []
        for views, size in zip(features.split(counts), sizes, strict=True):
            mapped = self.projector(self.image_views.before_projector(views, size))
            out.append(self.image_views.after_projector(mapped, size))
        return out

    def embed_inputs(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        image_features: torch.Tensor | Sequence[torch.Tensor] | None = None,
        image_sizes: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Text embeddings with image features written over the placeholder positions.

        ``image_features`` (already projected) may be given instead of ``pixel_values``: one tensor
        ``(N, tokens, hidden)`` or a list of ``(tokens_i, hidden)`` tensors whose lengths may differ per image.
        """
        embeds = self.language_model.get_input_embeddings()(input_ids)
        slots = input_ids == self.image_token_id
        if image_features is None and pixel_values is not None:
            image_features = self.encode_images(pixel_values, image_sizes)
        if image_features is None:
            if slots.any():
                raise ImageTokenMismatchError(
                    f"input_ids hold {int(slots.sum())} image placeholder tokens but no images were given"
                )
            return embeds
        if isinstance(image_features, torch.Tensor):
            per_image = [image_features.shape[1]] * image_features.shape[0]
            flat = image_features.reshape(-1, image_features.shape[-1])
        else:
            per_image = [f.shape[0] for f in image_features]
            flat = torch.cat(list(image_features)) if image_features else embeds.new_zeros(0, embeds.shape[-1])
        if int(slots.sum()) != flat.shape[0]:
            per_row = slots.sum(dim=1).tolist()
            raise ImageTokenMismatchError(
                f"image features and placeholders differ: expected {flat.shape[0]} image placeholder tokens "
                f"({len(per_image)} image(s) with {per_image} feature vectors) but found {int(slots.sum())} "
                f"(per row: {per_row})"
            )
        return embeds.masked_scatter(slots.unsqueeze(-1), flat.to(embeds.dtype))

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        image_features: torch.Tensor | Sequence[torch.Tensor] | None = None,
        image_counts: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
        supervised_loss: bool = False,
        loss_weights: torch.Tensor | None = None,
        **lm_kwargs,
    ):
        """Logits (and the LM loss over ``labels`` != -100) of the LM on the spliced embeddings.

        Position ids default to the running count of attended tokens, so left padding gets correct positions.
        ``image_counts`` (images per row, from the processor) is checked against the images given (placement
        itself is by token); ``image_sizes`` (``(N, 2)`` heights and widths) lay out multi-view images.
        ``supervised_loss=True`` (training) returns ``{"loss_sum", "targets"}`` from :meth:`supervised_loss_sum`
        instead, through ``forward`` so that DDP sees the call (``loss_weights``: per-position weights of that
        sum).
        """
        if image_counts is not None and image_features is None:
            if image_sizes is not None:
                given = int(image_sizes.shape[0])
            else:
                given = 0 if pixel_values is None else int(pixel_values.shape[0])  # one view per image
            if int(image_counts.sum()) != given:
                raise ConfigError(f"image_counts says {int(image_counts.sum())} image(s) but {given} were given")
        if supervised_loss:
            if labels is None:
                raise ConfigError("supervised_loss=True needs labels")
            loss_sum, targets = self.supervised_loss_sum(
                input_ids, labels, attention_mask, pixel_values, position_ids, loss_weights, image_sizes
            )
            return {"loss_sum": loss_sum, "targets": torch.tensor(targets)}
        if loss_weights is not None:
            raise ConfigError("loss_weights are for the supervised loss (supervised_loss=True)")
        inputs_embeds = self.embed_inputs(input_ids, pixel_values, image_features, image_sizes)
        if position_ids is None and attention_mask is not None and lm_kwargs.get("cache") is None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        return self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            labels=labels,
            **lm_kwargs,
        )

    def supervised_loss_sum(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        loss_weights: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, int]:
        """Summed next-token cross-entropy (fp32) over ``labels`` != -100, and the number of those targets.

        ``loss_weights`` (the shape of ``labels``) weights each position's term of the sum (the term predicting
        ``labels[:, t]`` is weighted by ``loss_weights[:, t]``).

        For training: the LM head runs only at the supervised positions instead of over the whole sequence (the
        image and prompt tokens, usually most of it), which saves time and the memory of full-vocabulary logits.
        LMs whose logits are more than ``lm_head(hidden)`` (soft-capping, logit scales) take the full forward.
        """
        shift_labels = labels[:, 1:]
        targets = shift_labels != IGNORE_INDEX
        if not self._head_only_supported():
            logits = self(
                input_ids, attention_mask, pixel_values, position_ids=position_ids, image_sizes=image_sizes,
                use_cache=False,
            ).logits  # fmt: skip
            picked = logits[:, :-1][targets].float()
        else:
            embeds = self.embed_inputs(input_ids, pixel_values, image_sizes=image_sizes)
            if position_ids is None and attention_mask is not None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
            hidden = self.language_model.get_decoder()(
                inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
            ).last_hidden_state
            picked = self.language_model.get_output_embeddings()(hidden[:, :-1][targets]).float()
        if loss_weights is None:
            loss = F.cross_entropy(picked, shift_labels[targets], reduction="sum")
        else:
            terms = F.cross_entropy(picked, shift_labels[targets], reduction="none")
            loss = (terms * loss_weights[:, 1:][targets].to(terms.dtype)).sum()
        return loss, int(targets.sum())

    def _head_only_supported(self) -> bool:
        config = self.language_model.config
        extras = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")
        return (
            self.language_model.get_output_embeddings() is not None
            and getattr(self.language_model, "get_decoder", None) is not None
            and not any(getattr(config, name, None) not in (None, 1, 1.0) for name in extras)
        )

    # -- freezing -------------------------------------------------------------------------------------------
    def component_modules(self, name: str) -> list[nn.Module]:
        """The modules of a component (:data:`COMPONENTS`): the projector's includes the views strategy's own
        parameters (separators, newlines), which train and freeze with it."""
        if name == "projector":
            return [self.projector, self.image_views]
        return [getattr(self, name)]

    def set_trainable(
        self, vision: bool | None = None, projector: bool | None = None, language_model: bool | None = None
    ) -> None:
        """Freeze (False) or unfreeze (True) whole components; None leaves a component as it is."""
        for name, flag in (("vision_tower", vision), ("projector", projector), ("language_model", language_model)):
            if flag is not None:
                for module in self.component_modules(name):
                    module.requires_grad_(flag)

    def parameter_summary(self) -> dict[str, ComponentCount]:
        """Trainable and frozen parameter counts per component (shared tensors counted once)."""
        seen: set[int] = set()
        summary = {}
        for name in COMPONENTS:
            trainable = frozen = 0
            for param in (p for module in self.component_modules(name) for p in module.parameters()):
                if id(param) in seen:
                    continue
                seen.add(id(param))
                if param.requires_grad:
                    trainable += param.numel()
                else:
                    frozen += param.numel()
            summary[name] = ComponentCount(trainable, frozen)
        return summary

    def format_parameter_summary(self) -> str:
        """A small table of trainable vs frozen parameters, for logs."""
        rows = self.parameter_summary()
        lines = [f"{'component':<16}{'trainable':>14}{'frozen':>14}"]
        for name, count in rows.items():
            lines.append(f"{name:<16}{count.trainable:>14,}{count.frozen:>14,}")
        lines.append(
            f"{'total':<16}{sum(c.trainable for c in rows.values()):>14,}{sum(c.frozen for c in rows.values()):>14,}"
        )
        return "\n".join(lines)

    # -- persistence ----------------------------------------------------------------------------------------
    def save_pretrained(self, folder: str | Path) -> Path:
        """Write ``config.json`` (self-contained: transformers configs inlined) and ``model.safetensors``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.config.vision.hf_config = self.vision_tower.model.config.to_dict()
        self.config.lm.hf_config = self.language_model.config.to_dict()
        self.config.save(folder)
        save_model(self, str(folder / WEIGHTS_FILE), metadata={"format": "pt", "vlmkit_format": str(FORMAT_VERSION)})
        return folder

    @classmethod
    def from_pretrained(cls, folder: str | Path, dtype: torch.dtype | None = None) -> VisionLanguageModel:
        """Load a folder written by :meth:`save_pretrained` (no network access: configs are inlined)."""
        folder = Path(folder)
        config = VLMConfig.load(folder)
        weights = folder / WEIGHTS_FILE
        if not weights.is_file():
            raise CheckpointError(f"{folder}: missing {WEIGHTS_FILE}")
        model = cls.from_config(config, load_weights=False)
        missing, unexpected = load_model(model, str(weights), strict=False)
        if missing or unexpected:
            raise CheckpointError(
                f"{weights}: weights don't match the config (missing {sorted(missing)[:5]}, unexpected "
                f"{sorted(unexpected)[:5]})"
            )
        if dtype is not None:
            model.to(dtype)
        return model.eval()

    # -- projector-only checkpoints -------------------------------------------------------------------------
    def _projector_dims(self) -> tuple[int, int]:
        return projector_in(self.config.views, self.vision_tower.hidden_size), self.language_model.config.hidden_size

    def save_projector(self, folder: str | Path) -> Path:
        """Save only the projector (weights + name + dimensions), to attach to another LM later."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        in_features, out_features = self._projector_dims()
        meta = {
            "format_version": FORMAT_VERSION,
            "name": self.config.projector.name,
            "in_features": in_features,
            "out_features": out_features,
            "vision_model_type": self.vision_tower.model.config.model_type,
            "lm_model_type": self.language_model.config.model_type,
            "views": self.config.views.name,
        }
        (folder / PROJECTOR_CONFIG).write_text(json.dumps(meta, indent=2) + "\n")
        state = {k: v.detach().contiguous() for k, v in self.projector.state_dict().items()}
        # the views strategy's parameters (separators, newlines) train with the projector and travel with it
        state |= {f"{VIEWS_PREFIX}{k}": v.detach().contiguous() for k, v in self.image_views.state_dict().items()}
        save_file(state, str(folder / PROJECTOR_WEIGHTS))
        return folder

    def load_projector(self, folder: str | Path) -> None:
        """Replace this model's projector with a saved one (a ``save_projector`` folder, or LLaVA's
        ``mm_projector.bin``: :mod:`vlmkit.interop.llava_projector`); its dimensions must match tower and LM."""
        folder = Path(folder)
        meta_path, weights = folder / PROJECTOR_CONFIG, folder / PROJECTOR_WEIGHTS
        if not meta_path.is_file() or not weights.is_file():
            from vlmkit.interop.llava_projector import find_mm_projector, read_mm_projector

            found = find_mm_projector(folder)
            if found is None:
                raise CheckpointError(
                    f"{folder}: not a projector checkpoint (needs {PROJECTOR_CONFIG} and {PROJECTOR_WEIGHTS}, "
                    "or LLaVA's mm_projector.bin)"
                )
            self._use_projector(*read_mm_projector(found), found)
            return
        self._use_projector(json.loads(meta_path.read_text()), load_file(str(weights)), folder)

    def _use_projector(self, meta: dict[str, Any], state: dict[str, torch.Tensor], folder: Path) -> None:
        want_in, want_out = self._projector_dims()
        if (meta["in_features"], meta["out_features"]) != (want_in, want_out):
            raise ConfigError(
                f"projector in {folder} maps {meta['in_features']} → {meta['out_features']}, but this model needs "
                f"{want_in} → {want_out} (vision feature size → LM hidden size)"
            )
        views = meta.get("views", "single")
        if views != self.config.views.name:
            raise ConfigError(
                f"projector in {folder} was trained with {views!r} image views, but this model uses "
                f"{self.config.views.name!r}"
            )
        own = {k[len(VIEWS_PREFIX) :]: v for k, v in state.items() if k.startswith(VIEWS_PREFIX)}
        projector = build_projector(meta["name"], want_in, want_out)
        projector.load_state_dict({k: v for k, v in state.items() if not k.startswith(VIEWS_PREFIX)}, strict=True)
        self.image_views.load_state_dict(own, strict=True)
        self.image_views.to(device=self.device, dtype=self.dtype)
        self.projector = projector.to(device=self.device, dtype=self.dtype)
        self.config.projector.name = meta["name"]
