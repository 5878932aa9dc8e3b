"""Chat template: messages -> ``(input_ids, labels)`` for training, and the generation prompt for inference.

Both come from the same code path (:func:`_pieces`), so the prompt a tuned model sees at inference is a byte-exact
(and token-exact) prefix of what it was trained on. Labels are ``-100`` everywhere except the assistant replies,
which include their end-of-turn token (``<|im_end|>`` for ChatML) so the model learns to stop.

Nothing about the model family is assumed: the end-of-turn token is read off the template (:func:`end_of_turn`),
a template's own default system prompt is left to it, a system prompt it cannot take is folded into the first user
turn (:func:`takes_system`), and a template's refusal (``raise_exception``) is a :class:`TemplateError`.

Text is text: what people and files write (messages, system prompts, character cards) never becomes a control token.
Before rendering, every control-token string inside a message (:func:`control_tokens`) is swapped for a
placeholder the template cannot mistake for anything; the template's own markers are then the only control strings
in the rendering, and each placeholder is tokenized back as the plain text it stands for (:func:`encode_segments`).
"""

from __future__ import annotations

import re
import weakref
from pathlib import Path
from typing import NamedTuple

from .data import Record, length_stats
from .errors import DataError, TemplateError

__all__ = [
    "CHATML_TEMPLATE",
    "IGNORE_INDEX",
    "Encoded",
    "TemplateError",
    "control_ids",
    "control_token_warnings",
    "control_tokens",
    "encode_conversation",
    "encode_record",
    "encode_prompt",
    "encode_segments",
    "end_of_turn",
    "forged_control_tokens",
    "ensure_chat_template",
    "render_text",
    "stop_token_ids",
    "takes_system",
    "token_length_stats",
    "with_system",
]

IGNORE_INDEX = -100

# Yi-6B-Chat's ChatML, used when a tokenizer ships no chat template of its own.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_PROBE = "\u2063chatlora-probe\u2063"


class Encoded(NamedTuple):
    """One rendered conversation."""

    input_ids: list[int]
    labels: list[int]
    truncated: bool


def ensure_chat_template(tokenizer) -> None:
    """Give a tokenizer without a chat template the built-in ChatML one (and ChatML special tokens)."""
    if getattr(tokenizer, "chat_template", None):
        return
    missing = [t for t in ("<|im_start|>", "<|im_end|>") if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing})
    tokenizer.chat_template = CHATML_TEMPLATE


def with_system(messages: list[dict], system_prompt: str | None) -> list[dict]:
    """Prepend ``system_prompt`` unless the conversation already has a system message (data wins)."""
    if not system_prompt or (messages and messages[0]["role"] == "system"):
        return list(messages)
    return [{"role": "system", "content": system_prompt}, *messages]


def _apply(messages: list[dict], tokenizer, add_generation_prompt: bool) -> str:
    from jinja2 import TemplateError as JinjaError

    try:
        return tokenizer.apply_chat_template(
            [{"role": m["role"], "content": m["content"]} for m in messages],
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            chat_template=getattr(tokenizer, "chat_template", None) or CHATML_TEMPLATE,
        )
    except JinjaError as e:  # raise_exception() in the template (e.g. Gemma's strict user/model alternation)
        roles = "/".join(m["role"] for m in messages[:8]) + ("/..." if len(messages) > 8 else "")
        raise TemplateError(f"the chat template refuses the conversation {roles}: {e}") from None


def render_text(messages: list[dict], tokenizer, add_generation_prompt: bool = False) -> str:
    """Render messages to text with the tokenizer's chat template (ChatML when it has none).

    A template that cannot take a system message (see :func:`takes_system`) gets the system prompt folded into the
    first user turn, ``system + "\n\n" + user``, as Gemma-3's template does itself.

    Raises:
        TemplateError: The template refuses the conversation (its ``raise_exception``), or there is no user turn
            right after a system prompt the template cannot take.
    """
    if messages and messages[0]["role"] == "system" and not takes_system(tokenizer):
        messages = _fold_system(messages)
    return _apply(messages, tokenizer, add_generation_prompt)


