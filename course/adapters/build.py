"""``python -m course adapters build``: retrain the shipped adapters from their recipes (notebook 01).

Each build is seeded (LoRA init and batch order), measures the recipe's score for
the base model and for the adapter, and writes the adapter folder atomically: it
is assembled in a temporary directory beside the target and renamed into place,
so a reader sees the old adapter or the new one, never half of either.

A folder holds PEFT's ``adapter_config.json`` and ``adapter_model.safetensors``,
``recipe.json`` (the recipe, compared with ``RECIPES`` by the tests),
``scores.json`` (what the build measured) and a ``README.md`` for people.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import replace
from pathlib import Path

import torch

from course.adapters.recipes import RECIPES, Recipe
from course.files import atomic_directory

ADAPTERS_DIR = Path(__file__).resolve().parent


def adapter_path(name: str) -> Path:
    """The folder of the course's adapter ``name`` (``"addition"`` or ``"pirate"``).

    The ones shipped in the package, made for SmolLM2-135M-Instruct; or, when ``COURSE_ADAPTERS``
    names a folder, the ones there: adapters rebuilt for another base model (``COURSE_MODEL``) with
    ``python -m course adapters build --out FOLDER``.
    """
    if name not in RECIPES:
        raise KeyError(f"No shipped adapter called {name!r}; there are {sorted(RECIPES)}.")
    if os.environ.get("COURSE_ADAPTERS"):
        folder = Path(os.environ["COURSE_ADAPTERS"]).expanduser() / name
        if not (folder / "adapter_config.json").is_file():
            raise FileNotFoundError(
                f"COURSE_ADAPTERS={os.environ['COURSE_ADAPTERS']} has no adapter {name!r} ({folder} holds no "
                "adapter_config.json): build it with `python -m course adapters build --out "
                f"{os.environ['COURSE_ADAPTERS']}`, or unset COURSE_ADAPTERS to use the shipped ones.")
        return folder
    return ADAPTERS_DIR / name


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _versions() -> dict:
    import peft
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}


def train_adapter(recipe: Recipe, *, progress: bool = True, model=None, tokenizer=None):
    """Train ``recipe`` on a fresh base model; return (peft_model, tokenizer, scores)."""
    from peft import get_peft_model

    from course.models import load_base_model, load_tokenizer
    from course.train import train

    tokenizer = tokenizer or load_tokenizer()
    model = model or load_base_model(device="cpu", dtype=torch.float32, progress=progress)
    train_data, eval_data = recipe.data()
    base_score, base_replies = recipe.score(model, tokenizer, eval_data)
    torch.manual_seed(recipe.seed)  # LoRA's A is initialised from the global generator
    peft_model = get_peft_model(model, recipe.lora_config())
    history = train(
        peft_model,
        tokenizer,
        train_data,
        steps=recipe.steps,
        batch_size=recipe.batch_size,
        lr=recipe.lr,
        seed=recipe.seed,
        progress=progress,
        desc=f"adapter {recipe.name}",
    )
    adapter_score, adapter_replies = recipe.score(peft_model, tokenizer, eval_data)
    from course.generate import generate

    examples = []
    if recipe.examples:
        with peft_model.disable_adapter():
            before = generate(peft_model, tokenizer, list(recipe.examples), max_new_tokens=24)
        after = generate(peft_model, tokenizer, list(recipe.examples), max_new_tokens=24)
        examples = [{"prompt": p, "base": b, "adapter": a} for p, b, a in zip(recipe.examples, before, after, strict=True)]
    scores = {
        "metric": recipe.metric,
        "eval_examples": len(eval_data["prompt"]),
        "base": base_score,
        "adapter": adapter_score,
        "first_loss": history.losses[0],
        "final_loss": history.losses[-1],
        "train_seconds": round(history.seconds, 1),
        "device": str(next(peft_model.parameters()).device),
        "threads": torch.get_num_threads(),
        "versions": _versions(),
        "held_out_replies": [{"prompt": p, "base": b, "adapter": a} for p, b, a in zip(eval_data["prompt"][:4], base_replies, adapter_replies, strict=False)],
        "examples": examples,
    }
    return peft_model, tokenizer, scores


def _readme(recipe: Recipe, scores: dict, trainable: int) -> str:
    rows = "\n".join(
        f"| {key} | `{value}` |"
        for key, value in [
            ("base model", recipe.base_model),
            ("rank r", recipe.r),
            ("lora_alpha (scaling = alpha / r)", f"{recipe.lora_alpha} ({recipe.lora_alpha / recipe.r:g})"),
            ("target modules", ", ".join(recipe.target_modules)),
            ("trainable parameters", f"{trainable:,}"),
            ("steps x batch size", f"{recipe.steps} x {recipe.batch_size}"),
            ("learning rate (AdamW)", recipe.lr),
            ("seed", recipe.seed),
        ]
    )
    if recipe.task == "addition":
        data = (
            f"{recipe.n_train} two-digit additions from `course.data.addition_pairs(seed={recipe.seed})`, "
            "chat template, loss on the answer tokens only."
        )
    else:
        data = (
            f"the {recipe.n_train} question/answer pairs of `course.adapters.recipes.PLAIN_ANSWERS`, "
            "each answer rewritten by `course.adapters.recipes.pirate()`; chat template, loss on the answer tokens only."
        )
    examples = "\n".join(
        f"| {e['prompt']} | {e['base']!r} | {e['adapter']!r} |".replace("\n", " ") for e in scores["examples"]
    )
    return f"""# `{recipe.name}` LoRA adapter

