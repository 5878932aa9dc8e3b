"""The server with the real embedded SmolLM2-135M-Instruct: real stops, template-exact prompts, adapter vs base."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

from serving import BackgroundServer  # noqa: E402

from chatlora.inference.infer import ChatModel, SamplingConfig  # noqa: E402
from chatlora.serve import create_app, load_models  # noqa: E402
from chatlora.template import encode_prompt, with_system  # noqa: E402

pytestmark = pytest.mark.integration

ASK = [{"role": "user", "content": "What is the capital of France? Answer in one short sentence."}]


@pytest.fixture(scope="module")
def adapter_dir(embedded_model_dir, tmp_path_factory) -> Path:
    """A small random LoRA adapter on the embedded model, saved like a chatlora run (adapter + tokenizer)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from chatlora.model import load_tokenizer

    out = tmp_path_factory.mktemp("smol-adapter")
    torch.manual_seed(0)
    net = AutoModelForCausalLM.from_pretrained(embedded_model_dir)
    peft = get_peft_model(
        net, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    peft.save_pretrained(out)
    load_tokenizer(embedded_model_dir).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def served(embedded_model_dir, adapter_dir):
    models = load_models({"smol-lora": adapter_dir}, model="embedded", device="cpu")
    with BackgroundServer(create_app(models, max_queue=4)) as srv:
        yield models, openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=300)


def test_real_model_stops_at_end_of_turn(served):
    """Bug: the server ignored the end-of-turn token (ran to max_tokens, finish_reason 'length') or leaked it."""
    models, client = served
    r = client.chat.completions.create(model="embedded", messages=ASK, temperature=0, max_tokens=64)
    text = r.choices[0].message.content
    assert r.choices[0].finish_reason == "stop"
    assert "Paris" in text and "<|im_end|>" not in text
    assert r.usage.completion_tokens < 64
    # Same reply as ChatModel on the base model: byte-identical prompt through the training template.
    chat = models.models["embedded"].chat
    prompt = encode_prompt(with_system(ASK, chat.system_prompt), chat.tokenizer)
    assert r.usage.prompt_tokens == len(prompt)
    ref = ChatModel.load(model="embedded", device="cpu").generate(
        ASK, SamplingConfig(max_new_tokens=64, temperature=0)
    )
    assert text == ref.text and r.usage.completion_tokens == ref.completion_tokens


def test_real_model_streams_same_text_and_adapter_matches_standalone(served, adapter_dir):
    """Bug: streaming split multi-byte text wrongly, or the adapter served differed from loading it alone."""
    models, client = served
    full = client.chat.completions.create(model="smol-lora", messages=ASK, temperature=0, max_tokens=24)
    chunks = list(
        client.chat.completions.create(model="smol-lora", messages=ASK, temperature=0, max_tokens=24, stream=True)
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == full.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason
    ref = ChatModel.load(adapter=adapter_dir, device="cpu").generate(
        ASK, SamplingConfig(max_new_tokens=24, temperature=0)
    )
    assert full.choices[0].message.content == ref.text
