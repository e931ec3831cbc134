"""The output folder of ``python -m course finetune``: claimed, checked, and continued only when asked (notebook 08).

A run claims ``--output_dir`` with a lock before anything else (a second run into it is refused,
naming the process that holds it), checks that it can write there and that there is room for the
adapter and its checkpoints, and refuses an earlier run's folder unless ``--resume`` (which refuses
flags that change the run's meaning, showing the differences) or ``--overwrite`` says what to do.
Data whose answers ``--cutoff_len`` cuts away entirely is refused before training.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

OURS = {"adapter_config.json", "adapter_model.safetensors", "finetune.json", "README.md", "olora-initial", "nola"}
FINISHED = ("adapter_config.json", "finetune.json")  # what a run that got to its end leaves
LOCK, OWNER = ".finetune.lock", ".finetune-owner.json"  # the claim on --output_dir, and who holds it
# Flags that change what a run computes: --resume refuses a value other than the run's own. The
# others (--max_steps, --num_epochs: how far; --eval_step, --save_step, --device, --use_compile)
# may change on resume.
SAME_ON_RESUME = ("method", "base_model", "data_path", "learning_rate", "batch_size", "cutoff_len", "val_set_size",
                  "quantize", "lora_r", "nola_num_basis", "lora_alpha", "lora_dropout", "lora_target_modules",
                  "seed")
KEEP_CHECKPOINTS = 2


class UsageError(ValueError):
    """A flag or the data is wrong; the message names it and says what to do."""


class TrainingError(RuntimeError):
    """Training went wrong (the loss stopped being a number); nothing was written as a result."""


def prepare_output(o: argparse.Namespace, *, claimed: bool = False) -> Path:
    """The run's folder: new or empty, or (with --resume / --overwrite) one of ours. Never somebody else's files."""
    from course.checkpoints import checkpoints

    if o.output_dir is None:
        o.output_dir = f"outputs/{o.method}-{time.strftime('%Y%m%d-%H%M%S')}"
    out = Path(o.output_dir)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--output_dir {out} is a file; name a folder.")
    if _launch_rank() == 0 and not claimed:
        _refuse_if_claimed(out)
    present = {p.name for p in out.iterdir() if not p.name.startswith(".")} if out.is_dir() else set()
    foreign = sorted(n for n in present if n not in OURS and not n.startswith("checkpoint-"))
    if foreign:
        raise UsageError(f"--output_dir {out} holds files that are not from this command ({', '.join(foreign[:5])}): "
                         "choose an empty or new folder.")
    if present and not (o.resume or o.overwrite):
        raise UsageError(f"--output_dir {out} holds an earlier run: add --resume to continue it, --overwrite to "
                         "replace it with a new one, or choose another folder.")
    if o.resume and not checkpoints(out) and present & set(FINISHED):
        raise UsageError(f"nothing to resume: --output_dir {out} holds a finished run that kept no checkpoint "
                         "(--save_step 0), so it cannot be continued. Use a new --output_dir, or --overwrite to "
                         "replace that run with a new one.")
    return out


def _launch_rank() -> int:
    """This process's rank under torchrun / accelerate (0 when run alone): rank 0 claims the folder."""
    return int(os.environ.get("RANK", "0"))


def _describe_owner(out: Path) -> str:
    try:
        owner = json.loads((out / OWNER).read_text(encoding="utf-8"))
        return f"process {owner['pid']} on {owner['host']}, started {owner['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that has not said who it is yet"


def _refuse_if_claimed(out: Path) -> None:
    """A run in progress in ``out`` is named at once (before its files are judged as an earlier run)."""
    from filelock import FileLock, Timeout

    if not (out / LOCK).is_file():
        return
    try:
        FileLock(str(out / LOCK), timeout=0).acquire().lock.release()
    except Timeout:
        raise UsageError(f"--output_dir {out} is in use by another fine-tuning run ({_describe_owner(out)}): wait "
                         "for it to finish, or choose another --output_dir.") from None
    except OSError:
        pass  # unreadable: claim_output says what is wrong


