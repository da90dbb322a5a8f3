"""Teacher-generated instruction data: ask an OpenAI-compatible teacher about images, keep the answers that
pass validation as a LLaVA dataset (``vlmkit data teach``; docs/teacher-data.md).

``presets`` (the tasks), ``client`` (requests, retries, budget), ``validate`` (answers → turns or a rejection),
``store`` (the files and resuming), ``run`` (:func:`teach`).
"""

from vlmkit.data.teach.client import (
    BudgetExhausted,
    ClientConfig,
    Completion,
    TeacherClient,
    TeacherError,
    TeacherRefused,
    TeacherUnavailable,
    Usage,
)
from vlmkit.data.teach.presets import DEFAULT_TASKS, PRESETS, TaskPrompt, load_prompt_file, resolve_tasks
from vlmkit.data.teach.run import Outcome, TeachConfig, TeachSummary, item_key, teach
from vlmkit.data.teach.store import TeachStore
from vlmkit.data.teach.validate import REJECT_REASONS, Rejection, parse_conversation_text, validate_answer

__all__ = [
    "DEFAULT_TASKS", "PRESETS", "REJECT_REASONS", "BudgetExhausted", "ClientConfig", "Completion", "Outcome",
    "Rejection", "TaskPrompt", "TeachConfig", "TeachStore", "TeachSummary", "TeacherClient", "TeacherError",
    "TeacherRefused", "TeacherUnavailable", "Usage", "item_key", "load_prompt_file", "parse_conversation_text",
    "resolve_tasks", "teach", "validate_answer",
]  # fmt: skip