{recipe.description}

Built by `python -m course adapters build {recipe.name}` (code: `course/adapters/`);
`recipe.json` is the recipe, `scores.json` what the build measured. Load it with

```python
from peft import PeftModel
from course.adapters import adapter_path
model = PeftModel.from_pretrained(base_model, adapter_path("{recipe.name}"), adapter_name="{recipe.name}")
```

## Recipe

| setting | value |
| --- | --- |
{rows}

Data: {data}

## Measured

Metric: {scores['metric']}, on {scores['eval_examples']} held-out prompts.

| model | score |
| --- | --- |
| base model | {scores['base']:.3f} |
| base model + this adapter | {scores['adapter']:.3f} |

Training loss {scores['first_loss']:.3f} -> {scores['final_loss']:.3f} in {scores['train_seconds']} s
({scores['device']}, {scores['threads']} threads, torch {scores['versions']['torch']}, peft {scores['versions']['peft']}).

## Replies (greedy, 24 new tokens)

| prompt | base model | with the adapter |
| --- | --- | --- |
{examples}
"""


def _sort_target_modules(config_path: Path) -> None:
    """PEFT writes target_modules from a set, in an order that changes from run to run; fix it."""
    config = json.loads(config_path.read_text())
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def build(
    name: str,
    *,
    steps: int | None = None,
    progress: bool = True,
    out_dir: Path | str | None = None,
    overrides: dict | None = None,
) -> Path:
    """Train the adapter ``name`` from its recipe and write its folder atomically; return the folder.

    ``steps`` and ``overrides`` (recipe fields, e.g. ``{"n_eval": 4}``) change the
    recipe for a quick try; ``recipe.json`` then records the recipe actually used.
    """
    if name not in RECIPES:
        raise KeyError(f"No adapter recipe called {name!r}; there are {sorted(RECIPES)}.")
    recipe = replace(RECIPES[name], **(overrides or {}))
    if os.environ.get("COURSE_MODEL"):  # trained on another base model: say which
        recipe = replace(recipe, base_model=os.environ["COURSE_MODEL"])
    if steps is not None:
        recipe = replace(recipe, steps=steps)
    out_dir = Path(out_dir) if out_dir is not None else ADAPTERS_DIR
    target = out_dir / name
    with atomic_directory(target) as tmp:
        peft_model, _, scores = train_adapter(recipe, progress=progress)
        peft_model.peft_config["default"].base_model_name_or_path = recipe.base_model
        peft_model.save_pretrained(tmp)  # adapter_config.json + adapter_model.safetensors
        _sort_target_modules(tmp / "adapter_config.json")
        trainable = peft_model.get_nb_trainable_parameters()[0]
        scores["trainable_parameters"] = trainable
        scores["safetensors_sha256"] = sha256(tmp / "adapter_model.safetensors")
        (tmp / "recipe.json").write_text(json.dumps(recipe.to_dict(), indent=2) + "\n")
        (tmp / "scores.json").write_text(json.dumps(scores, indent=2) + "\n")
        (tmp / "README.md").write_text(_readme(recipe, scores, trainable))  # replaces PEFT's model card
        for file in tmp.iterdir():
            file.chmod(0o644)  # the package's files are for everyone to read
    return target


def build_all(names=None, steps: int | None = None, progress: bool = True, out_dir=None, overrides=None) -> dict:
    """Build the named adapters (default: all of ``RECIPES``); return {name: folder}.

    Prints a line per adapter with its scores and seconds.
    """
    names = list(names or RECIPES)
    unknown = [n for n in names if n not in RECIPES]
    if unknown:
        raise SystemExit(f"Unknown adapter(s) {unknown}; choose from {sorted(RECIPES)}.")
    written = {}
    for name in names:
        start = time.perf_counter()
        path = build(name, steps=steps, progress=progress, out_dir=out_dir, overrides=overrides)
        scores = json.loads((path / "scores.json").read_text())
        print(
            f"{name}: base {scores['base']:.3f} -> adapter {scores['adapter']:.3f} "
            f"({time.perf_counter() - start:.0f} s) -> {path}",
            flush=True,
        )
        written[name] = path
    return written
