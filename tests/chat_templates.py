"""Chat templates that are not plain ChatML, written for the tests after the shape of real model families.

Each keeps the features of its original that break naive masking or stopping; none is a copy of the original's
text (tool prompts are shortened):

* ``qwen``: Qwen2.5-Instruct. Injects its own default system prompt when the conversation has none, and renders
  ``tools`` (a ``# Tools`` system block), assistant ``tool_calls`` and ``tool`` turns.
* ``llama3``: Llama-3.1-Instruct. ``bos_token`` in the text, a system block always written (dates, then the
  system prompt), contents trimmed, turns closed by ``<|eot_id|>`` while the tokenizer's EOS is
  ``<|end_of_text|>`` (as in the base model's tokenizer), a ``tools`` branch that moves the first user turn.
* ``gemma2``: Gemma-2-it. No system role (the template raises on one), strict user/model alternation,
  ``<end_of_turn>`` closes turns while EOS is ``<eos>``.
* ``gemma3``: Gemma-3-it. Folds the system prompt into the first user turn itself.
* ``mistral``: Mistral-7B-Instruct-v0.3. Writes the system prompt into the last user turn only (so never in a
  conversation that ends on a reply), a space before each reply, EOS closes turns, no generation prompt.
"""

from __future__ import annotations

from pathlib import Path

from conftest import make_model_dir, make_tokenizer

QWEN_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."

QWEN_TEMPLATE = (
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] }}"
    "{%- else %}{{- '" + QWEN_DEFAULT_SYSTEM + "' }}{%- endif %}"
    "{{- '\\n\\n# Tools\\n\\nFunction signatures:\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}{%- endfor %}"
    "{{- '\\n</tools>\\n\\nCall one inside <tool_call></tool_call> tags.<|im_end|>\\n' }}"
    "{%- else %}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\n" + QWEN_DEFAULT_SYSTEM + "<|im_end|>\\n' }}{%- endif %}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' or (message.role == 'system' and not loop.first)"
    " or (message.role == 'assistant' and not message.tool_calls) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- elif message.role == 'assistant' %}"
    "{{- '<|im_start|>' + message.role }}"
    "{%- if message.content %}{{- '\\n' + message.content }}{%- endif %}"
    "{%- for tool_call in message.tool_calls %}"
    "{%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}"
    '{{- \'\\n<tool_call>\\n{"name": "\' + tool_call.name + \'", "arguments": \' }}'
    "{{- tool_call.arguments | tojson }}{{- '}\\n</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{%- if loop.index0 == 0 or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

LLAMA3_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if not date_string is defined %}{%- set date_string = '26 Jul 2024' %}{%- endif %}"
    "{%- if not tools is defined %}{%- set tools = none %}{%- endif %}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system_message = messages[0]['content'] | trim %}{%- set messages = messages[1:] %}"
    "{%- else %}{%- set system_message = '' %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}"
    "{%- if tools is not none %}{{- 'Environment: ipython\\n' }}{%- endif %}"
    "{{- 'Cutting Knowledge Date: December 2023\\n' }}"
    "{{- 'Today Date: ' + date_string + '\\n\\n' }}"
    "{{- system_message }}{{- '<|eot_id|>' }}"
    "{%- if tools is not none %}"
    "{%- if messages | length != 0 %}"
    "{%- set first_user_message = messages[0]['content'] | trim %}{%- set messages = messages[1:] %}"
    "{%- else %}{{- raise_exception('Cannot put tools in the first user message when there is none!') }}"
    "{%- endif %}"
    "{{- '<|start_header_id|>user<|end_header_id|>\\n\\nAnswer with a JSON function call.\\n\\n' }}"
    "{%- for t in tools %}{{- t | tojson(indent=4) }}{{- '\\n\\n' }}{%- endfor %}"
    "{{- first_user_message + '<|eot_id|>' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
    " + '<|eot_id|>' }}"
    "{%- elif 'tool_calls' in message %}"
    "{%- set tool_call = message.tool_calls[0].function %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{{- '{\"name\": \"' + tool_call.name + '\", \"parameters\": ' + tool_call.arguments | tojson + '}' }}"
    "{{- '<|eot_id|>' }}"
    "{%- else %}"
    "{{- '<|start_header_id|>ipython<|end_header_id|>\\n\\n' + message.content | tojson + '<|eot_id|>' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)

