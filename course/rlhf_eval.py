"""Measuring what RLHF did (notebook 07): held-out log-probabilities, sampled rewards, and the
trained adapter saved, merged and reloaded.

``preference_logps`` and ``reward_margins`` give DPO's implicit reward on held-out pairs;
``sampled_reward`` is GRPO's reward on held-out prompts, sampled as GRPO samples;
``save_merge_reload`` saves the adapter, merges it, saves the merged model, reloads it and
checks that it computes what the trained model computes (chapter 06's ``course.merging.compare_models``,
a ``ModelComparison``). Re-exported by ``course.rlhf``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from course.device import base_dtype, default_device
from course.merging import ModelComparison, compare_models
from course.rlhf_progress import quiet_progress

__all__ = ["completion_logps", "preference_logps", "reward_margins", "sampled_reward", "probe_inputs",
           "save_merge_reload"]

# ---------------------------------------------------------------------------
# DPO's implicit reward on held-out pairs
# ---------------------------------------------------------------------------


def _chat_ids(tokenizer, messages, *, generation_prompt: bool) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    return list(ids)


def _split_at_common_prefix(prompt: list[int], full: list[int]) -> tuple[list[int], list[int]]:
    n = 0
    while n < min(len(prompt), len(full)) and prompt[n] == full[n]:
        n += 1
    return full[:n], full[n:]


@torch.no_grad()
def completion_logps(model, tokenizer, prompts, completions, *, batch_size: int = 16) -> torch.Tensor:
    """Summed log-probability of each completion given its prompt (conversational messages), as TRL's
    DPOTrainer computes it: the completion is what the chat template adds after the prompt."""
    device = next(model.parameters()).device
    rows = []
    for prompt, completion in zip(prompts, completions, strict=True):
        prompt_ids = _chat_ids(tokenizer, prompt, generation_prompt=True)
        full = _chat_ids(tokenizer, list(prompt) + list(completion), generation_prompt=False)
        head, tail = _split_at_common_prefix(prompt_ids, full)
        rows.append((head + tail, len(head)))
    out = []
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            width = max(len(ids) for ids, _ in chunk)
            ids = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            completion_mask = torch.zeros((len(chunk), width), dtype=torch.bool)
            for i, (seq, n_prompt) in enumerate(chunk):
                ids[i, : len(seq)] = torch.tensor(seq)
                mask[i, : len(seq)] = 1
                completion_mask[i, n_prompt : len(seq)] = True
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
            logps = torch.log_softmax(logits[:, :-1], dim=-1)
            targets = ids[:, 1:].to(device)
            token_logps = logps.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
            out.append((token_logps * completion_mask[:, 1:].to(device)).sum(-1).cpu())
    finally:
        model.train(was_training)
    return torch.cat(out)


def preference_logps(model, tokenizer, pairs, *, batch_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) summed log-probabilities of a preference split under ``model``."""
    chosen = completion_logps(model, tokenizer, pairs["prompt"], pairs["chosen"], batch_size=batch_size)
    rejected = completion_logps(model, tokenizer, pairs["prompt"], pairs["rejected"], batch_size=batch_size)
    return chosen, rejected


def reward_margins(policy: tuple, reference: tuple, beta: float) -> torch.Tensor:
    """DPO's implicit reward margin per pair, ``beta * [(pc - rc) - (pr - rr)]``.

    ``policy`` and ``reference`` are ``(chosen, rejected)`` log-probabilities from
    ``preference_logps``. Positive: the policy has moved towards the chosen answer, relative
    to the reference. Zero for every pair when the policy is the reference.
    """
    (pc, pr), (rc, rr) = policy, reference
    return beta * ((pc - rc) - (pr - rr))


@torch.no_grad()
def sampled_reward(model, tokenizer, dataset, reward_funcs, *, samples: int = 4, max_new_tokens: int = 8,
                   temperature: float = 1.0, seed: int = 0) -> dict[str, float]:
    """Mean rewards of ``samples`` completions sampled per prompt of ``dataset``, as GRPO samples them.

    ``dataset`` has conversational ``prompt`` and ``answer`` columns (``grpo_dataset``);
    ``reward_funcs`` is a TRL reward function or a list of them. Returns the mean of each, by
    function name, and their sum as ``"reward"`` (what TRL logs under that name). Seeded,
    without touching the global random state: the same call on the same model gives the same numbers.
    """
    from course.generate import chat_prompt

    funcs = list(reward_funcs) if isinstance(reward_funcs, (list, tuple)) else [reward_funcs]
    device = next(model.parameters()).device
    texts = [chat_prompt(tokenizer, p[-1]["content"]) for p in dataset["prompt"]]
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
    finally:
        tokenizer.padding_side = side
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            out = model.generate(**batch, do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
                                 max_new_tokens=max_new_tokens, num_return_sequences=samples,
                                 pad_token_id=tokenizer.pad_token_id)
    finally:
        model.train(was_training)
    replies = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    completions = [[{"role": "assistant", "content": r}] for r in replies]
    answers = [a for a in dataset["answer"] for _ in range(samples)]
    means = {f.__name__: sum(f(completions, answer=answers)) / len(completions) for f in funcs}
    return {**means, "reward": sum(means.values())}


# ---------------------------------------------------------------------------
# Save, merge, reload, validate
# ---------------------------------------------------------------------------


def probe_inputs(tokenizer, questions, device=None) -> dict:
    """A right-padded batch of chat prompts, to compare models' logits on (``save_merge_reload``)."""
    from course.generate import chat_prompt

    device = device or default_device()
    return tokenizer([chat_prompt(tokenizer, q) for q in questions], return_tensors="pt", padding=True,
                     add_special_tokens=False).to(device)


def save_merge_reload(peft_model, tokenizer, directory, probe: dict, *, base_path=None
                      ) -> tuple[torch.nn.Module, ModelComparison]:
    """Save the adapter, merge it into a fresh copy of its base, save that merged model, reload it.

    ``directory/adapter`` gets the PEFT adapter (safetensors), ``directory/merged`` the merged
    model and tokenizer (``save_pretrained``, safetensors). ``base_path`` is where the base the
    adapter was trained on lives (a ``save_pretrained`` folder), default the course's base model.
    The base is loaded, merged and reloaded in the dtype of the trained model's frozen base
    (``course.device.base_dtype``), on its device. Returns ``(reloaded, comparison)``: the merged
    model as loaded from disk, and ``course.merging.compare_models(reloaded, peft_model, probe)``
    against the trained model (adapter unmerged): ``max_logit_diff``, ``top1_agreement``, ``mean_kl``.
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from course.models import load_base_model

    directory = Path(directory)
    device = next(peft_model.parameters()).device
    dtype = base_dtype(peft_model)  # the trained model's, not the default policy's
    peft_model.save_pretrained(directory / "adapter")  # adapter_model.safetensors + adapter_config.json
    with quiet_progress():
        base = load_base_model(base_path, dtype=dtype, device=device, progress=False)
        merged = PeftModel.from_pretrained(base, directory / "adapter").merge_and_unload()
        merged.save_pretrained(directory / "merged")
        tokenizer.save_pretrained(directory / "merged")
        del base, merged
        reloaded = AutoModelForCausalLM.from_pretrained(directory / "merged", dtype=dtype).to(device).eval()
    peft_model.eval()
    return reloaded, compare_models(reloaded, peft_model, probe)
