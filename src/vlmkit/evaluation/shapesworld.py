"""The ShapesWorld suite: every task type of :mod:`vlmkit.data.tasks` on the held-out test split.

Questions are the canonical ones of :func:`vlmkit.data.tasks.eval_items` (the same items ``vlmkit data
export-eval`` writes), asked without any prompt suffix, exactly as the built-in model was trained. Scoring:

- ``exist``: the ``pope`` task (LLaVA parsing), F1 and the other metrics per category;
- ``attribute`` (colour of a shape, shape of a colour, object in a cell), ``position``, ``count``, ``text``:
  exact match against the accepted answers after VQA normalisation (:class:`ExactAnswer`: lower-case,
  punctuation, number words to digits, articles dropped), so ``"A large red circle."`` matches
  ``large red circle`` and ``three`` matches ``3``;
- ``grounding``: the ``grounding`` task (boxes not rounded): the ``[x1, y1, x2, y2]`` pixel answer parsed with
  :func:`~vlmkit.evaluation.metrics.parse_box`, accuracy at IoU ≥ 0.5 and mean IoU;
- ``caption``: whether the caption names exactly the right set of objects (every ``[size] colour shape``
  mention parsed; the set of colour/shape pairs must equal the scene's and every stated size must be right),
  object precision/recall (:class:`CaptionObjects`), and the ``caption`` task's BLEU/ROUGE-L/CIDEr against the
  reference paraphrases.

``blank_images`` replaces every image by a blank one of the same size and background colour: the ablation
that shows how much of a score comes from the image rather than from language priors.

``later_turns`` asks the same questions as the 2nd to 5th turn of a conversation about the image (cycling
through the positions): the earlier turns are other questions of the same scene with their gold answers, the
image given once, in the first user turn, as users write it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Iterator, Sequence
from typing import Any

from PIL import Image

from vlmkit.data.shapes import COLOURS, SHAPE_PLURALS, SHAPES, SIZES, Scene
from vlmkit.data.tasks import POPE_CATEGORIES, EvalItem
from vlmkit.errors import ConfigError
from vlmkit.evaluation.metrics import vqa_normalize_answer
from vlmkit.evaluation.tasks import EvalSample, Metrics, Task, get_task
from vlmkit.evaluation.tasks.base import mean
from vlmkit.processing.images import load_image

SUITE_TASKS = ("exist", "attribute", "position", "count", "grounding", "text", "caption")
ATTRIBUTE_KINDS = ("colour", "shape", "cell")
_SHAPE_WORDS = {**{s: s for s in SHAPES}, **{p: s for s, p in SHAPE_PLURALS.items()}}
_MENTION = re.compile(
    rf"\b(?:({'|'.join(SIZES)})\s+)?({'|'.join(COLOURS)})\s+({'|'.join(sorted(_SHAPE_WORDS, key=len, reverse=True))})\b"
)


def caption_objects(text: str) -> list[tuple[str | None, str, str]]:
    """Every ``[size] colour shape`` mention in a caption as ``(size or None, colour, shape)`` (plurals folded)."""
    return [(m.group(1), m.group(2), _SHAPE_WORDS[m.group(3)]) for m in _MENTION.finditer(text.lower())]


def _attribute_kind(item: EvalItem) -> str:
    if item.answer in COLOURS:
        return "colour"
    if item.answer in SHAPES:
        return "shape"
    return "cell"


def _blank(scene: Scene) -> Image.Image:
    return Image.new("RGB", (scene.image_size, scene.image_size), scene.background)


LATER_TURNS = (2, 3, 4, 5)
"""The turn positions a later-turn question is asked at, in rotation over a scene's items."""


def _history(items: Sequence[EvalItem], index: int, turn: int) -> tuple[tuple[str, str], ...]:
    """``turn - 1`` earlier turns for item ``index``: the scene's other short-answer items, in rotation."""
    target = items[index]
    others = [
        it for k, it in enumerate(items) if k != index and it.task != "caption" and it.question != target.question
    ]
    start = index % len(others) if others else 0
    picked = (others[start:] + others[:start])[: turn - 1]
    return tuple((it.question, it.answer) for it in picked)


