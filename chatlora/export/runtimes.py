"""Real runtimes in the parity check: llama.cpp and Ollama, when installed."""

from __future__ import annotations

import ctypes
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

from ..template import (
    encode_prompt,
    render_text,
    stop_token_ids,
)
from .ollama import MODELFILE
from .quants import GGUF_EXTRA, _llama_cpp
from .results import Check, _first_difference
from .source import _prompt_of, _Source


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

    The runtime's own kernels round differently, so replies may part at near-ties, after which the two are different
    continuations that end where they end. Where a reply stops must agree wherever the replies have not parted
    before: one stopping where the other goes on is a stop-token error (or a tie with the stop token). Every reply
    parting before its end means the runtime computes something else from the file.
    """
    stops = set(stop_token_ids(tok))
    same = parted = stop_bad = 0
    for want, (text, stopped) in zip(expected, got, strict=True):
        want_stopped = bool(want) and want[-1] in stops
        for special in tok.all_special_tokens:  # runtimes differ in whether they print special tokens
            text = text.replace(special, "")
        want_text = tok.decode([t for t in want if t not in stops], skip_special_tokens=True)
        if text == want_text:
            same += 1
            stop_bad += stopped != want_stopped
        elif text.startswith(want_text) or want_text.startswith(text):  # one ends where the other goes on
            stop_bad += stopped or want_stopped
        else:
            parted += 1
    n, checked = len(convs), len(convs) - parted
    detail = (
        f"{same}/{n} greedy replies identical, {checked - stop_bad}/{checked} stop where the export's weights stop"
    )
    if parted:
        detail += f" ({parted} parted before their end at a near-tie: the runtime's kernels round differently)"
    if not checked:
        detail += "; every reply parted before its end: the runtime computes something else from this file"
    return stop_bad == 0 and checked > 0, detail


def _check_llama_cpp(
    src: _Source, model_path: Path | None, lora_path: Path | None, convs, expected, max_new_tokens
) -> Check:
    """llama.cpp itself, through llama-cpp-python: the prompts it builds from the GGUF and where its replies stop.

    For each held-out prompt: llama.cpp's tokenizer on training's text (BOS added as the GGUF says, special tokens
    parsed) gives training's ids, with BOS once; the GGUF's template rendered as llama-cpp-python's chat completion
    renders it (and by llama.cpp's built-in renderer, where it recognises the template) is training's text; greedy
    replies stop where the export's weights stop in transformers.
    """
    name = "llama.cpp (library)"
    if importlib.util.find_spec("llama_cpp") is None:
        return Check(name, "SKIP", f"llama-cpp-python is not installed ({GGUF_EXTRA})")
    if model_path is None:
        return Check(name, "SKIP", "the base model is not a GGUF file to apply the LoRA to")
    llama_cpp = _llama_cpp()
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    tok = src.tokenizer
    prompts = [_prompt_of(c) for c in convs]
    want_ids = [encode_prompt(m, tok) for m in prompts]
    n_ctx = max(len(ids) for ids in want_ids) + max_new_tokens + 16
    # Llama() does not expose llama.cpp's use_extra_bufts (llama-cli's --no-repack): where the repacked CPU kernels
    # misbehave (they crashed on Q8_0/Q4_1 on an AMX Xeon) this row fails or crashes with them, as llama.cpp would.
    try:
        llm = llama_cpp.Llama(
            str(model_path),
            lora_path=str(lora_path) if lora_path else None,
            n_ctx=n_ctx,
            n_batch=n_ctx,
            n_threads=min(4, os.cpu_count() or 1),
            seed=0,
            logits_all=False,
            verbose=False,
        )
    except Exception as e:  # llama.cpp refuses the file: the row says so rather than crash the table
        return Check(name, "FAIL", f"llama.cpp does not load the GGUF: {type(e).__name__}: {e}")
    try:
        meta = llm.metadata
        template = meta.get("tokenizer.chat_template")
        if not template:
            return Check(name, "FAIL", "the GGUF has no tokenizer.chat_template for llama.cpp to render")
        vocab = llama_cpp.llama_model_get_vocab(llm.model)
        bos, eos = llama_cpp.llama_vocab_bos(vocab), llama_cpp.llama_vocab_eos(vocab)

        def text_of(token: int) -> str:
            return llama_cpp.llama_vocab_get_text(vocab, token).decode("utf-8", errors="replace")

        # What create_chat_completion does with the GGUF's template (Llama.__init__ builds the same formatter).
        formatter = Jinja2ChatFormatter(
            template, eos_token=text_of(eos) if eos != -1 else "", bos_token=text_of(bos) if bos != -1 else ""
        )
        builtin, builtin_diff = 0, None
        got = []
        for n, (messages, want) in enumerate(zip(prompts, want_ids, strict=True), 1):
            text = render_text(messages, tok, add_generation_prompt=True)
            ids = llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)  # add_bos: BOS if the GGUF says
            lead = _leading_bos(ids, bos)
            if lead > 1:
                return Check(
                    name,
                    "FAIL",
                    f"prompt {n}: llama.cpp's prompt starts with {lead} BOS tokens ({text_of(bos)!r}): the GGUF's "
                    f"add_bos_token adds one and the template writes one; training had {_leading_bos(want, bos)}",
                )
            if ids != want:
                return Check(
                    name, "FAIL", f"prompt {n}: llama.cpp tokenizes training's text {_id_difference(want, ids)}"
                )
            chat = formatter(messages=messages)
            if chat.prompt != text:
                return Check(
                    name,
                    "FAIL",
                    f"prompt {n}: llama-cpp-python's rendering of the GGUF template "
                    f"{_first_difference(text, chat.prompt)}",
                )
            chat_ids = llm.tokenize(chat.prompt.encode("utf-8"), add_bos=not chat.added_special, special=True)
            if chat_ids != want:
                return Check(
                    name, "FAIL", f"prompt {n}: llama-cpp-python's chat prompt {_id_difference(want, chat_ids)}"
                )
            own = _apply_builtin_template(llama_cpp, template, messages)
            if own is not None and own != text and builtin_diff is None:
                # what llama-cli does without --jinja: a note, since every command chatlora prints passes --jinja
                builtin_diff = f"prompt {n}: {_first_difference(text, own)}"
            elif own is not None:
                builtin += 1
            reply, stopped = [], False
            for token in llm.generate(chat_ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0):
                if llama_cpp.llama_vocab_is_eog(vocab, token):  # EOS, EOT or any end-of-generation token
                    stopped = True
                    break
                reply.append(token)
                if len(reply) == max_new_tokens:
                    break
            # Token ids, decoded by training's tokenizer as the expected replies are: byte-level tokens that end
            # inside a character compare exactly.
            got.append((tok.decode(reply, skip_special_tokens=True), stopped))
        ok, detail = _runtime_summary(convs, expected, got, tok)
        rendered = "llama-cpp-python's template" + (" and llama.cpp's built-in one" if builtin else "")
        note = (
            f"; NOTE without --jinja llama.cpp's built-in renderer differs from training ({builtin_diff}): keep --jinja"
            if builtin_diff
            else ""
        )
        return Check(
            name,
            "PASS" if ok else "FAIL",
            f"{rendered} render and llama.cpp tokenizes {len(prompts)} prompts as in training (BOS once); {detail}"
            + note,
        )
    finally:
        llm.close()


def _leading_bos(ids: list[int], bos: int) -> int:
    n = 0
    while bos != -1 and n < len(ids) and ids[n] == bos:
        n += 1
    return n


def _id_difference(want: list[int], got: list[int]) -> str:
    k = next((i for i, (x, y) in enumerate(zip(want, got, strict=False)) if x != y), min(len(want), len(got)))
    return f"to other ids: at token {k} training has {want[k : k + 4]}, llama.cpp {got[k : k + 4]}"


def _apply_builtin_template(llama_cpp, template: str, messages: list[dict]) -> str | None:
    """llama.cpp's own C++ rendering (what llama-cli/llama-server use without ``--jinja``); None when it does not
    recognise the template."""
    chat = (llama_cpp.llama_chat_message * len(messages))(
        *(llama_cpp.llama_chat_message(m["role"].encode(), m["content"].encode()) for m in messages)
    )
    size = llama_cpp.llama_chat_apply_template(template.encode(), chat, len(messages), True, None, 0)
    if size < 0:
        return None
    buf = ctypes.create_string_buffer(size + 1)
    llama_cpp.llama_chat_apply_template(template.encode(), chat, len(messages), True, buf, size + 1)
    return buf.raw[:size].decode("utf-8")


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
