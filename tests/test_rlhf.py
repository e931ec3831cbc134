"""course.rlhf against TRL: the DPO loss, the log-probabilities it is computed from, the configs, the helpers.

Everything runs on tiny random Llama models with the course's tokenizer (no real base model),
so the file takes seconds.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from course import rlhf
from course.merging import ModelComparison, compare_models
from course.rlhf import dpo_loss


def _tiny_llama(tokenizer, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=tokenizer.bos_token_id, tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()


def _random_lora():
    from peft import LoraConfig

    # init_lora_weights=False: B is random too, so the policy differs from its reference
    return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                      task_type="CAUSAL_LM")


def _dpo_trainer(tokenizer, pairs, beta: float):
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(**{**rlhf._common("test-dpo", 1, len(pairs), 1e-3, 0), "use_cpu": True, "bf16": False,
                        "fp16": False}, beta=beta, loss_type="sigmoid", max_length=64)
    with rlhf.quiet_progress():
        return DPOTrainer(model=_tiny_llama(tokenizer), args=args, train_dataset=pairs, processing_class=tokenizer,
                          peft_config=_random_lora())


@pytest.fixture(scope="module")
def pairs():
    return rlhf.preference_dataset("eval").select(range(6))


@pytest.fixture(scope="module")
def dpo_trainer(tokenizer, pairs):
    return _dpo_trainer(tokenizer, pairs, beta=0.3)


def _seeded_logps(batch: int = 6):
    g = torch.Generator().manual_seed(0)
    return tuple(-8 * torch.rand(batch, generator=g) - 0.5 for _ in range(4))


def _trl_sigmoid_loss(trainer, pc, pr, rc, rr) -> torch.Tensor:
    """TRL's own DPO loss code (``DPOTrainer._compute_loss``) on given summed log-probabilities.

    A stand-in model returns per-token log-probabilities whose sums are ``pc`` (chosen rows)
    and ``pr`` (rejected rows); the reference log-probabilities come in the batch, as TRL
    reads them with ``precompute_ref_log_probs``. TRL averages over the batch.
    """
    n, width = len(pc), 4
    log_probs = torch.zeros(2 * n, width - 1)
    log_probs[:, 0] = torch.cat([pc, pr])

    def model(**kwargs):
        zeros = torch.zeros(2 * n, width - 1)
        return SimpleNamespace(log_probs=log_probs, entropy=zeros, mean_logits=zeros,
                               is_top1=zeros.bool(), aux_loss=None)

    inputs = {"input_ids": torch.zeros(2 * n, width, dtype=torch.long),
              "attention_mask": torch.ones(2 * n, width, dtype=torch.long),
              "completion_mask": torch.ones(2 * n, width, dtype=torch.long),
              "ref_chosen_logps": rc, "ref_rejected_logps": rr}
    saved = trainer.precompute_ref_logps
    trainer.precompute_ref_logps = True
    try:
        return trainer._compute_loss(model, inputs, return_outputs=False)
    finally:
        trainer.precompute_ref_logps = saved


def test_dpo_loss_equals_trls_sigmoid_loss_per_example(dpo_trainer):
    pc, pr, rc, rr = _seeded_logps()
    ours = dpo_loss(pc, pr, rc, rr, beta=dpo_trainer.beta)
    assert ours.shape == (6,)
    for i in range(6):  # a batch of one pair: TRL's mean is that pair's loss
        theirs = _trl_sigmoid_loss(dpo_trainer, pc[i : i + 1], pr[i : i + 1], rc[i : i + 1], rr[i : i + 1])
        # Same float32 operations in the same order: equal up to rounding (~1e-7).
        torch.testing.assert_close(ours[i], theirs, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours.mean(), _trl_sigmoid_loss(dpo_trainer, pc, pr, rc, rr), rtol=1e-6, atol=1e-6)


def test_dpo_loss_formula_gradient_and_default_beta():
    pc, pr, rc, rr = (t.clone().requires_grad_() for t in _seeded_logps(3))
    loss = dpo_loss(pc, pr, rc, rr)
    margin = (pc - rc) - (pr - rr)
    torch.testing.assert_close(loss, -F.logsigmoid(0.1 * margin))
    loss.sum().backward()
    # d/d pc of -log sigmoid(beta m) = -beta * sigmoid(-beta m)
    torch.testing.assert_close(pc.grad, -0.1 * torch.sigmoid(-0.1 * margin.detach()))
    torch.testing.assert_close(pr.grad, 0.1 * torch.sigmoid(-0.1 * margin.detach()))


def test_dpo_loss_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match="one number per example"):
        dpo_loss(torch.zeros(3), torch.zeros(3), torch.zeros(3), torch.zeros(2))


def test_logps_margins_and_loss_match_trl_on_a_real_batch(dpo_trainer, pairs, tokenizer):
    """Our completion log-probabilities (policy, and reference with the adapter disabled) give TRL's loss
    and TRL's logged reward margin on the same pairs: the notebook's held-out margins mean what TRL's do."""
    batch = dpo_trainer._prepare_inputs(next(iter(dpo_trainer.get_train_dataloader())))
    model = dpo_trainer.model
    model.train()
    with torch.no_grad():
        trl_loss = dpo_trainer.compute_loss(model, batch)
    metrics = {key: values[-1] for key, values in dpo_trainer._metrics["train"].items()}
    policy = rlhf.preference_logps(model, tokenizer, pairs)
    with model.disable_adapter():
        reference = rlhf.preference_logps(model, tokenizer, pairs)
    assert not torch.allclose(policy[0], reference[0]), "the random adapter should change the model"
    ours = dpo_loss(*policy, *reference, beta=0.3).mean()
    # float32 forward passes of different batch shapes (padding): rounding of order 1e-6.
    torch.testing.assert_close(ours, trl_loss, rtol=1e-4, atol=1e-5)
    # The log-probabilities themselves (a prompt token counted in would cancel in the loss, not here).
    assert abs(policy[0].mean().item() - metrics["logps/chosen"]) < 1e-4
    assert abs(policy[1].mean().item() - metrics["logps/rejected"]) < 1e-4
    assert abs(0.3 * (policy[0] - reference[0]).mean().item() - metrics["rewards/chosen"]) < 1e-4
    margins = rlhf.reward_margins(policy, reference, beta=0.3)
    assert abs(margins.mean().item() - metrics["rewards/margins"]) < 1e-4


