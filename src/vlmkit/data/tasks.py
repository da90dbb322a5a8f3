"""Questions, answers and conversations from ShapesWorld ground truth.

Answers are short and canonical so exact match scores them: ``Yes``/``No``, a colour (``red``), a shape
(``circle``), a cell (``top left``), a digit count (``3``), an object (``large red circle``) or ``nothing``, a
word or ``none``, and for grounding a box ``[x1, y1, x2, y2]`` in integer pixels of the image (``x1, y1``
inclusive, ``x2, y2`` exclusive; see :mod:`vlmkit.data.shapes`). Each task has question templates: the first
is canonical (used for evaluation), the others are paraphrases drawn at random for training.

POPE-style existence negatives come in three categories: ``random`` (any absent colour/shape combination),
``popular`` (one of the :data:`POPULAR_TOP_K` absent combinations ranked most frequent by
:func:`vlmkit.data.shapes.popularity_ranking`) and ``adversarial`` (an absent combination sharing the colour or
the shape of a present object).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from vlmkit.data.shapes import CELLS, COLOURS, SHAPE_PLURALS, SHAPES, Box, Scene, popularity_ranking
from vlmkit.errors import ConfigError
from vlmkit.tokens import IMAGE_TOKEN

TASKS = ("caption", "exist", "attribute", "position", "count", "grounding", "text", "multiturn")
SINGLE_TURN_TASKS = TASKS[:-1]
TASK_WEIGHTS = {"caption": 0.15, "exist": 0.2, "attribute": 0.15, "position": 0.1, "count": 0.15,
                "grounding": 0.1, "text": 0.05, "multiturn": 0.1}  # fmt: skip
"""Relative frequency of each task in a synthetic dataset (renormalised over the selected tasks)."""
POPE_CATEGORIES = ("random", "popular", "adversarial")
POPULAR_TOP_K = 3
MULTITURN_TURNS = (2, 4)
BBOX_FORMAT = "[x1, y1, x2, y2]"

_NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_CELL_PHRASES = {"top left": "at the top left", "top": "at the top", "top right": "at the top right",
                 "left": "on the left", "center": "in the center", "right": "on the right",
                 "bottom left": "at the bottom left", "bottom": "at the bottom",
                 "bottom right": "at the bottom right"}  # fmt: skip

_TEMPLATES: dict[str, tuple[str, ...]] = {
    "caption": ("Describe the image.", "Describe every object in this image.",
                "What is in the picture? Describe all of it.", "Give a complete description of the scene."),
    "exist": ("Is there {a} {colour} {shape} in the image?", "Does the image contain {a} {colour} {shape}?",
              "Can you see {a} {colour} {shape} in the picture?", "Is {a} {colour} {shape} shown in the image?"),
    "colour_of": ("What colour is the {shape}?", "What is the colour of the {shape}?",
                  "Which colour does the {shape} have?"),
    "shape_of": ("What shape is the {colour} object?", "What is the shape of the {colour} object?",
                 "Which shape is {colour}?"),
    "cell": ("What is in the {cell} cell?", "What can you see in the {cell} cell of the grid?",
             "Which object is in the {cell} cell?"),
    "position": ("Where is the {colour} {shape}?", "In which cell is the {colour} {shape}?",
                 "Where is the {colour} {shape} located?"),
    "count_shape": ("How many {shapes} are there?", "How many {shapes} are in the image?", "Count the {shapes}."),
    "count_colour": ("How many {colour} objects are there?", "How many {colour} shapes are in the image?",
                     "Count the {colour} objects."),
    "count_all": ("How many objects are there?", "How many shapes are in the image?",
                  "Count the objects in the image."),
    "grounding": ("What is the bounding box of the {colour} {shape}? Answer as [x1, y1, x2, y2] in pixels.",
                  "Give the bounding box of the {colour} {shape} as [x1, y1, x2, y2] in pixels.",
                  "Locate the {colour} {shape} and give its bounding box [x1, y1, x2, y2] in pixels."),
    "text": ("What word is written in the image?", "Which word is written in the image?",
             "Read the word in the image."),
}  # fmt: skip


@dataclass(frozen=True)
class QA:
    """One question about a scene with its canonical answer and everything needed to score it."""

    task: str
    question: str
    answer: str
    answers: tuple[str, ...]
    """Every accepted form of the answer, canonical first."""
    kind: str | None = None
    """Sub-type: ``colour_of``/``shape_of``/``cell``, ``count_shape``/``count_colour``/``count_all``, or for
    existence ``positive``/``negative``."""
    category: str | None = None
    """POPE category of an existence question (random, popular, adversarial)."""
    bbox: Box | None = None
    expression: str | None = None


@dataclass(frozen=True)
class EvalItem:
    """One held-out evaluation question, as the evaluation exports write it."""

    question_id: str
    image_id: str
    task: str
    question: str
    answer: str
    answers: tuple[str, ...]
    category: str | None = None
    bbox: Box | None = None
    expression: str | None = None
    kind: str | None = None
    """The question's sub-type, as in :attr:`QA.kind`."""


