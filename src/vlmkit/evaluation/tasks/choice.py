"""Multiple-choice benchmarks scored as their reference code does: ``seedbench`` (SEED-Bench, LLaVA's
``convert_seed_for_submission.py``: the stripped answer must be the letter) and ``mmstar`` (MMStar's
``exact_match``; per-category scores are means over their sub-categories, as lmms-eval aggregates them)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vlmkit.errors import ConfigError, DataError
from vlmkit.evaluation.metrics import mmstar_exact_match
from vlmkit.evaluation.tasks.base import EvalSample, Metrics, Task, mean
from vlmkit.evaluation.tasks.mcq import MCQ_SUFFIX
from vlmkit.evaluation.tasks.registry import register_task
from vlmkit.evaluation.tasks.rows import get_field, image_path, sample_id

SEED_TYPES = {1: "Scene Understanding", 2: "Instance Identity", 3: "Instance Location", 4: "Instance Attributes",
              5: "Instances Counting", 6: "Spatial Relation", 7: "Instance Interaction", 8: "Visual Reasoning",
              9: "Text Understanding", 10: "Action Recognition", 11: "Action Prediction",
              12: "Procedure Understanding"}  # fmt: skip
"""SEED-Bench's ``question_type_id`` → name (its ``question_type`` table)."""


def _letter(row: dict[str, Any], where: str, letters: str) -> str:
    answer = str(get_field(row, ("answer",), where, (str, int))).strip().upper()
    if answer not in letters:
        raise DataError(f"{where}: 'answer' {answer!r} is not one of the option letters {letters}")
    return answer


@register_task("seedbench")
class SeedBenchTask(Task):
    """SEED-Bench image questions (rows: ``question_id, question, choice_a .. choice_d`` (or ``options``),
    ``answer`` letter, ``question_type_id``, ``data_type``, ``image``). ``parse``: ``"llava"`` (default: the
    stripped answer equals the letter) or ``"first_char"`` (lmms-eval: its first character does)."""

    default_suffix = MCQ_SUFFIX

    def __init__(self, prompt_suffix: str | None = None, parse: str = "llava") -> None:
        super().__init__(prompt_suffix)
        if parse not in ("llava", "first_char"):
            raise ConfigError(f"seedbench: parse must be 'llava' or 'first_char', got {parse!r}")
        self.parse = parse

    def read(self, row: dict[str, Any], where: str, image_root: Path) -> EvalSample:
        if row.get("data_type", "image") != "image":
            raise DataError(f"{where}: a {row['data_type']} question; vlmkit scores SEED-Bench's image questions "
                            "(filter on data_type == 'image')")  # fmt: skip
        if row.get("options") is not None:
            options = [str(o) for o in get_field(row, ("options",), where, (list, tuple))]
        else:
            options = [str(get_field(row, (f"choice_{k}",), where, (str, int, float))) for k in "abcd"]
        letters = "ABCDEFGH"[: len(options)]
        lines = [get_field(row, ("question",), where), *(f"{k}. {o}" for k, o in zip(letters, options, strict=True))]
        kind = row.get("question_type_id")
        group = SEED_TYPES.get(int(kind), str(kind)) if isinstance(kind, int | str) and str(kind).isdigit() else kind
        return EvalSample(
            sample_id(row, where),
            "\n".join(lines) + self.prompt_suffix,
            image_path(row, where, image_root),
            {"answer": _letter(row, where, letters), "group": None if group is None else str(group)},
            where,
        )

    def score(self, sample: EvalSample, prediction: str) -> dict[str, Any]:
        answer = prediction.strip()
        if self.parse == "first_char" and len(answer) > 1:
            answer = answer[0]
        return {"score": float(answer == sample.reference["answer"])}


@register_task("mmstar")
class MmstarTask(Task):
    """MMStar (rows as Lin-Chen/MMStar: ``index, question`` (options written in it), ``answer`` letter,
    ``category``, ``l2_category``, ``image``). Headline ``average``: the mean over sub-categories of their
    accuracy; each category's score: the mean over its sub-categories."""

    default_suffix = MCQ_SUFFIX

    def read(self, row: dict[str, Any], where: str, image_root: Path) -> EvalSample:
        return EvalSample(
            sample_id(row, where, keys=("index", "question_id", "id")),
            str(get_field(row, ("question",), where)).strip() + self.prompt_suffix,
            image_path(row, where, image_root),
            {"answer": str(get_field(row, ("answer",), where)), "category": str(row.get("category")),
             "l2_category": str(row.get("l2_category", row.get("category")))},
            where,
        )  # fmt: skip

    def score(self, sample: EvalSample, prediction: str) -> dict[str, Any]:
        return {"score": mmstar_exact_match(prediction, sample.reference["answer"])}

    @staticmethod
    def _macro(pairs: Sequence[tuple[str, float]]) -> float:
        by_l2: dict[str, list[float]] = {}
        for l2, value in pairs:
            by_l2.setdefault(l2, []).append(value)
        return mean([mean(values) for values in by_l2.values()])

    def aggregate(self, samples: Sequence[EvalSample], predictions: Sequence[str]) -> Metrics:
        scored = [(s.reference, self.score(s, p)["score"]) for s, p in zip(samples, predictions, strict=True)]
        categories = dict.fromkeys(ref["category"] for ref, _ in scored)
        return {
            "average": self._macro([(ref["l2_category"], v) for ref, v in scored]),
            "accuracy": mean([v for _, v in scored]),
            "n": len(scored),
            "by_category": {c: self._macro([(ref["l2_category"], v) for ref, v in scored if ref["category"] == c])
                            for c in categories},
        }  # fmt: skip

    def summary(self, metrics: Metrics) -> dict[str, Any]:
        return {"average": metrics["average"], **{f"{c}": v for c, v in metrics["by_category"].items()}}
