"""The parity check: the export reloaded and compared with its source, aspect by aspect."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from ..errors import FileError, ModelError, TemplateError
from ..model import load_model, resolve_model
from ..template import (
    IGNORE_INDEX,
    encode_conversation,
    encode_prompt,
    end_of_turn,
    render_text,
    stop_token_ids,
    with_system,
)
from .arch import (
    _ARCHS,
    _NORM_OFFSET,
    _PERMUTED,
    _arch,
    _context_length,
    _gguf_arch,
    _gguf_name,
    _head_dim,
    _qk_heads,
    _rope_theta,
    _sliding_layers,
    _unpermute,
)
from .lora import _lora_pairs
from .ollama import MODELFILE, parse_modelfile, render_go_template
from .quants import QUANTS, Quant
from .results import MANIFEST, Check, _first_difference, read_manifest
from .runtimes import _check_llama_cpp, _check_llama_server, _check_ollama
from .source import _conversations, _open_source, _prompt_of, _reference_model, _Source
from .writer import _round_like_export_, _round_like_file_


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


def _load_gguf(directory: Path, name: str, meta: dict[str, Any] | None = None):
    """The GGUF reloaded by transformers, its config completed as llama.cpp reads the file (see :func:`_as_llama_cpp`)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if meta is None:
        meta, _ = _meta(Path(directory) / name)

    tokenizer = AutoTokenizer.from_pretrained(str(directory), gguf_file=name)
    config = _as_llama_cpp(AutoConfig.from_pretrained(str(directory), gguf_file=name), meta)
    model = AutoModelForCausalLM.from_pretrained(
        str(directory), gguf_file=name, config=config, dtype=torch.float32
    ).eval()
    return model, tokenizer


def _as_llama_cpp(config, meta: dict[str, Any]):
    """Set what transformers' GGUF reader leaves at HF's defaults to what llama.cpp's graph reads from the file.

    transformers maps only the common keys; the rest (head size of qwen3, Gemma's soft-capping, sliding window, which
    layers slide, local RoPE base, query scale) would silently take HF's defaults. Here they take the file's values,
    or llama.cpp's own defaults where the file has none (llama-hparams.h, src/models/gemma2.cpp, gemma3.cpp), so a
    key the exporter forgot changes the reloaded model as it changes llama.cpp's.
    """
    arch = meta.get("general.architecture")

    def key(name: str, default=None):
        return meta.get(f"{arch}.{name}", default)

    head_dim = key("attention.key_length") or config.hidden_size // config.num_attention_heads
    config.head_dim = head_dim
    if arch not in ("gemma2", "gemma3"):
        return config
    big = config.num_hidden_layers == {"gemma2": 46, "gemma3": 62}[arch]  # llama.cpp's 27B query scale
    config.query_pre_attn_scalar = config.hidden_size // config.num_attention_heads if big else head_dim
    base = float(key("rope.freq_base", 10000.0))
    if arch == "gemma2":
        config.attn_logit_softcapping = float(key("attn_logit_softcapping", 50.0))
        config.final_logit_softcapping = float(key("final_logit_softcapping", 30.0))
        window, default_pattern = key("attention.sliding_window", 4096), 2
        local = float(key("rope.freq_base_swa", base))
    else:
        config.attn_logit_softcapping = None
        config.final_logit_softcapping = float(key("final_logit_softcapping", 0.0)) or None
        window, default_pattern = key("attention.sliding_window", 0), 6
        local = float(key("rope.freq_base_swa", 10000.0))
    pattern = key("attention.sliding_window_pattern", default_pattern)
    if isinstance(pattern, list):
        sliding = [bool(x) for x in pattern]
    else:  # llama_hparams::set_swa_pattern: every n-th layer full, the rest sliding
        sliding = [pattern == 0 or i % pattern < pattern - 1 for i in range(config.num_hidden_layers)]
    if not window:
        sliding = [False] * config.num_hidden_layers
    config.sliding_window = int(window) or None
    config.layer_types = ["sliding_attention" if s else "full_attention" for s in sliding]
    if arch == "gemma3":
        config.rope_parameters = {
            "full_attention": {"rope_type": "default", "rope_theta": base},
            "sliding_attention": {"rope_type": "default", "rope_theta": local},
        }
    elif local != base:
        raise ModelError(f"the gemma2 GGUF has a sliding-layer RoPE base {local} unlike its global {base}")
    return config


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
    manifest = read_manifest(directory)
    if _source is None:
        recorded = manifest.get("source") if isinstance(manifest.get("source"), dict) else {}
        if source is None and not isinstance(recorded.get("path"), str):
            raise FileError(f"{directory / MANIFEST}: no 'source.path'; pass the source with --adapter/--model")
        path = Path(source or recorded["path"])
        if not path.is_dir():
            raise ModelError(f"{path}: the export's source is gone; pass it with --adapter/--model")
        adapter = (path / "adapter_config.json").is_file()
        _source = _open_source(path if adapter else None, None if adapter else path)
    src = _source
    gguf_path = directory / manifest["gguf"]
    convs, described = _conversations(src, samples)
    modelfile = (
        parse_modelfile((directory / MODELFILE).read_text("utf-8")) if (directory / MODELFILE).is_file() else None
    )
    if manifest.get("lora_only"):
        checks, expected = _check_lora(src, gguf_path, convs, described, max_new_tokens, _ref)
        base = manifest.get("base_gguf")
        server_args = ["-m", base, "--lora", str(gguf_path)] if base else None
        model_path, lora_path = (Path(base) if base else None), gguf_path
    else:
        checks, expected = _check_model(src, gguf_path, manifest, convs, described, max_new_tokens, _ref)
        server_args = ["-m", str(gguf_path)]
        model_path, lora_path = gguf_path, None
    checks += _check_modelfile(src, modelfile, convs, manifest)
    if expected is not None:
        checks.append(_check_llama_cpp(src, model_path, lora_path, convs, expected, max_new_tokens))
        checks.append(_check_llama_server(src, server_args, convs, expected, max_new_tokens))
        checks.append(_check_ollama(src, directory, modelfile, convs, expected, max_new_tokens))
    return checks