def parse_tasks(spec: str | Iterable[str] | None) -> tuple[str, ...]:
    """Task names from ``"caption,exist"`` or a list; None means all. Raises ConfigError for unknown names."""
    if spec is None:
        return TASKS
    names = [n.strip() for n in (spec.split(",") if isinstance(spec, str) else spec) if n.strip()]
    unknown = [n for n in names if n not in TASKS]
    if unknown or not names:
        raise ConfigError(f"unknown task(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(TASKS)}")
    return tuple(dict.fromkeys(names))


def choose_task(rng: np.random.Generator, tasks: Iterable[str] = TASKS) -> str:
    """Draw one task name, weighted by :data:`TASK_WEIGHTS`."""
    names = tuple(tasks)
    weights = np.asarray([TASK_WEIGHTS[n] for n in names])
    return names[int(rng.choice(len(names), p=weights / weights.sum()))]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _template(key: str, rng: np.random.Generator | None, **fields: str) -> str:
    options = _TEMPLATES[key]
    text = options[0] if rng is None else options[int(rng.integers(len(options)))]
    return text.format(**fields)


def format_bbox(box: Box) -> str:
    """The grounding answer: ``[x1, y1, x2, y2]``."""
    return "[" + ", ".join(str(int(v)) for v in box) + "]"


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _object_phrase(obj: Any) -> str:
    return f"{_article(obj.size)} {obj.description} {_CELL_PHRASES[obj.cell]}"


def caption(scene: Scene) -> str:
    """The canonical caption: every object in grid order with size, colour, shape and place, then the word."""
    n = len(scene.objects)
    head = f"There {'is' if n == 1 else 'are'} {_NUMBER_WORDS[n]} object{'' if n == 1 else 's'}: "
    text = head + _join([_object_phrase(o) for o in scene.objects]) + "."
    if scene.word is not None:
        text += f' The word "{scene.word.text}" is written {_CELL_PHRASES[scene.word.cell]}.'
    return text


def caption_variants(scene: Scene, rng: np.random.Generator | None = None) -> list[str]:
    """The canonical caption first, then paraphrases (objects shuffled when ``rng`` is given)."""
    objects = list(scene.objects)
    if rng is not None:
        objects = [objects[i] for i in rng.permutation(len(objects))]
    phrases = [_object_phrase(o) for o in objects]
    n = len(objects)
    word = scene.word
    shows = "The image shows " + _join(phrases) + "."
    see = f"I can see {_NUMBER_WORDS[n]} object{'' if n == 1 else 's'}: " + _join(phrases) + "."
    where = " ".join(
        f"{_CELL_PHRASES[o.cell][0].upper()}{_CELL_PHRASES[o.cell][1:]} there is {_article(o.size)} {o.description}."
        for o in objects
    )
    if word is not None:
        shows += f' It also shows the word "{word.text}" {_CELL_PHRASES[word.cell]}.'
        see += f' The word "{word.text}" appears {_CELL_PHRASES[word.cell]}.'
        where += f' The word "{word.text}" is written {_CELL_PHRASES[word.cell]}.'
    return [caption(scene), shows, see, where]