def claim_output(out: Path):
    """Claim ``out`` for this run: create it, prove it writable, take its lock (returned; release it at the end).

    A second run into the same folder is refused at once, naming the folder and the process that holds it.
    """
    from filelock import FileLock, Timeout

    from course.files import atomic_write

    def unwritable(exc: OSError) -> UsageError:
        return UsageError(f"--output_dir {out} cannot be written to ({exc.strerror or exc}): choose a folder you "
                          "can write to (nothing was trained).")

    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=out, prefix=".write-test-")  # a file, then a rename: what saving does
        os.close(fd)
        os.replace(probe, probe + ".renamed")
        os.unlink(probe + ".renamed")
    except OSError as exc:
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        raise unwritable(exc) from None
    lock = FileLock(str(out / LOCK), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise UsageError(f"--output_dir {out} is in use by another fine-tuning run ({_describe_owner(out)}): wait "
                         "for it to finish, or choose another --output_dir.") from None
    except OSError as exc:
        raise unwritable(exc) from None
    try:
        import socket

        atomic_write(out / OWNER, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                              "started": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n")
    except BaseException:
        lock.release()
        raise
    return lock


def check_rank(o, name: str, *, in_features: int, out_features: int) -> None:
    """Refuse a ``--lora_r`` that a targeted layer cannot hold (VeRA's rank is its shared projection's)."""
    smallest = min(in_features, out_features)
    if o.method != "vera" and o.lora_r > smallest:
        raise UsageError(f"--lora_r {o.lora_r} is larger than layer {name} ({in_features} -> {out_features}) "
                         f"allows: B A has rank at most {smallest}. Choose a smaller --lora_r or other "
                         "--lora_target_modules.")


def _adapter_bytes(o, path: str) -> int:
    """About how many bytes the run writes: the adapter plus the checkpoints (weights and AdamW's two moments).

    Read from the shapes in the base model's safetensors headers (no weights loaded); 0 when the model
    is not a local folder (then nothing is checked).
    """
    from safetensors import safe_open

    from course.surgery import matches_target

    files = sorted(Path(path).glob("*.safetensors")) if Path(path).is_dir() else []
    targets = None if o.lora_target_modules.strip() == "all-linear" else [
        t.strip() for t in o.lora_target_modules.split(",") if t.strip()]
    numbers = 0
    for file in files:
        with safe_open(str(file), "pt") as f:
            for key in f.keys():
                name = key.removesuffix(".weight")
                if not key.endswith(".weight") or name.rpartition(".")[2] in ("lm_head", "embed_tokens", "wte", "wpe"):
                    continue
                shape = f.get_slice(key).get_shape()
                if len(shape) == 2 and (targets is None or matches_target(name, targets)):
                    check_rank(o, name, in_features=shape[1], out_features=shape[0])  # before the space it needs
                    numbers += o.lora_r * (shape[0] + shape[1])
    copies = 1 + (3 * KEEP_CHECKPOINTS if o.save_step else 0) + (1 if o.method == "olora" else 0)
    return numbers * 4 * copies


def check_space(o, out: Path, path: str) -> None:
    """Refuse before the model loads when ``out`` has no room for the adapter and the checkpoints."""
    need = _adapter_bytes(o, path)
    free = shutil.disk_usage(out).free
    if need and free < need * 1.25 + 2**20:
        raise UsageError(f"--output_dir {out} has {free / 2**20:.1f} MB free, and this run writes about "
                         f"{need / 2**20:.1f} MB (the adapter and its checkpoints): free some space or choose "
                         "another folder (nothing was trained).")


def _remove_earlier_run(out: Path) -> None:
    """--overwrite: the earlier run's own files go (never anything else: prepare_output checked)."""
    for item in out.iterdir():
        if item.name in OURS or item.name.startswith("checkpoint-"):
            shutil.rmtree(item) if item.is_dir() else item.unlink()


def run_settings(o, data_fingerprint: str) -> dict:
    """What a resumed run must share with the run it continues (recorded in every checkpoint)."""
    return {**{name: getattr(o, name) for name in SAME_ON_RESUME}, "data": data_fingerprint}


def check_resume_settings(o, last_checkpoint: Path, data_fingerprint: str) -> None:
    """Refuse --resume with flags (or data) that would change the run's meaning, showing the differences."""
    from course.checkpoints import STATE

    state = json.loads((last_checkpoint / STATE).read_text(encoding="utf-8"))
    before = state.get("settings")
    if before is None:  # a checkpoint written before the settings were recorded: nothing to compare
        return
    now = run_settings(o, data_fingerprint)
    changed = [key for key in now if key in before and before[key] != now[key]]
    if not changed:
        return
    lines = [f"  the data: {'--data_path ' + str(o.data_path) if o.data_path else 'the course task'} has changed "
             "since the run started" if key == "data" else f"  --{key}: {before[key]} (the run) -> {now[key]} (now)"
             for key in changed]
    raise UsageError(f"--resume continues the run in {o.output_dir} as it started, and these differ from it:\n"
                     + "\n".join(lines) + "\nDrop them (or give the run's values) to continue it, or start a new "
                     "run (another --output_dir, or --overwrite).")


def _fingerprint(train_rows, held_out) -> str:
    text = json.dumps([list(train_rows), list(held_out)], sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def check_answers_fit(o, encoded) -> None:
    """Refuse, before training, examples whose answer is cut off entirely by --cutoff_len (their loss is 0/0)."""
    empty = [labels for _, labels in encoded if all(t == -100 for t in labels[1:o.cutoff_len])]
    if empty:
        longest = max(len(ids) for ids, _ in encoded)
        raise UsageError(f"--cutoff_len {o.cutoff_len} leaves {len(empty)} of {len(encoded)} training examples with "
                         "no answer token (the prompt alone fills the limit), so there is nothing to learn from "
                         f"them: raise --cutoff_len (the longest example is {longest} tokens) or shorten the prompts.")