def test_reward_margins_are_zero_when_the_policy_is_the_reference():
    chosen, rejected = torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -0.5])
    assert torch.equal(rlhf.reward_margins((chosen, rejected), (chosen, rejected), 0.1), torch.zeros(2))
    moved = rlhf.reward_margins((chosen + 1, rejected - 1), (chosen, rejected), 0.1)
    torch.testing.assert_close(moved, torch.full((2,), 0.2))


def test_budget_follows_default_budget_and_quick_mode(monkeypatch):
    from course.train import default_budget

    monkeypatch.delenv("COURSE_QUICK", raising=False)
    full = rlhf.rlhf_budget("cpu")
    assert full.lr == default_budget("cpu").lr
    assert full.eval_examples == default_budget("cpu").eval_examples
    assert len(full.seeds) >= 3
    monkeypatch.setenv("COURSE_QUICK", "1")
    quick = rlhf.rlhf_budget("cpu")
    assert quick.sft_steps < full.sft_steps and quick.grpo_steps < full.grpo_steps
    assert quick.eval_examples == default_budget("cpu").eval_examples
    monkeypatch.delenv("COURSE_QUICK")
    assert rlhf.rlhf_budget("cuda").sft_steps > full.sft_steps


@pytest.mark.parametrize("make", [rlhf.sft_config, rlhf.dpo_config, rlhf.grpo_config])
def test_configs_are_offline_quiet_and_save_nothing(make):
    config = make(rlhf.rlhf_budget("cpu"))
    assert config.report_to in ([], "none", ["none"])
    assert config.save_strategy == "no"
    assert config.disable_tqdm is True
    assert config.logging_steps == 1
    assert not config.gradient_checkpointing
    assert not config.push_to_hub
    assert os.path.realpath(config.output_dir).startswith(os.path.realpath(__import__("tempfile").gettempdir()))
    assert not os.listdir(config.output_dir)


def test_grpo_config_counts_completions():
    budget = rlhf.rlhf_budget("cpu")
    config = rlhf.grpo_config(budget)
    assert config.per_device_train_batch_size == budget.grpo_prompts * budget.num_generations
    assert config.num_generations == budget.num_generations


def test_datasets_are_in_trls_formats():
    sft = rlhf.sft_dataset("eval")
    assert sft.column_names == ["prompt", "completion"]
    assert sft[0]["prompt"][0]["role"] == "user" and sft[0]["completion"][0]["role"] == "assistant"
    grpo = rlhf.grpo_dataset("eval")
    assert {"prompt", "answer"} <= set(grpo.column_names)
    assert rlhf.grpo_dataset("eval")[0]["prompt"] == sft[0]["prompt"]


