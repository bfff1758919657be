"""Offline evaluation tasks shipped with ifprune-mlx: lm-eval YAML configs over local JSONL.

Pass TASK_DIR to lm-eval as an include path (`TaskManager(include_path=TASK_DIR)`); the task
names are in TASKS. README.md in this folder describes the data and how it was written.
"""

from .records import TASK_DIR, TaskDataError, read_records

__all__ = ["TASK_DIR", "TASKS", "TaskDataError", "read_records"]

# task name -> its data file in TASK_DIR
TASKS = {
    "ifprune_ifeval_dev": "ifeval_dev.jsonl",
    "ifprune_ifeval_test": "ifeval_test.jsonl",
    "ifprune_exact_dev": "exact_dev.jsonl",
    "ifprune_exact_test": "exact_test.jsonl",
}