def _check_model(src: _Source, gguf_path: Path, manifest, convs, described, max_new_tokens, ref):
    try:
        meta, tensors = _meta(gguf_path)
        model, gtok = _load_gguf(gguf_path.parent, gguf_path.name, meta)
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
    replies, expected = _check_replies(src, reference, model, stops, spec, convs, described, max_new_tokens, gguf_path)
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
    want = {f: getattr(ref_config, f, None) for f in fields}
    arch = _arch(ref_config)
    want["max_position_embeddings"] = _context_length(ref_config, arch)  # mistral: capped at its sliding window
    want["head_dim"] = _head_dim(ref_config)
    if arch in _NORM_OFFSET:  # Gemma: what transformers' GGUF reader leaves to defaults, read as llama.cpp does
        for f in ("query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping", "layer_types"):
            want[f] = getattr(ref_config, f, None)
        want["sliding_window"] = ref_config.sliding_window if any(_sliding_layers(ref_config)) else None
    diffs = [f"{f} {w} vs {getattr(config, f, None)}" for f, w in want.items() if w != getattr(config, f, None)]
    thetas = [("rope_theta", _rope_theta(ref_config), _rope_theta(config))]
    if arch in _NORM_OFFSET:
        local = "sliding_attention"
        thetas.append(("sliding rope_theta", _rope_theta(ref_config, local), _rope_theta(config, local)))
    for name, a, b in (("rms_norm_eps", ref_config.rms_norm_eps, config.rms_norm_eps), *thetas):
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
            try:
                got = gtok.apply_chat_template(
                    messages, tokenize=False, add_generation_prompt=gen, chat_template=template
                )
            except Exception as e:  # the template's raise_exception (Gemma 2 on a system turn): a row, not a crash
                return Check(
                    "chat template (GGUF)",
                    "FAIL",
                    f"the GGUF template refuses a held-out conversation ({type(e).__name__}: {e}); training "
                    "rendered it (a system prompt folded into the first user turn)",
                )
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
        try:
            text = gtok.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True, chat_template=template
            )
        except Exception as e:  # see _check_gguf_template
            return Check("BOS once", "FAIL", f"the GGUF template refuses a held-out prompt ({type(e).__name__}: {e})")
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
    src: _Source,
    reference,
    model,
    stops: list[int],
    spec: Quant | None,
    convs,
    described,
    max_new_tokens,
    gguf_path: Path | None = None,
) -> tuple[list[Check], list[list[int]]]:
    """Greedy replies and teacher-forced top-1 predictions of ``model`` (the reloaded export) against the adapter.

    With ``spec`` the greedy replies must equal, token for token, those of the adapter holding exactly the weights
    the file holds (``reference`` is rounded in place to them; for llama.cpp's K-quant mixes they are read back from
    ``gguf_path``, each within rounding distance of the source's): any difference is a conversion error. The rounding
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
        moved = None
        if spec.llama_cpp:
            moved = _round_like_file_(reference, gguf_path)
        else:
            _round_like_export_(reference, spec)
        rounded = expected = [_greedy(reference, p, ref_stops, max_new_tokens, pad) for p in prompts]
        same = [a == b for a, b in zip(rounded, got, strict=True)]
        detail = (
            f"{sum(same)}/{n} identical token for token to the adapter with {spec.name} weights ({tokens} tokens, "
            f"{described}); {same32}/{n} to the fp32 adapter"
        )
        ok = all(same)
        if moved is not None:
            # Rounding moves a weight by a few percent (Q4_K ~5-10 %); rows out of order or a wrong tensor ~100 %.
            far = moved[1] > _MAX_ROUNDING
            ok = ok and not far
            detail += f"; the file's weights are at most {moved[1]:.1%} from the source's ({moved[0]})"
            if far:
                detail += f": more than rounding ({_MAX_ROUNDING:.0%}), a wrong tensor or Q/K row order"
        if not all(same):
            k = same.index(False)
            detail += "; " + _first_token_difference(rounded[k], got[k], tok, k + 1)
        checks.append(Check("greedy replies", "PASS" if ok else "FAIL", detail))
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


_MAX_ROUNDING = 0.5  # relative RMS change of a weight that rounding never reaches


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
        trained = repr(want_system) if want_system else f"none ({src.system_note or 'the run card records none'})"
        checks.append(Check("Modelfile SYSTEM", "FAIL", f"SYSTEM is {system!r}, the run's system prompt: {trained}"))
    elif want_system:
        checks.append(Check("Modelfile SYSTEM", "PASS", f"the trained system prompt ({len(want_system)} chars)"))
    else:
        why = src.system_note or "the run card records no system prompt"
        checks.append(Check("Modelfile SYSTEM", "PASS", f"no SYSTEM, as trained: {why}"))
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
    # What Ollama's chat receives: the client's messages, a system message only where it differs from the Modelfile
    # SYSTEM (a per-conversation prompt); Ollama adds SYSTEM itself to the others, as chatlora chat adds the run's.
    cases, wants = [], []
    for conv in (with_system(c, system) for c in convs):
        bare = conv[1:] if conv and conv[0]["role"] == "system" and conv[0]["content"] == system else conv
        cases.append(_prompt_of(bare))
        wants.append(render_text(_prompt_of(conv), tok, add_generation_prompt=True))
        if conv[-1]["role"] == "assistant":  # a whole conversation; the built-in prompts have no reply
            cases.append(bare)
            wants.append(render_text(conv, tok))
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


def _check_lora(src: _Source, gguf_path: Path, convs, described, max_new_tokens, ref):
    try:
        reader = gguf.GGUFReader(gguf_path)
    except Exception as e:  # a truncated or foreign file: the table says so rather than crash
        return [Check("LoRA GGUF", "FAIL", f"the file does not read as GGUF: {type(e).__name__}: {e}")], None
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    base = load_model(resolve_model(src.base_spec), torch.float32).eval()
    config = base.config
    arch = _arch(config)
    cfg, pairs = _lora_pairs(src.path)
    problems = []
    for key, want in (
        ("general.type", "adapter"),
        ("adapter.type", "lora"),
        ("general.architecture", _gguf_arch(arch)),
    ):
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
