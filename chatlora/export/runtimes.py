"""Real runtimes in the parity check: llama.cpp and Ollama, when installed."""

from __future__ import annotations

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
