"""The ShapesWorld suite: every task type of :mod:`vlmkit.data.tasks` on the held-out test split.

Questions are the canonical ones of :func:`vlmkit.data.tasks.eval_items` (the same items ``vlmkit data
export-eval`` writes), asked without any prompt suffix, exactly as the built-in model was trained. Scoring:

- ``exist``: POPE (LLaVA parsing), F1 and the other metrics per category;
- ``attribute`` (colour of a shape, shape of a colour, object in a cell), ``position``, ``count``, ``text``:
  exact match against the accepted answers after VQA normalisation (lower-case, punctuation, number words to
  digits, articles dropped), so ``"A large red circle."`` matches ``large red circle`` and ``three`` matches
  ``3``;
- ``grounding``: the ``[x1, y1, x2, y2]`` pixel answer parsed with :func:`~vlmkit.evaluation.metrics.parse_box`,
  accuracy at IoU ≥ 0.5 and mean IoU;
- ``caption``: whether the caption names exactly the right set of objects (every ``[size] colour shape``
  mention parsed; the set of colour/shape pairs must equal the scene's and every stated size must be right),
  object precision/recall, and BLEU/ROUGE-L/CIDEr against the reference paraphrases.

``blank_images`` replaces every image by a blank one of the same size and background colour: the ablation
that shows how much of a score comes from the image rather than from language priors.

``later_turns`` asks the same questions as the 2nd to 5th turn of a conversation about the image (cycling
through the positions): the earlier turns are other questions of the same scene with their gold answers, the
image given once, in the first user turn, as users write it.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator, Sequence
from typing import Any

from PIL import Image

from vlmkit.data.shapes import COLOURS, SHAPE_PLURALS, SHAPES, SIZES, Scene
from vlmkit.data.tasks import POPE_CATEGORIES, EvalItem
from vlmkit.errors import ConfigError
from vlmkit.evaluation.metrics import (
    binary_metrics,
    caption_metrics,
    grounding_metrics,
    iou,
    parse_box,
    pope_parse,
    vqa_normalize_answer,
)
from vlmkit.evaluation.tasks import EvalSample, Metrics, Task
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


class ShapesWorldSuite(Task):
    """All ShapesWorld task types at once; samples come from :func:`iter_suite_samples`, not from a file."""

    name = "shapesworld"

    def read(self, row: dict[str, Any], where: str, image_root: Any) -> EvalSample:
        raise ConfigError("the ShapesWorld suite generates its own samples; run it with evaluate_suite")

    def score(self, sample: EvalSample, prediction: str) -> dict[str, Any]:
        ref = sample.reference
        task = ref["task"]
        if task == "exist":
            parsed = pope_parse(prediction)
            return {"score": float(parsed == ref["label"]), "parsed": parsed}
        if task == "grounding":
            box = parse_box(prediction, *ref["size"])
            return {"score": 0.0 if box is None else iou(box, ref["bbox"]), "box": None if box is None else list(box)}
        if task == "caption":
            return _caption_score(prediction, ref["objects"])
        pred = vqa_normalize_answer(prediction)
        return {"score": float(any(pred == vqa_normalize_answer(a) for a in ref["answers"]))}

    def aggregate(self, samples: Sequence[EvalSample], predictions: Sequence[str]) -> Metrics:
        by_task: dict[str, list[tuple[EvalSample, str, dict[str, Any]]]] = {t: [] for t in SUITE_TASKS}
        for s, p in zip(samples, predictions, strict=True):
            by_task.setdefault(s.reference["task"], []).append((s, p, self.score(s, p)))
        metrics: Metrics = {}
        for task, rows in by_task.items():
            if rows:
                metrics[task] = _aggregate_task(task, rows)
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


def _aggregate_task(task: str, rows: list[tuple[EvalSample, str, dict[str, Any]]]) -> Metrics:
    scores = [r[2]["score"] for r in rows]
    n = len(rows)
    if task == "exist":
        preds = [r[2]["parsed"] for r in rows]
        labels = [r[0].reference["label"] for r in rows]
        out: Metrics = {"overall": binary_metrics(preds, labels)}
        for category in POPE_CATEGORIES:
            idx = [i for i, r in enumerate(rows) if r[0].reference["category"] == category]
            if idx:
                out[category] = binary_metrics([preds[i] for i in idx], [labels[i] for i in idx])
        return out
    if task == "grounding":
        return grounding_metrics([None if r[2]["box"] is None else r[2]["score"] for r in rows])
    if task == "caption":
        named, correct, truth = (sum(r[2][k] for r in rows) for k in ("named", "correct", "truth"))
        out = {
            "objects_exact": sum(scores) / n,
            "object_precision": correct / named if named else 0.0,
            "object_recall": correct / truth if truth else 0.0,
        }
        out.update(caption_metrics([r[1] for r in rows], [r[0].reference["answers"] for r in rows]))
        return out
    out = {"accuracy": sum(scores) / n, "n": n}
    if task == "attribute":
        kinds = [r[0].reference["kind"] for r in rows]
        out["by_kind"] = {
            k: sum(r[2]["score"] for r, kind in zip(rows, kinds, strict=True) if kind == k) / kinds.count(k)
            for k in ATTRIBUTE_KINDS
            if k in kinds
        }
    return out
