"""TRL with LoRA: supervised fine-tuning, DPO and GRPO on the course task (notebook 07).

The maths is one function, ``dpo_loss`` (eq. 7 of Rafailov et al. 2023, *Direct
Preference Optimization: Your Language Model is Secretly a Reward Model*)::

    loss_i = -log sigmoid( beta * [ (log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x)) ] )

per example i, with y_w the chosen and y_l the rejected completion; it equals TRL's
``loss_type="sigmoid"`` DPO loss (tests/test_rlhf.py). GRPO's group-relative advantages are
``grpo_advantages`` (section 4.1.2 of Shao et al. 2024, *DeepSeekMath*, as TRL's ``GRPOTrainer``
computes them; tests/test_rlhf.py runs the trainer to compare).

The rest is the plumbing that keeps the notebook short, one concern per module, all
re-exported here so that ``course.rlhf.X`` is the one name the notebook uses:

- ``course.rlhf_trl``: the chapter's budget (``rlhf_budget``, honouring ``COURSE_QUICK=1``), every
  TRL configuration in one place (``sft_config``, ``dpo_config``, ``grpo_config``), the course task
  in TRL's formats (``sft_dataset``, ``preference_dataset``, ``grpo_dataset``) and GRPO's rewards
  (``course.data.addition_reward``, ``number_only_reward``);
- ``course.rlhf_progress``: ``fit`` runs a trainer under the course's progress bar and collects
  its per-step logs; ``quiet_progress`` silences other libraries' bars;
- ``course.rlhf_eval``: DPO's implicit reward on held-out pairs (``preference_logps``,
  ``reward_margins``), GRPO's reward on held-out prompts (``sampled_reward``), and
  ``save_merge_reload``: save the adapter, merge it, reload and compare;
- ``course.memory``: ``memory_growth`` and ``tensor_bytes``, the memory a second copy of the model takes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "dpo_loss",
    "grpo_advantages",
    "RLHFBudget",
    "rlhf_budget",
    "lora_config",
    "sft_config",
    "dpo_config",
    "grpo_config",
    "sft_dataset",
    "preference_dataset",
    "grpo_dataset",
    "addition_reward",
    "number_only_reward",
    "fit",
    "Run",
    "preference_logps",
    "reward_margins",
    "save_merge_reload",
    "resident_bytes",
    "tensor_bytes",
    "memory_growth",
    "sampled_reward",
]



# ---------------------------------------------------------------------------
# The maths
# ---------------------------------------------------------------------------


def dpo_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
             beta: float = 0.1) -> torch.Tensor:
    """Per-example DPO loss (eq. 7 of Rafailov et al. 2023), TRL's ``loss_type="sigmoid"``.

    Each argument holds one summed log-probability per example (shape ``(batch,)``): of the
    chosen and rejected completions under the policy being trained and under the frozen
    reference. ``beta * (policy - reference)`` is DPO's implicit reward; the loss pushes the
    chosen completion's reward above the rejected one's. Returns one loss per example (take
    ``.mean()`` to train on a batch).
    """
    tensors = (policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) != 1:
        raise ValueError(f"dpo_loss takes four log-probability tensors of one shape (one number per example), "
                         f"got shapes {[tuple(t.shape) for t in tensors]}.")
    chosen_logratios = policy_chosen_logps - reference_chosen_logps
    rejected_logratios = policy_rejected_logps - reference_rejected_logps
    return -F.logsigmoid(beta * (chosen_logratios - rejected_logratios))


def grpo_advantages(rewards: torch.Tensor, group_size: int, scale_rewards: str = "group") -> torch.Tensor:
    """GRPO's group-relative advantages (Shao et al. 2024, section 4.1.2), as TRL's ``GRPOTrainer`` computes them.

    ``rewards`` holds one reward per completion, flat, with the ``group_size`` completions of each
    prompt consecutive (TRL's ``num_generations``). Each completion's baseline is the mean reward of
    its group; ``scale_rewards`` says what the difference is divided by:

    - ``"group"`` (TRL's default): the group's sample standard deviation (Bessel, n - 1) + 1e-4;
    - ``"batch"``: the standard deviation of the whole batch + 1e-4 (the baseline stays the group's mean);
    - ``"none"``: nothing (Dr. GRPO, Liu et al. 2025).

    ``True`` and ``False`` mean "group" and "none", as in ``GRPOConfig``. Returns a flat tensor like
    ``rewards``. TRL also accepts NaN rewards (completions no reward function scored), leaves them
    out of the statistics and gives them advantage 0; here a NaN is refused.
    """
    rewards, scale_rewards = _grpo_inputs(rewards, group_size, scale_rewards)
    groups = rewards.view(-1, group_size)  # one row per prompt
    advantages = rewards - groups.mean(dim=1).repeat_interleave(group_size)
    if scale_rewards == "none":
        return advantages
    if scale_rewards == "group":
        std = groups.std(dim=1).repeat_interleave(group_size) if group_size > 1 else torch.zeros_like(rewards)
    else:
        std = rewards.std() if rewards.numel() > 1 else torch.zeros_like(rewards)
    return advantages / (std + 1e-4)


def _grpo_inputs(rewards, group_size, scale_rewards) -> tuple[torch.Tensor, str]:
    """``grpo_advantages``'s arguments, checked: a flat float tensor, whole groups, a known scaling."""
    scale = {True: "group", False: "none"}[scale_rewards] if isinstance(scale_rewards, bool) else scale_rewards
    if scale not in ("group", "batch", "none"):
        raise ValueError(f"scale_rewards must be 'group', 'batch' or 'none' (as in TRL's GRPOConfig), got "
                         f"{scale_rewards!r}.")
    rewards = torch.as_tensor(rewards)
    if not rewards.is_floating_point():
        rewards = rewards.float()
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be flat, one reward per completion with each prompt's completions "
                         f"consecutive; got shape {tuple(rewards.shape)}. Flatten it (rewards.flatten()) in "
                         "that order.")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int (completions per prompt), got {group_size!r}.")
    if rewards.numel() == 0 or rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not make whole groups of {group_size}: each prompt needs "
                         "exactly group_size completions.")
    if torch.isnan(rewards).any():
        raise ValueError("rewards holds NaN: score every completion (TRL gives unscored ones advantage 0 and "
                         "leaves them out of the group statistics).")
    return rewards, scale


# The rest of the chapter's plumbing lives by concern in three modules, re-exported here so that
# `course.rlhf.X` is the one name the notebook uses.
from course.memory import memory_growth, resident_bytes, tensor_bytes  # noqa: E402, F401 (re-exported)
from course.rlhf_eval import (  # noqa: E402, F401 (re-exported)
    completion_logps,
    preference_logps,
    probe_inputs,
    reward_margins,
    sampled_reward,
    save_merge_reload,
)
from course.rlhf_progress import Run, fit, progress_bar, quiet_progress  # noqa: E402, F401 (re-exported)
from course.rlhf_trl import (  # noqa: E402, F401 (re-exported)
    RLHFBudget,
    _common,
    addition_reward,
    dpo_config,
    grpo_config,
    grpo_dataset,
    lora_config,
    number_only_reward,
    preference_dataset,
    rlhf_budget,
    scratch_dir,
    sft_config,
    sft_dataset,
)