def pope_candidates(scene: Scene, category: str) -> list[tuple[str, str]]:
    """The (colour, shape) combinations a negative existence question of ``category`` may ask about."""
    present = {(o.colour, o.shape) for o in scene.objects}
    absent = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present]
    if category == "random":
        return absent
    if category == "popular":
        ranked = [combo for combo in popularity_ranking() if combo not in present]
        return ranked[:POPULAR_TOP_K]
    if category == "adversarial":
        colours, shapes = {c for c, _ in present}, {s for _, s in present}
        return [(c, s) for c, s in absent if c in colours or s in shapes]
    raise ConfigError(f"unknown POPE category {category!r}; expected one of {', '.join(POPE_CATEGORIES)}")


def _pick(rng: np.random.Generator, items: list[Any]) -> Any:
    return items[int(rng.integers(len(items)))]


def ask_exist(
    scene: Scene, rng: np.random.Generator, *, positive: bool, category: str | None = None, canonical: bool = False
) -> QA:
    """A POPE-style existence question: about a present object, or a negative of ``category``."""
    if positive:
        obj = _pick(rng, list(scene.objects))
        colour, shape = obj.colour, obj.shape
    else:
        colour, shape = _pick(rng, pope_candidates(scene, category or "random"))
    question = _template("exist", None if canonical else rng, a=_article(colour), colour=colour, shape=shape)
    answer = "Yes" if positive else "No"
    return QA("exist", question, answer, (answer,), "positive" if positive else "negative", category)


def _ask_attribute(scene: Scene, rng: np.random.Generator, tpl: np.random.Generator | None) -> QA:
    shapes = [o.shape for o in scene.objects]
    colours = [o.colour for o in scene.objects]
    kinds = ["cell"]
    if any(shapes.count(s) == 1 for s in shapes):
        kinds.append("colour_of")
    if any(colours.count(c) == 1 for c in colours):
        kinds.append("shape_of")
    kind = _pick(rng, kinds)
    if kind == "colour_of":
        obj = _pick(rng, [o for o in scene.objects if shapes.count(o.shape) == 1])
        return QA("attribute", _template(kind, tpl, shape=obj.shape), obj.colour, (obj.colour,), kind)
    if kind == "shape_of":
        obj = _pick(rng, [o for o in scene.objects if colours.count(o.colour) == 1])
        return QA("attribute", _template(kind, tpl, colour=obj.colour), obj.shape, (obj.shape,), kind)
    word_cell = scene.word.cell if scene.word is not None else None
    cell = _pick(rng, [c for c in CELLS if c != word_cell])
    obj = scene.object_at(cell)
    answer = obj.description if obj is not None else "nothing"
    return QA("attribute", _template(kind, tpl, cell=cell), answer, (answer,), kind)


def _ask_count(scene: Scene, rng: np.random.Generator, tpl: np.random.Generator | None) -> QA:
    kind = _pick(rng, ["count_shape", "count_colour", "count_all"])
    if kind == "count_all":
        count, question = len(scene.objects), _template(kind, tpl)
    elif kind == "count_shape":
        present = rng.random() < 0.7
        shape = _pick(rng, [o.shape for o in scene.objects]) if present else _pick(rng, list(SHAPES))
        count = sum(o.shape == shape for o in scene.objects)
        question = _template(kind, tpl, shapes=SHAPE_PLURALS[shape])
    else:
        present = rng.random() < 0.7
        colour = _pick(rng, [o.colour for o in scene.objects]) if present else _pick(rng, list(COLOURS))
        count = sum(o.colour == colour for o in scene.objects)
        question = _template(kind, tpl, colour=colour)
    return QA("count", question, str(count), (str(count), _NUMBER_WORDS[count]), kind)


