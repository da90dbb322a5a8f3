"""``chartqa``: ChartQA, relaxed accuracy (pix2struct's ``relaxed_correctness``: numbers within 5%), overall and
per split (human-written and augmented questions)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vlmkit.evaluation.metrics import relaxed_correctness
from vlmkit.evaluation.tasks.base import EvalSample, Metrics, Task, mean
from vlmkit.evaluation.tasks.registry import register_task
from vlmkit.evaluation.tasks.rows import answer_list, get_field, image_path, sample_id

CHARTQA_SUFFIX = "\nAnswer the question with a single word."
"""lmms-eval's ChartQA prompt suffix."""


def _split(row: dict[str, Any]) -> str | None:
    """``human`` / ``augmented`` from lmms-lab's ``type`` (human_test, augmented_test) or HuggingFaceM4's
    ``human_or_machine`` (0 human, 1 machine)."""
    kind = row.get("type")
    if isinstance(kind, str):
        return "human" if kind.startswith("human") else "augmented" if kind.startswith("augmented") else kind
    flag = row.get("human_or_machine")
    if flag is not None:
        return "human" if int(flag) == 0 else "augmented"
    return None


@register_task("chartqa")
class ChartQaTask(Task):
    """ChartQA (rows: ``question`` or ``query``, ``answer`` or ``label`` (a string or a list), ``image``, and the
    split as ``type`` or ``human_or_machine``). A question scores 1 if any answer is relaxed-correct."""

    default_suffix = CHARTQA_SUFFIX

    def read(self, row: dict[str, Any], where: str, image_root: Path) -> EvalSample:
        return EvalSample(
            sample_id(row, where, fallback=str(row.get("_index"))),
            get_field(row, ("question", "query"), where) + self.prompt_suffix,
            image_path(row, where, image_root),
            {"answers": answer_list(row, where, ("answer", "label")), "split": _split(row)},
            where,
        )

    def score(self, sample: EvalSample, prediction: str) -> dict[str, Any]:
        right = any(relaxed_correctness(answer, prediction) for answer in sample.reference["answers"])
        return {"score": float(right)}

    def aggregate(self, samples: Sequence[EvalSample], predictions: Sequence[str]) -> Metrics:
        scores = [self.score(s, p)["score"] for s, p in zip(samples, predictions, strict=True)]
        out: Metrics = {"relaxed_accuracy": mean(scores), "n": len(scores)}
        for split in ("human", "augmented"):
            part = [v for v, s in zip(scores, samples, strict=True) if s.reference["split"] == split]
            if part:
                out[f"relaxed_{split}"] = mean(part)
        if "relaxed_human" in out and "relaxed_augmented" in out:
            out["relaxed_average"] = (out["relaxed_human"] + out["relaxed_augmented"]) / 2
        return out

    def summary(self, metrics: Metrics) -> dict[str, Any]:
        keys = ("relaxed_accuracy", "relaxed_human", "relaxed_augmented", "relaxed_average")
        return {key: metrics[key] for key in keys if key in metrics}
