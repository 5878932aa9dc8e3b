"""GGUF + Ollama export and its parity check, on tiny random llama/qwen2 models and byte-level BPE tokenizers."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
import shutil
import threading
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from conftest import write_jsonl

from chatlora.cli import main
from chatlora.export import (
    MANIFEST,
    QUANTS,
    check_export,
    export,
    parse_modelfile,
    write_gguf,
)
from chatlora.model import ModelError
from chatlora.template import CHATML_TEMPLATE, encode_prompt, end_of_turn

SMOL_LIKE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_TEXT = [
    "皇上万福金安。臣妾做不到啊！",
    "Hello world, this is a tiny tokenizer.",
    "你是谁？我是甄嬛。 12345",
    "嬛嬛一袅楚宫腰",
]


def make_bpe_tokenizer(pre: str = "gpt2", template: str | None = SMOL_LIKE, bos: str | None = None, eos="<|im_end|>"):
    """A small trained byte-level BPE (real merges), split GPT-2 style or Qwen2 style, with ChatML specials."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    if pre == "qwen2":
        from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        show_progress=False,
    )
    tok.train_from_iterator(_TEXT * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, pad_token="<|endoftext|>", bos_token=bos)
    if template:
        fast.chat_template = template
    return fast


# Each architecture's quirks at values unlike its defaults, so a reader that falls back to a default is caught.
_ARCH_CONFIG = {
    "llama": {},
    "qwen2": {},
    "qwen3": dict(head_dim=32),  # != hidden / heads: the key/value length must be written
    "mistral": dict(sliding_window=4096),
    "gemma2": dict(
        head_dim=16,
        query_pre_attn_scalar=16,
        attn_logit_softcapping=3.0,
        final_logit_softcapping=2.0,
        sliding_window=6,
        hidden_activation="gelu_pytorch_tanh",
    ),
    "gemma3_text": dict(
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=6,
        layer_types=["sliding_attention", "full_attention"],  # llama.cpp's default would slide both
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
            "full_attention": {"rope_type": "default", "rope_theta": 5000.0},
        },
        hidden_activation="gelu_pytorch_tanh",
    ),
}