_SYSTEM_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def takes_system(tokenizer) -> bool:
    """Whether the chat template writes a system message, both in a prompt and in a conversation that ends on a
    reply (training's). Gemma-2's raises on one, some drop it, Mistral v0.3's writes it into a final user turn only."""
    key = getattr(tokenizer, "chat_template", None)
    cached = _SYSTEM_CACHE.get(tokenizer)
    if cached is not None and cached[0] == key:
        return cached[1]
    probe = [
        {"role": "system", "content": _PROBE},
        {"role": "user", "content": "x"},
        {"role": "assistant", "content": "y"},
    ]
    try:
        found = _PROBE in _apply(probe[:2], tokenizer, True) and _PROBE in _apply(probe, tokenizer, False)
    except TemplateError:
        found = False
    _SYSTEM_CACHE[tokenizer] = (key, found)
    return found


def _fold_system(messages: list[dict]) -> list[dict]:
    system, rest = messages[0]["content"], messages[1:]
    if not rest or rest[0]["role"] != "user":
        raise TemplateError(
            "the chat template has no system role and the system prompt is not followed by a user turn to fold it into"
        )
    content = f"{system}\n\n{rest[0]['content']}" if system else rest[0]["content"]
    return [{"role": "user", "content": content}, *rest[1:]]


# ---------------------------------------------------------------- text is text

_CONTROL_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def control_tokens(tokenizer) -> dict[str, int]:
    """The strings this tokenizer turns into control tokens, with their ids: every special token, and every added
    token that the chat template writes itself without it being flagged special (``<think>``, ``<tool_call>``).

    Other added tokens (Gemma's ``<h1>`` or runs of spaces) are vocabulary for ordinary text and stay so.
    """
    return _controls(tokenizer)[0]


def control_ids(tokenizer) -> frozenset[int]:
    """Ids of :func:`control_tokens`."""
    return _controls(tokenizer)[1]


def _controls(tokenizer) -> tuple[dict[str, int], frozenset[int]]:
    template = getattr(tokenizer, "chat_template", None) or CHATML_TEMPLATE
    key = (template, len(tokenizer))
    cached = _CONTROL_CACHE.get(tokenizer)
    if cached is not None and cached[0] == key:
        return cached[1]
    found: dict[str, int] = {}
    for token_id, added in getattr(tokenizer, "added_tokens_decoder", {}).items():
        text = str(added)
        structural = text in template and not any(c.isspace() for c in text)
        if text and (added.special or structural):
            found[text] = token_id
    for text in tokenizer.all_special_tokens:
        token_id = tokenizer.convert_tokens_to_ids(text)
        if text and token_id is not None:
            found.setdefault(text, token_id)
    result = (found, frozenset(found.values()))
    _CONTROL_CACHE[tokenizer] = (key, result)
    return result


# A placeholder stands for one literal (a control-token string, or the placeholder's own lead character) inside
# message text: private-use characters, which no chat template changes and no control token contains.
_LEAD, _TAIL = "\ue000", "\ue001"
_PLACEHOLDER = re.compile(f"{_LEAD}(\\d+){_TAIL}")
_LITERAL_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _literals(tokenizer) -> tuple[list[str], re.Pattern]:
    """The literals placeholders stand for (``_LEAD`` first, then control strings, longest first) and a pattern
    that finds any of them."""
    controls = control_tokens(tokenizer)  # cached: the same dict until the template or the vocabulary changes
    cached = _LITERAL_CACHE.get(tokenizer)
    if cached is not None and cached[0] is controls:
        return cached[1]
    literals = [_LEAD, *sorted(controls, key=len, reverse=True)]
    found = (literals, re.compile("|".join(re.escape(t) for t in literals)))
    _LITERAL_CACHE[tokenizer] = (controls, found)
    return found


def forged_control_tokens(text: str, tokenizer) -> list[str]:
    """The control-token strings inside ``text`` (e.g. ``["<|im_end|>"]``), which chatlora tokenizes as text."""
    literals, pattern = _literals(tokenizer)
    return [m.group(0) for m in pattern.finditer(text) if m.group(0) != _LEAD]


