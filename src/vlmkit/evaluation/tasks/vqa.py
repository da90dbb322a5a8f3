"""Short-answer tasks: ``vqa`` and ``textvqa`` (VQA accuracy), ``gqa`` (exact match), ``docvqa`` (ANLS)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

from vlmkit.evaluation.metrics import anls, gqa_exact_match, vqa_accuracy
from vlmkit.evaluation.tasks.base import SHORT_ANSWER, EvalSample, Metrics, Task, mean
from vlmkit.evaluation.tasks.registry import register_task
from vlmkit.evaluation.tasks.rows import answer_list, get_field

logger = logging.getLogger(__name__)


@register_task("vqa")
class VqaTask(Task):
    """VQAv2 accuracy (official normalisation, leave-one-out min(n/3, 1)); ``textvqa`` normalises answers fully."""

    default_suffix = SHORT_ANSWER
    textvqa: ClassVar[bool] = False

    def __init__(self, prompt_suffix: str | None = None) -> None:
        super().__init__(prompt_suffix)
        self._warned = False

    def read(self, row: dict[str, Any], where: str, image_root: Path) -> EvalSample:
        answers = answer_list(row, where)
        if len(answers) < 4 and not self._warned:
            self._warned = True
            logger.warning(
                "%s: %d answer(s); VQA accuracy needs 3 matching *other* answers for full credit, so rows with fewer "
                "than 4 answers can never score 1 (use task 'gqa' for single-answer data)",
                where,
                len(answers),
            )
        group = self._group(row, ("answer_type", "task", "category"))
        return self._qa_sample(row, where, image_root, {"answers": answers, "group": group})

    def score(self, sample: EvalSample, prediction: str) -> dict[str, Any]:
        return {"score": vqa_accuracy(prediction, sample.reference["answers"], textvqa=self.textvqa)}


@register_task("gqa")
class GqaTask(Task):
    """GQA: exact match after stripping, removing trailing periods and lower-casing (LLaVA)."""

    default_suffix = SHORT_ANSWER

    def read(self, row: dict[str, Any], where: str, image_root: Path) -> EvalSample:
        answers = answer_list(row, where, ("answer", "answers"))
        group = self._group(row, ("task", "category"))
        return self._qa_sample(row, where, image_root, {"answers": answers, "group": group})

    def score(self, sample: EvalSample, prediction: str) -> dict[str, Any]:
        return {"score": gqa_exact_match(prediction, sample.reference["answers"])}


@register_task("textvqa")
class TextVqaTask(VqaTask):
    """TextVQA: the VQA formula with the full normalisation applied to the answers too.

    ``ocr=True`` appends the row's ``ocr_tokens`` to the question as LLaVA-1.5's TextVQA file has them (and
    lmms-eval's ``ocr: true``): ``"\nReference OCR token: a, b, c"``. Off by default, as lmms-eval."""

    textvqa = True

    def __init__(self, prompt_suffix: str | None = None, ocr: bool = False) -> None:
        super().__init__(prompt_suffix)
        self.ocr = ocr

    def _question(self, row: dict[str, Any], where: str, keys: Sequence[str] = ("question",)) -> str:
        question = get_field(row, keys, where)
        if self.ocr:
            tokens = get_field(row, ("ocr_tokens",), where, (list, tuple))
            question += f"\nReference OCR token: {', '.join(str(t) for t in tokens)}"
        return question + self.prompt_suffix


@register_task("docvqa")
class DocVqaTask(Task):
    """DocVQA: ANLS (threshold 0.5)."""

    default_suffix = SHORT_ANSWER

    def read(self, row: dict[str, Any], where: str, image_root: Path) -> EvalSample:
        return self._qa_sample(row, where, image_root, {"answers": answer_list(row, where)})

    def score(self, sample: EvalSample, prediction: str) -> dict[str, Any]:
        return {"score": anls(prediction, sample.reference["answers"])}

    def aggregate(self, samples: Sequence[EvalSample], predictions: Sequence[str]) -> Metrics:
        values = [self.score(s, p)["score"] for s, p in zip(samples, predictions, strict=True)]
        return {"anls": mean(values), "n": len(values)}

    def summary(self, metrics: Metrics) -> dict[str, Any]:
        return {"anls": metrics["anls"]}
