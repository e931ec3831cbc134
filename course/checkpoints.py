"""Training checkpoints that survive a kill: atomic, safetensors and JSON only (notebook 08).

``save_checkpoint`` writes ``checkpoint-<step>/`` beside the run: the trainable weights and the
optimizer's tensors as safetensors, the optimizer's settings, the step and the random state as
JSON. The folder appears whole or not at all (``course.files.atomic_directory``), so after a
kill the newest checkpoint folder is always complete, and ``--resume`` starts from it. Nothing
is pickled, so loading a checkpoint runs no code from the file.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from course.files import atomic_directory

_NAME = re.compile(r"^checkpoint-(\d+)$")
STATE, WEIGHTS, OPTIMIZER = "state.json", "trainable.safetensors", "optimizer.safetensors"


def _split_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer ``state_dict`` as flat tensors plus a JSON-able rest."""
    tensors, plain = {}, {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{key}"] = value.detach().contiguous().cpu()
            else:
                plain[f"{index}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "plain": plain}


def _join_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for flat, value in [*tensors.items(), *meta["plain"].items()]:
        index, _, key = flat.partition(".")
        state.setdefault(int(index), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(run_dir, step: int, weights: dict[str, torch.Tensor], optimizer, extra: dict | None = None,
                    keep: int = 2) -> Path:
    """Write ``run_dir/checkpoint-<step>`` atomically; keep only the newest ``keep`` checkpoints."""
    run_dir = Path(run_dir)
    target = run_dir / f"checkpoint-{step}"
    tensors, meta = _split_optimizer(optimizer.state_dict())
    with atomic_directory(target) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, tmp / WEIGHTS)
        save_file(tensors or {"empty": torch.zeros(0)}, tmp / OPTIMIZER)
        state = {"step": step, "optimizer": meta, "torch_rng": torch.get_rng_state().tolist(), **(extra or {})}
        (tmp / STATE).write_text(json.dumps(state), encoding="utf-8")
    for old in checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def checkpoints(run_dir) -> list[Path]:
    """Complete checkpoints in ``run_dir``, oldest first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run_dir.iterdir() if (m := _NAME.match(p.name)) and (p / STATE).is_file()]
    return [p for _, p in sorted(found)]


def load_checkpoint(path) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """(trainable weights, optimizer state_dict, state) of a checkpoint; restores torch's random state."""
    path = Path(path)
    state = json.loads((path / STATE).read_text(encoding="utf-8"))
    tensors = {k: v for k, v in load_file(path / OPTIMIZER).items() if k != "empty"}
    torch.set_rng_state(torch.tensor(state["torch_rng"], dtype=torch.uint8))
    return load_file(path / WEIGHTS), _join_optimizer(tensors, state["optimizer"]), state
