"""Training data for ``python -m course finetune`` (notebook 08): the course task, or yours.

``--data_path`` takes, in this order:

- nothing: the course task, two-digit addition (``course.data.addition_splits``);
- a ``.json`` file (a list of records) or a ``.jsonl`` file (one record per line);
- a folder written by ``datasets``' ``save_to_disk`` (a ``Dataset``, or a ``DatasetDict``
  whose ``train`` split is used and whose ``validation``/``test`` split, if any, is held out);
- a hub data set id, when the hub can be reached.

A record is a question and its answer in one of three shapes: ``prompt`` and ``answer``;
``instruction`` and ``output`` (with an optional ``input``, appended to the instruction, as
in Alpaca-style files); or ``messages``, a chat whose last message is the assistant's answer.
Every record is checked before training starts; a bad one is named by its line.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SHAPES = "`prompt` and `answer`, `instruction` and `output` (optional `input`), or `messages` (a chat)"


class DataError(ValueError):
    """The data cannot be used; the message names the file, the line and the fix."""


def to_example(record, where: str) -> dict:
    """``{"prompt", "answer"}`` from a record of any accepted shape, or ``DataError`` naming ``where``."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: a record must be a JSON object with {SHAPES}; got {type(record).__name__}.")
    if "prompt" in record or "answer" in record:
        prompt, answer = record.get("prompt"), record.get("answer")
        missing = "answer" if "prompt" in record else "prompt"
    elif "instruction" in record or "output" in record:
        prompt, answer = record.get("instruction"), record.get("output")
        missing = "output" if "instruction" in record else "instruction"
        if prompt is not None and record.get("input"):
            prompt = f"{prompt}\n\n{record['input']}"
    elif "messages" in record:
        messages = record["messages"]
        ok = (isinstance(messages, list) and len(messages) >= 2 and all(isinstance(m, dict) for m in messages)
              and messages[-1].get("role") == "assistant")
        if not ok:
            raise DataError(f"{where}: `messages` must be a list of chat messages ending with the assistant's answer.")
        user = [m for m in messages[:-1] if m.get("role") == "user"]
        if not user:
            raise DataError(f"{where}: `messages` has no user message before the assistant's answer.")
        prompt, answer, missing = user[-1].get("content"), messages[-1].get("content"), "content"
    else:
        raise DataError(f"{where}: the record has fields {sorted(record)}; it needs {SHAPES}.")
    if prompt is None or answer is None:
        raise DataError(f"{where}: the record has no `{missing}`; it needs {SHAPES}.")
    if not isinstance(prompt, str) or not isinstance(answer, str) or not prompt.strip() or not answer.strip():
        raise DataError(f"{where}: the question and the answer must be non-empty strings.")
    return {"prompt": prompt, "answer": answer}


def _read_json_file(path: Path) -> list[dict]:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        examples = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path.name} line {number}: not valid JSON ({exc.msg}).") from None
            examples.append(to_example(record, f"{path.name} line {number}"))
        return examples
    try:
        records = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path.name} line {exc.lineno}: not valid JSON ({exc.msg}).") from None
    if not isinstance(records, list):
        raise DataError(f"{path.name}: a .json file must hold a list of records (or use .jsonl, one per line).")
    return [to_example(r, f"{path.name} record {i}") for i, r in enumerate(records, 1)]


def _from_datasets(data) -> tuple[list[dict], list[dict] | None]:
    from datasets import DatasetDict

    held_out = None
    if isinstance(data, DatasetDict):
        if "train" not in data:
            raise DataError(f"The data set has splits {sorted(data)} but no `train` split.")
        for name in ("validation", "test"):
            if name in data:
                held_out = [to_example(r, f"{name} row {i}") for i, r in enumerate(data[name], 1)]
                break
        data = data["train"]
    return [to_example(r, f"row {i}") for i, r in enumerate(data, 1)], held_out


def load_examples(data_path: str | None, val_set_size: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(train, held-out) lists of ``{"prompt", "answer"}``; the held-out part has ``val_set_size`` rows
    (taken from the data, seeded, unless the data has its own validation split)."""
    if val_set_size < 0:
        raise DataError(f"--val_set_size must be 0 or more, got {val_set_size}.")
    if data_path is None:
        from course.data import addition_splits

        splits = addition_splits(n_eval=max(val_set_size, 1))
        held_out = [{"prompt": p, "answer": a} for p, a in zip(splits["eval"]["prompt"], splits["eval"]["answer"], strict=True)]
        train = [{"prompt": p, "answer": a} for p, a in zip(splits["train"]["prompt"], splits["train"]["answer"], strict=True)]
        return train, held_out[:val_set_size]
    path = Path(data_path).expanduser()
    held_out = None
    if path.is_file():
        if path.suffix not in (".json", ".jsonl"):
            raise DataError(f"--data_path {path}: a data file must be .json or .jsonl (or a folder saved with "
                            "datasets' save_to_disk).")
        examples = _read_json_file(path)
    elif path.is_dir():
        from datasets import load_from_disk

        try:
            data = load_from_disk(str(path))
        except FileNotFoundError as exc:
            raise DataError(f"--data_path {path} is a folder but not a data set saved with datasets' "
                            f"save_to_disk ({exc}).") from None
        examples, held_out = _from_datasets(data)
    elif data_path.startswith((".", "/", "~")) or data_path.endswith((".json", ".jsonl")):
        raise DataError(f"--data_path {path}: no such file or folder.")
    else:
        from course.models import hub_reachable

        if not hub_reachable():
            raise DataError(f"--data_path {data_path!r} is not a local file or folder, and the hub cannot be "
                            "reached (offline) to download it as a data set id. Pass a .json/.jsonl file or a "
                            "folder saved with datasets' save_to_disk.")
        from datasets import load_dataset

        examples, held_out = _from_datasets(load_dataset(data_path))
    if not examples:
        raise DataError(f"--data_path {data_path}: no records.")
    if held_out is None:
        if val_set_size >= len(examples):
            raise DataError(f"--val_set_size {val_set_size} leaves nothing to train on: the data has "
                            f"{len(examples)} records.")
        order = list(range(len(examples)))
        random.Random(seed).shuffle(order)
        held_out = [examples[i] for i in order[:val_set_size]]
        examples = [examples[i] for i in sorted(order[val_set_size:])]
    return examples, held_out[:val_set_size]
