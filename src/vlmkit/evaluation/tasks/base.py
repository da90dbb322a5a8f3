"""What every task builds on: :class:`EvalSample` (one question) and :class:`Task` (read, score, aggregate)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from vlmkit.evaluation.tasks.rows import get_field, image_path, sample_id

SHORT_ANSWER = "\nAnswer the question using a single word or phrase."
"""LLaVA-1.5's prompt suffix for short-answer benchmarks (VQAv2, GQA, POPE, TextVQA, DocVQA)."""

Metrics = dict[str, Any]


@dataclass
class EvalSample:
    """One evaluation question: its id, prompt text, image (path string, encoded bytes, PIL image or None) and
    reference."""

    id: str
    prompt: str
    image: Any
    reference: dict[str, Any] = field(default_factory=dict)
    where: str = ""
    """``file:line`` (or another origin) for error messages."""
    history: tuple[tuple[str, str], ...] = ()
    """Earlier (question, answer) turns about the same image: the prompt is then asked as a later turn."""

    def conversation(self) -> list[dict[str, Any]]:
        """The conversation in content-parts form: the image (if any) in the first user turn, then the earlier
        turns of ``history``, then the prompt as the last user turn."""
        questions = [q for q, _ in self.history] + [self.prompt]
        answers = [a for _, a in self.history]
        messages: list[dict[str, Any]] = []
        for i, question in enumerate(questions):
            content: list[dict[str, Any]] = []
            if i == 0 and self.image is not None:
                content.append({"type": "image", "image": self.image})
            content.append({"type": "text", "text": question})
            messages.append({"role": "user", "content": content})
            if i < len(answers):
                messages.append({"role": "assistant", "content": answers[i]})
        return messages


def mean(values: Sequence[float]) -> float:
    """The mean, 0 for no values."""
    return sum(values) / len(values) if values else 0.0


def grouped_accuracy(scores: Sequence[float], groups: Sequence[str | None]) -> Metrics:
    """``accuracy`` and ``n``, plus ``by_group`` (in order of first occurrence) when any group is set."""
    out: Metrics = {"accuracy": mean(scores), "n": len(scores)}
    names = [g for g in dict.fromkeys(groups) if g is not None]
    if names:
        out["by_group"] = {g: mean([s for s, h in zip(scores, groups, strict=True) if h == g]) for g in names}
    return out


class Task:
    """Base class: subclasses implement :meth:`read` and :meth:`score`, and :meth:`aggregate` and
    :meth:`summary` unless accuracy (per ``reference["group"]``) is the metric. ``name`` is set when the class
    is registered (:func:`~vlmkit.evaluation.tasks.register_task`)."""

    name: ClassVar[str] = ""
    default_suffix: ClassVar[str] = ""

    def __init__(self, prompt_suffix: str | None = None) -> None:
        self.prompt_suffix = self.default_suffix if prompt_suffix is None else prompt_suffix

    def read(self, row: dict[str, Any], where: str, image_root: Path) -> EvalSample:
        """Validate one data row and turn it into a sample; raises DataError naming ``where``."""
        raise NotImplementedError

    def read_rows(self, rows: Sequence[tuple[str, dict[str, Any]]], image_root: Path) -> list[EvalSample]:
        """All ``(where, row)`` rows of a source as samples: one :meth:`read` each, unless the task makes
        several samples of a row or needs to see every row first (MMBench's CircularEval)."""
        return [self.read(row, where, image_root) for where, row in rows]

    def score(self, sample: EvalSample, prediction: str) -> dict[str, Any]:
        """Per-sample score: ``{"score": float, ...}`` plus whatever was parsed from the answer."""
        raise NotImplementedError

    def aggregate(self, samples: Sequence[EvalSample], predictions: Sequence[str]) -> Metrics:
        """Nested metrics over all samples (predictions in the same order)."""
        return grouped_accuracy(
            [self.score(s, p)["score"] for s, p in zip(samples, predictions, strict=True)],
            [s.reference.get("group") for s in samples],
        )

    def summary(self, metrics: Metrics) -> dict[str, Any]:
        """The headline numbers of ``metrics``, label → value, in display order."""
        return {"accuracy": metrics["accuracy"]}

    def _question(self, row: dict[str, Any], where: str, keys: Sequence[str] = ("question",)) -> str:
        return get_field(row, keys, where) + self.prompt_suffix

    def _qa_sample(self, row: dict[str, Any], where: str, image_root: Path, reference: dict[str, Any]) -> EvalSample:
        """A question-about-an-image sample: id, question (+ suffix), image and the task's reference."""
        return EvalSample(
            sample_id(row, where), self._question(row, where), image_path(row, where, image_root), reference, where
        )

    @staticmethod
    def _group(row: dict[str, Any], keys: Sequence[str]) -> str | None:
        """The first of ``keys`` present in ``row``, as the sample's reporting group."""
        return next((str(row[k]) for k in keys if row.get(k) is not None), None)
