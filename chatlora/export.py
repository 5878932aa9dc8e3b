"""Export a tuned model to GGUF (llama.cpp, Ollama, LM Studio) with an Ollama Modelfile, then prove it matches.

:func:`export` merges the adapter into its base (or takes a merged model), writes one GGUF file with the ``gguf``
package (llama.cpp's own writer) following llama.cpp's conventions, a ``Modelfile`` beside it and a manifest, and
runs :func:`check_export`. The check reloads the GGUF with transformers and compares it with the adapter on held-out
prompts, and compares every place that decides how a prompt is built or where a reply stops (the GGUF's chat
template and special tokens, the Modelfile's TEMPLATE, SYSTEM and stop parameters) with the training template.
``--lora-only`` writes the adapter alone as a llama.cpp LoRA GGUF instead.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from . import __version__
from .errors import ChatloraError, FileError
from .infer import SamplingConfig
from .merge import set_generation_stops
from .model import EMBEDDED, ModelError, embedded_gguf, load_model, load_tokenizer, resolve_model
from .runcard import read_adapter, read_run_card, system_prompt
from .template import (
    IGNORE_INDEX,
    TemplateError,
    encode_conversation,
    encode_prompt,
    end_of_turn,
    render_text,
    stop_token_ids,
    with_system,
)

__all__ = [
    "MANIFEST",
    "MODELFILE",
    "QUANTS",
    "Check",
    "ExportResult",
    "Quant",
    "check_export",
    "export",
    "format_checks",
    "modelfile_text",
    "ollama_template",
    "parse_modelfile",
    "render_go_template",
    "write_gguf",
    "write_lora_gguf",
]

MANIFEST = "chatlora-export.json"
MODELFILE = "Modelfile"
_Q = gguf.GGMLQuantizationType
_F = gguf.LlamaFileType


@dataclass(frozen=True)
class Quant:
    """One ``--quant`` choice: the GGML type of the 2-D weights and what the parity check demands of it.

    Attributes:
        min_top1: share of reply tokens whose top-1 prediction must agree with the fp32 adapter's under teacher
            forcing (the rounding's cost; conversion errors are caught exactly, see :func:`check_export`).
        embeddings: type of ``token_embd``/``output``; 4/5-bit types keep them at q8_0, as llama.cpp's own
            4/5-bit mixes keep the output layer at higher precision.
    """

    name: str
    qtype: gguf.GGMLQuantizationType
    file_type: gguf.LlamaFileType
    min_top1: float
    embeddings: gguf.GGMLQuantizationType | None = None


QUANTS: dict[str, Quant] = {
    q.name: q
    for q in (
        Quant("f32", _Q.F32, _F.ALL_F32, 0.99),
        Quant("f16", _Q.F16, _F.MOSTLY_F16, 0.99),
        Quant("bf16", _Q.BF16, _F.MOSTLY_BF16, 0.95),
        Quant("q8_0", _Q.Q8_0, _F.MOSTLY_Q8_0, 0.95),
        Quant("q5_1", _Q.Q5_1, _F.MOSTLY_Q5_1, 0.85, _Q.Q8_0),
        Quant("q5_0", _Q.Q5_0, _F.MOSTLY_Q5_0, 0.85, _Q.Q8_0),
        Quant("q4_1", _Q.Q4_1, _F.MOSTLY_Q4_1, 0.80, _Q.Q8_0),
        Quant("q4_0", _Q.Q4_0, _F.MOSTLY_Q4_0, 0.80, _Q.Q8_0),
    )
}
LORA_QUANTS = ("f32", "f16")

_ARCHS = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2}
_PERMUTED = {"llama"}  # llama.cpp's llama graph wants Q/K rows in its RoPE order; qwen2 keeps HF's


@dataclass
class Check:
    """One row of the parity table: ``status`` is ``PASS``, ``FAIL`` or ``SKIP`` (with the reason in ``detail``)."""

    name: str
    status: str
    detail: str

    @property
    def failed(self) -> bool:
        return self.status == "FAIL"


@dataclass
class ExportResult:
    """What :func:`export` wrote (the GGUF file first) and the parity check's rows (empty with ``check=False``)."""

    output_dir: Path
    files: list[Path]
    checks: list[Check] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not any(c.failed for c in self.checks)


# ---------------------------------------------------------------- the source: an adapter or a merged model


@dataclass
class _Source:
    kind: str  # "adapter" or "model"
    path: Path
    card: dict[str, Any]
    tokenizer: Any
    base_spec: str | None = None

    @property
    def system_prompt(self) -> str | None:
        return system_prompt(self.card)

    @property
    def stem(self) -> str:
        return re.sub(r"[^A-Za-z0-9._-]+", "-", self.path.resolve().name).strip("-") or "model"


def _open_source(adapter: str | Path | None, model: str | Path | None) -> _Source:
    if (adapter is None) == (model is None):
        raise ModelError("give exactly one of --adapter DIR (a chatlora run) or --model DIR (a merged model)")
    if adapter is not None:
        path = Path(adapter)
        card, spec = read_adapter(path)
        return _Source("adapter", path, card, load_tokenizer(str(path)), spec)
    path = Path(model)
    if not (path / "config.json").is_file():
        raise ModelError(f"{path}: no config.json here; --model takes a merged model directory (chatlora merge)")
    return _Source("model", path, read_run_card(path), load_tokenizer(str(path)))


def _reference_model(src: _Source):
    """The model the export must reproduce, in fp32: base + adapter merged, or the merged model as saved."""
    if src.kind == "model":
        return load_model(str(src.path)).eval()
    from peft import PeftModel

    base = load_model(resolve_model(src.base_spec), torch.float32)
    merged = PeftModel.from_pretrained(base, str(src.path)).merge_and_unload().eval()
    set_generation_stops(merged, src.tokenizer)
    return merged


def _base_gguf(src: _Source) -> Path | None:
    """The base model's own GGUF file, when it was given as one (a LoRA GGUF needs the exact base it was tuned on)."""
    spec = src.base_spec
    if spec in (None, "", EMBEDDED):
        return embedded_gguf()
    return Path(spec).resolve() if str(spec).endswith(".gguf") else None


# ---------------------------------------------------------------- GGUF: hyperparameters, vocabulary, tensors


def _arch(config) -> str:
    arch = getattr(config, "model_type", None)
    if arch not in _ARCHS:
        raise ModelError(f"GGUF export supports the {' and '.join(_ARCHS)} architectures; this model is {arch!r}")
    return arch


def _rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in (None, "default"):
        raise ModelError(f"RoPE scaling {rope_type!r} is not written by chatlora export (only plain RoPE)")
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    if theta is None:
        raise ModelError("the model config names no rope_theta")
    return float(theta)


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _write_hparams(writer: gguf.GGUFWriter, config, arch: str, quant: Quant, name: str) -> None:
    if getattr(config, "use_sliding_window", False):
        raise ModelError("sliding-window attention is not written by chatlora export")
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    head_dim = _head_dim(config)
    if arch == "llama":
        writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_file_type(quant.file_type)
    if quant.qtype not in (_Q.F32, _Q.F16):
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _split_patterns() -> dict[str, str]:
    """llama.cpp pre-tokenizer names whose split regex transformers knows, so a reload reproduces them."""
    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS
    except ImportError:  # an older transformers: only the regex-free byte-level kinds are recognised
        return {}
    return {
        name: GGUF_PRE_TOKENIZER_SPLITS[name] for name in ("qwen2", "llama-bpe") if name in GGUF_PRE_TOKENIZER_SPLITS
    }


def _pre_tokenizer(backend: dict) -> str:
    """llama.cpp's ``tokenizer.ggml.pre`` for the way this tokenizer splits text before BPE.

    Derived from the tokenizer the adapter was trained with, so llama.cpp splits text the way training did.
    """
    pre = backend.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    last = steps[-1] if steps else {}
    if kinds and kinds[-1] == "ByteLevel" and last.get("add_prefix_space"):
        raise ModelError("the tokenizer adds a prefix space (ByteLevel add_prefix_space), which llama.cpp does not")
    if kinds == ["ByteLevel"] and last.get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and last.get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not last.get("use_regex", True):
        regex = (steps[0].get("pattern") or {}).get("Regex")
        for name, known in _split_patterns().items():
            if regex == known and steps[0].get("behavior") == "Isolated" and not steps[0].get("invert"):
                return name
    raise ModelError(
        f"the tokenizer's pre-tokenizer ({' + '.join(map(str, kinds)) or 'none'}) has no llama.cpp equivalent that "
        "chatlora knows (GPT-2, SmolLM, Qwen2 or Llama-3 style), so llama.cpp would split text differently"
    )


def _vocab(tokenizer, vocab_size: int) -> tuple[list[str], list[int], list[str], str]:
    """Tokens, token types, merges and pre-tokenizer name of a byte-level BPE tokenizer, llama.cpp's ``gpt2``."""
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    model = backend.get("model", {})
    decoder = backend.get("decoder") or {}
    if model.get("type") != "BPE" or decoder.get("type") != "ByteLevel":
        raise ModelError(
            f"GGUF export writes byte-level BPE tokenizers (GPT-2 style: Llama 3, Qwen2, SmolLM); this one is "
            f"{model.get('type')} with a {decoder.get('type')} decoder (sentencepiece tokenizers are not supported)"
        )
    normalizer = backend.get("normalizer")
    if normalizer and normalizer.get("type") != "NFC":
        raise ModelError(f"the tokenizer normalizes text ({normalizer.get('type')}), which llama.cpp does not")
    pre = _pre_tokenizer(backend)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    if not merges:
        raise ModelError("the BPE tokenizer has no merges; llama.cpp needs them")
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    if max(by_id) >= vocab_size:
        raise ModelError(f"the tokenizer has token id {max(by_id)} but the model only {vocab_size} embeddings")
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    return tokens, types, merges, pre


def _write_tokenizer(writer: gguf.GGUFWriter, tokenizer, vocab_size: int) -> None:
    tokens, types, merges, pre = _vocab(tokenizer, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    _, eot = end_of_turn(tokenizer)
    if tokenizer.bos_token_id is not None:
        writer.add_bos_token_id(tokenizer.bos_token_id)
    # The stop token is the one the model was trained to end its turns with; runtimes that stop only at EOS stop.
    writer.add_eos_token_id(eot)
    writer.add_eot_token_id(eot)
    if tokenizer.unk_token_id is not None:
        writer.add_unk_token_id(tokenizer.unk_token_id)
    if tokenizer.pad_token_id is not None:
        writer.add_pad_token_id(tokenizer.pad_token_id)
    # Training tokenizes the rendered template without special tokens: a runtime must add none either, or the model
    # sees a BOS it never saw in training (twice, when the template writes it too).
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)
    writer.add_chat_template(tokenizer.chat_template)


def _permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """HF's Q/K rows -> llama.cpp's: each head's two rotary halves interleaved (llama.cpp's RoPE pairs neighbours)."""
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def _unpermute(weights: np.ndarray, n_head: int) -> np.ndarray:
    return (
        weights.reshape(n_head, weights.shape[0] // n_head // 2, 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def _qk_heads(hf_name: str, config) -> int | None:
    """Heads to permute by for a llama Q/K weight or bias, None for any other tensor."""
    if ".q_proj." in hf_name or hf_name.endswith(".q_proj"):
        return config.num_attention_heads
    if ".k_proj." in hf_name or hf_name.endswith(".k_proj"):
        return getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return None


def _gguf_name(name_map: gguf.TensorNameMap, hf_name: str) -> str:
    found = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if found is None:
        raise ModelError(f"{hf_name}: this weight has no llama.cpp tensor name")
    return found


def _encode(data: np.ndarray, gguf_name: str, quant: Quant) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    """Tensor data in the GGML type ``quant`` gives it; norms and biases stay f32, as llama.cpp keeps them."""
    if data.ndim == 1:
        return data.astype(np.float32), _Q.F32
    qtype = quant.qtype
    if quant.embeddings is not None and gguf_name in ("token_embd.weight", "output.weight"):
        qtype = quant.embeddings
    block, _ = gguf.GGML_QUANT_SIZES[qtype]
    if data.shape[-1] % block:
        qtype = _Q.F16  # rows that do not split into whole blocks: llama.cpp falls back the same way
    return gguf.quants.quantize(data, qtype), qtype


def _gguf_tensors(model, spec: Quant):
    """``(gguf_name, data, qtype)`` for each weight as llama.cpp stores it (llama Q/K rows in llama.cpp's order)."""
    config = model.config
    arch = _arch(config)
    name_map = gguf.get_tensor_name_map(_ARCHS[arch], config.num_hidden_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue  # llama.cpp uses token_embd as the output layer when output.weight is absent
        gname = _gguf_name(name_map, hf_name)
        data = tensor.detach().to(torch.float32).cpu().numpy()
        heads = _qk_heads(hf_name, config) if arch in _PERMUTED else None
        if heads is not None:
            data = _permute(data, heads)
        yield (gname, *_encode(data, gname, spec))


def _round_like_export_(model, spec: Quant) -> None:
    """Give ``model`` the weights its ``spec`` GGUF holds: each weight encoded and decoded as the file stores it.

    Done on HF's row order, independently of :func:`_permute` (GGML types quantize row by row, so permuting rows
    commutes with them): a file written with wrong Q/K rows does not get a reference with the same mistake.
    """
    config = model.config
    name_map = gguf.get_tensor_name_map(_ARCHS[_arch(config)], config.num_hidden_layers)
    seen = set()
    with torch.no_grad():
        for hf_name, tensor in model.state_dict().items():
            if tensor.data_ptr() in seen:  # tied embeddings: one tensor under two names, rounded once
                continue
            seen.add(tensor.data_ptr())
            gname = _gguf_name(name_map, hf_name)
            encoded, qtype = _encode(tensor.detach().to(torch.float32).cpu().numpy(), gname, spec)
            decoded = gguf.quants.dequantize(encoded, qtype).reshape(tuple(tensor.shape))
            tensor.copy_(torch.from_numpy(np.ascontiguousarray(decoded)))


def write_gguf(model, tokenizer, path: str | Path, quant: str = "f16", name: str | None = None) -> Path:
    """Write ``model`` (a llama or qwen2 ``*ForCausalLM``) and ``tokenizer`` as one GGUF file llama.cpp loads.

    The chat template, BOS, the end-of-turn token (as EOS and EOT) and chatlora chat's sampling defaults go into the
    metadata. The file appears at ``path`` only once complete.
    """
    spec = _quant(quant)
    path = Path(path)
    config = model.config
    arch = _arch(config)
    tmp = path.with_name(path.name + ".tmp")
    writer = gguf.GGUFWriter(tmp, arch)
    _write_hparams(writer, config, arch, spec, name or path.stem)
    _write_tokenizer(writer, tokenizer, config.vocab_size)
    sampling = SamplingConfig()
    writer.add_sampling_temp(sampling.temperature)
    writer.add_sampling_top_p(sampling.top_p)
    writer.add_sampling_top_k(sampling.top_k)
    writer.add_sampling_penalty_repeat(sampling.repetition_penalty)
    for gname, encoded, qtype in _gguf_tensors(model, spec):
        # f32/f16 arrays carry their type; quantized ones are bytes whose GGML type must be named
        writer.add_tensor(gname, encoded, raw_dtype=None if qtype in (_Q.F32, _Q.F16) else qtype)
    return _finish_gguf(writer, tmp, path)


def _finish_gguf(writer, tmp: Path, path: Path) -> Path:
    """Write header, metadata and tensors to ``tmp``, then move it into place: a GGUF appears whole or not at all."""
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    os.replace(tmp, path)
    return path


def _quant(quant: str) -> Quant:
    if quant not in QUANTS:
        raise ModelError(f"--quant {quant}: choose one of {', '.join(QUANTS)}")
    return QUANTS[quant]


# ---------------------------------------------------------------- LoRA-only GGUF


def _lora_pairs(adapter: Path) -> tuple[dict[str, Any], dict[str, tuple[np.ndarray, np.ndarray]]]:
    """The adapter's config and its ``{base weight name: (A, B)}``, refusing what llama.cpp LoRA cannot express."""
    from safetensors.numpy import load_file

    cfg = json.loads((adapter / "adapter_config.json").read_text())
    problems = []
    if cfg.get("use_dora"):
        problems.append("DoRA")
    if cfg.get("modules_to_save"):
        problems.append(f"modules_to_save {cfg['modules_to_save']}")
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        problems.append("per-module rank/alpha patterns")
    if cfg.get("bias", "none") != "none":
        problems.append(f"bias={cfg['bias']}")
    if problems:
        raise ModelError(
            f"{adapter}: a llama.cpp LoRA GGUF cannot hold {', '.join(problems)}; export the merged model"
        )
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    pairs: dict[str, dict[str, np.ndarray]] = {}
    for key, value in weights.items():
        m = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.[^.]+)?\.weight", key)
        if not m:
            raise ModelError(f"{adapter}: unexpected tensor {key} in the adapter")
        pairs.setdefault(m.group(1) + ".weight", {})[m.group(2)] = value.astype(np.float32)
    out = {}
    for name, ab in pairs.items():
        if set(ab) != {"A", "B"} or "embed_tokens" in name or name.startswith("lm_head"):
            raise ModelError(f"{adapter}: {name} is not a plain linear LoRA pair; export the merged model")
        out[name] = (ab["A"], ab["B"])
    return cfg, out


def _lora_alpha(cfg: dict[str, Any]) -> float:
    """``adapter.lora.alpha`` such that llama.cpp's scale alpha / r equals PEFT's (alpha / sqrt(r) with rsLoRA)."""
    r, alpha = cfg["r"], cfg["lora_alpha"]
    return float(alpha * math.sqrt(r)) if cfg.get("use_rslora") else float(alpha)


def write_lora_gguf(adapter: str | Path, path: str | Path, quant: str = "f16") -> Path:
    """Write a PEFT LoRA adapter as a llama.cpp LoRA GGUF (``llama-cli -m BASE.gguf --lora FILE``, Ollama ``ADAPTER``).

    Tensors are ``blk.N.attn_q.weight.lora_a`` (A, r x in) and ``.lora_b`` (B, out x r), B's rows in llama.cpp's
    Q/K order for llama; ``adapter.lora.alpha`` makes llama.cpp's scale alpha / r equal PEFT's.
    """
    if quant not in LORA_QUANTS:
        raise ModelError(f"--lora-only writes {' or '.join(LORA_QUANTS)}, not {quant}")
    adapter, path = Path(adapter), Path(path)
    _, spec = read_adapter(adapter)
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(resolve_model(spec))
    arch = _arch(config)
    cfg, pairs = _lora_pairs(adapter)
    name_map = gguf.get_tensor_name_map(_ARCHS[arch], config.num_hidden_layers)
    tmp = path.with_name(path.name + ".tmp")
    writer = gguf.GGUFWriter(tmp, arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_name(adapter.resolve().name)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, _lora_alpha(cfg))
    dtype = np.float16 if quant == "f16" else np.float32
    for hf_name, (a, b) in sorted(pairs.items()):
        gname = _gguf_name(name_map, hf_name)
        heads = _qk_heads(hf_name, config) if arch in _PERMUTED else None
        if heads is not None:
            b = _permute(b, heads)  # W' = W + s B A: permuting W's rows is permuting B's
        writer.add_tensor(gname + ".lora_a", a.astype(dtype))
        writer.add_tensor(gname + ".lora_b", b.astype(dtype))
    return _finish_gguf(writer, tmp, path)


# ---------------------------------------------------------------- Ollama: TEMPLATE in Go text/template, Modelfile


_PROBES = {r: f"\u2063chatlora-{r}\u2063" for r in ("system", "user", "assistant", "user2")}


@dataclass(frozen=True)
class _TemplateParts:
    """An append-only chat template as literal pieces: what goes around each role's content, and the extras."""

    head: str  # written before the first message when the conversation has no system message (a default system)
    wrap: dict[str, tuple[str, str]]  # role -> (before content, after content)
    generation: str  # what add_generation_prompt appends

    def render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        out = [] if messages and messages[0]["role"] == "system" else [self.head]
        for m in messages:
            before, after = self.wrap[m["role"]]
            out += [before, m["content"], after]
        if add_generation_prompt:
            out.append(self.generation)
        return "".join(out)


def _split_probe(text: str, probe: str, what: str) -> tuple[str, str]:
    if text.count(probe) != 1:
        raise TemplateError(f"the chat template does not write the {what} content once, verbatim")
    before, after = text.split(probe)
    return before, after


def _template_parts(tokenizer) -> _TemplateParts:
    """Read the training template's pieces off probe renderings, then prove them on longer conversations."""
    p = _PROBES
    sys_, usr, ast = (
        {"role": "system", "content": p["system"]},
        {"role": "user", "content": p["user"]},
        {"role": "assistant", "content": p["assistant"]},
    )

    def suffix(longer: list[dict], shorter: list[dict]) -> str:
        full, prefix = render_text(longer, tokenizer), render_text(shorter, tokenizer)
        if not full.startswith(prefix):
            raise TemplateError("the chat template rewrites earlier turns when one is added")
        return full[len(prefix) :]

    wrap = {
        "system": _split_probe(render_text([sys_], tokenizer), p["system"], "system"),
        "user": _split_probe(suffix([sys_, usr], [sys_]), p["user"], "user"),
        "assistant": _split_probe(suffix([sys_, usr, ast], [sys_, usr]), p["assistant"], "assistant"),
    }
    no_system = render_text([usr], tokenizer)
    user_block = "".join((wrap["user"][0], p["user"], wrap["user"][1]))
    if not no_system.endswith(user_block):
        raise TemplateError("the chat template writes a first user turn differently without a system message")
    prompt = render_text([sys_, usr], tokenizer, add_generation_prompt=True)
    plain = render_text([sys_, usr], tokenizer)
    if not prompt.startswith(plain):
        raise TemplateError("the chat template's generation prompt rewrites the conversation")
    parts = _TemplateParts(no_system[: -len(user_block)], wrap, prompt[len(plain) :])
    user2 = {"role": "user", "content": p["user2"]}
    for conv in ([sys_, usr, ast, user2, ast], [usr, ast, user2], [usr]):
        for gen in (False, True):
            if parts.render(conv, gen) != render_text(conv, tokenizer, add_generation_prompt=gen):
                raise TemplateError("it is not a fixed wrapping of each message (it depends on position or content)")
    return parts


def _go_string(text: str) -> str:
    # A JSON string is a valid Go interpreted string literal (same escapes; non-ASCII stays UTF-8).
    return json.dumps(text, ensure_ascii=False)


def ollama_template(tokenizer) -> str:
    """The training chat template as an Ollama ``TEMPLATE`` (Go text/template over ``.Messages``).

    Every literal is a Go string in an action, so the template's own layout whitespace is trimmed and nothing but
    the training text is written. The generation prompt follows unless the conversation ends on an assistant turn.
    """
    try:
        parts = _template_parts(tokenizer)
    except TemplateError as e:
        raise TemplateError(f"cannot write the chat template as an Ollama TEMPLATE: {e}") from None

    def lit(text: str) -> str:
        return "{{ " + _go_string(text) + " }}" if text else ""

    lines = ['{{- $role := "" }}']
    if parts.head:
        lines.append(
            '{{- if not (and .Messages (eq (index .Messages 0).Role "system")) }}' + lit(parts.head) + "{{ end }}"
        )
    lines.append("{{- range .Messages }}{{ $role = .Role }}")
    for i, role in enumerate(("system", "user", "assistant")):
        before, after = parts.wrap[role]
        keyword = "if" if i == 0 else "else if"
        lines.append(f'{{{{- {keyword} eq .Role "{role}" }}}}{lit(before)}{{{{ .Content }}}}{lit(after)}')
    lines += ["{{- end }}", "{{- end }}", '{{- if ne $role "assistant" }}' + lit(parts.generation) + "{{ end }}"]
    return "\n".join(lines)


def modelfile_text(
    model_from: str,
    template: str,
    system: str | None,
    stops: list[str],
    adapter: str | None = None,
    sampling: SamplingConfig | None = None,
) -> str:
    """An Ollama Modelfile: FROM, optional ADAPTER, TEMPLATE, SYSTEM, stop tokens and chatlora chat's sampling."""
    sampling = sampling or SamplingConfig()
    for what, text in (("TEMPLATE", template), ("SYSTEM", system or "")):
        if '"""' in text:
            raise ModelError(f'the {what} text contains """, which a Modelfile cannot quote')
    lines = [
        "# Written by `chatlora export`; `chatlora export --check DIR` proves it renders prompts like training.",
        f"FROM {model_from}",
    ]
    if adapter:
        lines.append(f"ADAPTER {adapter}")
    lines.append(f'TEMPLATE """{template}"""')
    if system:
        lines.append(f'SYSTEM """{system}"""')
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    lines += [
        f"PARAMETER temperature {sampling.temperature}",
        f"PARAMETER top_p {sampling.top_p}",
        f"PARAMETER top_k {sampling.top_k}",
        f"PARAMETER repeat_penalty {sampling.repetition_penalty}",
    ]
    return "\n".join(lines) + "\n"


def parse_modelfile(text: str) -> dict[str, Any]:
    """The commands of a Modelfile: ``FROM``, ``ADAPTER``, ``TEMPLATE``, ``SYSTEM`` (strings), ``PARAMETER`` (lists)."""
    out: dict[str, Any] = {"PARAMETER": {}}
    pos = 0
    command = re.compile(r"\s*(?:#[^\n]*\n?)?")
    while pos < len(text):
        pos = command.match(text, pos).end()
        while (m := command.match(text, pos)) and m.end() > pos:
            pos = m.end()
        if pos >= len(text):
            break
        m = re.compile(r"([A-Za-z]+)[ \t]+").match(text, pos)
        if not m:
            raise ModelError(f"Modelfile: cannot read the line at character {pos}")
        name, pos = m.group(1).upper(), m.end()
        if text.startswith('"""', pos):
            end = text.find('"""', pos + 3)
            if end < 0:
                raise ModelError(f'Modelfile: {name} opens """ and never closes it')
            value, pos = text[pos + 3 : end], end + 3
        else:
            end = text.find("\n", pos)
            end = len(text) if end < 0 else end
            value, pos = text[pos:end].strip(), end
        if name == "PARAMETER":
            key, _, raw = value.partition(" ")
            raw = raw.strip()
            if len(raw) >= 2 and raw[0] == raw[-1] == '"':
                raw = raw[1:-1]
            out["PARAMETER"].setdefault(key, []).append(raw)
        else:
            out[name] = value
    return out


_GO_RENDERER = r"""package main

// Renders an Ollama TEMPLATE the way Ollama's chat endpoint does: the Modelfile SYSTEM is prepended when the
// conversation has no system message, consecutive messages of one role are joined with a blank line, and the
// template runs with missingkey=zero over .System, .Messages and an empty .Response.
import (
	"encoding/json"
	"fmt"
	"os"
	"strings"
	"text/template"
)

type message struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

type request struct {
	Template      string      `json:"template"`
	System        string      `json:"system"`
	Conversations [][]message `json:"conversations"`
}

func main() {
	var req request
	if err := json.NewDecoder(os.Stdin).Decode(&req); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	funcs := template.FuncMap{"json": func(v any) string { b, _ := json.Marshal(v); return string(b) }}
	tmpl, err := template.New("").Option("missingkey=zero").Funcs(funcs).Parse(req.Template)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	out := []string{}
	for _, conv := range req.Conversations {
		if req.System != "" && (len(conv) == 0 || conv[0].Role != "system") {
			conv = append([]message{{Role: "system", Content: req.System}}, conv...)
		}
		var system []string
		var msgs []*message
		for i := range conv {
			m := conv[i]
			if m.Role == "system" {
				system = append(system, m.Content)
			}
			if n := len(msgs); n > 0 && msgs[n-1].Role == m.Role {
				msgs[n-1].Content += "\n\n" + m.Content
			} else {
				msgs = append(msgs, &m)
			}
		}
		var b strings.Builder
		data := map[string]any{"System": strings.Join(system, "\n\n"), "Messages": msgs, "Response": ""}
		if err := tmpl.Execute(&b, data); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		out = append(out, b.String())
	}
	json.NewEncoder(os.Stdout).Encode(out)
}
"""


def render_go_template(template: str, conversations: list[list[dict]], system: str | None = None) -> list[str]:
    """Render an Ollama TEMPLATE with Go's text/template (``go`` must be on PATH), as Ollama's chat does."""
    go = shutil.which("go")
    if go is None:
        raise FileNotFoundError("go is not installed (Debian: apt-get install golang-go)")
    request = {
        "template": template,
        "system": system or "",
        "conversations": [[{"role": m["role"], "content": m["content"]} for m in c] for c in conversations],
    }
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "render.go"
        src.write_text(_GO_RENDERER)
        env = {**os.environ, "GO111MODULE": "off", "GOTOOLCHAIN": "local", "GOFLAGS": ""}
        proc = subprocess.run(
            [go, "run", str(src)], input=json.dumps(request), capture_output=True, text=True, env=env, timeout=300
        )
    if proc.returncode != 0:
        raise TemplateError(f"Go could not render the Modelfile TEMPLATE: {proc.stderr.strip()[-500:]}")
    return json.loads(proc.stdout)


# ---------------------------------------------------------------- export


def _check_output_is_folder(out: Path) -> None:
    """Refuse an ``--output`` that is (or lies under) an existing file: the export writes a folder of files."""
    for path in (out, *out.parents):
        if path.exists():
            if not path.is_dir():
                where = "is a file" if path == out else f"lies under {path}, which is a file"
                raise FileError(f"{out}: {where}: --output must be a folder (new or empty); choose another --output")
            return


def export(
    adapter: str | Path | None = None,
    output: str | Path = "",
    model: str | Path | None = None,
    quant: str = "f16",
    lora_only: bool = False,
    overwrite: bool = False,
    check: bool = True,
    samples: int = 8,
    max_new_tokens: int = 48,
) -> ExportResult:
    """Write ``output/``: the GGUF file, an Ollama ``Modelfile`` and ``chatlora-export.json``; then check it.

    Args:
        adapter: a chatlora run dir (adapter + run card); or ``model``, a merged model dir.
        quant: one of :data:`QUANTS` (``f32``/``f16`` with ``lora_only``).
        lora_only: write the adapter alone as a llama.cpp LoRA GGUF (its Modelfile names the base GGUF, when the
            base was one).
        overwrite: allow writing into a non-empty ``output``; without it a non-empty ``output`` is an error.
        check: run :func:`check_export` afterwards (``samples`` held-out prompts, ``max_new_tokens`` per reply).
    """
    if not str(output):
        raise ModelError("--output DIR is required")
    _check_output_is_folder(Path(output))  # before the source: a file there is refused, never deleted
    src = _open_source(adapter, model)
    spec = _quant(quant) if not lora_only else None
    if lora_only and src.kind != "adapter":
        raise ModelError("--lora-only needs --adapter (a merged model has no adapter to write)")
    if lora_only and quant not in LORA_QUANTS:
        raise ModelError(f"--lora-only writes {' or '.join(LORA_QUANTS)}, not {quant}")
    out = Path(output)
    if out.resolve() == src.path.resolve():
        raise ModelError("--output must differ from the adapter/model directory")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ModelError(f"{out}: exists and is not empty; choose another --output or pass --overwrite")

    # Everything that can refuse the model is checked before its weights are loaded.
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(src.path) if src.kind == "model" else resolve_model(src.base_spec))
    _arch(config)
    _rope_theta(config)
    if not lora_only:
        _vocab(src.tokenizer, config.vocab_size)
    eot_text, _ = end_of_turn(src.tokenizer)
    stops = [src.tokenizer.convert_ids_to_tokens(i) for i in stop_token_ids(src.tokenizer)]
    template = ollama_template(src.tokenizer)
    out.mkdir(parents=True, exist_ok=True)
    reference = None
    manifest: dict[str, Any] = {
        "chatlora_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "source": {"kind": src.kind, "path": str(src.path.resolve()), "base_model": src.base_spec},
        "format": "gguf",
        "quant": quant,
        "lora_only": lora_only,
        "end_of_turn": eot_text,
        "stop": stops,
        "system_prompt": src.system_prompt,
    }
    files = []
    if lora_only:
        gguf_path = write_lora_gguf(src.path, out / f"{src.stem}-lora-{quant}.gguf", quant)
        base = _base_gguf(src)
        manifest["base_gguf"] = str(base) if base else None
        if base is not None:
            text = modelfile_text(str(base), template, src.system_prompt, stops, adapter=f"./{gguf_path.name}")
            (out / MODELFILE).write_text(text, encoding="utf-8")
            files.append(out / MODELFILE)
    else:
        reference = _reference_model(src)
        gguf_path = write_gguf(reference, src.tokenizer, out / f"{src.stem}-{spec.name}.gguf", spec.name, src.stem)
        (out / MODELFILE).write_text(
            modelfile_text(f"./{gguf_path.name}", template, src.system_prompt, stops), encoding="utf-8"
        )
        files.append(out / MODELFILE)
    manifest["gguf"] = gguf_path.name
    files.insert(0, gguf_path)
    (out / MANIFEST).write_text(json.dumps(manifest, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    files.append(out / MANIFEST)
    result = ExportResult(out, files)
    if check:
        result.checks = check_export(out, samples=samples, max_new_tokens=max_new_tokens, _source=src, _ref=reference)
        manifest["parity"] = [asdict(c) for c in result.checks]
        (out / MANIFEST).write_text(json.dumps(manifest, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    return result


# ---------------------------------------------------------------- the parity check


_BUILTIN_PROMPTS = ["你是谁？", "皇上今日为何闷闷不乐？", "Tell me about yourself in one sentence."]


def _conversations(src: _Source, samples: int) -> tuple[list[list[dict]], str]:
    """Held-out conversations from the run card (system prompt applied), each ending on its reference reply."""
    from .eval import held_out_records

    try:
        records, _ = held_out_records(src.card, samples)
        why = "the run card's held-out split is empty"
    except ChatloraError as e:  # no usable held-out split (none recorded, the data gone or changed): built-in prompts
        records, why = [], str(e).splitlines()[0]
    if not records:
        convs = [[{"role": "user", "content": p}] for p in _BUILTIN_PROMPTS[:samples]]
        return [with_system(c, src.system_prompt) for c in convs], f"{len(convs)} built-in prompts: {why}"
    convs = [with_system([dict(m) for m in r.messages], src.system_prompt) for r in records]
    return convs, f"{len(convs)} held-out conversations"


def _prompt_of(conv: list[dict]) -> list[dict]:
    """The conversation up to its last user turn: what a runtime is asked to answer."""
    last_user = max(i for i, m in enumerate(conv) if m["role"] == "user")
    return conv[: last_user + 1]


def _greedy(model, prompt_ids: list[int], stop_ids: list[int], max_new_tokens: int, pad_id: int | None) -> list[int]:
    from transformers import GenerationConfig

    ids = torch.tensor([prompt_ids])
    config = GenerationConfig(
        do_sample=False,
        max_new_tokens=max_new_tokens,
        eos_token_id=stop_ids,
        pad_token_id=pad_id if pad_id is not None else stop_ids[0],
    )
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)
    return out[0, len(prompt_ids) :].tolist()


def _top1(model, input_ids: list[int], positions: list[int]) -> list[int]:
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([input_ids])).logits[0]
    return logits[positions].argmax(-1).tolist()


def _meta(path: Path) -> tuple[dict[str, Any], list[Any]]:
    reader = gguf.GGUFReader(path)
    meta = {}
    for key, f in reader.fields.items():
        if key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type"):
            continue
        try:
            meta[key] = f.contents()
        except (ValueError, IndexError):  # a type this reader version cannot decode; not one we compare
            continue
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    meta["_tokens"] = tokens.contents() if tokens is not None else []
    return meta, list(reader.tensors)


def _load_gguf(directory: Path, name: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(directory), gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(str(directory), gguf_file=name, dtype=torch.float32).eval()
    return model, tokenizer


def _first_difference(a: str, b: str) -> str:
    i = next((k for k, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
    return f"first difference at character {i}: training {a[i : i + 24]!r} vs export {b[i : i + 24]!r}"


def check_export(
    directory: str | Path,
    source: str | Path | None = None,
    samples: int = 8,
    max_new_tokens: int = 48,
    _source: _Source | None = None,
    _ref=None,
) -> list[Check]:
    """Prove an export directory reproduces its source; one :class:`Check` per aspect (see the README's table).

    Args:
        directory: what :func:`export` wrote (its ``chatlora-export.json`` names the source).
        source: the adapter or merged model dir, when it moved since the export.
    """
    directory = Path(directory)
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        raise ModelError(f"{directory}: no {MANIFEST} here; is this a chatlora export directory?")
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    if _source is None:
        path = Path(source or manifest["source"]["path"])
        if not path.is_dir():
            raise ModelError(f"{path}: the export's source is gone; pass it with --adapter/--model")
        adapter = (path / "adapter_config.json").is_file()
        _source = _open_source(path if adapter else None, None if adapter else path)
    src = _source
    gguf_path = directory / manifest["gguf"]
    if not gguf_path.is_file():
        raise ModelError(f"{gguf_path}: the GGUF file named in {MANIFEST} is missing")
    convs, described = _conversations(src, samples)
    modelfile = (
        parse_modelfile((directory / MODELFILE).read_text("utf-8")) if (directory / MODELFILE).is_file() else None
    )
    if manifest.get("lora_only"):
        checks, expected = _check_lora(src, gguf_path, convs, described, max_new_tokens, _ref)
        base = manifest.get("base_gguf")
        server_args = ["-m", base, "--lora", str(gguf_path)] if base else None
    else:
        checks, expected = _check_model(src, gguf_path, manifest, convs, described, max_new_tokens, _ref)
        server_args = ["-m", str(gguf_path)]
    checks += _check_modelfile(src, modelfile, convs, manifest)
    if expected is not None:
        checks.append(_check_llama_server(src, server_args, convs, expected, max_new_tokens))
        checks.append(_check_ollama(src, directory, modelfile, convs, expected, max_new_tokens))
    return checks


def _check_model(src: _Source, gguf_path: Path, manifest, convs, described, max_new_tokens, ref):
    try:
        meta, tensors = _meta(gguf_path)
        model, gtok = _load_gguf(gguf_path.parent, gguf_path.name)
    except Exception as e:  # whatever breaks the reload, the table must say so rather than crash
        return [Check("model config", "FAIL", f"the GGUF does not load: {type(e).__name__}: {e}")], None
    reference = ref if ref is not None else _reference_model(src)
    spec = QUANTS[manifest["quant"]]
    checks = [_check_config(reference.config, model.config, meta, tensors)]
    checks.append(_check_tokenizer(src.tokenizer, gtok, convs))
    checks.append(_check_gguf_template(src.tokenizer, gtok, meta, convs))
    checks.append(_check_bos(src.tokenizer, gtok, meta, convs))
    checks.append(_check_stops(src, meta, reference.generation_config))
    stops = list(
        dict.fromkeys(meta[k] for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id") if k in meta)
    )
    replies, expected = _check_replies(src, reference, model, stops, spec, convs, described, max_new_tokens)
    return checks + replies, expected


def _check_config(ref_config, config, meta, tensors) -> Check:
    fields = (
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "intermediate_size",
        "max_position_embeddings",
        "vocab_size",
        "tie_word_embeddings",
    )
    diffs = [
        f"{f} {getattr(ref_config, f, None)} vs {getattr(config, f, None)}"
        for f in fields
        if getattr(ref_config, f, None) != getattr(config, f, None)
    ]
    for name, a, b in (
        ("rms_norm_eps", ref_config.rms_norm_eps, config.rms_norm_eps),
        ("rope_theta", _rope_theta(ref_config), _rope_theta(config)),
    ):
        if not math.isclose(a, b, rel_tol=1e-6):
            diffs.append(f"{name} {a} vs {b}")
    types = sorted({t.tensor_type.name for t in tensors})
    detail = (
        f"{meta.get('general.architecture')}, {len(tensors)} tensors ({'/'.join(types)}), "
        f"{config.num_hidden_layers} blocks, context {config.max_position_embeddings}"
    )
    if diffs:
        return Check("model config", "FAIL", "reloaded config differs: " + "; ".join(diffs))
    return Check("model config", "PASS", detail)


def _check_tokenizer(tok, gtok, convs) -> Check:
    texts = [render_text(c, tok) for c in convs] + ["Digits 12345, 3.14; emoji 🦙 and   spaces\n\ttab 甄嬛传"]
    bad = []
    for text in texts:
        a = tok(text, add_special_tokens=False)["input_ids"]
        b = gtok(text, add_special_tokens=False)["input_ids"]
        if a != b:
            k = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
            bad.append(f"{text[:20]!r}: token {k} is {a[k : k + 1]} in training, {b[k : k + 1]} from the GGUF")
    if bad:
        return Check("tokenizer", "FAIL", f"{len(bad)}/{len(texts)} texts tokenize differently; " + bad[0])
    return Check("tokenizer", "PASS", f"{len(texts)} texts tokenize to the same ids (vocab {len(gtok)})")


def _check_gguf_template(tok, gtok, meta, convs) -> Check:
    template = meta.get("tokenizer.chat_template")
    if not template:
        return Check("chat template (GGUF)", "FAIL", "the GGUF has no tokenizer.chat_template")
    n = 0
    for conv in convs:
        for messages, gen in ((_prompt_of(conv), True), (conv, False)):
            want = render_text(messages, tok, add_generation_prompt=gen)
            got = gtok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen, chat_template=template)
            if got != want:
                return Check(
                    "chat template (GGUF)",
                    "FAIL",
                    f"renders differently from training; {_first_difference(want, got)}",
                )
            n += 1
    return Check("chat template (GGUF)", "PASS", f"{n} renderings byte-identical to training (prompts + full chats)")


def _check_bos(tok, gtok, meta, convs) -> Check:
    """The prompt a runtime builds from the GGUF (its template, tokenizer and add_bos flag) must be training's."""
    template = meta.get("tokenizer.chat_template") or ""
    bos = meta.get("tokenizer.ggml.bos_token_id")
    add_bos, add_eos = bool(meta.get("tokenizer.ggml.add_bos_token")), bool(meta.get("tokenizer.ggml.add_eos_token"))
    eos = meta.get("tokenizer.ggml.eos_token_id")
    for conv in convs:
        messages = _prompt_of(conv)
        want = encode_prompt(messages, tok)
        text = gtok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, chat_template=template)
        got = ([bos] if add_bos and bos is not None else []) + gtok(text, add_special_tokens=False)["input_ids"]
        got += [eos] if add_eos and eos is not None else []
        lead_want = _leading(want, bos)
        lead_got = _leading(got, bos)
        if lead_got > 1:
            return Check(
                "BOS once",
                "FAIL",
                f"the runtime prompt starts with {lead_got} BOS tokens ({gtok.convert_ids_to_tokens(bos)!r}): "
                f"GGUF add_bos_token={add_bos} and the template writes BOS too; training had {lead_want}",
            )
        if got != want:
            k = next((i for i, (x, y) in enumerate(zip(want, got, strict=False)) if x != y), min(len(want), len(got)))
            return Check(
                "BOS once",
                "FAIL",
                f"the runtime prompt differs from training at token {k} (add_bos_token={add_bos}, "
                f"add_eos_token={add_eos}): training {want[k : k + 3]}, GGUF {got[k : k + 3]}",
            )
    what = f"BOS {gtok.convert_ids_to_tokens(bos)!r}" if bos is not None else "no BOS token"
    return Check("BOS once", "PASS", f"{len(convs)} runtime prompts = training ids ({what}, add_bos_token={add_bos})")


def _leading(ids: list[int], bos: int | None) -> int:
    n = 0
    while bos is not None and n < len(ids) and ids[n] == bos:
        n += 1
    return n


def _check_stops(src: _Source, meta, generation_config) -> Check:
    tok = src.tokenizer
    eot_text, eot = end_of_turn(tok)
    problems = []
    card_eot = src.card.get("template", {}).get("end_of_turn")
    if card_eot and card_eot != eot_text:
        problems.append(
            f"the run card says training ended turns with {card_eot!r}, the tokenizer's template {eot_text!r}"
        )
    gen_eos = generation_config.eos_token_id
    gen_eos = [gen_eos] if isinstance(gen_eos, int) else list(gen_eos or [])
    if eot not in gen_eos:
        problems.append(f"generation_config eos_token_id {gen_eos} lacks the end-of-turn token {eot} ({eot_text!r})")
    for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id"):
        if key in meta and meta[key] != eot:
            got = meta[key]
            name = meta["_tokens"][got] if got < len(meta["_tokens"]) else "?"
            problems.append(
                f"GGUF {key} is {got} ({name!r}) but the model ends turns with {eot} ({eot_text!r}): a runtime would not stop"
            )
    if "tokenizer.ggml.eos_token_id" not in meta:
        problems.append("the GGUF has no tokenizer.ggml.eos_token_id")
    tokens = meta["_tokens"]
    if eot >= len(tokens) or tokens[eot] != eot_text:
        problems.append(f"GGUF token {eot} is {tokens[eot] if eot < len(tokens) else None!r}, not {eot_text!r}")
    detail = f"end of turn {eot_text!r} = {eot} in tokenizer_config, generation_config {gen_eos}, GGUF eos/eot"
    if problems:
        return Check("stop tokens (EOS/EOT)", "FAIL", "; ".join(problems))
    return Check("stop tokens (EOS/EOT)", "PASS", detail)


def _teacher_forced(conv: list[dict], reply: list[int], tok) -> tuple[list[int], list[int]]:
    """Input ids and the positions predicting reply tokens: the data's replies, else the adapter's own greedy one."""
    if conv[-1]["role"] == "assistant":
        enc = encode_conversation(conv, tok)
        ids, labels = enc.input_ids, enc.labels
    else:
        prompt = encode_prompt(conv, tok)
        ids, labels = prompt + reply, [IGNORE_INDEX] * len(prompt) + reply
    return ids, [i - 1 for i, label in enumerate(labels) if label != IGNORE_INDEX and i > 0]


def _first_token_difference(want: list[int], got: list[int], tok, n: int) -> str:
    k = next((i for i, (x, y) in enumerate(zip(want, got, strict=False)) if x != y), min(len(want), len(got)))
    return (
        f"first difference in prompt {n} at reply token {k}: adapter {tok.decode(want[k : k + 4])!r}, "
        f"GGUF {tok.decode(got[k : k + 4])!r}"
    )


def _check_replies(
    src: _Source, reference, model, stops: list[int], spec: Quant | None, convs, described, max_new_tokens
) -> tuple[list[Check], list[list[int]]]:
    """Greedy replies and teacher-forced top-1 predictions of ``model`` (the reloaded export) against the adapter.

    With ``spec`` the greedy replies must equal, token for token, those of the adapter holding exactly the weights
    the file holds (``reference`` is rounded in place to them): any difference is a conversion error. The rounding
    itself is measured against the fp32 adapter: top-1 agreement under teacher forcing, and greedy replies, which
    can part at near-ties (two tokens within rounding noise) without the export being wrong.

    Returns the checks and the greedy replies the exported weights should give (for the runtime checks).
    """
    tok = src.tokenizer
    ref_stops, pad = stop_token_ids(tok), tok.pad_token_id
    prompts = [encode_prompt(_prompt_of(c), tok) for c in convs]
    fp32 = [_greedy(reference, p, ref_stops, max_new_tokens, pad) for p in prompts]
    forced = [_teacher_forced(c, r, tok) for c, r in zip(convs, fp32, strict=True)]
    ref_top1 = [_top1(reference, ids, pos) for ids, pos in forced if pos]
    got_top1 = [_top1(model, ids, pos) for ids, pos in forced if pos]
    got = [_greedy(model, p, stops or ref_stops, max_new_tokens, pad) for p in prompts]
    same32 = sum(a == b for a, b in zip(fp32, got, strict=True))
    total = sum(len(a) for a in ref_top1)
    agree = sum(x == y for a, b in zip(ref_top1, got_top1, strict=True) for x, y in zip(a, b, strict=True))
    share = agree / total if total else 0.0
    min_top1 = spec.min_top1 if spec else QUANTS["f16"].min_top1
    checks, expected = [], got
    n, tokens = len(convs), sum(len(r) for r in fp32)
    if spec is not None:
        _round_like_export_(reference, spec)
        rounded = expected = [_greedy(reference, p, ref_stops, max_new_tokens, pad) for p in prompts]
        same = [a == b for a, b in zip(rounded, got, strict=True)]
        detail = (
            f"{sum(same)}/{n} identical token for token to the adapter with {spec.name} weights ({tokens} tokens, "
            f"{described}); {same32}/{n} to the fp32 adapter"
        )
        if not all(same):
            k = same.index(False)
            detail += "; " + _first_token_difference(rounded[k], got[k], tok, k + 1)
        checks.append(Check("greedy replies", "PASS" if all(same) else "FAIL", detail))
    else:
        checks.append(
            Check(
                "greedy replies", "PASS", f"{same32}/{n} identical to the fp32 adapter ({tokens} tokens, {described})"
            )
        )
    passed = bool(total) and share >= min_top1
    detail = (
        f"{share:.1%} of {total} reply tokens agree with the fp32 adapter (teacher forcing), needs >= {min_top1:.0%}"
    )
    if not passed and spec is not None:
        # Rounding the merged weights can snap a small LoRA update back onto the base's grid.
        detail += f"; {spec.name} loses the tuning here: use q8_0/f16, or --lora-only on the base's GGUF"
    checks.append(Check("top-1 agreement", "PASS" if passed else "FAIL", detail))
    return checks, expected


def _check_modelfile(src: _Source, modelfile, convs, manifest) -> list[Check]:
    if modelfile is None:
        why = (
            "no Modelfile: the base model is not a GGUF file"
            if manifest.get("lora_only")
            else f"no {MODELFILE} written"
        )
        return [Check("Modelfile", "SKIP" if manifest.get("lora_only") else "FAIL", why)]
    checks = []
    system = modelfile.get("SYSTEM")
    want_system = src.system_prompt
    if (system or None) != (want_system or None):
        checks.append(Check("Modelfile SYSTEM", "FAIL", f"SYSTEM is {system!r}, training used {want_system!r}"))
    else:
        checks.append(Check("Modelfile SYSTEM", "PASS", f"the trained system prompt ({len(want_system or '')} chars)"))
    tok = src.tokenizer
    stops = modelfile["PARAMETER"].get("stop", [])
    want = [tok.convert_ids_to_tokens(i) for i in stop_token_ids(tok)]
    ids = [tok.convert_tokens_to_ids(s) for s in stops]
    if sorted(stops) != sorted(want):
        checks.append(
            Check("Modelfile stop", "FAIL", f"PARAMETER stop {stops} (ids {ids}), the model stops at {want}")
        )
    else:
        checks.append(Check("Modelfile stop", "PASS", f"PARAMETER stop {stops} = ids {ids}"))
    template = modelfile.get("TEMPLATE")
    if not template:
        checks.append(Check("Modelfile TEMPLATE (Go)", "FAIL", "no TEMPLATE: Ollama would send the bare prompt"))
        return checks
    # What Ollama's chat receives: the user's messages; it adds the Modelfile SYSTEM itself.
    cases, wants = [], []
    for conv in convs:
        bare = conv[1:] if conv and conv[0]["role"] == "system" and conv[0]["content"] == src.system_prompt else conv
        cases += [_prompt_of(bare), bare]
        wants += [render_text(_prompt_of(conv), tok, add_generation_prompt=True), render_text(conv, tok)]
    try:
        got = render_go_template(template, cases, system)
    except FileNotFoundError as e:
        checks.append(Check("Modelfile TEMPLATE (Go)", "SKIP", str(e)))
        return checks
    except TemplateError as e:
        checks.append(Check("Modelfile TEMPLATE (Go)", "FAIL", str(e)))
        return checks
    for w, g in zip(wants, got, strict=False):
        if w != g:
            checks.append(
                Check(
                    "Modelfile TEMPLATE (Go)",
                    "FAIL",
                    f"Go renders differently from training; {_first_difference(w, g)}",
                )
            )
            return checks
    checks.append(Check("Modelfile TEMPLATE (Go)", "PASS", f"{len(wants)} Go renderings byte-identical to training"))
    return checks


# ---------------------------------------------------------------- LoRA-only checks


def _check_lora(src: _Source, gguf_path: Path, convs, described, max_new_tokens, ref):
    reader = gguf.GGUFReader(gguf_path)
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    base = load_model(resolve_model(src.base_spec), torch.float32).eval()
    config = base.config
    arch = _arch(config)
    cfg, pairs = _lora_pairs(src.path)
    problems = []
    for key, want in (("general.type", "adapter"), ("adapter.type", "lora"), ("general.architecture", arch)):
        if meta.get(key) != want:
            problems.append(f"{key} is {meta.get(key)!r}, llama.cpp needs {want!r}")
    alpha = meta.get("adapter.lora.alpha")
    checks = []
    name_map = gguf.get_tensor_name_map(_ARCHS[arch], config.num_hidden_layers)
    by_gguf = {_gguf_name(name_map, n): n for n in pairs}
    tensors = {t.name: t for t in reader.tensors}
    state = base.state_dict()
    for gname, hf_name in by_gguf.items():
        a, b = tensors.get(gname + ".lora_a"), tensors.get(gname + ".lora_b")
        if a is None or b is None:
            problems.append(f"{gname}: lora_a/lora_b pair missing")
            continue
        w = state[hf_name]  # (out, in): llama.cpp ne = [in, out]
        if not (a.shape[0] == w.shape[1] and b.shape[1] == w.shape[0] and a.shape[1] == b.shape[0]):
            problems.append(
                f"{gname}: shapes a {list(a.shape)}, b {list(b.shape)} do not fit the base {list(w.shape)}"
            )
    extra = [n for n in tensors if n.rsplit(".", 1)[0] not in by_gguf]
    if extra:
        problems.append(f"tensors without a base weight: {extra[:3]}")
    detail = (
        f"{len(by_gguf)} lora_a/lora_b pairs, alpha {alpha}, {arch}; names and shapes fit llama.cpp's base tensors"
    )
    checks.append(Check("LoRA GGUF", "FAIL" if problems else "PASS", "; ".join(problems) if problems else detail))
    if problems:
        return checks, None
    # Rebuild base + LoRA the way llama.cpp applies it (scale alpha / r) and compare with the adapter.
    with torch.no_grad():
        for gname, hf_name in by_gguf.items():
            a = np.asarray(tensors[gname + ".lora_a"].data, dtype=np.float32)
            b = np.asarray(tensors[gname + ".lora_b"].data, dtype=np.float32)
            heads = _qk_heads(hf_name, config) if arch in _PERMUTED else None
            if heads is not None:
                b = _unpermute(b, heads)
            scale = float(alpha) / a.shape[0]
            state[hf_name] += torch.from_numpy(scale * (b @ a))
    reference = ref if ref is not None else _reference_model(src)
    replies, expected = _check_replies(src, reference, base, [], None, convs, described, max_new_tokens)
    return checks + replies, expected


# ---------------------------------------------------------------- llama.cpp's server, when installed


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict, timeout: float = 300) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def _runtime_summary(convs, expected: list[list[int]], got: list[tuple[str, bool]], tok) -> tuple[bool, str]:
    """Compare a runtime's ``(reply text, stopped)`` with the replies the exported weights give in transformers.

    The runtime's own kernels round differently, so replies may part at near-ties; where a reply stops must agree.
    """
    stops = set(stop_token_ids(tok))
    same = stopped_ok = 0
    for want, (text, stopped) in zip(expected, got, strict=True):
        want_stopped = bool(want) and want[-1] in stops
        for special in tok.all_special_tokens:  # runtimes differ in whether they print special tokens
            text = text.replace(special, "")
        same += text == tok.decode([t for t in want if t not in stops], skip_special_tokens=True)
        stopped_ok += stopped == want_stopped
    n = len(convs)
    return (
        stopped_ok == n,
        f"{same}/{n} greedy replies identical, {stopped_ok}/{n} stop where the export's weights stop",
    )


def _check_llama_server(src: _Source, model_args: list[str] | None, convs, expected, max_new_tokens) -> Check:
    """Generate through llama.cpp itself: its rendering of the GGUF template, its tokenizer and where it stops."""
    name = "llama.cpp (llama-server)"
    exe = shutil.which("llama-server")
    if exe is None:
        return Check(name, "SKIP", "llama-server is not on PATH")
    if model_args is None:
        return Check(name, "SKIP", "the base model is not a GGUF file to apply the LoRA to")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [exe, *model_args, "--host", "127.0.0.1", "--port", str(port), "--jinja", "-c", "4096"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while not _ready(url + "/health"):
            if proc.poll() is not None or time.time() > deadline:
                err = proc.stderr.read()[-300:] if proc.poll() is not None else "no answer within 300 s"
                return Check(name, "FAIL", f"llama-server did not start: {err}")
            time.sleep(0.5)
        tok, got = src.tokenizer, []
        for n, conv in enumerate(convs, 1):
            messages = _prompt_of(conv)
            want_text = render_text(messages, tok, add_generation_prompt=True)
            text = _post(url + "/apply-template", {"messages": messages})["prompt"]
            if text != want_text:
                return Check(name, "FAIL", f"prompt {n}: llama.cpp's template {_first_difference(want_text, text)}")
            ids = _post(url + "/tokenize", {"content": text, "add_special": True})["tokens"]
            want_ids = encode_prompt(messages, tok)
            if ids != want_ids:
                return Check(
                    name, "FAIL", f"prompt {n}: llama.cpp tokenizes to {ids[:8]}..., training {want_ids[:8]}..."
                )
            reply = _post(
                url + "/completion",
                {
                    "prompt": text,
                    "n_predict": max_new_tokens,
                    "temperature": 0,
                    "top_k": 1,
                    "samplers": ["top_k"],
                    "repeat_penalty": 1.0,
                    "cache_prompt": False,
                },
            )
            got.append((reply.get("content", ""), reply.get("stop_type") == "eos"))
        ok, detail = _runtime_summary(convs, expected, got, tok)
        return Check(name, "PASS" if ok else "FAIL", f"prompts rendered and tokenized as in training; {detail}")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _check_ollama(src: _Source, directory: Path, modelfile, convs, expected, max_new_tokens) -> Check:
    """Create the model from the Modelfile in a running Ollama, chat with it greedily, remove it again."""
    name = "Ollama"
    exe = shutil.which("ollama")
    if exe is None:
        return Check(name, "SKIP", "ollama is not on PATH")
    if modelfile is None:
        return Check(name, "SKIP", f"no {MODELFILE} to create a model from")
    host = os.environ.get("OLLAMA_HOST") or "127.0.0.1:11434"
    url = host if host.startswith("http") else f"http://{host}"
    if not _ready(url + "/api/version"):
        return Check(name, "SKIP", f"no Ollama server answers at {url} (start it with `ollama serve`)")
    model = f"chatlora-check-{os.getpid()}-{int(time.time())}"
    made = subprocess.run([exe, "create", model, "-f", MODELFILE], cwd=directory, capture_output=True, text=True)
    if made.returncode != 0:
        return Check(name, "FAIL", f"ollama create failed: {(made.stderr or made.stdout).strip()[-300:]}")
    try:
        got = []
        for conv in convs:
            # Ollama adds the Modelfile SYSTEM itself, as it does for any client.
            messages = [
                m for m in _prompt_of(conv) if not (m["role"] == "system" and m["content"] == src.system_prompt)
            ]
            options = {"temperature": 0, "top_k": 1, "repeat_penalty": 1.0, "num_predict": max_new_tokens, "seed": 0}
            reply = _post(
                url + "/api/chat", {"model": model, "messages": messages, "stream": False, "options": options}
            )
            got.append((reply["message"]["content"], reply.get("done_reason") == "stop"))
        ok, detail = _runtime_summary(convs, expected, got, src.tokenizer)
        return Check(name, "PASS" if ok else "FAIL", f"created from the {MODELFILE}; {detail}")
    finally:
        subprocess.run([exe, "rm", model], capture_output=True)


# ---------------------------------------------------------------- presentation


def format_checks(checks: list[Check]) -> str:
    """The parity table as text, one row per check."""
    width = max([len(c.name) for c in checks] + [5])
    lines = [f"{'check'.ljust(width)}  result  detail", f"{'-' * width}  ------  {'-' * 40}"]
    lines += [f"{c.name.ljust(width)}  {c.status.ljust(6)}  {c.detail}" for c in checks]
    return "\n".join(lines)
