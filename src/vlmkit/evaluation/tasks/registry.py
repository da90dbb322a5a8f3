"""The task registry (:data:`TASKS`): task classes by exact name, listed in registration order."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from vlmkit.errors import ConfigError, RegistryError
from vlmkit.evaluation.tasks.base import Task
from vlmkit.registry import Registry

TaskClass = TypeVar("TaskClass", bound=type[Task])


TASKS: Registry[type[Task]] = Registry("evaluation task", ordered=True)
"""Task classes by name, listed in registration order (the built-ins' documented order); ``in`` checks a name,
:func:`get_task` builds one."""


def register_task(name: str) -> Callable[[TaskClass], TaskClass]:
    """Class decorator: register a :class:`Task` subclass as ``name``, which becomes its ``name``."""

    def decorator(cls: TaskClass) -> TaskClass:
        TASKS.add(name, cls)
        cls.name = name
        return cls

    return decorator


def task_names() -> list[str]:
    """The registered task names, in registration order."""
    return TASKS.names()


def get_task(name: str, **options: Any) -> Task:
    """The task registered as exactly ``name``, built with ``options`` (e.g. ``prompt_suffix``).

    Raises RegistryError listing the valid names, or ConfigError for an option the task does not take.
    """
    if name not in TASKS:
        raise RegistryError(f"unknown evaluation task {name!r}; choose from {', '.join(task_names())}")
    try:
        return TASKS.get(name)(**options)
    except TypeError as exc:
        raise ConfigError(f"task {name!r}: invalid option ({exc})") from exc
