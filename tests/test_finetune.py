"""``python -m course finetune``: every method, resume after a crash, two processes, bad input.

A tiny random Llama with the real tokenizer stands in for the base model, so that a run takes
seconds; the code path is the one the default model takes.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from course import finetune, finetune_output
from course.__main__ import main

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tokenizer), tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def flags(model, out, *extra) -> list[str]:
    return ["--base_model", str(model), "--output_dir", str(out), "--batch_size", "4", "--max_steps", "4",
            "--val_set_size", "4", "--eval_step", "2", "--save_step", "2", "--lora_dropout", "0", *extra]


def logits_with_adapter(model_dir, adapter_dir) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir)
    peft_model = PeftModel.from_pretrained(base, adapter_dir)
    with torch.no_grad():
        return peft_model(input_ids=torch.arange(1, 9)[None]).logits


@pytest.mark.parametrize("method", finetune.METHODS)
def test_each_method_trains_and_writes_an_adapter_peft_loads(method, tiny_model, tmp_path):
    out = tmp_path / method
    assert main(["finetune", "--method", method, *flags(tiny_model, out)]) == 0
    summary = json.loads((out / "finetune.json").read_text())
    assert summary["steps"] == 4 and len(summary["history"]["loss"]) == 4
    assert [e["step"] for e in summary["history"]["evaluations"]] == [0, 2, 4]
    assert all(torch.isfinite(torch.tensor(summary["history"]["loss"])))
    config = json.loads((out / "adapter_config.json").read_text())
    with_adapter = logits_with_adapter(tiny_model, out)
    assert torch.isfinite(with_adapter).all()
    if method == "olora":  # converted to plain LoRA of rank 2r for the unmodified base
        assert config["r"] == 16 and config["lora_alpha"] == 32 and config["init_lora_weights"] is True
    if method == "dora":
        assert config["use_dora"] is True
    if method == "vera":
        assert config["peft_type"] == "VERA"
    if method == "nola":  # its own file (coefficients, seeds) and PEFT's plain LoRA give the same model
        from transformers import AutoModelForCausalLM

        from course.nola import load_nola, nola_layers

        nola = load_nola(AutoModelForCausalLM.from_pretrained(tiny_model), out / "nola")
        assert len(nola_layers(nola)) == 14 and config["peft_type"] == "LORA"  # 7 linears x 2 blocks
        with torch.no_grad():
            own = nola(input_ids=torch.arange(1, 9)[None]).logits
        torch.testing.assert_close(own, with_adapter, rtol=1e-5, atol=1e-5)  # float32, same sums
        base = AutoModelForCausalLM.from_pretrained(tiny_model)
        with torch.no_grad():
            assert not torch.allclose(base(input_ids=torch.arange(1, 9)[None]).logits, own), "the adapter did nothing"


def test_a_crashed_run_resumes_from_its_last_checkpoint_and_ends_where_an_unbroken_run_ends(
        tiny_model, tmp_path, monkeypatch):
    unbroken, broken = tmp_path / "unbroken", tmp_path / "broken"
    assert main(["finetune", *flags(tiny_model, unbroken, "--max_steps", "6")]) == 0

    import course.checkpoints

    real_save = course.checkpoints.save_checkpoint

    def crash_after_step_4(run_dir, step, *args, **kwargs):
        path = real_save(run_dir, step, *args, **kwargs)
        if step == 4:
            raise KeyboardInterrupt("the machine went down")
        return path

    monkeypatch.setattr("course.checkpoints.save_checkpoint", crash_after_step_4)
    with pytest.raises(KeyboardInterrupt):
        main(["finetune", *flags(tiny_model, broken, "--max_steps", "6")])
    assert sorted(p.name for p in broken.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert not (broken / "adapter_model.safetensors").exists()
    monkeypatch.setattr("course.checkpoints.save_checkpoint", real_save)

    assert main(["finetune", *flags(tiny_model, broken, "--max_steps", "6")]) == 2, "a run's folder needs --resume"
    assert main(["finetune", *flags(tiny_model, broken, "--max_steps", "6", "--resume")]) == 0
    a, b = load_file(unbroken / "adapter_model.safetensors"), load_file(broken / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:  # same data order, optimizer state and random state: the same arithmetic, bit for bit
        assert torch.equal(a[key], b[key]), key
    losses = [json.loads((d / "finetune.json").read_text())["history"]["loss"] for d in (unbroken, broken)]
    assert losses[0] == losses[1]


def test_a_killed_process_leaves_only_whole_checkpoints_and_resumes(tiny_model, tmp_path):
    out = tmp_path / "killed"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}

    def command(steps: int, *extra: str) -> list[str]:
        return [sys.executable, "-m", "course", "finetune",
                *flags(tiny_model, out, "--max_steps", str(steps), "--save_step", "1", "--eval_step", "0", *extra)]

    process = subprocess.Popen(command(400), cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not len(list(out.glob("checkpoint-*"))) and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    process.send_signal(signal.SIGKILL)
    process.wait()
    from course.checkpoints import checkpoints

    complete = checkpoints(out)
    assert complete, "a checkpoint was written before the kill"
    assert all((p / "state.json").is_file() and (p / "trainable.safetensors").is_file() for p in complete)
    step = json.loads((complete[-1] / "state.json").read_text())["step"]
    resumed = subprocess.run(command(step + 2, "--resume"), cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resuming from {complete[-1].name}" in resumed.stderr + resumed.stdout
    summary = json.loads((out / "finetune.json").read_text())
    assert summary["steps"] == step + 2 and summary["resumed_at_step"] == step
    # the time printed is this process's: the message says it covers the last two steps only
    assert f"{step + 2} steps in all, the last 2 in this run's" in resumed.stderr + resumed.stdout


def test_two_processes_match_one_with_the_same_global_batch(tiny_model, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    common = ["--max_steps", "3", "--eval_step", "0", "--save_step", "0"]
    assert main(["finetune", *flags(tiny_model, one, *common, "--batch_size", "8")]) == 0
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             "--master_port", "29533", "-m", "course", "finetune",
                             *flags(tiny_model, two, *common, "--batch_size", "4")],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    summaries = [json.loads((d / "finetune.json").read_text()) for d in (one, two)]
    assert summaries[0]["processes"] == 1 and summaries[1]["processes"] == 2
    # Same 8 examples per step, split 4 + 4; the loss is normalised by the global token count, so
    # only the order of float32 additions differs (all-reduce of two partial sums): ~1e-7 relative
    # per step, a little more after AdamW's division by sqrt(v). 1e-5 is far below any real difference
    # (a wrong split or normalisation changes the first loss in the second decimal).
    torch.testing.assert_close(torch.tensor(summaries[1]["history"]["loss"]),
                               torch.tensor(summaries[0]["history"]["loss"]), rtol=1e-5, atol=1e-5)
    a, b = load_file(one / "adapter_model.safetensors"), load_file(two / "adapter_model.safetensors")
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("extra", "phrase"), [
    (["--method", "ia3"], "invalid choice: 'ia3'"),
    (["--lora_r", "64"], "--lora_r 64 is larger than layer"),
    (["--data_path", "nowhere/data.jsonl"], "no such file"),
    (["--lora_target_modules", "query,value"], "matches no linear layer"),
    (["--batch_size", "0"], "--batch_size must be at least 1"),
    (["--resume"], "holds files that are not from this command"),
    (["--method", "nola", "--quantize"], "drop --quantize"),
])
def test_bad_input_is_refused_before_training_with_the_flag_named(extra, phrase, tiny_model, tmp_path, capsys):
    out = tmp_path / "out"
    if "--resume" in extra:
        out.mkdir()
        (out / "thesis.tex").write_text("somebody else's work")
    with pytest.raises(SystemExit) if extra == ["--method", "ia3"] else _no_raise():
        code = main(["finetune", *flags(tiny_model, out), *extra])
        assert code == 2
    err = capsys.readouterr().err
    assert phrase in err, err
    assert not (out / "adapter_model.safetensors").exists() and not list(out.glob("checkpoint-*"))
    if "--resume" in extra:
        assert (out / "thesis.tex").read_text() == "somebody else's work"
        assert [p.name for p in out.iterdir()] == ["thesis.tex"], "a refused folder is not touched (no lock file)"


def test_a_data_line_without_the_needed_fields_is_named(tiny_model, tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    data.write_text('{"prompt": "2+2?", "answer": "4"}\n\n{"prompt": "3+3?", "reply": "6"}\n')
    assert main(["finetune", *flags(tiny_model, tmp_path / "out"), "--data_path", str(data)]) == 2
    err = capsys.readouterr().err
    assert "data.jsonl line 3" in err and "no `answer`" in err


def test_user_data_in_each_shape_trains(tiny_model, tmp_path):
    from datasets import Dataset

    rows = [{"instruction": f"Say {i} twice.", "input": "", "output": f"{i} {i}"} for i in range(40)]
    (tmp_path / "alpaca.json").write_text(json.dumps(rows))
    Dataset.from_list([{"messages": [{"role": "user", "content": f"Echo {i}"},
                                     {"role": "assistant", "content": str(i)}]} for i in range(40)]
                      ).save_to_disk(str(tmp_path / "chat"))
    for name, numeric in (("alpaca.json", False), ("chat", True)):
        out = tmp_path / f"run-{name}"
        assert main(["finetune", *flags(tiny_model, out), "--data_path", str(tmp_path / name)]) == 0
        final = json.loads((out / "finetune.json").read_text())["final"]
        assert "val_loss" in final and ("exact_match" in final) == numeric  # exact match for numeric answers only


class _no_raise:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# --- Runs that never lose work (issue 21) -------------------------------------------------------
# The smallest budgets: rank 2 on q_proj, one or two steps of batch 2, no evaluation on the way.


def small(model, out, *extra) -> list[str]:
    return ["finetune", "--base_model", str(model), "--output_dir", str(out), "--max_steps", "1", "--batch_size", "2",
            "--val_set_size", "2", "--eval_step", "0", "--save_step", "1", "--lora_r", "2",
            "--lora_target_modules", "q_proj", *extra]


@pytest.fixture
def no_model_load(monkeypatch):
    """A refusal must come before the model loads."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the refusal")

    monkeypatch.setattr(finetune, "load_model", refuse)


