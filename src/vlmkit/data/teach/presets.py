"""Task prompts for teacher data: the built-in presets and user prompt files.

A task says what the teacher is asked (``prompt``, optionally after a ``system`` message), what the dataset's
human turn says (``question``: a plain instruction, not the teacher's long brief), and how the answer is read
(``kind``): ``answer`` (the whole text is the reply) or ``conversation`` (the text is parsed into turns).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal

import yaml

from vlmkit.errors import ConfigError

Kind = Literal["answer", "conversation"]
KINDS: tuple[str, ...] = ("answer", "conversation")
DEFAULT_TASKS = ("detailed_description", "reasoning", "conversation")


@dataclass(frozen=True)
class TaskPrompt:
    """One teacher task."""

    name: str
    prompt: str
    """What the teacher is asked about the image."""
    question: str | None = None
    """The human turn written to the dataset for ``answer`` tasks (default: ``prompt``)."""
    kind: Kind = "answer"
    system: str | None = None
    """An optional system message sent before the prompt."""
    max_tokens: int = 512
    """The teacher's answer budget (``max_tokens`` of the request)."""

    def __post_init__(self) -> None:
        if not self.name or not all(c.isalnum() or c in "_-" for c in self.name):
            raise ConfigError(f"task name {self.name!r}: use letters, digits, '_' and '-' only")
        if self.kind not in KINDS:
            raise ConfigError(f"task {self.name!r}: kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise ConfigError(f"task {self.name!r}: the prompt is empty")
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ConfigError(f"task {self.name!r}: max_tokens must be a positive integer, got {self.max_tokens!r}")

    @property
    def human_turn(self) -> str:
        return (self.question or self.prompt).strip()

    def fingerprint(self) -> str:
        """A short hash of everything that shapes this task's records (resume refuses a changed task)."""
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


PRESETS: dict[str, TaskPrompt] = {
    task.name: task
    for task in (
        TaskPrompt(
            "detailed_description",
            "Describe this image in detail. Cover every object you can see: what it is, its colour, size and "
            "position, and how the objects relate to one another. Describe only what is visible.",
            question="Describe this image in detail.",
        ),
        TaskPrompt(
            "reasoning",
            "What can you conclude from this image? Answer with reasoning that goes beyond listing what is "
            "visible, and point to the details in the image that support each step.",
            question="What can you conclude from this image? Explain your reasoning.",
        ),
        TaskPrompt(
            "conversation",
            "Write a conversation of 2 to 4 exchanges between a person asking about this image and an assistant "
            "who can see it. Ask about the objects, their attributes, positions and counts, and answer only with "
            "what the image shows. Start each question on a new line with 'Question:' and each answer on a new "
            "line with 'Answer:'. Write nothing else.",
            kind="conversation",
        ),
        TaskPrompt(
            "car_design",
            "You are a car designer. Describe this car's design concisely: body type and proportions, surface "
            "treatment, lights, grille, wheels, colours, and any distinctive or futuristic details.",
            question="Describe this car's design.",
            max_tokens=120,  # short: such descriptions often feed a text encoder with a 77-token limit
        ),
    )
}
"""The built-in tasks: LLaVA's three kinds of instruction data, and a car-design brief."""

_FIELDS = tuple(f.name for f in fields(TaskPrompt) if f.name != "name")


def _task(name: str, spec: Any, where: str) -> TaskPrompt:
    if isinstance(spec, str):
        spec = {"prompt": spec}
    if not isinstance(spec, dict):
        raise ConfigError(f"{where}: task {name!r} must be a prompt string or a mapping, got {type(spec).__name__}")
    unknown = sorted(set(spec) - set(_FIELDS))
    if unknown:
        raise ConfigError(
            f"{where}: task {name!r}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(_FIELDS)}"
        )
    if "prompt" not in spec:
        raise ConfigError(f"{where}: task {name!r} has no 'prompt'")
    try:
        return TaskPrompt(name=str(name), **spec)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from exc


def load_prompt_file(path: str | Path) -> list[TaskPrompt]:
    """The tasks a prompt file defines: a ``.txt``/``.md`` file is one ``answer`` task named by its stem, whose
    prompt is the whole text; a ``.yaml``/``.yml``/``.json`` file maps task names to a prompt string or to
    ``{prompt, question, kind, system, max_tokens}``."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"prompt file {path}: cannot be read ({exc})") from exc
    if path.suffix.lower() in (".txt", ".md"):
        return [_task(path.stem, {"prompt": text.strip()}, str(path))]
    if path.suffix.lower() not in (".yaml", ".yml", ".json"):
        raise ConfigError(f"prompt file {path}: expected .txt, .md, .yaml, .yml or .json")
    try:
        data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise ConfigError(f"prompt file {path}: malformed ({exc})") from exc
    if not isinstance(data, dict) or not data:
        raise ConfigError(f"prompt file {path}: expected a mapping of task names to prompts")
    return [_task(str(name), spec, str(path)) for name, spec in data.items()]


def resolve_tasks(names: Sequence[str] | None, prompt_files: Iterable[str | Path] = ()) -> list[TaskPrompt]:
    """The tasks to run, in order: ``names`` among the presets and the prompt files' tasks (a file's task
    replaces a preset of the same name). Without names: the files' tasks, or else :data:`DEFAULT_TASKS`."""
    known = dict(PRESETS)
    from_files: list[str] = []
    for path in prompt_files:
        for task in load_prompt_file(path):
            if task.name in from_files:
                raise ConfigError(f"task {task.name!r} is defined by more than one prompt file")
            known[task.name] = task
            from_files.append(task.name)
    chosen = list(names) if names else from_files or list(DEFAULT_TASKS)
    unknown = [name for name in chosen if name not in known]
    if unknown:
        raise ConfigError(f"unknown task(s) {', '.join(unknown)}; expected one of {', '.join(known)}")
    if len(set(chosen)) != len(chosen):
        raise ConfigError(f"a task is named twice: {', '.join(chosen)}")
    return [known[name] for name in chosen]
