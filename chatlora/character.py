"""Character cards (Character Card V2 JSON, or a ``character:`` block in the YAML) compiled into one system prompt.

The compiled prompt is the only thing the rest of chatlora sees: train renders every conversation with it, the run
card records it (with the card's name and hash), and chat, generate, eval and serve take it from the run card as
the model's default system prompt, so every command talks to the model the way it was trained.

Spec: https://github.com/malfoyslastname/character-card-spec-v2 (``spec: "chara_card_v2"``, the fields in
``data``). A PNG card (what card sites and SillyTavern hand out) carries the same JSON, base64-encoded, in a text
chunk named ``chara``; :func:`load_card` reads either, telling them apart by content, not by file name.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .files import lone_surrogate

__all__ = [
    "CARD_FIELDS",
    "MAX_PROMPT_CHARS",
    "Character",
    "CharacterError",
    "character_from_block",
    "compile_prompt",
    "load_card",
    "resolve_character",
]

SPEC = "chara_card_v2"
# The V2 fields that become the prompt, in the order they appear in it.
CARD_FIELDS = ("name", "description", "personality", "scenario", "first_mes", "mes_example", "system_prompt")
# Fields a V2 card may carry that never reach the prompt (the spec says creator_notes, tags, creator and
# character_version MUST NOT; post_history_instructions, alternate_greetings and character_book need a frontend).
_STRING_EXTRAS = ("creator_notes", "post_history_instructions", "creator", "character_version")
_LIST_EXTRAS = ("alternate_greetings", "tags")
_OBJECT_EXTRAS = ("character_book", "extensions")
# A system prompt longer than this leaves no room for the conversation in any max_length chatlora trains with.
MAX_PROMPT_CHARS = 16_000
USER_NAME = "User"  # what {{user}} becomes: the card talks to whoever is chatting


class CharacterError(ConfigError):
    """A character card is unusable; the message is ``PATH: field: what is wrong``."""


@dataclass(frozen=True)
class Character:
    """The prompt fields of one character card, and where they came from.

    Attributes:
        name: ``data.name``; ``{{char}}`` in the other fields becomes this.
        description: Who the character is.
        personality: A short summary of the character's personality.
        scenario: The situation the conversation takes place in.
        first_mes: The character's opening line.
        mes_example: Example dialogue (``<START>`` separates examples).
        system_prompt: The card's own system instruction; ``{{original}}`` in it is dropped (there is no global
            prompt to fall back to).
        source: The card file, or ``"inline"`` for a ``character:`` block in the YAML.
        sha256: Hash of the card file's bytes (inline: of the block as canonical JSON).
    """

    name: str
    description: str = ""
    personality: str = ""
    scenario: str = ""
    first_mes: str = ""
    mes_example: str = ""
    system_prompt: str = ""
    source: str = "inline"
    sha256: str = ""

    @property
    def prompt(self) -> str:
        """The compiled system prompt (see :func:`compile_prompt`)."""
        return compile_prompt(self)

    def record(self) -> dict[str, Any]:
        """What the run card keeps: name, source, hashes of the card and of the compiled prompt."""
        return {
            "name": self.name,
            "source": self.source,
            "card_sha256": self.sha256,
            "prompt_sha256": hashlib.sha256(self.prompt.encode("utf-8")).hexdigest(),
        }


def _macros(text: str, name: str) -> str:
    # {{char}}/{{user}} are case-insensitive in the frontends that write cards (SillyTavern); <BOT>/<USER> are V1's.
    text = re.sub(r"\{\{\s*char\s*\}\}|<BOT>", lambda _: name, text, flags=re.IGNORECASE)
    text = re.sub(r"\{\{\s*user\s*\}\}|<USER>", USER_NAME, text, flags=re.IGNORECASE)
    return re.sub(r"\{\{\s*original\s*\}\}", "", text, flags=re.IGNORECASE).strip()


def compile_prompt(character: Character) -> str:
    """One system prompt from a card: its system_prompt (else "You are NAME."), description, personality,
    scenario, greeting and example dialogue, each a paragraph, ``{{char}}``/``{{user}}`` filled in."""
    c, name = character, character.name
    examples = "\n".join(
        line for line in _macros(c.mes_example, name).splitlines() if line.strip().upper() != "<START>"
    ).strip()
    parts = [
        _macros(c.system_prompt, name) or f"You are {name}.",
        _macros(c.description, name),
        f"{name}'s personality: {_macros(c.personality, name)}" if c.personality.strip() else "",
        f"Scenario: {_macros(c.scenario, name)}" if c.scenario.strip() else "",
        f"{name}'s greeting: {_macros(c.first_mes, name)}" if c.first_mes.strip() else "",
        f"Example dialogue:\n{examples}" if examples else "",
    ]
    return "\n\n".join(p for p in parts if p)


def _kind(value: Any) -> str:
    return {
        str: "a string",
        list: "a list",
        dict: "an object",
        bool: "a boolean",
        type(None): "null",
        int: "a number",
        float: "a number",
    }.get(type(value), type(value).__name__)


def _check_data(where: str, data: dict[str, Any], prefix: str) -> dict[str, str]:
    """The prompt fields of a card's ``data`` object, checked; raises :class:`CharacterError` at the first fault."""

    def bad(field: str, why: str) -> CharacterError:
        return CharacterError(f"{where}: {prefix}{field}: {why}")

    if "name" not in data:
        raise bad("name", "missing: every card needs the character's name")
    fields: dict[str, str] = {}
    for key in CARD_FIELDS + _STRING_EXTRAS:
        value = data.get(key, "")
        if not isinstance(value, str):
            raise bad(key, f"expected a string, got {_kind(value)}")
        fields[key] = value
    for key in _LIST_EXTRAS:
        value = data.get(key, [])
        if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
            raise bad(key, f"expected a list of strings, got {_kind(value)}")
    for key in _OBJECT_EXTRAS:
        value = data.get(key, {})
        if not isinstance(value, dict):
            raise bad(key, f"expected an object, got {_kind(value)}")
    for key in CARD_FIELDS:  # the fields that reach the prompt, which no tokenizer accepts with a lone surrogate
        if (char := lone_surrogate(fields[key])) is not None:
            raise bad(
                key,
                f"invalid Unicode: holds the lone surrogate \\u{ord(char):04x}: expected valid Unicode text "
                "(characters outside the BMP as a \\uD8xx\\uDCxx pair)",
            )
    if not fields["name"].strip():
        raise bad("name", "empty: every card needs the character's name")
    if len(fields["name"]) > 200:
        raise bad("name", f"{len(fields['name'])} characters: a name is at most 200")
    return {k: fields[k] for k in CARD_FIELDS}


