"""``mme``: MME's yes/no questions, two per image, scored as its official ``eval_tool/calculation.py``:
per subtask accuracy + accuracy+ (both questions of an image right), × 100, summed into perception and
cognition."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vlmkit.errors import DataError
from vlmkit.evaluation.metrics import mme_parse, mme_scores
from vlmkit.evaluation.tasks.base import SHORT_ANSWER, EvalSample, Metrics, Task
from vlmkit.evaluation.tasks.registry import register_task
from vlmkit.evaluation.tasks.rows import get_field, image_path


@register_task("mme")
class MmeTask(Task):
    """MME (rows as lmms-lab/MME: ``question_id`` = the image's name, shared by its two questions; ``question``
    (or LLaVA's ``text``), ``answer`` Yes/No, ``category`` = the subtask). The image of a row is ``image_id``,
    else ``question_id``, else the ``image`` path: acc+ pairs questions by it."""

    default_suffix = SHORT_ANSWER

    def read(self, row: dict[str, Any], where: str, image_root: Path) -> EvalSample:
        raw = get_field(row, ("answer", "label"), where)
        label = raw.strip().lower()
        if label not in ("yes", "no"):
            raise DataError(f"{where}: MME's 'answer' must be Yes or No, got {raw!r}")
        subtask = str(get_field(row, ("category",), where))
        question = get_field(row, ("question", "text"), where)
        image_key = row.get("image_id", row.get("question_id", row.get("image")))
        if not isinstance(image_key, str | int):
            raise DataError(f"{where}: MME rows need 'question_id' (the image's name) or 'image_id'")
        digest = hashlib.sha1(question.encode("utf-8")).hexdigest()[:10]
        return EvalSample(
            f"{subtask}/{image_key}#{digest}",
            question + self.prompt_suffix,
            image_path(row, where, image_root),
            {"label": label, "subtask": subtask, "image": str(image_key)},
            where,
        )

    def score(self, sample: EvalSample, prediction: str) -> dict[str, Any]:
        parsed = mme_parse(prediction)
        return {"score": float(parsed == sample.reference["label"]), "parsed": parsed}

    def aggregate(self, samples: Sequence[EvalSample], predictions: Sequence[str]) -> Metrics:
        rows = [(s.reference["subtask"], s.reference["image"], s.reference["label"], p)
                for s, p in zip(samples, predictions, strict=True)]  # fmt: skip
        return mme_scores(rows)

    def summary(self, metrics: Metrics) -> dict[str, Any]:
        out = {"perception": metrics["perception"], "cognition": metrics["cognition"], "total": metrics["total"]}
        out.update({f"{name} score": m["score"] for name, m in metrics["subtasks"].items()})
        return out
