"""The fine-tuning command line: ``python -m course finetune [flags]`` (notebook 08).

One command for the methods of the course, with the flags practitioners know from PEFT's DoRA
and OLoRA example scripts. With no flags it fine-tunes the default base model on the course task
with LoRA in a few CPU minutes, evaluates on held-out questions and writes a PEFT adapter::

    python -m course finetune                                     # LoRA on the course task
    python -m course finetune --method dora --lora_r 4 --output_dir outputs/dora
    python -m course finetune --data_path my.jsonl --base_model path/to/model --quantize
    python -m course finetune --output_dir outputs/dora --resume  # continue a stopped run
    python -m course finetune --output_dir outputs/dora --resume --max_steps 60   # or extend a finished one
    python -m course finetune --output_dir outputs/dora --overwrite               # replace it with a new run

The methods come from PEFT (LoRA, DoRA, OLoRA, VeRA); an OLoRA adapter is converted to plain
LoRA on the way out (PEFT's ``path_initial_model_for_weight_conversion``), so it works on the
unmodified base model. NOLA has no PEFT implementation: it uses the course's layers
(``course.nola``, notebook 05), and writes both its own small file (coefficients and seeds, in
``nola/``) and the generated factors as a plain PEFT LoRA adapter. The training loop runs on ``accelerate``, so the very same command is
data-parallel under a launcher, one process per device (``--batch_size`` is per process)::

    torchrun --nproc_per_node 2 -m course finetune --batch_size 8
    accelerate launch --multi_gpu --num_processes 2 -m course finetune --batch_size 8

(On a machine without GPUs ``accelerate launch --cpu`` starts one process only: its CPU launcher
spreads processes through MPI when given ``--mpirun_hostfile``. ``--multi_gpu`` selects the
torchrun launcher, and this command then runs each process on the CPU with gloo.)

The loss is the sum over answer tokens divided by the global number of answer tokens, so N
processes of batch b compute the same gradient as one process of batch N*b. Checkpoints are
atomic (``course.checkpoints``); everything is checked before training starts.

No run loses another's work: the output folder is claimed with a lock (a second run into it is
refused, naming the process that holds it) and checked for being writable and for room before the
model loads; an earlier run there is continued only with ``--resume`` (which refuses flags that
change the run's meaning, showing the differences) and replaced only with ``--overwrite``. A loss
that stops being a number ends the run with no adapter written.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

import torch

from course.finetune_adapters import _targeted_linears, adapter_config, nola_model  # noqa: F401  (re-exported)
from course.finetune_output import (  # noqa: F401  (re-exported: the folder claim and resume rules)
    FINISHED,
    KEEP_CHECKPOINTS,
    LOCK,
    OURS,
    OWNER,
    SAME_ON_RESUME,
    TrainingError,
    UsageError,
    _fingerprint,
    _launch_rank,
    _remove_earlier_run,
    check_answers_fit,
    check_resume_settings,
    check_space,
    claim_output,
    prepare_output,
    run_settings,
)

METHODS = ("lora", "dora", "olora", "nola", "vera")


def _flag_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes"):
        return True
    if text.lower() in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {text!r}")


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):  # "(default: None)" says nothing: the help says what None means
        return action.help if action.default is None else super()._get_help_string(action)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m course finetune", description=__doc__.split("\n\n")[1],
                                formatter_class=_Help)
    p.add_argument("--method", choices=METHODS, default="lora", help="the adapter to train")
    p.add_argument("--base_model", default=None, help="hub id or local folder (default: the course's SmolLM2)")
    p.add_argument("--data_path", default=None, help=".json/.jsonl file, a save_to_disk folder or a hub id "
                   "(default: the course task, two-digit addition)")
    p.add_argument("--output_dir", default=None, help="where the adapter and checkpoints go "
                   "(default: outputs/<method>-<time>)")
    p.add_argument("--batch_size", type=int, default=16, help="examples per step and process")
    p.add_argument("--num_epochs", type=int, default=1, help="passes over the data (when --max_steps is 0)")
    p.add_argument("--max_steps", type=int, default=30, help="optimizer steps; 0: --num_epochs decides")
    p.add_argument("--learning_rate", type=float, default=2e-3)
    p.add_argument("--cutoff_len", type=int, default=256, help="longest example in tokens (longer ones are cut)")
    p.add_argument("--val_set_size", type=int, default=64, help="held-out examples to evaluate on")
    p.add_argument("--use_compile", type=_flag_bool, nargs="?", const=True, default=False, help="torch.compile the model")
    p.add_argument("--quantize", action="store_true", help="load the base model in 4 bits (bitsandbytes, QLoRA style)")
    p.add_argument("--eval_step", type=int, default=10, help="evaluate every this many steps (0: only at the end)")
    p.add_argument("--save_step", type=int, default=10, help="checkpoint every this many steps (0: never)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:0 or mps")
    p.add_argument("--lora_r", type=int, default=8, help="rank (VeRA: the shared projection's rank)")
    p.add_argument("--nola_num_basis", type=int, default=256,
                   help="NOLA: random basis matrices per factor (trained numbers per layer: twice this)")
    p.add_argument("--lora_alpha", type=float, default=16.0)
    p.add_argument("--lora_dropout", type=float, default=0.0)
    p.add_argument("--lora_target_modules", default="all-linear",
                   help='comma-separated module names, or "all-linear"')
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue the run in --output_dir from its last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace the earlier run in --output_dir (its adapter "
                   "and checkpoints) with a new one")
    return p


def check_flags(o: argparse.Namespace) -> None:
    """Refuse impossible values before anything is loaded."""
    for name in ("batch_size", "cutoff_len", "lora_r", "nola_num_basis"):
        if getattr(o, name) < 1:
            raise UsageError(f"--{name} must be at least 1, got {getattr(o, name)}.")
    for name in ("num_epochs", "max_steps", "eval_step", "save_step", "val_set_size"):
        if getattr(o, name) < 0:
            raise UsageError(f"--{name} must be 0 or more, got {getattr(o, name)}.")
    if o.max_steps == 0 and o.num_epochs == 0:
        raise UsageError("--max_steps 0 and --num_epochs 0: nothing to train. Give one of them a positive value.")
    if not o.learning_rate > 0 or not o.lora_alpha > 0:
        raise UsageError("--learning_rate and --lora_alpha must be positive.")
    if not 0 <= o.lora_dropout < 1:
        raise UsageError(f"--lora_dropout is a probability in [0, 1), got {o.lora_dropout}.")
    if o.method == "nola" and o.quantize:
        raise UsageError("--method nola uses the course's own layers, which wrap full-precision nn.Linear layers: "
                         "drop --quantize (or choose a PEFT method: lora, dora, olora, vera).")
    if o.resume and o.output_dir is None:
        raise UsageError("--resume continues the run in --output_dir: name that folder.")
    if o.resume and o.overwrite:
        raise UsageError("--resume continues the run in --output_dir, --overwrite replaces it: choose one.")


def _device(o) -> torch.device:
    from course.device import default_device

    try:
        device = default_device() if o.device == "auto" else torch.device(o.device)
    except RuntimeError:
        raise UsageError(f"--device {o.device!r} is not a device: use auto, cpu, cuda, cuda:N or mps.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda, but torch sees no CUDA GPU here: use --device cpu (or auto).")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(f"--device {o.device}, but torch sees {torch.cuda.device_count()} CUDA GPU(s), numbered from "
                         "0: choose one of them (or --device auto).")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError("--device mps, but this machine has no MPS device (an Apple-silicon GPU with a macOS build "
                         "of PyTorch): use --device cpu (or auto).")
    return device


def load_model(o, device: torch.device, path: str):
    """The base model at ``path`` (4-bit with ``--quantize``)."""
    from transformers import AutoModelForCausalLM

    from course.device import default_dtype

    dtype = default_dtype(device)
    if o.quantize:
        from transformers import BitsAndBytesConfig

        compute = torch.float32 if dtype == torch.float32 else dtype
        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute)
        model = AutoModelForCausalLM.from_pretrained(path, quantization_config=quantization,
                                                     device_map={"": str(device)}, dtype=compute)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
    return model


def _batches(encoded, batch_size: int, seed: int, epoch: int):
    """A DataLoader over ``encoded`` in the seeded order of ``epoch`` (the same in every process)."""
    from torch.utils.data import DataLoader

    order = torch.randperm(len(encoded), generator=torch.Generator().manual_seed(seed * 100003 + epoch)).tolist()
    return DataLoader(encoded, batch_size=batch_size, sampler=order, collate_fn=list, drop_last=True)


def _loss_sum(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of the answer tokens' cross-entropy, and their count."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(),
                                             ignore_index=-100, reduction="sum")
    return loss, (labels != -100).sum()


@torch.no_grad()
def evaluate(model, tokenizer, held_out, encoded, device) -> dict:
    """Held-out loss per answer token and, when every answer is a number, exact-match accuracy."""
    from course.generate import accuracy
    from course.train import collate

    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    for start in range(0, len(encoded), 16):
        loss, count = _loss_sum(model, collate(tokenizer, encoded[start:start + 16], device))
        total, tokens = total + loss.item(), tokens + count.item()
    result = {"val_loss": total / max(tokens, 1)}
    answers = [e["answer"] for e in held_out]
    if answers and all(a.strip().lstrip("-").isdigit() for a in answers):
        data = {"prompt": [e["prompt"] for e in held_out], "answer": answers}
        result["exact_match"] = accuracy(model, tokenizer, data)
    model.train(was_training)
    return result


def run(o: argparse.Namespace) -> dict:
    """Train as ``o`` says; return the run's summary (also written to ``finetune.json``).

    Everything that can be checked is checked before the model loads: the flags, the device, the
    base model's whereabouts, the output folder (claimed with a lock, writable, room for the
    adapter and checkpoints), the data and what --resume would continue.
    """
    from course.files import remove_leftovers
    from course.models import model_path

    check_flags(o)
    device = _device(o)
    path = model_path(o.base_model)  # a missing --base_model is named here, before anything is written
    out = prepare_output(o)  # read-only: a folder that is refused is not touched
    lock, created = None, not out.exists()
    if _launch_rank() == 0:  # one claim per run, however many processes it has
        lock = claim_output(out)
    try:
        if lock is not None:
            prepare_output(o, claimed=True)  # again, now that no other run can start here
            remove_leftovers(out)  # half-written checkpoints of a killed run: we hold the lock, none is live
            check_space(o, out, path)
            if o.overwrite:
                _remove_earlier_run(out)
        return _train(o, out, device, path)
    finally:
        if lock is not None:
            (out / OWNER).unlink(missing_ok=True)
            if created and {p.name for p in out.iterdir()} <= {LOCK}:  # refused before writing: leave no trace
                shutil.rmtree(out, ignore_errors=True)
            lock.release()


def _train(o: argparse.Namespace, out: Path, device: torch.device, path: str) -> dict:
    from accelerate import Accelerator
    from peft import get_peft_model
    from tqdm.auto import tqdm

    from course.checkpoints import checkpoints, load_checkpoint, save_checkpoint
    from course.files import atomic_directory
    from course.finetune_data import load_examples
    from course.models import load_tokenizer
    from course.train import collate, encode_example

    train_rows, held_out = load_examples(o.data_path, o.val_set_size, o.seed)
    data_fingerprint = _fingerprint(train_rows, held_out)
    last = checkpoints(out)[-1:] if o.resume else []
    if last:
        check_resume_settings(o, last[0], data_fingerprint)
    tokenizer = load_tokenizer(path)
    encode = [encode_example(tokenizer, r["prompt"], r["answer"]) for r in train_rows]
    encoded = [(ids[:o.cutoff_len], labels[:o.cutoff_len]) for ids, labels in encode]
    check_answers_fit(o, encoded)
    held_encoded = [encode_example(tokenizer, r["prompt"], r["answer"]) for r in held_out]

    accelerator = Accelerator(cpu=device.type == "cpu")
    if device.type != "cpu" and accelerator.num_processes > 1:
        device = accelerator.device  # one device per process
    main_process = accelerator.is_main_process
    say = (lambda text: tqdm.write(text)) if main_process else (lambda text: None)
    per_epoch = len(encoded) // (o.batch_size * accelerator.num_processes)
    if per_epoch == 0:
        raise UsageError(f"{len(encoded)} training examples do not fill one step of --batch_size {o.batch_size} x "
                         f"{accelerator.num_processes} process(es): lower --batch_size.")
    total = o.max_steps or o.num_epochs * per_epoch

    model = load_model(o, device, path)
    config = adapter_config(o, model)
    torch.manual_seed(o.seed)  # the same initial adapter in every process
    model = nola_model(o, model, config) if o.method == "nola" else get_peft_model(model, config)
    if o.method == "olora" and main_process and not (out / "olora-initial").is_dir():
        with atomic_directory(out / "olora-initial") as tmp:  # the start point, for the conversion at the end
            model.save_pretrained(tmp)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(trainable.values(), lr=o.learning_rate, weight_decay=0.0)

    step, history = 0, {"loss": [], "evaluations": []}
    if last:
        weights, optimizer_state, state = load_checkpoint(last[0])
        with torch.no_grad():
            for name, tensor in weights.items():
                trainable[name].copy_(tensor)
        optimizer.load_state_dict(optimizer_state)
        step, history = state["step"], state["history"]
        say(f"resuming from {last[0].name} (step {step})")
    elif o.resume:
        say(f"nothing to resume in {out} yet (no checkpoint): starting at step 0")
    if o.use_compile:
        model = torch.compile(model)
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()

    from course.device import base_dtype

    # autocast on GPUs, as course.train, in the dtype the base was loaded in (read once from the model)
    half = base_dtype(accelerator.unwrap_model(model)) if device.type == "cuda" else torch.float32
    scaler = torch.amp.GradScaler(device.type, enabled=half == torch.float16)  # float16 needs loss scaling
    settings = run_settings(o, data_fingerprint)

    def evaluation() -> None:
        if main_process:
            scores = {"step": step, **evaluate(accelerator.unwrap_model(model), tokenizer, held_out, held_encoded, device)}
            history["evaluations"].append(scores)
            say("  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in scores.items()))
        accelerator.wait_for_everyone()

    start, first_step = time.perf_counter(), step  # first_step > 0 when resumed
    if step == 0 and o.eval_step:
        evaluation()
    bar = tqdm(total=total, initial=step, desc=f"{o.method} fine-tuning", disable=not main_process)
    while step < total:
        epoch, skip = divmod(step, per_epoch)
        loader = accelerator.prepare(_batches(encoded, o.batch_size, o.seed, epoch))
        for rows in accelerator.skip_first_batches(loader, skip) if skip else loader:
            batch = collate(tokenizer, rows, device)
            with torch.autocast(device.type, dtype=half, enabled=half != torch.float32):
                loss_sum, tokens = _loss_sum(model, batch)
            global_tokens = accelerator.reduce(tokens.detach(), "sum")
            mean = (accelerator.reduce(loss_sum.detach(), "sum") / global_tokens).item()
            if not math.isfinite(mean):  # every process sees the same reduced value and stops alike
                bar.close()
                kept = checkpoints(out)
                raise TrainingError(
                    f"the training loss is {mean} at step {step + 1}: training stopped before that step changed "
                    "the adapter, and no adapter was written"
                    + (f" ({kept[-1].name} is there to --resume from)" if kept else "")
                    + ". Lower --learning_rate, or check the data and --cutoff_len.")
            # DDP averages gradients over processes: scale so the result is the global per-token mean.
            loss = loss_sum * accelerator.num_processes / global_tokens
            accelerator.backward(scaler.scale(loss))
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            history["loss"].append(mean)
            bar.update(1)
            bar.set_postfix(loss=f"{mean:.3f}")
            if o.eval_step and step % o.eval_step == 0 and step != total:
                evaluation()
            if o.save_step and (step % o.save_step == 0 or step == total):  # the last one too: a run can be extended
                if main_process:
                    weights = {n: p for n, p in accelerator.unwrap_model(model).named_parameters() if p.requires_grad}
                    save_checkpoint(out, step, weights, optimizer, {"history": history, "settings": settings},
                                    keep=KEEP_CHECKPOINTS)
                accelerator.wait_for_everyone()
            if step >= total:
                break
    bar.close()
    evaluation()
    seconds = time.perf_counter() - start
    summary = {"options": vars(o), "processes": accelerator.num_processes, "steps": step,
               "resumed_at_step": first_step, "train_seconds": round(seconds, 1),  # this process's seconds
               "history": history, "final": history["evaluations"][-1] if history["evaluations"] else {}}
    if main_process:
        peft_model = accelerator.unwrap_model(model)
        peft_model = getattr(peft_model, "_orig_mod", peft_model)  # torch.compile's wrapper
        # Into the claimed folder, file by file (each a rename): checkpoints and the lock stay where they are.
        with atomic_directory(out, keep_others=True) as tmp:
            if o.method == "nola":  # the generated A and B as plain LoRA, and NOLA's own small file
                from course.lora import save_peft_adapter
                from course.nola import save_nola

                save_peft_adapter(peft_model, tmp, base_model_name_or_path=peft_model.config.name_or_path,
                                  task_type="CAUSAL_LM")
                save_nola(peft_model, tmp / "nola")
            elif o.method == "olora":  # rank 2r, alpha 2 * alpha, on the unmodified base (PEFT's conversion)
                peft_model.save_pretrained(tmp, path_initial_model_for_weight_conversion=str(out / "olora-initial"))
            else:
                peft_model.save_pretrained(tmp)
            (tmp / "finetune.json").write_text(json.dumps(summary, indent=2, default=str) + "\n", encoding="utf-8")
        timed = (f"{step} steps in {seconds:.0f} s" if first_step == 0 else
                 f"{step} steps in all, the last {step - first_step} in this run's {seconds:.0f} s")
        say(f"adapter written to {out} (loads with peft.PeftModel.from_pretrained); {timed}")
    accelerator.wait_for_everyone()
    return summary


def main(argv=None) -> int:
    options = parser().parse_args(argv)
    from course.finetune_data import DataError
    from course.models import ModelNotFoundError

    try:
        run(options)
    except (UsageError, DataError, ModelNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except TrainingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