GEMMA2_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'assistant' %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}"
    "{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)

GEMMA3_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}{%- set role = 'model' -%}{%- else -%}"
    "{%- set role = message['role'] -%}{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"
)

MISTRAL_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system_message = messages[0]['content'] %}{%- set loop_messages = messages[1:] %}"
    "{%- else %}{%- set loop_messages = messages %}{%- endif %}"
    "{{- bos_token }}"
    "{%- for message in loop_messages %}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('After the optional system message, conversation roles must alternate user/assistant/"
    "user/assistant/...') }}{%- endif %}"
    "{%- if message['role'] == 'user' %}"
    "{%- if loop.last and system_message is defined %}"
    "{{- '[INST] ' + system_message + '\\n\\n' + message['content'] + '[/INST]' }}"
    "{%- else %}{{- '[INST] ' + message['content'] + '[/INST]' }}{%- endif %}"
    "{%- else %}{{- ' ' + message['content'] | trim + eos_token }}{%- endif %}"
    "{%- endfor %}"
)

_QWEN_SPECIALS = {
    "eos_token": "<|im_end|>",
    "pad_token": "<|endoftext|>",
    "additional_special_tokens": ["<|im_start|>"],
}
_LLAMA3_SPECIALS = {
    "bos_token": "<|begin_of_text|>",
    "eos_token": "<|end_of_text|>",
    "additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>"],
}
_GEMMA_SPECIALS = {
    "bos_token": "<bos>",
    "eos_token": "<eos>",
    "pad_token": "<pad>",
    "additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"],
}

_MISTRAL_SPECIALS = {"bos_token": "<s>", "eos_token": "</s>", "additional_special_tokens": ["[INST]", "[/INST]"]}

# family -> (chat template, special tokens, end-of-turn token)
FAMILIES = {
    "qwen": (QWEN_TEMPLATE, _QWEN_SPECIALS, "<|im_end|>"),
    "llama3": (LLAMA3_TEMPLATE, _LLAMA3_SPECIALS, "<|eot_id|>"),
    "gemma2": (GEMMA2_TEMPLATE, _GEMMA_SPECIALS, "<end_of_turn>"),
    "gemma3": (GEMMA3_TEMPLATE, _GEMMA_SPECIALS, "<end_of_turn>"),
    "mistral": (MISTRAL_TEMPLATE, _MISTRAL_SPECIALS, "</s>"),
}
# what the template writes between the generation prompt and the reply's text
REPLY_LEAD = {"mistral": " "}


def family_tokenizer(family: str):
    template, specials, _ = FAMILIES[family]
    return make_tokenizer(template, specials)


def make_scripted_model_dir(path: Path, family: str, reply: str = "hi") -> Path:
    """A tiny Llama that, greedily, answers ``reply`` and then the family's end-of-turn token, then rambles.

    Attention and MLP outputs are zeroed, so each position's logits depend on its own token only: the last
    character of every generation prompt (a newline for all families) leads to ``reply[0]``, each character of the
    reply to the next one, its last to the end-of-turn token, and every other token to ``x``. A generator that
    does not stop at the end-of-turn token goes on ``xxx...`` until its token limit; one that trains or scores the
    template's text after the end-of-turn token (its newline) meets a confident wrong prediction.
    LoRA on ``q_proj``/``v_proj`` leaves the outputs unchanged (their attention output is multiplied by zero).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    template, specials, eot = FAMILIES[family]
    make_model_dir(path, template, special_tokens=specials)
    tok = AutoTokenizer.from_pretrained(path)
    net = AutoModelForCausalLM.from_pretrained(path)

    def tid(text: str) -> int:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1, text
        return ids[0]

    chain = ["\n", *reply]
    targets = [*reply, eot]
    hidden = net.config.hidden_size
    assert len(chain) + 1 <= hidden
    with torch.no_grad():
        for layer in net.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        embed, head = net.model.embed_tokens.weight, net.lm_head.weight
        embed.zero_()
        head.zero_()
        embed[:, 0] = 1.0  # every token's own direction is 0, unless it is on the chain
        head[tid("x"), 0] = 1.5
        for k, (source, target) in enumerate(zip(chain, targets, strict=True), start=1):
            embed[tid(source)] = 0.0
            embed[tid(source), k] = 1.0
            head[tid(target), k] = 1.5
    net.save_pretrained(path)
    return path