def ask(task: str, scene: Scene, rng: np.random.Generator, *, canonical: bool = False) -> QA:
    """One single-turn question of ``task`` about ``scene``; ``canonical`` uses the first template."""
    tpl = None if canonical else rng
    if task == "caption":
        variants = caption_variants(scene, rng)
        answer = variants[0] if canonical or rng.random() < 0.5 else _pick(rng, variants[1:])
        return QA("caption", _template("caption", tpl), answer, tuple(caption_variants(scene)))
    if task == "exist":
        positive = bool(rng.random() < 0.5)
        category = None if positive else _pick(rng, list(POPE_CATEGORIES))
        return ask_exist(scene, rng, positive=positive, category=category, canonical=canonical)
    if task == "attribute":
        return _ask_attribute(scene, rng, tpl)
    if task == "count":
        return _ask_count(scene, rng, tpl)
    if task in ("position", "grounding"):
        obj = _pick(rng, list(scene.objects))
        question = _template(task, tpl, colour=obj.colour, shape=obj.shape)
        if task == "position":
            return QA(task, question, obj.cell, (obj.cell,))
        answer = format_bbox(obj.bbox)
        return QA(task, question, answer, (answer,), bbox=obj.bbox, expression=f"the {obj.name}")
    if task == "text":
        answer = scene.word.text if scene.word is not None else "none"
        return QA(task, _template("text", tpl), answer, (answer,))
    raise ConfigError(f"unknown single-turn task {task!r}; choose from {', '.join(SINGLE_TURN_TASKS)}")


def conversation(
    scene: Scene,
    task: str,
    rng: np.random.Generator,
    tasks: Iterable[str] = TASKS,
    turns: tuple[int, int] = MULTITURN_TURNS,
) -> tuple[list[dict[str, str]], dict[str, Any]]:
    """Messages for one sample of ``task`` (the image marker opens the first user turn) and task metadata.

    ``multiturn`` asks ``turns[0]`` to ``turns[1]`` (default 2 to 4) distinct questions drawn from the other
    selected ``tasks`` (all single-turn tasks when none is selected).
    """
    if task == "multiturn":
        pool = [t for t in tasks if t != "multiturn"] or list(SINGLE_TURN_TASKS)
        count = int(rng.integers(turns[0], turns[1] + 1))
        qas: list[QA] = []
        for _ in range(count * 10):
            qa = ask(_pick(rng, pool), scene, rng)
            if all(qa.question != q.question for q in qas):
                qas.append(qa)
            if len(qas) == count:
                break
        meta: dict[str, Any] = {"turns": [qa.task for qa in qas]}
    else:
        qas = [ask(task, scene, rng)]
        meta = {"pope_category": qas[0].category} if task == "exist" and qas[0].category else {}
    messages = []
    for i, qa in enumerate(qas):
        prefix = f"{IMAGE_TOKEN}\n" if i == 0 else ""
        messages.append({"role": "user", "content": prefix + qa.question})
        messages.append({"role": "assistant", "content": qa.answer})
    return messages, meta


def eval_items(scene: Scene, rng: np.random.Generator) -> list[EvalItem]:
    """Held-out questions about one (test) scene, with canonical questions and gold answers.

    Per image: for each POPE category one positive and one negative existence question (so every category is
    half positive); one attribute, position and count question; a text question when a word is shown; one
    grounding question; and the caption with its reference paraphrases.
    """
    qas: list[QA] = []
    for category in POPE_CATEGORIES:
        for positive in (True, False):
            qas.append(ask_exist(scene, rng, positive=positive, category=category, canonical=True))
    qas += [ask(task, scene, rng, canonical=True) for task in ("attribute", "position", "count", "grounding")]
    if scene.word is not None:
        qas.append(ask("text", scene, rng, canonical=True))
    qas.append(ask("caption", scene, rng, canonical=True))
    return [
        EvalItem(f"{scene.id}-{k:02d}", scene.id, qa.task, qa.question, qa.answer, qa.answers, qa.category,
                 qa.bbox, qa.expression, qa.kind)
        for k, qa in enumerate(qas)
    ]  # fmt: skip