def control_token_warnings(records, tokenizer, source: str) -> list[str]:
    """``FILE:LINE: warning: ...`` for each record whose text holds control-token strings of this tokenizer's
    template (leftover markers are a common fault of scraped chat data); chatlora trains them as plain text."""
    out = []
    for r in records:
        found = {(m["role"], t) for m in r.messages for t in forged_control_tokens(m["content"], tokenizer)}
        if found:
            what = ", ".join(f"{role} {token}" for role, token in sorted(found))
            out.append(f"{source}:{r.line}: warning: text holds control-token strings ({what}); trained as plain text")
    return out


def _escape(messages: list[dict], tokenizer) -> list[dict]:
    """``messages`` with every control-token string in their content swapped for its placeholder."""
    literals, pattern = _literals(tokenizer)
    index = {t: i for i, t in enumerate(literals)}

    def swap(m: re.Match) -> str:
        return f"{_LEAD}{index[m.group(0)]}{_TAIL}"

    return [{**m, "content": pattern.sub(swap, m["content"])} for m in messages]


def _tokenize(text: str, tokenizer, offsets: bool = False):
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=offsets)
    return (list(enc["input_ids"]), list(enc["offset_mapping"])) if offsets else (list(enc["input_ids"]), None)


# Text put before a segment that continues a piece, so that the tokenizer does not treat the segment as the start of
# a text (sentencepiece vocabularies add a word-start marker there); its own tokens are dropped again.
_ANCHORS = ("\n", ".", "a")


_ANCHOR_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _continue(text: str, tokenizer, offsets: bool):
    """Tokens of ``text`` as it reads in the middle of a text: ``_tokenize`` behind an anchor, anchor dropped."""
    heads = _ANCHOR_CACHE.get(tokenizer)
    if heads is None:  # the anchors' own tokens, once per tokenizer: this runs for every continued piece
        heads = _ANCHOR_CACHE[tokenizer] = [_tokenize(anchor, tokenizer)[0] for anchor in _ANCHORS]
    for anchor, head in zip(_ANCHORS, heads, strict=True):
        ids, spans = _tokenize(anchor + text, tokenizer, offsets)
        if ids[: len(head)] == head:
            spans = [(a - len(anchor), b - len(anchor)) for a, b in spans[len(head) :]] if offsets else None
            return ids[len(head) :], spans
    return _tokenize(text, tokenizer, offsets)


def _literal_chunks(literal: str, controls: list[str]) -> list[str]:
    """``literal`` cut into chunks none of which holds a control string, so no chunk can become a control token."""
    if not any(c in literal for c in controls):
        return [literal]
    if len(literal) == 1:
        return [literal]
    return [literal[:1], *_literal_chunks(literal[1:], controls)]


_TEXT_START_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _marks_text_start(tokenizer) -> bool:
    """Whether the tokenizer encodes the start of a text differently from the same words further on (sentencepiece's
    word-start marker: ``▁Hi`` alone, ``Hi`` after a newline). Byte-level BPE vocabularies do not."""
    if tokenizer not in _TEXT_START_CACHE:
        _TEXT_START_CACHE[tokenizer] = _tokenize("Hi", tokenizer)[0] != _continue("Hi", tokenizer, False)[0]
    return _TEXT_START_CACHE[tokenizer]


def encode_segments(text: str, tokenizer, offsets: bool = False, continued: bool = False):
    """Token ids (and character offsets into ``text`` when asked, which needs a fast tokenizer) of one piece of an
    escaped rendering: the template's text is tokenized as the tokenizer does, control tokens included, and each
    placeholder as the plain text it stands for, never as a control token.

    ``continued``: the piece follows others in the same rendering, so it is tokenized as the middle of a text (for
    sentencepiece vocabularies, without the word-start marker a text's first word gets), as a runtime that
    tokenizes the whole rendering at once (llama.cpp, Ollama) does. Text without placeholders (every conversation
    whose messages hold no control-token string) is tokenized in one call, exactly as before this safeguard existed.
    """
    start_fresh = not (continued and _marks_text_start(tokenizer))
    if _LEAD not in text:
        ids, where = _tokenize(text, tokenizer, offsets) if start_fresh else _continue(text, tokenizer, offsets)
        _check_controls(text, ids, tokenizer)
        return ids, where
    literals, _ = _literals(tokenizer)
    controls = literals[1:]
    ids: list[int] = []
    spans: list[tuple[int, int]] = []
    pos = 0

    def add(chunk: str, start: int, span: tuple[int, int] | None = None) -> None:
        fresh = start_fresh and not ids
        got, where = _tokenize(chunk, tokenizer, offsets) if fresh else _continue(chunk, tokenizer, offsets)
        ids.extend(got)
        if offsets:  # a placeholder's tokens all point at the whole placeholder
            spans.extend(span or (start + a, start + b) for a, b in where)

    for m in _PLACEHOLDER.finditer(text):
        if m.start() > pos:
            add(text[pos : m.start()], pos)
        literal = literals[int(m.group(1))]
        for chunk in _literal_chunks(literal, controls):
            add(chunk, m.start(), (m.start(), m.end()))
        pos = m.end()
    if pos < len(text):
        add(text[pos:], pos)
    _check_controls(text, ids, tokenizer)
    return ids, (spans if offsets else None)


