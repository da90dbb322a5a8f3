"""Evaluation tasks: how a data row becomes a prompt, how one answer is scored, how scores aggregate.

Each task reads one row of a source (a JSONL line, a parquet or datasets row; formats in ``docs/evaluation.md``),
turns it into an
:class:`EvalSample` (id, prompt, image, reference), scores one prediction (``{"score": float, ...}``, written to
``predictions.jsonl``) and aggregates all predictions into nested metrics plus a flat ``summary`` of headline
numbers. Tasks are looked up by exact name with :func:`get_task`.

One module per task family (:mod:`~vlmkit.evaluation.tasks.pope`, :mod:`~vlmkit.evaluation.tasks.vqa`,
:mod:`~vlmkit.evaluation.tasks.grounding`, :mod:`~vlmkit.evaluation.tasks.caption`,
:mod:`~vlmkit.evaluation.tasks.mcq`, :mod:`~vlmkit.evaluation.tasks.mme`, :mod:`~vlmkit.evaluation.tasks.mmbench`,
:mod:`~vlmkit.evaluation.tasks.chartqa`, :mod:`~vlmkit.evaluation.tasks.choice`), each class registered in
:data:`TASKS` with ``@register_task("name")``; importing this package imports, and so registers, the built-in
ones, in the order :func:`task_names` lists them.
"""

from vlmkit.evaluation.tasks.base import SHORT_ANSWER, EvalSample, Metrics, Task
from vlmkit.evaluation.tasks.registry import TASKS, get_task, register_task, task_names

# isort: off
from vlmkit.evaluation.tasks.pope import PopeTask
from vlmkit.evaluation.tasks.vqa import DocVqaTask, GqaTask, TextVqaTask, VqaTask
from vlmkit.evaluation.tasks.grounding import GROUNDING_PROMPT, GroundingTask
from vlmkit.evaluation.tasks.caption import CAPTION_PROMPT, CaptionTask
from vlmkit.evaluation.tasks.mcq import MCQ_SUFFIX, McqTask
from vlmkit.evaluation.tasks.mme import MmeTask
from vlmkit.evaluation.tasks.mmbench import MmbenchTask
from vlmkit.evaluation.tasks.chartqa import ChartQaTask
from vlmkit.evaluation.tasks.choice import MmstarTask, SeedBenchTask

# isort: on

__all__ = [
    "CAPTION_PROMPT",
    "GROUNDING_PROMPT",
    "MCQ_SUFFIX",
    "SHORT_ANSWER",
    "TASKS",
    "CaptionTask",
    "ChartQaTask",
    "DocVqaTask",
    "EvalSample",
    "GqaTask",
    "GroundingTask",
    "McqTask",
    "Metrics",
    "MmbenchTask",
    "MmeTask",
    "MmstarTask",
    "PopeTask",
    "SeedBenchTask",
    "Task",
    "TextVqaTask",
    "VqaTask",
    "get_task",
    "register_task",
    "task_names",
]