def scene_samples(
    scene: Scene, png: bytes, items: Sequence[EvalItem], *, blank_images: bool = False, later_turns: bool = False
) -> list[EvalSample]:
    """The suite's samples for one test scene (its evaluation items), sharing one in-memory image."""
    image = _blank(scene) if blank_images else load_image(png)
    objects = [[o.size, o.colour, o.shape] for o in scene.objects]
    samples = []
    for index, item in enumerate(items):
        reference: dict[str, Any] = {"task": item.task, "answers": list(item.answers)}
        if item.task == "exist":
            reference.update(label=item.answer.lower(), category=item.category)
        elif item.task == "attribute":
            reference["kind"] = _attribute_kind(item)
        elif item.task == "grounding":
            reference.update(bbox=list(item.bbox or ()), size=[scene.image_size, scene.image_size])
        elif item.task == "caption":
            reference["objects"] = objects
        history: tuple[tuple[str, str], ...] = ()
        if later_turns:
            reference["turn"] = LATER_TURNS[index % len(LATER_TURNS)]
            history = _history(items, index, reference["turn"])
        sample = EvalSample(item.question_id, item.question, image, reference, f"scene {scene.id}", history)
        samples.append(sample)
    return samples


def iter_suite_samples(
    n: int, seed: int = 0, *, blank_images: bool = False, later_turns: bool = False
) -> Iterator[EvalSample]:
    """Samples of the first ``n`` test scenes of ``seed``, in order (asked as later turns with ``later_turns``)."""
    from vlmkit.data.synth import iter_eval_items

    for scene, png, items in iter_eval_items(n, seed):
        yield from scene_samples(scene, png, items, blank_images=blank_images, later_turns=later_turns)


def samples_digest(samples: Sequence[EvalSample]) -> str:
    """sha256 of the samples' ids, prompts and references: identifies the suite's data."""
    digest = hashlib.sha256()
    for s in samples:
        fields = [s.id, s.prompt, s.reference, *([s.history] if s.history else [])]
        digest.update(json.dumps(fields, sort_keys=True).encode() + b"\n")
    return digest.hexdigest()


def _caption_score(prediction: str, truth: Sequence[Sequence[str]]) -> dict[str, Any]:
    mentions = caption_objects(prediction)
    sizes = {(c, s): size for size, c, s in truth}
    named = {(c, s) for _, c, s in mentions}
    sizes_ok = all(size is None or sizes.get((c, s), size) == size for size, c, s in mentions)
    exact = named == set(sizes) and sizes_ok
    return {
        "score": float(exact),
        "objects": sorted(f"{c} {s}" for c, s in named),
        "correct": len(named & set(sizes)),
        "named": len(named),
        "truth": len(sizes),
    }


class ExactAnswer(Task):
    """Exact match after VQA normalisation against any of ``reference["answers"]``; with ``kinds``, also the
    accuracy per ``reference["kind"]`` (``by_kind``, in the order of ``kinds``)."""

    def __init__(self, kinds: Sequence[str] = ()) -> None:
        super().__init__()
        self.kinds = tuple(kinds)

    def score(self, sample: EvalSample, prediction: str) -> dict[str, Any]:
        pred = vqa_normalize_answer(prediction)
        return {"score": float(any(pred == vqa_normalize_answer(a) for a in sample.reference["answers"]))}

    def aggregate(self, samples: Sequence[EvalSample], predictions: Sequence[str]) -> Metrics:
        scores = [self.score(s, p)["score"] for s, p in zip(samples, predictions, strict=True)]
        out: Metrics = {"accuracy": mean(scores), "n": len(scores)}
        if self.kinds:
            kinds = [s.reference["kind"] for s in samples]
            by_kind = {k: [v for v, kind in zip(scores, kinds, strict=True) if kind == k] for k in self.kinds}
            out["by_kind"] = {k: mean(values) for k, values in by_kind.items() if values}
        return out