def _build(where: str, fields: dict[str, str], source: str, sha256: str, prefix: str) -> Character:
    character = Character(**fields, source=source, sha256=sha256)
    if not any(fields[k].strip() for k in CARD_FIELDS if k != "name"):
        raise CharacterError(
            f"{where}: {prefix}description: empty, and so are personality, scenario, first_mes, mes_example and "
            "system_prompt: the card says nothing about the character"
        )
    size = len(character.prompt)
    if size > MAX_PROMPT_CHARS:
        raise CharacterError(
            f"{where}: {prefix}description: the compiled system prompt is {size} characters, over the "
            f"{MAX_PROMPT_CHARS} limit: it would leave no room for the conversation"
        )
    return character


def load_card(path: str | Path) -> Character:
    """Read and check a Character Card V2 JSON file.

    Raises:
        CharacterError: One line, ``PATH: field: what is wrong`` (``PATH: what is wrong`` when it is not JSON).
    """
    from .errors import FileError
    from .files import parse_json, read_input

    try:
        raw = read_input(path, "a character card (JSON or PNG)")
        if not raw.strip():
            raise CharacterError(f"{path}: empty file: expected a Character Card V2 JSON object")
        text = _png_card_json(path, raw) if raw.startswith(PNG_SIGNATURE) else raw
        card = parse_json(path, text, "a Character Card V2 JSON file")
    except FileError as e:
        raise CharacterError(str(e)) from None
    if not isinstance(card, dict):
        raise CharacterError(f"{path}: expected a JSON object (a Character Card V2), got {_kind(card)}")
    spec = card.get("spec")
    if spec != SPEC:
        got = "missing" if spec is None else f"got {json.dumps(spec, ensure_ascii=False)[:60]}"
        raise CharacterError(f"{path}: spec: expected {SPEC!r} (a Character Card V2), {got}")
    data = card.get("data")
    if not isinstance(data, dict):
        raise CharacterError(f"{path}: data: expected an object holding the card's fields, got {_kind(data)}")
    fields = _check_data(str(path), data, "data.")
    return _build(str(path), fields, str(path), hashlib.sha256(raw).hexdigest(), "data.")


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_CARD_KEY = b"chara"  # Character Card V2's text chunk (V3 exporters usually keep a V2 copy there too)