def test_a_second_run_into_a_claimed_folder_is_refused_naming_the_process(tiny_model, tmp_path, capsys):
    out = tmp_path / "shared"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from course.finetune import claim_output; "
         "lock = claim_output(Path(sys.argv[1])); print('claimed', flush=True); time.sleep(60)", str(out)],
        cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "claimed"
        assert main(small(tiny_model, out)) == 2
        err = capsys.readouterr().err
        assert f"--output_dir {out} is in use by another fine-tuning run (process {holder.pid}" in err, err
        assert not (out / "adapter_model.safetensors").exists() and not list(out.glob("checkpoint-*"))
    finally:
        holder.kill()
        holder.wait()
    assert main(small(tiny_model, out)) == 0, "the claim ends with its process"
    assert main(small(tiny_model, out, "--overwrite")) == 0, "and with the run that made it"


def test_resume_of_a_finished_run_without_checkpoints_is_refused(tiny_model, tmp_path, capsys):
    out = tmp_path / "done"
    assert main(small(tiny_model, out, "--save_step", "0")) == 0
    adapter = (out / "adapter_model.safetensors").read_bytes()
    summary = (out / "finetune.json").read_text()
    assert main(small(tiny_model, out, "--save_step", "0", "--resume")) == 2
    err = capsys.readouterr().err
    assert f"nothing to resume: --output_dir {out} holds a finished run that kept no checkpoint" in err, err
    assert "use a new --output_dir, or --overwrite" in err.lower()
    assert (out / "adapter_model.safetensors").read_bytes() == adapter and (out / "finetune.json").read_text() == summary
    assert main(small(tiny_model, out, "--resume", "--overwrite")) == 2
    assert "choose one" in capsys.readouterr().err
    assert main(small(tiny_model, out, "--seed", "1", "--overwrite")) == 0, "--overwrite replaces it when asked"
    assert json.loads((out / "finetune.json").read_text())["options"]["seed"] == 1
    assert (out / "adapter_model.safetensors").read_bytes() != adapter