def test_rewards_take_trls_conversational_completions():
    completions = [[{"role": "assistant", "content": "82"}], [{"role": "assistant", "content": "82 is it"}],
                   [{"role": "assistant", "content": "81"}], [{"role": "assistant", "content": "The sum"}]]
    assert rlhf.addition_reward(completions, answer=["82"] * 4) == [1.0, 1.0, 0.0, 0.0]
    assert rlhf.number_only_reward(completions) == [1.0, 0.0, 1.0, 0.0]


def test_fit_trains_quietly_and_returns_the_logs(tokenizer, capsys):
    from trl import SFTTrainer

    budget = rlhf.RLHFBudget(**{**rlhf.rlhf_budget("cpu").__dict__, "sft_steps": 2, "batch_size": 2})
    args = rlhf.sft_config(budget)
    args.use_cpu, args.bf16, args.fp16 = True, False, False
    with rlhf.quiet_progress():
        trainer = SFTTrainer(model=_tiny_llama(tokenizer), args=args, train_dataset=rlhf.sft_dataset("eval"),
                             processing_class=tokenizer, peft_config=_random_lora())
    run = rlhf.fit(trainer, "tiny SFT")
    assert len(run.losses) == 2 and all(loss > 0 for loss in run.losses)
    assert run.seconds > 0 and run.model is trainer.model
    out = capsys.readouterr()
    assert "{'loss'" not in out.out + out.err  # TRL's printer is gone


def test_save_merge_reload_round_trips(tokenizer, tmp_path):
    from peft import get_peft_model

    base_dir = tmp_path / "base"
    _tiny_llama(tokenizer).save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    from course.models import load_base_model

    trained = get_peft_model(load_base_model(str(base_dir), dtype=torch.float32, device="cpu", progress=False),
                             _random_lora())
    probe = rlhf.probe_inputs(tokenizer, ["What is 12+30? Reply with the number only.", "Hi"], device="cpu")
    reloaded, report = rlhf.save_merge_reload(trained, tokenizer, tmp_path / "out", probe, base_path=str(base_dir))
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "out" / "merged" / "model.safetensors").is_file()
    assert type(reloaded).__name__ == "LlamaForCausalLM"
    assert isinstance(report, ModelComparison)  # chapter 06's yardstick, one type for both chapters
    assert report.max_logit_diff < 1e-4 and report.top1_agreement == 1.0  # float32 merge: rounding
    with trained.disable_adapter():
        unadapted = compare_models(reloaded, trained, probe)
    assert unadapted.max_logit_diff > 1e-3  # the comparison does see the adapter
    assert not hasattr(rlhf, "_compare_models")  # no second vocabulary for the same measurement


def test_save_merge_reload_keeps_the_trained_models_dtype(tokenizer, tmp_path, monkeypatch):
    # The base was loaded (and trained over) in bfloat16 while the course's policy says float32: the
    # merge and the reloaded model follow the trained model, not the policy.
    from peft import get_peft_model

    from course.models import load_base_model

    monkeypatch.setenv("COURSE_DTYPE", "float32")
    base_dir = tmp_path / "base"
    _tiny_llama(tokenizer).save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    trained = get_peft_model(load_base_model(str(base_dir), dtype=torch.bfloat16, device="cpu", progress=False),
                             _random_lora())
    assert {p.dtype for n, p in trained.named_parameters() if "lora_" in n} == {torch.float32}  # PEFT's adapters
    probe = rlhf.probe_inputs(tokenizer, ["What is 12+30? Reply with the number only."], device="cpu")
    reloaded, report = rlhf.save_merge_reload(trained, tokenizer, tmp_path / "out", probe, base_path=str(base_dir))
    assert reloaded.dtype == torch.bfloat16
    assert {p.dtype for p in reloaded.parameters()} == {torch.bfloat16}
    # Merged in bfloat16: rounding, not another model. (A random tiny model has near-ties between its top
    # tokens, so rounding may flip one of them: the KL says how far apart the two models are.)
    assert report.mean_kl < 1e-5 and report.top1_agreement >= 0.9, report


