"""``mcq``: multiple choice, accuracy of the parsed option letter."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vlmkit.errors import DataError
from vlmkit.evaluation.metrics import mcq_parse
from vlmkit.evaluation.tasks.base import EvalSample, Metrics, Task, mean
from vlmkit.evaluation.tasks.registry import register_task
from vlmkit.evaluation.tasks.rows import get_field, image_path, sample_id

MCQ_SUFFIX = "\nAnswer with the option's letter from the given choices directly."


@register_task("mcq")
class McqTask(Task):
    """Multiple choice: accuracy of the parsed option letter."""

    default_suffix = MCQ_SUFFIX

    def read(self, row: dict[str, Any], where: str, image_root: Path) -> EvalSample:
        options = get_field(row, ("options", "choices"), where, (list, tuple))
        if not 2 <= len(options) <= 26 or not all(isinstance(o, str | int | float) for o in options):
            raise DataError(f"{where}: 'options' must be a list of 2 to 26 option texts")
        options = [str(o) for o in options]
        letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"[: len(options)]
        answer = str(get_field(row, ("answer",), where, (str, int))).strip()
        if answer.upper() in letters and len(answer) == 1:
            target = answer.upper()
        elif answer in options:
            target = letters[options.index(answer)]
        else:
            raise DataError(f"{where}: 'answer' {answer!r} is neither an option letter ({letters}) nor an option")
        lines = [get_field(row, ("question",), where), *(f"{k}. {o}" for k, o in zip(letters, options, strict=True))]
        return EvalSample(
            sample_id(row, where),
            "\n".join(lines) + self.prompt_suffix,
            image_path(row, where, image_root),
            {"options": options, "answer": target},
            where,
        )

    def score(self, sample: EvalSample, prediction: str) -> dict[str, Any]:
        letter = mcq_parse(prediction, sample.reference["options"])
        return {"score": float(letter == sample.reference["answer"]), "parsed": letter}

    def aggregate(self, samples: Sequence[EvalSample], predictions: Sequence[str]) -> Metrics:
        scored = [self.score(s, p) for s, p in zip(samples, predictions, strict=True)]
        return {
            "accuracy": mean([r["score"] for r in scored]),
            "n": len(scored),
            "parse_failures": sum(r["parsed"] is None for r in scored),
        }

    def summary(self, metrics: Metrics) -> dict[str, Any]:
        return {"accuracy": metrics["accuracy"], "parse_failures": metrics["parse_failures"]}