def _check_controls(text: str, ids: list[int], tokenizer) -> None:
    """Refuse an encoding with more control tokens than the template wrote: text next to a marker forged one."""
    marks = len(forged_control_tokens(_PLACEHOLDER.sub("", text), tokenizer))
    controls = control_ids(tokenizer)
    if sum(i in controls for i in ids) > marks:
        raise TemplateError("message text next to a chat-template marker would be read as a control token")


_EOT_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def end_of_turn(tokenizer) -> tuple[str, int]:
    """The token that closes an assistant turn in this template, e.g. ``("<|im_end|>", 2)``.

    Found by rendering a probe reply and taking the first special token after it; the tokenizer's EOS otherwise.
    """
    key = getattr(tokenizer, "chat_template", None)
    cached = _EOT_CACHE.get(tokenizer)
    if cached is not None and cached[0] == key:
        return cached[1]
    _EOT_CACHE[tokenizer] = (key, found := _find_end_of_turn(tokenizer))
    return found


def stop_token_ids(tokenizer) -> list[int]:
    """What generation must stop at: the end-of-turn token, then the tokenizer's EOS when it is another token."""
    _, eot = end_of_turn(tokenizer)
    return list(dict.fromkeys(i for i in (eot, tokenizer.eos_token_id) if i is not None))


def _find_end_of_turn(tokenizer) -> tuple[str, int]:
    text = render_text([{"role": "user", "content": "x"}, {"role": "assistant", "content": _PROBE}], tokenizer)
    after = text[text.rindex(_PROBE) + len(_PROBE) :]
    special = set(tokenizer.all_special_ids) | {
        i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if getattr(t, "special", False)
    }
    for token_id in tokenizer(after, add_special_tokens=False)["input_ids"]:
        if token_id in special:
            return tokenizer.convert_ids_to_tokens(token_id), token_id
    if tokenizer.eos_token is None:
        raise TemplateError("the chat template closes assistant turns with no special token and there is no EOS")
    return tokenizer.eos_token, tokenizer.eos_token_id


# Earlier whole turns rendered before each new one when locating it; enough for templates that look back a turn.
_CONTEXT_TURNS = 2


def _prefix_len(prefix: str, full: str, what: str) -> int:
    if not full.startswith(prefix):
        raise TemplateError(
            f"the chat template renders {what} differently once later turns are added, so prompts and "
            "training text would not match; use a template that only appends (ChatML-style)"
        )
    return len(prefix)


def _spans_by_prefix(messages: list[dict], tokenizer, full: str) -> list[tuple[int, int]]:
    """``(start, end)`` in ``full`` of each assistant turn, from renderings of every prefix (quadratic, exact)."""
    spans = []
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            start = _prefix_len(render_text(messages[:i], tokenizer, add_generation_prompt=True), full, f"turn {i}")
            end = _prefix_len(render_text(messages[: i + 1], tokenizer), full, f"turn {i + 1}")
            spans.append((start, end))
    return spans


