"""Reading the task files: JSONL records, and the loader lm-eval calls (`custom_dataset`)."""

from __future__ import annotations

import json
from pathlib import Path

# absolute: lm-eval loads this file by path (`!function records.load_split`), outside the package
from ifprune_mlx.errors import IFPruneError

TASK_DIR = Path(__file__).resolve().parent


class TaskDataError(IFPruneError, ValueError):
    """A task data file is missing or is not one JSON object per line."""


def read_records(data_file: str | Path) -> list[dict]:
    """The records of a JSONL file: a bare file name is a task file of this folder, anything
    with a directory part ("./x.jsonl", "data/x.jsonl") a path."""
    path = Path(data_file)
    if str(data_file) == path.name:
        path = TASK_DIR / path
    if not path.is_file():
        raise TaskDataError(f"task data file {path} not found; the task files are "
                            f"{sorted(p.name for p in TASK_DIR.glob('*.jsonl'))} (reinstall ifprune-mlx "
                            f"if one is missing); give any other file with its directory")
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise TaskDataError(f"{path}:{number} is not JSON ({e}); expected one record per line") from None
        if not isinstance(record, dict):
            raise TaskDataError(f"{path}:{number} is a {type(record).__name__}; expected a JSON object")
        records.append(record)
    return records


def load_split(data_file: str, split: str = "test", **_metadata):
    """lm-eval's `custom_dataset` hook: the file as a one-split DatasetDict, read locally
    (no hub access, no datasets cache). lm-eval passes the task's metadata too; it is unused."""
    import datasets

    return datasets.DatasetDict({split: datasets.Dataset.from_list(read_records(data_file))})