class CaptionObjects(Task):
    """Whether a caption names exactly the scene's objects (``reference["objects"]``), object precision and
    recall, and the ``caption`` task's BLEU/ROUGE-L/CIDEr against the paraphrases (``reference["answers"]``)."""

    def __init__(self) -> None:
        super().__init__()
        self.captions = get_task("caption")

    def score(self, sample: EvalSample, prediction: str) -> dict[str, Any]:
        return _caption_score(prediction, sample.reference["objects"])

    def aggregate(self, samples: Sequence[EvalSample], predictions: Sequence[str]) -> Metrics:
        scored = [self.score(s, p) for s, p in zip(samples, predictions, strict=True)]
        named, correct, truth = (sum(r[k] for r in scored) for k in ("named", "correct", "truth"))
        out: Metrics = {
            "objects_exact": mean([r["score"] for r in scored]),
            "object_precision": correct / named if named else 0.0,
            "object_recall": correct / truth if truth else 0.0,
        }
        references = [dataclasses.replace(s, reference={"captions": s.reference["answers"]}) for s in samples]
        out.update(self.captions.aggregate(references, predictions))
        return out


class ShapesWorldSuite(Task):
    """All ShapesWorld task types at once; samples come from :func:`iter_suite_samples`, not from a file.

    Each task type is scored by one task object (:attr:`parts`): the registered ``pope`` and ``grounding``
    tasks, :class:`ExactAnswer` and :class:`CaptionObjects`.
    """

    name = "shapesworld"

    def __init__(self) -> None:
        super().__init__()
        short = ExactAnswer()
        parts: dict[str, Task] = {
            "exist": get_task("pope"),
            "attribute": ExactAnswer(ATTRIBUTE_KINDS),
            "position": short,
            "count": short,
            "grounding": get_task("grounding", box_decimals=None),
            "text": short,
            "caption": CaptionObjects(),
        }
        self.parts = {task: parts[task] for task in SUITE_TASKS}

    def read(self, row: dict[str, Any], where: str, image_root: Any) -> EvalSample:
        raise ConfigError("the ShapesWorld suite generates its own samples; run it with evaluate_suite")

    def score(self, sample: EvalSample, prediction: str) -> dict[str, Any]:
        return self.parts[sample.reference["task"]].score(sample, prediction)

    def aggregate(self, samples: Sequence[EvalSample], predictions: Sequence[str]) -> Metrics:
        metrics: Metrics = {}
        for task, part in self.parts.items():
            rows = [(s, p) for s, p in zip(samples, predictions, strict=True) if s.reference["task"] == task]
            if rows:
                metrics[task] = part.aggregate([s for s, _ in rows], [p for _, p in rows])
        if "exist" in metrics:  # the categories in their fixed order
            exist = metrics["exist"]
            metrics["exist"] = {"overall": exist["overall"], **{c: exist[c] for c in POPE_CATEGORIES if c in exist}}
        return metrics

    def summary(self, metrics: Metrics) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if "exist" in metrics:
            m = metrics["exist"]
            out.update({f"existence F1 ({c})": m[c]["f1"] for c in POPE_CATEGORIES if c in m})
            out.update(
                {"existence accuracy": m["overall"]["accuracy"], "existence yes-ratio": m["overall"]["yes_ratio"]}
            )
        if "attribute" in metrics:
            out.update({f"attribute: {k}": v for k, v in metrics["attribute"]["by_kind"].items()})
        for task, label in (("position", "position"), ("count", "counting"), ("text", "text reading")):
            if task in metrics:
                out[f"{label} accuracy"] = metrics[task]["accuracy"]
        if "grounding" in metrics:
            out.update(
                {"grounding acc@0.5": metrics["grounding"]["acc@0.5"], "grounding mIoU": metrics["grounding"]["miou"]}
            )
        if "caption" in metrics:
            m = metrics["caption"]
            out.update({"caption: exact object set": m["objects_exact"], "caption CIDEr": m["cider"]})
        return out