def _spans_by_window(messages: list[dict], tokenizer, full: str) -> list[tuple[int, int]] | None:
    """The spans of :func:`_spans_by_prefix` in linear time, or None where this shortcut cannot vouch for them.

    Each assistant turn is located from a window: the system message, the last ``_CONTEXT_TURNS`` whole turns and
    the new one. What the window's rendering adds for the new turn (generation prompt, reply) must equal ``full``
    at the end of the previous turn; that holds for templates that render each turn from the turn and its
    neighbours. Templates that number turns or rewrite history fail the comparison (or raise) and return None.
    """
    assistants = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    head = messages[:1] if messages and messages[0]["role"] == "system" else []
    spans: list[tuple[int, int]] = []
    end = 0  # where the previous turn ends in full
    previous = ""  # the rendering of the previous window, when it equals the next context
    for n, i in enumerate(assistants):
        first = assistants[n - 1] + 1 if n else 0  # messages after the previous turn
        if n <= _CONTEXT_TURNS:
            context = messages[:first]  # the true prefix: no window yet
        else:
            context = head + messages[assistants[n - 1 - _CONTEXT_TURNS] + 1 : first]
        try:
            base = previous if n <= _CONTEXT_TURNS else render_text(context, tokenizer)
            prompt = render_text(context + messages[first:i], tokenizer, add_generation_prompt=True)
            reply = render_text(context + messages[first : i + 1], tokenizer)
        except Exception:  # e.g. a template's raise_exception on a window it finds odd: use the exact way
            return None
        if not (prompt.startswith(base) and reply.startswith(base)):
            return None
        added_prompt, added_reply = prompt[len(base) :], reply[len(base) :]
        if not (full.startswith(added_prompt, end) and full.startswith(added_reply, end)):
            return None
        spans.append((end + len(added_prompt), end + len(added_reply)))
        end += len(added_reply)
        previous = reply
    return spans


def _pieces(messages: list[dict], tokenizer, add_generation_prompt: bool) -> list[tuple[str, bool]]:
    """Split the rendering of ``messages`` into consecutive ``(text, trained)`` pieces.

    A trained piece is one assistant reply through its end-of-turn token; whatever the template writes after that
    token (ChatML's newline) belongs to the next, untrained piece. The reply spans are the ones found by rendering
    every prefix of the conversation; :func:`_spans_by_window` finds them in linear time for templates that render
    turn by turn, and the prefix renderings are the fallback for the others.
    """
    full = render_text(messages, tokenizer, add_generation_prompt=add_generation_prompt)
    spans = _spans_by_window(messages, tokenizer, full)
    if spans is None:
        spans = _spans_by_prefix(messages, tokenizer, full)
    eot, _ = end_of_turn(tokenizer)
    pieces: list[tuple[str, bool]] = []
    pos = 0
    for start, end in spans:
        block = full[start:end]
        cut = block.rfind(eot)
        stop = start + cut + len(eot) if cut >= 0 else end
        pieces.append((full[pos:start], False))
        pieces.append((full[start:stop], True))
        pos = stop
    if pos < len(full):
        pieces.append((full[pos:], False))
    return [(text, trained) for text, trained in pieces if text]


def _user_spans(messages: list[dict], full: str) -> list[tuple[int, int]]:
    """Character spans of the user turns' text in the rendering ``full``, found in order (a template that rewrites
    a turn's text, e.g. folding the system prompt into it or stripping it, gets no span for that turn)."""
    spans, pos = [], 0
    for m in messages:
        if m["role"] not in ("user", "system") or not m["content"]:
            continue
        start = full.find(m["content"], pos)
        if start < 0:
            continue
        if m["role"] == "user":
            spans.append((start, start + len(m["content"])))
        pos = start + len(m["content"])  # past a system prompt too: a short user turn may also occur inside it
    return spans


def _user_labels(
    text: str, offset: int, spans: list[tuple[int, int]], tokenizer, continued: bool
) -> tuple[list[int], list[int]]:
    """``(ids, labels)`` of an untrained piece (``text``, starting at ``offset`` of the rendering): the ids are
    :func:`encode_segments`', and a token is its own label when it lies wholly inside a user turn's text, else
    ``-100``."""
    if not getattr(tokenizer, "is_fast", False):
        raise TemplateError("train_on_user needs a fast tokenizer (character offsets); this one is not")
    ids, where = encode_segments(text, tokenizer, offsets=True, continued=continued)
    labels = []
    for token, (a, b) in zip(ids, where, strict=True):
        inside = any(s <= offset + a and offset + b <= e for s, e in spans) and b > a
        labels.append(token if inside else IGNORE_INDEX)
    return ids, labels


