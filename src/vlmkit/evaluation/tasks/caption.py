"""``caption``: corpus BLEU-1..4, ROUGE-L and CIDEr(-D) against reference captions."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vlmkit.errors import DataError
from vlmkit.evaluation.metrics import caption_metrics, rouge_l
from vlmkit.evaluation.tasks.base import EvalSample, Metrics, Task
from vlmkit.evaluation.tasks.registry import register_task
from vlmkit.evaluation.tasks.rows import answer_list, get_field, image_path, sample_id

CAPTION_PROMPT = "Provide a one-sentence caption for the provided image."


@register_task("caption")
class CaptionTask(Task):
    """Captioning: corpus BLEU-1..4, ROUGE-L and CIDEr(-D) (pycocoevalcap, pure-Python tokenisation)."""

    def read(self, row: dict[str, Any], where: str, image_root: Path) -> EvalSample:
        captions = answer_list(row, where, ("captions", "references"))
        if not any(c.strip() for c in captions):
            raise DataError(f"{where}: 'captions' are all empty")
        image = image_path(row, where, image_root)
        prompt = get_field(row, ("question",), where) if row.get("question") is not None else CAPTION_PROMPT
        fallback = str(row.get("image")) if row.get("image") else None
        return EvalSample(
            sample_id(row, where, fallback=fallback), prompt + self.prompt_suffix, image, {"captions": captions}, where
        )

    def score(self, sample: EvalSample, prediction: str) -> dict[str, Any]:
        return {"score": rouge_l(prediction, sample.reference["captions"])}

    def aggregate(self, samples: Sequence[EvalSample], predictions: Sequence[str]) -> Metrics:
        return caption_metrics(predictions, [s.reference["captions"] for s in samples])

    def summary(self, metrics: Metrics) -> dict[str, Any]:
        return {key: metrics[key] for key in ("bleu4", "rouge_l", "cider")}