def _png_text_chunks(path: str | Path, raw: bytes) -> dict[bytes, bytes]:
    """The text chunks (tEXt, zTXt, iTXt) of a PNG file, keyword -> bytes of their text."""
    chunks: dict[bytes, bytes] = {}
    pos = len(PNG_SIGNATURE)
    while pos < len(raw):
        if pos + 8 > len(raw):
            raise CharacterError(f"{path}: truncated PNG (a chunk header is cut at byte {pos})")
        (length,) = struct.unpack(">I", raw[pos : pos + 4])
        kind, body = raw[pos + 4 : pos + 8], raw[pos + 8 : pos + 8 + length]
        if len(body) < length:
            raise CharacterError(f"{path}: truncated PNG (a {kind.decode('latin-1')!r} chunk is cut at byte {pos})")
        pos += 12 + length  # length, type, data, CRC
        if kind == b"IEND":
            break
        if kind not in (b"tEXt", b"zTXt", b"iTXt") or b"\0" not in body:
            continue
        key, _, rest = body.partition(b"\0")
        try:
            if kind == b"zTXt":
                rest = zlib.decompress(rest[1:])
            elif kind == b"iTXt":  # compressed flag, method, language tag, translated keyword, text
                compressed = rest[:1] == b"\1"
                rest = rest[2:].split(b"\0", 2)[-1]
                rest = zlib.decompress(rest) if compressed else rest
        except zlib.error:
            raise CharacterError(f"{path}: the PNG's {key.decode('latin-1')!r} text chunk is damaged") from None
        chunks.setdefault(key, rest)
    return chunks


def _png_card_json(path: str | Path, raw: bytes) -> bytes:
    """The card JSON inside a PNG card: the base64 text of its ``chara`` chunk."""
    text = _png_text_chunks(path, raw).get(_PNG_CARD_KEY)
    if text is None:
        raise CharacterError(
            f"{path}: a PNG image without a character card in it (no 'chara' text chunk): expected a Character "
            "Card V2 PNG as card sites export it, or the card's JSON"
        )
    try:
        return base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise CharacterError(
            f"{path}: the PNG's 'chara' text chunk is not base64: expected the card's JSON in "
            "base64, as card sites write it"
        ) from None


def character_from_block(where: str, block: dict[str, Any]) -> Character:
    """A ``character:`` mapping in a YAML config (the V2 ``data`` fields), checked like a card.

    Raises:
        CharacterError: ``FILE: character.field: what is wrong``.
    """
    known = set(CARD_FIELDS + _STRING_EXTRAS + _LIST_EXTRAS + _OBJECT_EXTRAS)
    unknown = sorted(str(k) for k in block if k not in known)
    if unknown:
        raise CharacterError(
            f"{where}: character.{unknown[0]}: unknown field; a character block takes {', '.join(CARD_FIELDS)}"
        )
    fields = _check_data(where, block, "character.")
    canonical = json.dumps(block, ensure_ascii=False, sort_keys=True).encode("utf-8")
    return _build(where, fields, "inline", hashlib.sha256(canonical).hexdigest(), "character.")


def resolve_character(value: str | dict[str, Any] | None, where: str = "`--character`") -> Character | None:
    """The character a config names: a card path, an inline block, or none."""
    if value is None:
        return None
    if isinstance(value, dict):
        return character_from_block(where, value)
    return load_card(value)