def make_model_dir(
    path: Path,
    tokenizer,
    arch: str = "llama",
    tie: bool = False,
    seed: int = 0,
    hidden: int = 64,
    reply: str | None = None,
    **config,
) -> Path:
    """A tiny random model of ``arch`` (2 layers, hidden 64, GQA 4/2) with confident predictions (weights ~ 0.2).

    ``config`` overrides the architecture's test values (:data:`_ARCH_CONFIG`). ``hidden=256`` gives rows
    llama.cpp's K-quants can hold (256-value super-blocks); narrower rows fall back to legacy types in llama.cpp's
    quantizer. With ``reply`` (untied only) the model is instead nearly a bigram model: small block weights, and the
    output layer reads each token's embedding out as the logit of its successor in a random permutation of the
    vocabulary that chains the generation prompt's last token through ``reply`` to the end of turn. Its every
    prediction wins by a wide margin, so runtimes whose kernels round differently (llama.cpp's 8-bit activations)
    reply ``reply`` to any prompt and stop at the same place, as a random model does not.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    kw = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        tie_word_embeddings=tie,
        rms_norm_eps=1e-6,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(
        AutoConfig.for_model(arch, **{**kw, **_ARCH_CONFIG.get(arch, {}), **config})
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2 or "bias" in name:
                p.normal_(0, 0.2 * (64 / hidden) ** 0.5)  # the same gain per layer at any width
            elif name.endswith("norm.weight") and arch not in ("llama", "qwen2"):
                p.normal_(0.0 if arch.startswith("gemma") else 1.0, 0.2)  # Gemma's norm multiplies by 1 + w
        if reply is not None:
            assert not tie
            for name, p in model.named_parameters():
                if "layers." in name:
                    p.mul_(0.1)
            embed = model.get_input_embeddings().weight
            embed.normal_(0, 1.0)
            start = encode_prompt([{"role": "user", "content": "x"}], tokenizer)[-1]  # a generation prompt's last
            chain = [start, *tokenizer(reply, add_special_tokens=False)["input_ids"], end_of_turn(tokenizer)[1]]
            assert len(set(chain)) == len(chain), chain
            succ = torch.randperm(len(tokenizer), generator=torch.Generator().manual_seed(seed)).tolist()
            for a, b in zip(chain, chain[1:], strict=False):
                j = succ.index(b)
                succ[j], succ[a] = succ[a], b  # still a permutation, now with a -> b
            model.lm_head.weight[torch.tensor(succ)] = embed[: len(succ)] / 16
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def train_adapter(
    tmp: Path,
    model_dir: Path,
    system_prompt: str | None = "你是甄嬛",
    seed: int = 1,
    rows: list[dict] | None = None,
    lora_std: float = 0.3,
    **settings,
) -> Path:
    """A real chatlora run (adapter + run card with a held-out split), its LoRA weights then set to random values."""
    from safetensors.torch import load_file, save_file

    from chatlora.config import TrainConfig
    from chatlora.training.train import train

    rows = rows or [
        {"instruction": f"你是谁？{i}", "input": "", "output": "臣妾做不到啊。" if i % 2 else "皇上万福金安。"}
        for i in range(12)
    ]
    data = write_jsonl(tmp / "d.jsonl", rows)
    out = tmp / "run"
    cfg = TrainConfig(
        model=str(model_dir),
        data=str(data),
        output_dir=str(out),
        max_steps=1,
        batch_size=4,
        val_size=4,
        logging_steps=1,
        eval_steps=100,
        save_steps=100,
        lora_dropout=0.0,
        lora_r=4,
        lora_alpha=8,
        system_prompt=system_prompt,
    )
    train(dataclasses.replace(cfg, **settings))
    weights = load_file(out / "adapter_model.safetensors")
    torch.manual_seed(seed)
    save_file({k: torch.randn_like(v) * lora_std for k, v in weights.items()}, out / "adapter_model.safetensors")
    return out


def statuses(checks) -> dict[str, str]:
    return {c.name: c.status for c in checks}


def failed(checks) -> dict[str, str]:
    return {c.name: c.detail for c in checks if c.failed}


def set_gguf_field(path: Path, key: str, edit) -> None:
    """Change one metadata value of a GGUF file in place (same byte size), as a broken exporter would have."""
    reader = gguf.GGUFReader(path, "r+")
    part = reader.fields[key].parts[reader.fields[key].data[0]]
    part[...] = edit(part.copy())
    reader.data.flush()


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("llama")
    tok = make_bpe_tokenizer(bos="<|im_start|>")  # SmolLM2's layout: BOS is <|im_start|>, written by the template
    return train_adapter(tmp, make_model_dir(tmp / "base", tok))


@pytest.fixture(scope="module")
def llama_f16(llama_run, tmp_path_factory):
    return export(llama_run, tmp_path_factory.mktemp("x") / "f16", quant="f16", max_new_tokens=12)


def broken_copy(result, tmp_path: Path) -> Path:
    out = tmp_path / "broken"
    shutil.copytree(result.output_dir, out)
    return out


def test_f16_export_passes_every_check(llama_f16):
    """Guards against an export that loads but answers differently (weights, tokenizer, template, stops)."""
    got = statuses(llama_f16.checks)
    assert llama_f16.passed, failed(llama_f16.checks)
    assert got["llama.cpp (llama-server)"] == "SKIP" or shutil.which("llama-server")
    for name in ("model config", "tokenizer", "chat template (GGUF)", "BOS once", "stop tokens (EOS/EOT)"):
        assert got[name] == "PASS"
    for name in ("greedy replies", "top-1 agreement", "Modelfile SYSTEM", "Modelfile stop"):
        assert got[name] == "PASS"
    detail = {c.name: c.detail for c in llama_f16.checks}
    assert detail["greedy replies"].startswith("4/4 identical token for token")
    assert "4 held-out conversations" in detail["greedy replies"]


def test_gguf_metadata_follows_llama_cpp(llama_f16, llama_run):
    """Guards against metadata llama.cpp would misread: names, types, BOS/EOS, template, adding BOS."""
    path = llama_f16.files[0]
    assert path.name == "run-f16.gguf"
    reader = gguf.GGUFReader(path)
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.ggml.")}
    tok_meta = {k: f.contents() for k, f in reader.fields.items() if k.startswith("tokenizer.ggml.") and "s" != k[-1]}
    assert meta["general.architecture"] == "llama"
    assert meta["llama.block_count"] == 2 and meta["llama.context_length"] == 512
    assert meta["llama.attention.head_count"] == 4 and meta["llama.attention.head_count_kv"] == 2
    assert meta["llama.rope.dimension_count"] == 16
    assert meta["general.file_type"] == gguf.LlamaFileType.MOSTLY_F16
    assert reader.fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert reader.fields["tokenizer.ggml.pre"].contents() == "gpt-2"
    assert tok_meta["tokenizer.ggml.eos_token_id"] == 2 and tok_meta["tokenizer.ggml.eot_token_id"] == 2
    assert tok_meta["tokenizer.ggml.bos_token_id"] == 1
    assert reader.fields["tokenizer.ggml.add_bos_token"].contents() is False
    assert meta["tokenizer.chat_template"] == SMOL_LIKE
    names = {t.name: t for t in reader.tensors}
    assert {"token_embd.weight", "output.weight", "output_norm.weight", "blk.1.attn_q.weight"} <= set(names)
    assert names["blk.0.attn_k.weight"].tensor_type == gguf.GGMLQuantizationType.F16
    assert names["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    assert list(names["blk.0.attn_k.weight"].shape) == [64, 32]  # llama.cpp's ne: [in, out]


def test_modelfile_has_template_system_stop_and_sampling(llama_f16):
    """Guards against a FROM-only Modelfile (LLaMA-Factory #6320): Ollama would use no template and never stop."""
    mf = parse_modelfile((llama_f16.output_dir / "Modelfile").read_text())
    assert mf["FROM"] == "./run-f16.gguf"
    assert mf["SYSTEM"] == "你是甄嬛"
    assert mf["PARAMETER"]["stop"] == ["<|im_end|>"]
    assert mf["PARAMETER"]["temperature"] == ["0.7"] and mf["PARAMETER"]["repeat_penalty"] == [
        "1.0"
    ]  # see NOT_EXPORTED
    assert '"<|im_start|>assistant\\n"' in mf["TEMPLATE"]


def test_check_alone_passes_and_cli_exit_codes(llama_f16, capsys):
    """Guards against `export --check` not reloading the source from the manifest, or exiting 0 on a failure."""
    assert main(["export", "--check", str(llama_f16.output_dir), "--samples", "2", "--max-new-tokens", "8"]) == 0
    out = capsys.readouterr().out
    assert "greedy replies" in out and "parity: all checks passed" in out
    assert main(["export", "--check", str(llama_f16.output_dir), "--quant", "q8_0"]) == 2
    assert "--check DIR checks an existing export" in capsys.readouterr().err


def test_wrong_eos_is_caught(llama_f16, tmp_path, capsys):
    """Guards against a rewritten EOS (unsloth #5386): a runtime stopping at EOS would never end the turn."""
    out = broken_copy(llama_f16, tmp_path)
    set_gguf_field(out / "run-f16.gguf", "tokenizer.ggml.eos_token_id", lambda v: np.array([0], dtype=v.dtype))
    assert main(["export", "--check", str(out), "--samples", "2", "--max-new-tokens", "8"]) == 1
    printed = capsys.readouterr().out
    assert "GGUF tokenizer.ggml.eos_token_id is 0 ('<|endoftext|>') but the model ends turns with 2" in printed
    assert "FAILED: stop tokens (EOS/EOT)" in printed


def test_changed_template_is_caught(llama_f16, tmp_path):
    """Guards against a GGUF chat template that differs from training (LLaMA-Factory #6020)."""
    out = broken_copy(llama_f16, tmp_path)
    set_gguf_field(
        out / "run-f16.gguf",
        "tokenizer.chat_template",
        lambda v: np.frombuffer(bytes(v).replace(b"'\n'", b"' '"), dtype=v.dtype),
    )
    bad = failed(check_export(out, samples=2, max_new_tokens=8))
    assert "chat template (GGUF)" in bad
    assert "first difference at character" in bad["chat template (GGUF)"]


def test_double_bos_is_caught(llama_f16, tmp_path):
    """Guards against double BOS (unsloth #3899): a runtime adds BOS while the template already starts with it."""
    out = broken_copy(llama_f16, tmp_path)
    set_gguf_field(out / "run-f16.gguf", "tokenizer.ggml.add_bos_token", lambda v: np.array([1], dtype=v.dtype))
    bad = failed(check_export(out, samples=2, max_new_tokens=8))
    assert "starts with 2 BOS tokens ('<|im_start|>')" in bad["BOS once"]


def test_unloadable_gguf_is_a_failed_row(llama_f16, tmp_path, capsys):
    """Guards against a truncated or corrupt GGUF crashing the check instead of failing it with the reason."""
    out = broken_copy(llama_f16, tmp_path)
    path = out / "run-f16.gguf"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert main(["export", "--check", str(out), "--samples", "2", "--max-new-tokens", "8"]) == 1
    assert re.search(r"\nmodel config +FAIL +the GGUF does not load: ", capsys.readouterr().out)


@pytest.mark.parametrize(
    "edit, check, message",
    [
        (lambda t: t.replace('"<|im_end|>\\n"', '"<|im_end|>"', 1), "Modelfile TEMPLATE (Go)", "first difference"),
        (lambda t: t.replace('SYSTEM """你是甄嬛"""', 'SYSTEM """You are helpful"""'), "Modelfile SYSTEM", "你是甄嬛"),
        (lambda t: t.replace('PARAMETER stop "<|im_end|>"', 'PARAMETER stop "</s>"'), "Modelfile stop", "</s>"),
    ],
)
def test_broken_modelfile_is_caught(llama_f16, tmp_path, edit, check, message):
    """Guards against a Modelfile whose TEMPLATE, SYSTEM or stop differs from training."""
    if check == "Modelfile TEMPLATE (Go)" and shutil.which("go") is None:
        pytest.skip("go is not installed (CI installs golang-go)")
    out = broken_copy(llama_f16, tmp_path)
    modelfile = out / "Modelfile"
    modelfile.write_text(edit(modelfile.read_text()))
    bad = failed(check_export(out, samples=2, max_new_tokens=8))
    assert check in bad and message in bad[check]
    assert set(bad) <= {check, "Modelfile TEMPLATE (Go)"}  # a wrong SYSTEM also changes what Ollama renders


def test_qk_permutation_is_required(llama_run, tmp_path, monkeypatch):
    """Guards against writing llama Q/K rows in HF order: llama.cpp's RoPE would rotate the wrong pairs."""
    import chatlora.export.writer as writer

    monkeypatch.setattr(writer, "_permute", lambda w, n: w)
    bad = failed(export(llama_run, tmp_path / "x", quant="f16", max_new_tokens=12).checks)
    assert "greedy replies" in bad and "top-1 agreement" in bad


def test_q8_0_export(llama_run, tmp_path):
    """Guards against a broken q8_0 encoding: replies must match the adapter holding the same q8_0 weights."""
    result = export(llama_run, tmp_path / "q8", quant="q8_0", max_new_tokens=12)
    assert result.passed, failed(result.checks)
    types = {t.tensor_type for t in gguf.GGUFReader(result.files[0]).tensors}
    assert types == {gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.F32}
    detail = {c.name: c.detail for c in result.checks}["greedy replies"]
    assert detail.startswith("4/4 identical token for token to the adapter with q8_0 weights")


def test_qwen2_export(tmp_path):
    """Guards against qwen2 specifics: Q/K/V biases, tied embeddings (no output.weight), Qwen2 pre-tokenizer."""
    tok = make_bpe_tokenizer("qwen2", template=None)  # no template: chatlora trains with its ChatML fallback
    run = train_adapter(tmp_path, make_model_dir(tmp_path / "base", tok, arch="qwen2", tie=True), system_prompt="")
    result = export(run, tmp_path / "out", quant="q4_0", max_new_tokens=12)
    # A random 2-layer model says nothing about 4-bit quality; every conversion check must pass.
    assert set(failed(result.checks)) <= {"top-1 agreement"}, failed(result.checks)
    reader = gguf.GGUFReader(result.files[0])
    names = {t.name: t.tensor_type for t in reader.tensors}
    assert "output.weight" not in names and "blk.0.attn_q.bias" in names
    assert names["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.Q4_0
    assert names["token_embd.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert reader.fields["general.architecture"].contents() == "qwen2"
    assert reader.fields["tokenizer.ggml.pre"].contents() == "qwen2"
    assert "SYSTEM" not in parse_modelfile((result.output_dir / "Modelfile").read_text())


def test_lora_only_gguf(llama_run, tmp_path):
    """Guards against a LoRA GGUF llama.cpp rejects or scales wrongly (names, A/B layout, alpha, Q/K order)."""
    result = export(llama_run, tmp_path / "lora", lora_only=True, max_new_tokens=12)
    assert result.passed, failed(result.checks)
    reader = gguf.GGUFReader(result.files[0])
    assert reader.fields["general.type"].contents() == "adapter"
    assert reader.fields["adapter.type"].contents() == "lora"
    assert reader.fields["adapter.lora.alpha"].contents() == 8.0
    shapes = {t.name: list(t.shape) for t in reader.tensors}
    assert shapes["blk.0.attn_k.weight.lora_a"] == [64, 4]  # ne [in, r]
    assert shapes["blk.0.attn_k.weight.lora_b"] == [4, 32]  # ne [r, out]
    assert len(shapes) == 2 * 7 * 2
    set_gguf_field(result.files[0], "adapter.lora.alpha", lambda v: np.array([2.0], dtype=v.dtype))
    assert "top-1 agreement" in failed(check_export(result.output_dir, samples=2, max_new_tokens=8))


def test_lora_only_converts_rslora_alpha(llama_run, tmp_path):
    """Guards against writing rsLoRA's alpha as is: llama.cpp scales by alpha / r, rsLoRA by alpha / sqrt(r)."""
    run = tmp_path / "rslora"
    shutil.copytree(llama_run, run)
    cfg = json.loads((run / "adapter_config.json").read_text())
    (run / "adapter_config.json").write_text(json.dumps({**cfg, "use_rslora": True}))
    result = export(run, tmp_path / "lora", lora_only=True, max_new_tokens=8)
    assert gguf.GGUFReader(result.files[0]).fields["adapter.lora.alpha"].contents() == 16.0  # 8 * sqrt(4)
    assert result.passed, failed(result.checks)


def test_refuses_to_overwrite_output(llama_run, llama_f16):
    """Guards against overwriting a user's folder (house rule: nothing is lost without being asked)."""
    with pytest.raises(ModelError, match="exists and is not empty; choose another --output or pass --overwrite"):
        export(llama_run, llama_f16.output_dir)
    result = export(llama_run, llama_f16.output_dir, overwrite=True, check=False)
    assert result.files[0].is_file() and json.loads((result.output_dir / MANIFEST).read_text())["quant"] == "f16"


def test_unsupported_tokenizer_is_refused_clearly(tiny_model_dir, tmp_path, capsys):
    """Guards against writing a tokenizer llama.cpp would split differently (here: no pre-tokenizer regex)."""
    from chatlora.model import load_model, load_tokenizer

    with pytest.raises(ModelError, match="no llama.cpp equivalent"):
        write_gguf(load_model(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir)), tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()
    capsys.readouterr()
    assert main(["export", "--model", str(tiny_model_dir), "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "ByteLevel" in err


def test_merge_writes_end_of_turn_generation_config(tmp_path):
    """Guards against a merged model whose generation_config stops only at the pretraining EOS (Yi: 2, not 7)."""
    from chatlora.merge import merge

    tok = make_bpe_tokenizer(template=CHATML_TEMPLATE, eos="<|endoftext|>")  # EOS differs from the end-of-turn token
    run = train_adapter(tmp_path, make_model_dir(tmp_path / "base", tok))
    merged = merge(run, tmp_path / "merged")
    gen = json.loads((merged / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [2, 0]  # <|im_end|> first, then EOS
    result = export(model=merged, output=tmp_path / "gguf", max_new_tokens=12)
    assert result.passed, failed(result.checks)
    assert {c.name: c.detail for c in result.checks}["stop tokens (EOS/EOT)"].startswith(
        "end of turn '<|im_end|>' = 2"
    )
    gen["eos_token_id"] = 0
    (merged / "generation_config.json").write_text(json.dumps(gen))
    bad = failed(check_export(tmp_path / "gguf", samples=2, max_new_tokens=8))
    assert "generation_config eos_token_id [0] lacks the end-of-turn token 2" in bad["stop tokens (EOS/EOT)"]


def test_parse_modelfile():
    """Guards against misreading multi-line TEMPLATE/SYSTEM or repeated PARAMETER stop lines."""
    text = '# c\nFROM ./m.gguf\nTEMPLATE """a\n{{ .Content }}\n"""\nSYSTEM """x "y" z"""\nPARAMETER stop "<a>"\nPARAMETER stop "<b>"\nPARAMETER top_k 5\n'
    mf = parse_modelfile(text)
    assert mf["FROM"] == "./m.gguf" and mf["TEMPLATE"] == "a\n{{ .Content }}\n" and mf["SYSTEM"] == 'x "y" z'
    assert mf["PARAMETER"] == {"stop": ["<a>", "<b>"], "top_k": ["5"]}


FAKE_LLAMA_SERVER = '''
"""Stand-in for llama.cpp's llama-server: the endpoints chatlora's check calls, served from the GGUF by transformers."""
import json, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import gguf, torch
from transformers import AutoModelForCausalLM, AutoTokenizer

args = sys.argv[1:]
path, port = Path(args[args.index("-m") + 1]), int(args[args.index("--port") + 1])
fields = gguf.GGUFReader(path).fields
meta = {k: fields[k].contents() for k in fields if not k.startswith("tokenizer.ggml.t") and "merges" not in k}
tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
stops = {meta.get("tokenizer.ggml.eos_token_id"), meta.get("tokenizer.ggml.eot_token_id")}


def tokenize(text, add_special):
    bos = [meta["tokenizer.ggml.bos_token_id"]] if add_special and meta.get("tokenizer.ggml.add_bos_token") else []
    return bos + tok(text, add_special_tokens=False)["input_ids"]


class Handler(BaseHTTPRequestHandler):
    def send(self, body):
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self.send({"status": "ok"})

    def do_POST(self):
        req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path == "/apply-template":
            template = meta["tokenizer.chat_template"]
            text = tok.apply_chat_template(req["messages"], tokenize=False, add_generation_prompt=True, chat_template=template)
            return self.send({"prompt": text})
        if self.path == "/tokenize":
            return self.send({"tokens": tokenize(req["content"], req.get("add_special", False))})
        ids, out = tokenize(req["prompt"], True), []
        with torch.inference_mode():
            while len(out) < req["n_predict"]:
                token = int(model(torch.tensor([ids + out])).logits[0, -1].argmax())
                if token in stops:
                    return self.send({"content": tok.decode(out), "stop_type": "eos"})
                out.append(token)
        self.send({"content": tok.decode(out), "stop_type": "limit"})

    def log_message(self, *args):
        pass


ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()
'''


def fake_executable(bin_dir: Path, name: str, source: str) -> None:
    import sys

    bin_dir.mkdir(exist_ok=True)
    path = bin_dir / name
    path.write_text(f"#!{sys.executable}\n{source}")
    path.chmod(0o755)


def test_llama_server_check(llama_f16, tmp_path, monkeypatch):
    """Guards against the llama-server check comparing the wrong things (template, tokens, where replies stop)."""
    fake_executable(tmp_path / "bin", "llama-server", FAKE_LLAMA_SERVER)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    row = {c.name: c for c in check_export(llama_f16.output_dir, samples=2, max_new_tokens=8)}[
        "llama.cpp (llama-server)"
    ]
    assert row.status == "PASS", row.detail
    assert row.detail == (
        "prompts rendered and tokenized as in training; 2/2 greedy replies identical, "
        "2/2 stop where the export's weights stop"
    )
    out = broken_copy(llama_f16, tmp_path)  # a runtime that adds BOS to a prompt whose template already has it
    set_gguf_field(out / "run-f16.gguf", "tokenizer.ggml.add_bos_token", lambda v: np.array([1], dtype=v.dtype))
    row = {c.name: c for c in check_export(out, samples=2, max_new_tokens=8)}["llama.cpp (llama-server)"]
    assert row.status == "FAIL" and "prompt 1: llama.cpp tokenizes to [1, 1, " in row.detail


class _FakeOllama:
    """Stand-in for a running Ollama: `ollama create/rm` keep a registry, /api/chat renders the Modelfile's TEMPLATE
    with Go (as Ollama does), adds its SYSTEM and stops at its stop parameters."""

    CLI = """
import json, os, sys
registry = os.environ["FAKE_OLLAMA_REGISTRY"]
models = json.load(open(registry)) if os.path.exists(registry) else {}
if sys.argv[1] == "create":
    models[sys.argv[2]] = os.path.abspath(sys.argv[sys.argv.index("-f") + 1])
elif sys.argv[1] == "rm":
    models.pop(sys.argv[2])
json.dump(models, open(registry, "w"))
"""

    def __init__(self, registry: Path):
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        from chatlora.export import render_go_template
        from chatlora.export.parity import _load_gguf as load_gguf

        fake = self

        class Handler(BaseHTTPRequestHandler):
            def send(self, body):
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self.send({"version": "0.0-fake"})

            def do_POST(self):
                req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                path = Path(json.loads(registry.read_text())[req["model"]])
                fake.chats.append(req["model"])
                mf = parse_modelfile(path.read_text())
                model, tok = load_gguf(path.parent, mf["FROM"])
                prompt = render_go_template(mf["TEMPLATE"], [req["messages"]], mf.get("SYSTEM"))[0]
                ids, out = tok(prompt, add_special_tokens=False)["input_ids"], []
                stops = {tok.convert_tokens_to_ids(s) for s in mf["PARAMETER"]["stop"]}
                with torch.inference_mode():
                    while len(out) < req["options"]["num_predict"]:
                        token = int(model(torch.tensor([ids + out])).logits[0, -1].argmax())
                        if token in stops:
                            return self.send({"message": {"content": tok.decode(out)}, "done_reason": "stop"})
                        out.append(token)
                self.send({"message": {"content": tok.decode(out)}, "done_reason": "length"})

            def log_message(self, *args):
                pass

        self.chats: list[str] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def test_ollama_check(llama_f16, tmp_path, monkeypatch):
    """Guards against the Ollama check chatting with a model other than the Modelfile's, or leaving it installed."""
    registry = tmp_path / "registry.json"
    fake = _FakeOllama(registry)
    fake_executable(tmp_path / "bin", "ollama", _FakeOllama.CLI)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_OLLAMA_REGISTRY", str(registry))
    monkeypatch.setenv("OLLAMA_HOST", f"127.0.0.1:{fake.server.server_port}")
    try:
        row = {c.name: c for c in check_export(llama_f16.output_dir, samples=2, max_new_tokens=8)}["Ollama"]
    finally:
        fake.server.shutdown()
    assert row.status == "PASS", row.detail
    assert (
        row.detail
        == "created from the Modelfile; 2/2 greedy replies identical, 2/2 stop where the export's weights stop"
    )
    assert len(fake.chats) == 2 and json.loads(registry.read_text()) == {}  # removed again


def character_chats(systems: list[str]) -> list[dict]:
    """Multi-turn `messages` conversations of English characters, the i-th with system prompt ``systems[i]``."""
    return [
        {
            "messages": [
                {"role": "system", "content": system},
                {"role": "user", "content": f"Hello world, who is this? {i}"},
                {"role": "assistant", "content": "Hello world, this is a tiny tokenizer."},
                {"role": "user", "content": "And what do you do?"},
                {"role": "assistant", "content": "This is a tiny tokenizer."},
            ]
        }
        for i, system in enumerate(systems)
    ]


def test_per_conversation_system_prompts_export_no_system_and_pass_every_row(tmp_path):
    """Guards against issue 22.6: a run on 12 conversations that each carry their own (non-甄嬛) system prompt, with
    no held-out split, exported chatlora's built-in 甄嬛 prompt as the Modelfile SYSTEM while its check said "PASS the
    trained system prompt", and the Go TEMPLATE row failed on the built-in prompts ("training '' vs export
    '<|im_start|>assistant\\n'"). The Modelfile has no SYSTEM and says why; every row passes."""
    tok = make_bpe_tokenizer(bos="<|im_start|>")
    systems = [f"You are character {i} of the tiny world. Hello world." for i in range(12)]
    run = train_adapter(
        tmp_path, make_model_dir(tmp_path / "base", tok), None, rows=character_chats(systems), val_size=None
    )
    card = json.loads((run / "chatlora.json").read_text(encoding="utf-8"))
    assert card["dataset"]["val_records"] == 0
    assert card["template"]["system_prompt"] is None
    assert card["template"]["system_prompts"]["data"] == "several"
    assert card["template"]["system_prompts"]["trained_distinct"] == 12
    result = export(run, tmp_path / "x", quant="f16", samples=3, max_new_tokens=8)
    assert result.passed, failed(result.checks)
    detail = {c.name: c.detail for c in result.checks}
    assert detail["Modelfile SYSTEM"].startswith("no SYSTEM, as trained: the run trained 12 distinct system prompts")
    assert statuses(result.checks)["Modelfile TEMPLATE (Go)"] == ("PASS" if shutil.which("go") else "SKIP")
    text = (result.output_dir / "Modelfile").read_text(encoding="utf-8")
    assert "甄嬛" not in text and "SYSTEM" not in parse_modelfile(text)
    assert "\n# no SYSTEM: the run trained 12 distinct system prompts, one per conversation" in text
    manifest = json.loads((result.output_dir / MANIFEST).read_text(encoding="utf-8"))
    assert manifest["system_prompt"] is None and "12 distinct" in manifest["system_prompt_note"]


@pytest.mark.parametrize("every", [True, False], ids=["every-record", "half-the-records"])
def test_one_shared_system_prompt_in_the_data_is_the_exported_one(tmp_path, every):
    """Guards against issue 22.6: data that carries one system prompt (a character's) exported chatlora's built-in
    甄嬛 prompt instead. The Modelfile SYSTEM and the manifest are the data's prompt; the Go TEMPLATE renders the
    held-out conversations (their system message left to SYSTEM) as chatlora renders them, also those without one
    (both add the run's prompt)."""
    from chatlora.export.source import _conversations, _open_source

    tok = make_bpe_tokenizer(bos="<|im_start|>")
    shared = "You are the tiny tokenizer. Hello world."
    rows = character_chats([shared] * 12)
    if not every:
        rows = [{"messages": r["messages"][i % 2 :]} for i, r in enumerate(rows)]  # odd ones without a system message
    run = train_adapter(tmp_path, make_model_dir(tmp_path / "base", tok), None, rows=rows)
    result = export(run, tmp_path / "x", quant="f16", samples=4, max_new_tokens=8)
    assert result.passed, failed(result.checks)
    assert parse_modelfile((result.output_dir / "Modelfile").read_text(encoding="utf-8"))["SYSTEM"] == shared
    assert json.loads((result.output_dir / MANIFEST).read_text(encoding="utf-8"))["system_prompt"] == shared
    convs, what = _conversations(_open_source(run, None), 4)
    assert what == "4 held-out conversations"
    assert every == all(c[0]["role"] == "system" for c in convs)  # without: rendered as trained, with none


def test_parity_prompts_fall_back_to_built_in_ones_when_the_held_out_split_is_unusable(tmp_path):
    """Guards against the parity check failing with a traceback (or a wall of data errors) when the run's dataset
    is gone or no longer valid: it uses built-in prompts and says why in one line."""
    from chatlora.export.source import _conversations, _Source

    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n[]\n", encoding="utf-8")
    for path, expected in ((tmp_path / "gone.jsonl", "the run's dataset is gone"), (bad, f"{bad}:1:")):
        card = {"dataset": {"path": str(path), "val_indices": [0]}, "template": {"system_prompt": "S"}}
        convs, what = _conversations(_Source("adapter", tmp_path, card, None), 2)
        assert what.startswith("2 built-in prompts: ") and expected in what and "\n" not in what, what
        assert convs[0][0] == {"role": "system", "content": "S"} and convs[0][-1]["role"] == "user"
    assert "held-out" in _conversations(_Source("adapter", tmp_path, {}, None), 2)[1]  # no split recorded


@pytest.mark.parametrize("overwrite", [False, True], ids=["plain", "overwrite"])
def test_output_that_is_a_file_is_one_line_exit_2_and_kept(tmp_path, capsys, overwrite):
    """Guards against `export --output FILE --overwrite` on an existing regular file dying with a FileExistsError
    traceback from mkdir (or deleting the user's file); it is refused before the adapter is even opened, so the
    adapter path here need not exist."""
    target = tmp_path / "notes.txt"
    target.write_text("mine", encoding="utf-8")
    argv = ["export", "--adapter", str(tmp_path / "no-such-run"), "--output", str(target)]
    assert main(argv + ["--overwrite"] * overwrite) == 2
    err = capsys.readouterr().err
    assert (
        err
        == f"chatlora: error: {target}: is a file: --output must be a folder (new or empty); choose another --output\n"
    )
    assert target.read_text(encoding="utf-8") == "mine"
    assert main(["export", "--adapter", str(tmp_path / "no-such-run"), "--output", str(target / "sub")]) == 2
    assert f"lies under {target}, which is a file: --output must be a folder" in capsys.readouterr().err


# llama.cpp itself (llama-cpp-python, the `gguf` extra `make install` installs): K-quants and the library row.
needs_llama_cpp = pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python is not installed (make install has it)"
)
LIBRARY = "llama.cpp (library)"


@pytest.fixture(scope="module")
def wide_runs(tmp_path_factory) -> dict[str, Path]:
    """A llama (BOS written by the template) and a qwen2 (no BOS, ChatML fallback), hidden 256 for K-quants, nearly
    bigram models that reply "Hello world, this is a tiny tokenizer." to any prompt, with small LoRA updates."""
    runs = {}
    for arch, pre, template, bos, system in (
        ("llama", "gpt2", SMOL_LIKE, "<|im_start|>", "你是甄嬛"),
        ("qwen2", "qwen2", None, None, ""),
    ):
        tmp = tmp_path_factory.mktemp(f"wide-{arch}")
        tok = make_bpe_tokenizer(pre, template=template, bos=bos)
        base = make_model_dir(tmp / "base", tok, arch=arch, hidden=256, reply="Hello world, this is a tiny tokenizer.")
        runs[arch] = train_adapter(tmp, base, system, lora_std=0.03)
    return runs


def set_gguf_array_item(path: Path, key: str, index: int, value: int) -> None:
    """Change one element of a GGUF metadata array in place, as a broken exporter would have written it."""
    reader = gguf.GGUFReader(path, "r+")
    field = reader.fields[key]
    field.parts[field.data[index]][...] = value
    reader.data.flush()


@needs_llama_cpp
@pytest.mark.parametrize("quant", ["f16", "q8_0", "q4_k_m"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_llama_cpp_library_prompts_and_stops_like_the_export(wide_runs, tmp_path, arch, quant):
    """Guards against a GGUF that transformers reads right but llama.cpp itself renders, tokenizes or stops
    differently (its own tokenizer, token types, add_bos flag, template engine and kernels)."""
    result = export(wide_runs[arch], tmp_path / quant, quant=quant, max_new_tokens=12)
    assert result.passed, failed(result.checks)
    row = {c.name: c for c in result.checks}[LIBRARY]
    assert row.status == "PASS", row.detail
    assert "llama.cpp tokenizes 4 prompts as in training (BOS once)" in row.detail
    assert row.detail.endswith("4/4 stop where the export's weights stop"), row.detail


@needs_llama_cpp
@pytest.mark.parametrize(
    "quant, types",
    [("q4_k_m", {"Q4_K", "Q6_K", "F32"}), ("q5_k_m", {"Q5_K", "Q6_K", "F32"}), ("q6_k", {"Q6_K", "F32"})],
)
def test_k_quant_export(wide_runs, tmp_path, quant, types):
    """Guards against a K-quant file that is not llama.cpp's mix, or a reference that is not the file's weights:
    replies must equal the adapter holding the weights read back from the file, token for token."""
    result = export(wide_runs["llama"], tmp_path / quant, quant=quant, max_new_tokens=12)
    assert result.passed, failed(result.checks)
    reader = gguf.GGUFReader(result.files[0])
    assert {t.tensor_type.name for t in reader.tensors} == types
    assert reader.fields["general.file_type"].contents() == QUANTS[quant].file_type
    detail = {c.name: c.detail for c in result.checks}["greedy replies"]
    assert detail.startswith(f"4/4 identical token for token to the adapter with {quant} weights"), detail
    assert sorted(p.name for p in result.output_dir.iterdir()) == ["Modelfile", MANIFEST, f"run-{quant}.gguf"]


@needs_llama_cpp
def test_k_quant_qk_permutation_is_required(wide_runs, tmp_path, monkeypatch):
    """Guards against a K-quant reference read back from a file with HF's Q/K row order: the reference would hold
    the same mistake, so the read-back weights must be within rounding distance of the source's."""
    import chatlora.export.writer as writer

    monkeypatch.setattr(writer, "_permute", lambda w, n: w)
    bad = failed(export(wide_runs["llama"], tmp_path / "x", quant="q4_k_m", max_new_tokens=8).checks)
    assert "a wrong tensor or Q/K row order" in bad["greedy replies"], bad


@needs_llama_cpp
def test_k_quant_failure_leaves_no_file(wide_runs, tmp_path, monkeypatch):
    """Guards against a half-written GGUF or a stray f32 temp file when llama.cpp's quantizer fails."""
    import llama_cpp

    from chatlora.model import load_model, load_tokenizer

    def fail(src, dst, params):
        assert Path(src.decode()).is_file()  # the f32 GGUF llama.cpp quantizes from
        Path(dst.decode()).write_bytes(b"GGUF half")
        return 1

    monkeypatch.setattr(llama_cpp, "llama_model_quantize", fail)
    base = wide_runs["llama"].parent / "base"
    with pytest.raises(ModelError, match="llama.cpp's quantizer failed to write q4_k_m"):
        write_gguf(load_model(str(base)), load_tokenizer(str(base)), tmp_path / "m.gguf", "q4_k_m")
    assert list(tmp_path.iterdir()) == []


def test_k_quant_without_llama_cpp_is_one_line_exit_2(llama_run, llama_f16, tmp_path, capsys, monkeypatch):
    """Guards against a traceback (or minutes of merging first) when the `gguf` extra is missing for a K-quant,
    and against the library row failing rather than skipping without it."""
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llama_cpp" else find_spec(name))
    out = tmp_path / "k"
    assert main(["export", "--adapter", str(llama_run), "--output", str(out), "--quant", "q4_k_m"]) == 2
    err = capsys.readouterr().err
    assert err == (
        "chatlora: error: --quant q4_k_m is written by llama.cpp's quantizer (llama-cpp-python): "
        "pip install 'chatlora[gguf]'\n"
    )
    assert not out.exists()
    row = {c.name: c for c in check_export(llama_f16.output_dir, samples=1, max_new_tokens=4)}[LIBRARY]
    assert (row.status, row.detail) == ("SKIP", "llama-cpp-python is not installed (pip install 'chatlora[gguf]')")


@needs_llama_cpp
def test_llama_cpp_library_catches_a_second_bos(llama_f16, tmp_path):
    """Guards against add_bos_token = true while the template writes BOS: llama.cpp would prompt with two."""
    out = broken_copy(llama_f16, tmp_path)
    set_gguf_field(out / "run-f16.gguf", "tokenizer.ggml.add_bos_token", lambda v: np.array([1], dtype=v.dtype))
    bad = failed(check_export(out, samples=2, max_new_tokens=4))
    assert bad[LIBRARY].startswith("prompt 1: llama.cpp's prompt starts with 2 BOS tokens ('<|im_start|>')"), bad
    assert set(bad) == {"BOS once", LIBRARY}  # the transformers-side check reads the same flag


@needs_llama_cpp
def test_llama_cpp_library_catches_a_chat_marker_that_is_not_control(llama_f16, tmp_path):
    """Guards against a chat marker stored as a NORMAL token: llama.cpp would split '<|im_start|>' into pieces
    (transformers' GGUF reader does not look at token types, so only llama.cpp itself shows it; llama.cpp repairs
    the type of end-of-turn markers it knows, like '<|im_end|>', by itself)."""
    out = broken_copy(llama_f16, tmp_path)
    set_gguf_array_item(out / "run-f16.gguf", "tokenizer.ggml.token_type", 1, gguf.TokenType.NORMAL)
    bad = failed(check_export(out, samples=2, max_new_tokens=4))
    assert bad[LIBRARY].startswith("prompt 1: llama.cpp tokenizes training's text to other ids: at token 0"), bad
    assert set(bad) == {LIBRARY}


def test_runtime_summary_judges_stops_only_where_replies_have_not_parted():
    """Guards against failing a runtime whose reply parted at a near-tie and then ended elsewhere (a different
    continuation, SmolLM2 q4_k_m in llama.cpp: 2 of 8), and against passing one that runs past the stop token."""
    from chatlora.export.runtimes import _runtime_summary

    tok = make_bpe_tokenizer()
    hello, world = (tok(t, add_special_tokens=False)["input_ids"] for t in ("Hello", " world"))
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    convs = [[{"role": "user", "content": "x"}]] * 2
    expected = [hello + world + [eot]] * 2
    parted = [("Hello world", True), ("Hello tiny tokenizer", False)]  # the second parts after "Hello", goes on
    assert _runtime_summary(convs, expected, parted, tok) == (
        True,
        "1/2 greedy replies identical, 1/1 stop where the export's weights stop (1 parted before their end at a "
        "near-tie: the runtime's kernels round differently)",
    )
    runs_on = [("Hello world", True), ("Hello world tiny", False)]  # the same reply, then past the stop token
    assert _runtime_summary(convs, expected, runs_on, tok) == (
        False,
        "1/2 greedy replies identical, 1/2 stop where the export's weights stop",
    )
    elsewhere = [("tiny", True), ("tokenizer", True)]
    ok, detail = _runtime_summary(convs, expected, elsewhere, tok)
    assert not ok and detail.endswith(
        "every reply parted before its end: the runtime computes something else from this file"
    )


@needs_llama_cpp
def test_llama_cpp_builtin_renderer_difference_is_a_note_not_a_failure(tmp_path):
    """Guards against failing a correct export because llama.cpp's built-in ChatML renderer (llama-cli without
    --jinja, which no printed command uses) leaves out the default system line SmolLM2's template writes when a run
    trained without a system prompt; the row says so instead."""
    tok = make_bpe_tokenizer("gpt2", template=SMOL_LIKE, bos="<|im_start|>")
    base = make_model_dir(tmp_path / "base", tok, hidden=256, reply="Hello world, this is a tiny tokenizer.")
    run = train_adapter(tmp_path, base, "", lora_std=0.03)
    result = export(run, tmp_path / "x", quant="f16", samples=2, max_new_tokens=12)
    assert result.passed, failed(result.checks)
    row = {c.name: c for c in result.checks}[LIBRARY]
    assert row.status == "PASS" and "NOTE without --jinja llama.cpp's built-in renderer differs" in row.detail