def test_resume_refuses_flags_and_data_that_change_the_run_showing_the_differences(tiny_model, tmp_path, capsys):
    out, data = tmp_path / "run", tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i}+1?", "answer": str(i + 1)}) + "\n" for i in range(8)))
    assert main(small(tiny_model, out, "--data_path", str(data))) == 0
    summary = (out / "finetune.json").read_text()
    (out / ".checkpoint-2.tmp-abc123").mkdir()  # what a run killed mid-checkpoint leaves
    code = main(small(tiny_model, out, "--data_path", str(data), "--resume", "--max_steps", "2",
                      "--learning_rate", "1e-9", "--lora_r", "4"))
    err = capsys.readouterr().err
    assert code == 2
    assert "--learning_rate: 0.002 (the run) -> 1e-09 (now)" in err and "--lora_r: 2 (the run) -> 4 (now)" in err, err
    assert (out / "finetune.json").read_text() == summary
    data.write_text(data.read_text().replace('"answer": "1"', '"answer": "one"'))
    assert main(small(tiny_model, out, "--data_path", str(data), "--resume", "--max_steps", "2")) == 2
    assert f"the data: --data_path {data} has changed since the run started" in capsys.readouterr().err
    data.write_text(data.read_text().replace('"answer": "one"', '"answer": "1"'))
    assert main(small(tiny_model, out, "--data_path", str(data), "--resume", "--max_steps", "2")) == 0
    assert json.loads((out / "finetune.json").read_text())["steps"] == 2, "a longer run is a continuation"
    assert not (out / ".checkpoint-2.tmp-abc123").exists(), "the killed run's half checkpoint was cleared"


