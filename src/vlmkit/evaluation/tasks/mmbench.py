"""``mmbench``: MMBench with CircularEval: a question with k options is asked k times, its options rotated each
time (LLaVA's ``model_vqa_mmbench``: ``options[1:] + options[:1]``); it counts only if every pass is right. The
choice is extracted by VLMEvalKit's rules (``can_infer``: the option letter, then the option text), with no
LLM judge: an answer the rules can't read is wrong."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vlmkit.errors import ConfigError, DataError
from vlmkit.evaluation.metrics import can_infer
from vlmkit.evaluation.tasks.base import EvalSample, Metrics, Task, mean
from vlmkit.evaluation.tasks.mcq import MCQ_SUFFIX
from vlmkit.evaluation.tasks.registry import register_task
from vlmkit.evaluation.tasks.rows import get_field, image_path

LETTERS = "ABCDEFGHI"
COPY_STRIDE = 1_000_000
"""VLMEvalKit's layout of a file that already holds the circular copies: copy r of question i has index
``i + r × 1e6`` (``g_index = index % 1e6``)."""


def is_none(value: Any) -> bool:
    """LLaVA's ``is_none``: None, NaN, or the strings "nan" / "none" (any case) are missing values."""
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and value.strip().lower() in ("nan", "none")


def mmbench_options(row: dict[str, Any]) -> list[str]:
    """The option texts of columns A, B, C, ... up to the first missing one (LLaVA's ``get_options``)."""
    options = []
    for letter in LETTERS:
        if is_none(row.get(letter)):
            break
        options.append(str(row[letter]))
    return options


@register_task("mmbench")
class MmbenchTask(Task):
    """MMBench rows as its TSV (``index, question, hint, A, B, C, D, answer, category, l2-category, image``).

    ``circular``: ``"auto"`` (default: the rows as given when the file already holds VLMEvalKit's circular
    copies, any index ≥ 1e6; otherwise the rotations are made here), ``"generate"``, ``"given"`` or ``False``
    (vanilla: each row once)."""

    default_suffix = MCQ_SUFFIX

    def __init__(self, prompt_suffix: str | None = None, circular: str | bool = "auto") -> None:
        super().__init__(prompt_suffix)
        if circular not in ("auto", "generate", "given", False):
            raise ConfigError(f"mmbench: circular must be 'auto', 'generate', 'given' or False, got {circular!r}")
        self.circular = circular

    def _prompt(self, row: dict[str, Any], options: list[str], where: str) -> str:
        question = str(get_field(row, ("question",), where))
        if not is_none(row.get("hint")):
            question = f"{row['hint']}\n{question}"
        for letter, option in zip(LETTERS, options, strict=False):
            question += f"\n{letter}. {option}"
        return question + self.prompt_suffix

    def _sample(self, row: dict[str, Any], where: str, root: Path, group: int, rotation: int) -> EvalSample:
        options = mmbench_options(row)
        if len(options) < 2:
            raise DataError(f"{where}: an MMBench row needs options in columns A and B at least")
        answer = str(get_field(row, ("answer",), where)).strip().upper()
        if answer not in LETTERS[: len(options)]:
            raise DataError(f"{where}: 'answer' {answer!r} is not one of the options {LETTERS[: len(options)]}")
        target = LETTERS.index(answer)
        options = options[rotation:] + options[:rotation]
        index = int(row["index"]) if not isinstance(row.get("index"), bool) and "index" in row else None
        return EvalSample(
            f"{index}" if rotation == 0 else f"{index}#r{rotation}",
            self._prompt(row, options, where),
            image_path(row, where, root),
            {"options": options, "answer": LETTERS[(target - rotation) % len(options)], "group": group,
             "pass": rotation, "category": row.get("category"), "l2_category": row.get("l2-category",
             row.get("l2_category"))},
            where,
        )  # fmt: skip

    def read_rows(self, rows: Sequence[tuple[str, dict[str, Any]]], image_root: Path) -> list[EvalSample]:
        for where, row in rows:
            if not isinstance(row.get("index"), int | str) or not str(row["index"]).lstrip("-").isdigit():
                raise DataError(f"{where}: an MMBench row needs its integer 'index'")
        given = any(int(row["index"]) >= COPY_STRIDE for _, row in rows)
        mode = ("given" if given else "generate") if self.circular == "auto" else self.circular
        if mode == "generate" and given:
            raise DataError("this MMBench file already holds circular copies (index ≥ 1e6); use circular='given'")
        samples = []
        for where, row in rows:
            group = int(row["index"]) % COPY_STRIDE
            if mode == "generate":
                samples += [self._sample(row, where, image_root, group, r) for r in range(len(mmbench_options(row)))]
            else:
                samples.append(self._sample(row, where, image_root, group, 0))
        return samples

    def read(self, row: dict[str, Any], where: str, image_root: Path) -> EvalSample:
        return self.read_rows([(where, row)], image_root)[0]

    def score(self, sample: EvalSample, prediction: str) -> dict[str, Any]:
        choices = dict(zip(LETTERS, sample.reference["options"], strict=False))
        letter = can_infer(prediction, choices)
        return {"score": float(letter == sample.reference["answer"]), "parsed": letter}

    def aggregate(self, samples: Sequence[EvalSample], predictions: Sequence[str]) -> Metrics:
        groups: dict[int, list[float]] = {}
        first: dict[int, EvalSample] = {}
        unparsed = 0
        for sample, prediction in zip(samples, predictions, strict=True):
            scored = self.score(sample, prediction)
            unparsed += scored["parsed"] is None
            group = sample.reference["group"]
            groups.setdefault(group, []).append(scored["score"])
            if sample.reference["pass"] == 0 or group not in first:
                first[group] = sample
        right = {g: float(all(v == 1.0 for v in values)) for g, values in groups.items()}
        out: Metrics = {"circular_accuracy": mean(list(right.values())), "questions": len(groups), "n": len(samples),
                        "unparsed": unparsed}  # fmt: skip
        vanilla = [self.score(s, p)["score"] for s, p in zip(samples, predictions, strict=True)
                   if s.reference["pass"] == 0]  # fmt: skip
        out["vanilla_accuracy"] = mean(vanilla)
        for key in ("category", "l2_category"):
            names = [first[g].reference[key] for g in groups]
            if any(n is not None for n in names):
                out[f"by_{key}"] = {str(n): mean([right[g] for g in groups if first[g].reference[key] == n])
                                    for n in dict.fromkeys(names)}  # fmt: skip
        return out

    def summary(self, metrics: Metrics) -> dict[str, Any]:
        return {key: metrics[key] for key in ("circular_accuracy", "vanilla_accuracy", "unparsed")}
