"""Evaluation: field-standard metrics, task definitions and a resumable runner that needs only a predictor.

``evaluate(predictor, "pope", "pope.jsonl", out_dir="runs/pope")`` scores any model that can answer a batch of
chat conversations; ``evaluate_suite`` runs every ShapesWorld task type on the held-out test split.
"""

from vlmkit.evaluation.runner import Predictor, evaluate, evaluate_suite, format_table, read_predictions
from vlmkit.evaluation.tasks import EvalSample, Task, get_task, task_names

__all__ = [
    "EvalSample",
    "Predictor",
    "Task",
    "evaluate",
    "evaluate_suite",
    "format_table",
    "get_task",
    "read_predictions",
    "task_names",
]
