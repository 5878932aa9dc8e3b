"""Ollama: the training template as a Go TEMPLATE, the Modelfile, and Go's own rendering of it."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ModelError, TemplateError
from ..settings import SamplingConfig
from ..template import (
    render_text,
)

MODELFILE = "Modelfile"


_PROBES = {r: f"\u2063chatlora-{r}\u2063" for r in ("system", "user", "assistant", "user2")}


@dataclass(frozen=True)
class _TemplateParts:
    """An append-only chat template as literal pieces: what goes around each role's content, and the extras.

    ``folds_system``: the template has no system turn; the system prompt opens the first user turn's content,
    followed by a blank line (Gemma-3's template does that itself; chatlora does it for Gemma-2 and Mistral).
    """

    head: str  # written before the first message when the conversation has no system message (a default system)
    wrap: dict[str, tuple[str, str]]  # role -> (before content, after content)
    generation: str  # what add_generation_prompt appends
    folds_system: bool = False

    def render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        if self.folds_system and messages and messages[0]["role"] == "system":
            system, first, *rest = messages
            content = f"{system['content']}\n\n{first['content']}" if system["content"] else first["content"]
            messages = [{"role": "user", "content": content}, *rest]
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
    sys_, usr, ast, user2 = (
        {"role": "system", "content": p["system"]},
        {"role": "user", "content": p["user"]},
        {"role": "assistant", "content": p["assistant"]},
        {"role": "user", "content": p["user2"]},
    )

    def suffix(longer: list[dict], shorter: list[dict]) -> str:
        full, prefix = render_text(longer, tokenizer), render_text(shorter, tokenizer)
        if not full.startswith(prefix):
            raise TemplateError("the chat template rewrites earlier turns when one is added")
        return full[len(prefix) :]

    folded = [{"role": "user", "content": f"{p['system']}\n\n{p['user']}"}]
    folds = render_text([sys_, usr], tokenizer) == render_text(folded, tokenizer)
    if folds:  # no system turn: the user wrap is read off a later user turn, the head is what comes before
        wrap = {
            "user": _split_probe(suffix([usr, ast, user2], [usr, ast]), p["user2"], "user"),
            "assistant": _split_probe(suffix([usr, ast], [usr]), p["assistant"], "assistant"),
        }
    else:
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
    parts = _TemplateParts(no_system[: -len(user_block)], wrap, prompt[len(plain) :], folds)
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
    if parts.folds_system:  # the system prompt opens the first user turn: held until that turn
        lines[0] += '{{- $system := "" }}{{- $first := true }}'
        if parts.head:
            lines.append("{{- " + _go_string(parts.head) + " }}")
    elif parts.head:
        lines.append(
            '{{- if not (and .Messages (eq (index .Messages 0).Role "system")) }}' + lit(parts.head) + "{{ end }}"
        )
    lines.append("{{- range .Messages }}{{ $role = .Role }}")
    if parts.folds_system:
        before, after = parts.wrap["user"]
        lines.append('{{- if eq .Role "system" }}{{ $system = .Content }}')
        lines.append(
            f'{{{{- else if eq .Role "user" }}}}{lit(before)}'
            '{{ if and $first $system }}{{ $system }}{{ "\\n\\n" }}{{ end }}{{ $first = false }}'
            f"{{{{ .Content }}}}{lit(after)}"
        )
        roles = ("assistant",)
    else:
        roles = ("system", "user", "assistant")
    for role in roles:
        before, after = parts.wrap[role]
        keyword = "if" if role == "system" else "else if"
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
    system_note: str = "",
) -> str:
    """An Ollama Modelfile: FROM, optional ADAPTER, TEMPLATE, SYSTEM, stop tokens and the sampling settings of
    chatlora chat that mean the same in Ollama (temperature, top_p, top_k; see :data:`NOT_EXPORTED`).

    Without ``system``, ``system_note`` (why there is none) is written as a comment where SYSTEM would be.
    """
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
    elif system_note:
        lines.append("# no SYSTEM: " + " ".join(system_note.split()))
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    lines += [
        f"PARAMETER temperature {sampling.temperature}",
        f"PARAMETER top_p {sampling.top_p}",
        f"PARAMETER top_k {sampling.top_k}",
        # Ollama's repeat_penalty 1.0 switches off its own default (1.1 over the last 64 tokens)
        "PARAMETER repeat_penalty 1.0",
        f"# {NOT_EXPORTED}",
    ]
    return "\n".join(lines) + "\n"


NOT_EXPORTED = (
    "Not exported: chatlora chat's repetition_penalty, which transformers applies over the whole sequence, prompt "
    "included; llama.cpp's and Ollama's repeat_penalty looks at the last 64 tokens only, a different thing."
)


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