def test_tensor_bytes_counts_shared_tensors_once(tokenizer):
    model = _tiny_llama(tokenizer)  # tied embeddings: the output head is the input embedding
    every = sum(p.numel() * p.element_size() for _, p in model.named_parameters(remove_duplicate=False))
    once = sum(p.numel() * p.element_size() for p in model.parameters())
    once += sum(b.numel() * b.element_size() for b in model.buffers())
    assert rlhf.tensor_bytes(model) == once
    assert every - model.lm_head.weight.numel() * 4 == sum(p.numel() * 4 for p in model.parameters())
    # Two Parameter objects over one storage (as a reference sharing a policy's weights): counted once.
    shared = torch.nn.Module()
    weight = torch.zeros(10, 10)
    shared.a, shared.b = torch.nn.Parameter(weight), torch.nn.Parameter(weight)
    assert len(list(shared.parameters())) == 2
    assert rlhf.tensor_bytes(shared) == 10 * 10 * 4


def test_memory_growth_sees_a_new_tensor():
    # In a new interpreter: the test suite's process holds memory freed by earlier tests, which
    # a new tensor can reuse without the resident set growing (seen in CI: 0 bytes). 64 MB is above
    # glibc's largest mmap threshold (32 MB), so in a fresh process it is new memory, counted once written.
    code = ("import torch\nfrom course import rlhf\n"
            "tensor, grown = rlhf.memory_growth(lambda: torch.ones(16 * 2**20))\nprint(tensor.numel(), grown)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    numel, grown = (int(x) for x in done.stdout.split()[-2:])
    assert numel == 16 * 2**20
    assert 0.9 * 64 * 2**20 < grown < 1.5 * 64 * 2**20


def test_sampled_reward_is_seeded_and_leaves_the_random_state_alone(tokenizer):
    model = _tiny_llama(tokenizer)
    prompts = rlhf.grpo_dataset("eval").select(range(3))
    torch.manual_seed(5)
    expected = torch.rand(2)
    torch.manual_seed(5)
    first = rlhf.sampled_reward(model, tokenizer, prompts, [rlhf.addition_reward, rlhf.number_only_reward],
                                samples=2, max_new_tokens=3)
    assert torch.equal(torch.rand(2), expected)
    second = rlhf.sampled_reward(model, tokenizer, prompts, [rlhf.addition_reward, rlhf.number_only_reward],
                                 samples=2, max_new_tokens=3)
    assert first == second
    assert set(first) == {"addition_reward", "number_only_reward", "reward"}
    assert first["reward"] == first["addition_reward"] + first["number_only_reward"]

    def reply_length(completions, **kwargs):  # varies with every sampled token, unlike the task's rewards
        return [float(len(c[-1]["content"])) for c in completions]

    lengths = [rlhf.sampled_reward(model, tokenizer, prompts, reply_length, samples=2, max_new_tokens=3, seed=seed)
               for seed in (0, 0, 1)]
    assert lengths[0] == lengths[1], "the same seed samples the same replies"
    assert lengths[0] != lengths[2], "another seed samples other replies"


# ---------------------------------------------------------------------------
# GRPO's advantages against GRPOTrainer
# ---------------------------------------------------------------------------

GROUP = 4  # completions per prompt (TRL's num_generations)


@pytest.fixture(scope="module")
def grpo_run(tokenizer):
    """A real ``GRPOTrainer`` on a tiny model, whose reward function hands out seeded rewards and logs them.

    ``run(scale_rewards)`` runs TRL's own ``_generate_and_score_completions`` on one generation batch
    (3 prompts x 4 completions) and returns (the rewards TRL was given, the prompts they came with,
    the advantages TRL computed). The advantages are computed in that method, trl/trainer/grpo_trainer.py
    lines 2761-2787 in trl 1.16.0 (``mean_grouped_rewards``, ``nanstd``, ``+ 1e-4``).
    """
    from trl import GRPOConfig, GRPOTrainer

    log = []
    g = torch.Generator().manual_seed(0)

    def seeded_reward(prompts, completions, **kwargs):
        rewards = torch.rand(len(completions), generator=g).mul(3).round().div(2)  # 0, 0.5, 1 or 1.5
        rewards[:GROUP] = 1.0  # the first prompt's group has no spread: the 1e-4 is all that divides
        log.append((rewards.tolist(), [p[0]["content"] for p in prompts]))
        return rewards.tolist()

    args = GRPOConfig(**{**rlhf._common("test-grpo", 1, 3 * GROUP, 1e-3, 0), "use_cpu": True, "bf16": False,
                         "fp16": False}, num_generations=GROUP, max_completion_length=4, beta=0.0,
                      log_completions=False)
    with rlhf.quiet_progress():
        trainer = GRPOTrainer(model=_tiny_llama(tokenizer), reward_funcs=seeded_reward, args=args,
                              train_dataset=rlhf.grpo_dataset("eval").select(range(6)), processing_class=tokenizer)
    trainer.model.train()
    batch = next(iter(trainer.get_train_dataloader()))

    def run(scale_rewards):
        trainer.scale_rewards = scale_rewards
        out = trainer._generate_and_score_completions(batch)
        rewards, prompts = log[-1]
        return torch.tensor(rewards), prompts, out["advantages"]

    return run


@pytest.mark.parametrize("scale_rewards", ["group", "batch", "none"])
def test_grpo_advantages_equal_trls_on_logged_rewards(grpo_run, scale_rewards):
    rewards, prompts, theirs = grpo_run(scale_rewards)
    # TRL's convention, seen from the reward function: each prompt's completions are consecutive.
    assert all(len(set(prompts[i : i + GROUP])) == 1 for i in range(0, len(prompts), GROUP))
    assert len(set(prompts)) == len(prompts) // GROUP
    assert rewards.view(-1, GROUP).std(dim=1).gt(0).sum() >= 2, "the seeded rewards should vary in most groups"
    ours = rlhf.grpo_advantages(rewards, GROUP, scale_rewards)
    assert ours.shape == theirs.shape == (12,)
    # Same float32 statistics, computed in another order (TRL's nanstd): rounding of order 1e-7.
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    assert torch.equal(theirs[:GROUP], torch.zeros(GROUP)), "a group without spread has no advantage"


def test_grpo_scalings_differ_and_follow_the_formulas():
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.5, 2.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    groups = rewards.view(3, 4)
    centred = (groups - groups.mean(dim=1, keepdim=True)).flatten()
    none = rlhf.grpo_advantages(rewards, 4, "none")
    torch.testing.assert_close(none, centred)
    # By hand: squared deviations 0.5, 2 and 0 over n - 1 = 3.
    sample_std = torch.tensor([math.sqrt(0.5 / 3), math.sqrt(2.0 / 3), 0.0]).repeat_interleave(4)
    torch.testing.assert_close(rlhf.grpo_advantages(rewards, 4), centred / (sample_std + 1e-4))
    torch.testing.assert_close(rlhf.grpo_advantages(rewards, 4, "batch"), centred / (rewards.std() + 1e-4))
    # GRPOConfig's aliases: True is "group", False is "none".
    torch.testing.assert_close(rlhf.grpo_advantages(rewards, 4, True), rlhf.grpo_advantages(rewards, 4, "group"))
    torch.testing.assert_close(rlhf.grpo_advantages(rewards, 4, False), none)
    # One completion per prompt: no spread to divide by, so no advantage (as TRL).
    assert torch.equal(rlhf.grpo_advantages(rewards, 1), torch.zeros(12))


def test_grpo_config_maps_the_boolean_aliases_as_we_do():
    from trl import GRPOConfig

    for alias, meaning in ((True, "group"), (False, "none")):
        config = GRPOConfig(**{**rlhf._common("test-grpo-alias", 1, 4, 1e-3, 0), "use_cpu": True},
                            num_generations=4, scale_rewards=alias)
        assert config.scale_rewards == meaning


@pytest.mark.parametrize(("args", "phrase"), [
    ((torch.zeros(3, 4), 4), "must be flat"),
    ((torch.zeros(10), 4), "do not make whole groups of 4"),
    ((torch.zeros(8), 0), "positive int"),
    ((torch.zeros(8), 4, "batchwise"), "'group', 'batch' or 'none'"),
    ((torch.tensor([1.0, float("nan"), 0.0, 1.0]), 2), "NaN"),
])
def test_grpo_advantages_refuse_bad_input(args, phrase):
    with pytest.raises(ValueError, match=re.escape(phrase)):
        rlhf.grpo_advantages(*args)


def test_one_name_for_each_helper():
    """quiet_progress is the one context manager that silences the libraries' bars (its alias is gone),
    and chapter 06's compare_models the one model comparison (no _compare_models with its own words)."""
    from course import rlhf_progress

    assert rlhf.quiet_progress is rlhf_progress.quiet_progress
    assert not hasattr(rlhf, "quiet_datasets") and not hasattr(rlhf_progress, "quiet_datasets")
    assert not hasattr(rlhf, "_compare_models")