def encode_conversation(
    messages: list[dict], tokenizer, max_length: int | None = None, label_user: bool = False
) -> Encoded:
    """Messages -> ``input_ids`` and ``labels`` (``-100`` except assistant replies + their end-of-turn token).

    The messages' text is text: a control-token string inside it is tokenized as plain text (:func:`encode_segments`).

    Every assistant turn is trained; with ``label_user`` the text of the user turns is too (not the system prompt
    or the template's own tokens), as more of the same dialogue to learn from. When the conversation is longer
    than ``max_length`` tokens, it is cut after the last whole assistant turn that fits; only when not even the
    first reply fits is it cut mid-turn. ``truncated`` says whether anything was cut.
    """
    input_ids: list[int] = []
    labels: list[int] = []
    last_whole_turn = 0
    first_reply = None  # where the first reply starts
    messages = _escape(messages, tokenizer)
    pieces = _pieces(messages, tokenizer, add_generation_prompt=False)
    spans = _user_spans(messages, "".join(text for text, _ in pieces)) if label_user else []
    offset = 0
    for text, trained in pieces:
        if spans and not trained:
            ids, piece_labels = _user_labels(text, offset, spans, tokenizer, continued=offset > 0)
        else:
            ids, _ = encode_segments(text, tokenizer, continued=offset > 0)
            piece_labels = ids if trained else [IGNORE_INDEX] * len(ids)
        if trained and first_reply is None:
            first_reply = len(input_ids)
        input_ids += ids
        labels += piece_labels
        offset += len(text)
        if trained and (max_length is None or len(input_ids) <= max_length):
            last_whole_turn = len(input_ids)
    truncated = max_length is not None and len(input_ids) > max_length
    keep = (last_whole_turn or max_length) if truncated else len(input_ids)
    if first_reply is None or keep <= first_reply:  # not one reply token kept: nothing is trained (user text neither)
        return Encoded(input_ids[:keep], [IGNORE_INDEX] * keep, truncated)
    return Encoded(input_ids[:keep], labels[:keep], truncated)


def encode_record(
    record: Record,
    tokenizer,
    system_prompt: str | None,
    max_length: int | None,
    train_on_prompt: bool = False,
    train_on_user: bool = False,
    source: str | Path = "data",
) -> Encoded:
    """One data record as training encodes it: ``system_prompt`` added where it has none (:func:`with_system`),
    labels chosen by the training options. ``train_on_prompt`` labels every token (system prompt, user turns,
    template); ``train_on_user`` the user turns' text too. A record the chat template refuses raises a DataError
    naming ``source`` and its line. ``train`` and ``data show`` both encode through here.
    """
    label_user = train_on_user and not train_on_prompt  # train_on_prompt labels those tokens and more
    try:
        enc = encode_conversation(with_system(record.messages, system_prompt), tokenizer, max_length, label_user)
    except TemplateError as e:
        raise DataError([f"{source}:{record.line}: {e}"]) from None
    if train_on_prompt and any(label != IGNORE_INDEX for label in enc.labels):
        return Encoded(enc.input_ids, list(enc.input_ids), enc.truncated)
    return enc


def encode_prompt(messages: list[dict], tokenizer) -> list[int]:
    """Token ids of the generation prompt for ``messages`` (ending on a user turn), through the training path.

    The result is a token-exact prefix of ``encode_conversation(messages + [reply])`` for any reply.
    """
    ids: list[int] = []
    for n, (text, _) in enumerate(_pieces(_escape(messages, tokenizer), tokenizer, add_generation_prompt=True)):
        ids += encode_segments(text, tokenizer, continued=n > 0)[0]
    return ids


def token_length_stats(
    conversations: list[list[dict]], tokenizer, system_prompt: str | None, max_length: int | None
) -> dict:
    """Token lengths of ``conversations`` as training encodes them (``system_prompt`` added, nothing cut).

    Returns:
        :func:`chatlora.data.length_stats` of the lengths (``truncated``: how many exceed ``max_length``) and
        ``max_length`` itself.
    """
    lengths = [len(encode_conversation(with_system(m, system_prompt), tokenizer).input_ids) for m in conversations]
    return {**length_stats(lengths, max_length), "max_length": max_length}