def test_output_dir_dot_works(tiny_model, tmp_path, monkeypatch):
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    assert main(small(tiny_model, ".")) == 0
    assert (here / "adapter_model.safetensors").is_file() and (here / "checkpoint-1").is_dir()
    assert not [p.name for p in here.iterdir() if ".old-" in p.name or ".tmp-" in p.name]
    assert main(small(tiny_model, ".", "--resume", "--max_steps", "2")) == 0
    assert json.loads((here / "finetune.json").read_text())["steps"] == 2


def _is_root_like(folder: Path) -> bool:
    try:
        (folder / "probe").write_text("x")
    except OSError:
        return False
    (folder / "probe").unlink()
    return True


def test_a_read_only_folder_is_refused_before_the_model_loads(tiny_model, tmp_path, capsys, monkeypatch,
                                                              no_model_load):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        if _is_root_like(locked):  # root writes anywhere: make the folder refuse the way a read-only mount does
            def read_only(*args, **kwargs):
                raise PermissionError(13, "Permission denied")

            monkeypatch.setattr(finetune_output.tempfile, "mkstemp", read_only)
        assert main(small(tiny_model, locked)) == 2
        assert main(small(tiny_model, locked / "inside")) == 2  # a read-only parent
    finally:
        locked.chmod(0o755)
    err = capsys.readouterr().err
    assert f"--output_dir {locked} cannot be written to (Permission denied)" in err, err
    assert f"--output_dir {locked / 'inside'} cannot be written to" in err, err
    assert [p.name for p in locked.iterdir()] == [], "nothing was left in the folder"


def test_a_full_disk_is_refused_before_the_model_loads(tiny_model, tmp_path, capsys, monkeypatch, no_model_load):
    import collections

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(finetune_output.shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 4096, 4096))
    out = tmp_path / "full"
    assert main(small(tiny_model, out)) == 2
    err = capsys.readouterr().err
    assert re.search(rf"--output_dir {re.escape(str(out))} has 0\.0 MB free, and this run writes about [\d.]+ MB", err), err
    assert not out.exists(), "a refused run leaves no folder behind"


def test_answers_cut_off_by_cutoff_len_are_refused_before_the_model_loads(tiny_model, tmp_path, capsys,
                                                                         no_model_load):
    assert main(small(tiny_model, tmp_path / "cut", "--cutoff_len", "1")) == 2
    err = capsys.readouterr().err
    assert re.search(r"--cutoff_len 1 leaves (\d+) of \1 training examples with no answer token", err), err


def test_a_nan_loss_stops_the_run_and_writes_no_adapter(tiny_model, tmp_path, capsys, monkeypatch):
    real = finetune._loss_sum
    calls = []

    def nan_at_step_2(model, batch):
        loss, count = real(model, batch)
        calls.append(1)
        return (loss * float("nan") if len(calls) == 2 else loss), count

    monkeypatch.setattr(finetune, "_loss_sum", nan_at_step_2)
    out = tmp_path / "nan"
    assert main(small(tiny_model, out, "--max_steps", "3")) == 1
    captured = capsys.readouterr()
    assert "the training loss is nan at step 2" in captured.err and "no adapter was written" in captured.err
    assert "checkpoint-1 is there to --resume from" in captured.err
    assert "adapter written" not in captured.out + captured.err
    assert not (out / "adapter_model.safetensors").exists() and not (out / "finetune.json").exists()
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-1"]


@pytest.mark.parametrize(("extra", "phrase"), [
    (["--base_model", "/path/that/does/not/exist"], "looks like a local folder, and /path/that/does/not/exist does "
                                                    "not exist"),
    (["--device", "mps"], "--device mps, but this machine has no MPS device"),
    (["--device", "cuda:7"], "--device cuda"),
])
def test_environment_mistakes_are_clear_errors_not_tracebacks(extra, phrase, tiny_model, tmp_path, capsys):
    if extra == ["--device", "mps"] and torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    if extra == ["--device", "cuda:7"] and torch.cuda.device_count() > 7:
        pytest.skip("this machine has 8 GPUs")
    out = tmp_path / "out"
    assert main(small(tiny_model, out, *extra)) == 2
    assert phrase in capsys.readouterr().err
    assert not out.exists()


def test_a_rank_too_large_for_the_layers_is_named_before_the_space_it_would_need(tiny_model, tmp_path, capsys,
                                                                                monkeypatch):
    # A huge --lora_r also asks for a huge adapter: the message must name the rank, not the disk.
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr("course.finetune_output.shutil.disk_usage", lambda path: usage(2**30, 2**30, 0))
    assert main(["finetune", *flags(tiny_model, tmp_path / "out"), "--lora_r", "64"]) == 2
    err = capsys.readouterr().err
    assert "--lora_r 64 is larger than layer" in err and "MB free" not in err, err
