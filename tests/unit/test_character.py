"""Character cards: parsing, the compiled system prompt, and that train and chat use the very same prompt."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from conftest import write_jsonl

from chatlora.character import MAX_PROMPT_CHARS, compile_prompt, load_card
from chatlora.cli import _load_chat, build_parser, main
from chatlora.config import ConfigError, TrainConfig, load_config

CARD = {
    "spec": "chara_card_v2",
    "spec_version": "2.0",
    "data": {
        "name": "甄嬛",
        "description": "{{char}}是大理寺少卿甄远道之女，入宫为妃。",
        "personality": "聪慧，隐忍",
        "scenario": "紫禁城，{{user}}前来请安。",
        "first_mes": "{{user}}来了，快坐。",
        "mes_example": "<START>\n{{user}}: 娘娘安好？\n{{char}}: 本宫很好。",
        "system_prompt": "现在你要扮演皇帝身边的女人--{{char}}。{{original}}",
        "creator_notes": "never in the prompt",
        "tags": ["宫廷"],
        "creator": "chatlora tests",
        "character_version": "1",
        "alternate_greetings": [],
        "extensions": {},
    },
}
COMPILED = (
    "现在你要扮演皇帝身边的女人--甄嬛。\n\n"
    "甄嬛是大理寺少卿甄远道之女，入宫为妃。\n\n"
    "甄嬛's personality: 聪慧，隐忍\n\n"
    "Scenario: 紫禁城，User前来请安。\n\n"
    "甄嬛's greeting: User来了，快坐。\n\n"
    "Example dialogue:\nUser: 娘娘安好？\n甄嬛: 本宫很好。"
)


def write_card(path: Path, card) -> Path:
    path.write_text(card if isinstance(card, str) else json.dumps(card, ensure_ascii=False), encoding="utf-8")
    return path


def with_data(**changes) -> dict:
    data = {k: v for k, v in CARD["data"].items() if k not in changes or changes[k] is not ...}
    data.update({k: v for k, v in changes.items() if v is not ...})
    return {**CARD, "data": data}


def test_valid_card_compiles_to_the_documented_prompt(tmp_path):
    """Guards against a field dropped from the prompt, macros left unfilled, creator_notes leaking into the prompt,
    or the paragraphs out of order."""
    character = load_card(write_card(tmp_path / "card.json", CARD))
    assert character.name == "甄嬛"
    assert character.prompt == COMPILED
    assert "never in the prompt" not in character.prompt


def test_card_without_system_prompt_starts_with_you_are_name():
    """Guards against a card with an empty system_prompt compiling to a prompt that never says who to be."""
    from chatlora.character import Character

    assert compile_prompt(Character(name="Ann", description="A pilot.")) == "You are Ann.\n\nA pilot."


BROKEN = [
    ("not-json", '{"spec": "chara_card_v2", "data": {', ":1: invalid JSON: "),
    ("empty", "", ": empty file: "),
    ("wrong-spec", {**CARD, "spec": "chara_card_v3"}, ": spec: expected 'chara_card_v2'"),
    (
        "no-spec",
        {k: v for k, v in CARD.items() if k != "spec"},
        ": spec: expected 'chara_card_v2' (a Character Card V2), missing",
    ),
    ("no-data", {"spec": "chara_card_v2", "data": "甄嬛"}, ": data: expected an object"),
    ("missing-name", with_data(name=...), ": data.name: missing"),
    ("blank-name", with_data(name="  "), ": data.name: empty"),
    ("wrong-type", with_data(personality=["聪慧"]), ": data.personality: expected a string, got a list"),
    ("wrong-tags", with_data(tags="宫廷"), ": data.tags: expected a list of strings, got a string"),
    (
        "says-nothing",
        with_data(description="", personality="", scenario="", first_mes="", mes_example="", system_prompt=""),
        ": data.description: empty, and so are",
    ),
    ("oversized", with_data(description="宫" * (MAX_PROMPT_CHARS + 1)), ": data.description: the compiled system"),
    ("array", "[1, 2]", ": expected a JSON object (a Character Card V2), got a list"),
    (
        "lone-surrogate",  # the \\ud800 escape in the file parses to a lone surrogate no tokenizer accepts
        json.dumps(with_data(personality="聪慧\ud800")),
        ": data.personality: invalid Unicode: holds the lone surrogate \\ud800",
    ),
]


@pytest.mark.parametrize(("name", "card", "message"), BROKEN, ids=[b[0] for b in BROKEN])
def test_broken_card_is_one_line_naming_path_and_field_exit_2(tmp_path, capsys, name, card, message):
    """Guards against a bad card raising a traceback, exiting 0/1, or an error line that does not name the file
    and the field at fault."""
    path = write_card(tmp_path / f"{name}.json", card)
    assert main(["train", "--character", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith(f"chatlora: error: {path}{message}"), err


def test_chat_with_lone_surrogate_card_is_one_line_exit_2(tmp_path, capsys, monkeypatch):
    """Guards against `chat --character CARD` with a lone surrogate (a \\ud800 escape) in a field reaching the
    tokenizer and dying with a TypeError traceback instead of one line naming the card and the field."""
    import chatlora.inference.infer

    def no_model(*args, **kwargs):
        raise AssertionError("the card must be refused before any model loads")

    monkeypatch.setattr(chatlora.inference.infer.ChatModel, "load", no_model)
    card = write_card(tmp_path / "card.json", json.dumps(with_data(first_mes="\ud83d来了")))
    assert main(["chat", "--model", "m", "--character", str(card)]) == 2
    err = capsys.readouterr().err
    assert (
        err == f"chatlora: error: {card}: data.first_mes: invalid Unicode: holds the lone surrogate \\ud83d: "
        "expected valid Unicode text (characters outside the BMP as a \\uD8xx\\uDCxx pair)\n"
    )


def test_yaml_character_block_compiles_like_the_card(tmp_path):
    """Guards against the inline `character:` block and the card file compiling to different prompts."""
    import yaml

    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"character": CARD["data"]}, allow_unicode=True), encoding="utf-8")
    cfg = load_config(config)
    assert cfg.system_prompt == COMPILED
    card_cfg = load_config(None, {"character": str(write_card(tmp_path / "card.json", CARD))})
    assert card_cfg.system_prompt == cfg.system_prompt


def test_yaml_character_block_error_names_file_and_field(tmp_path):
    """Guards against a bad inline block reported without its YAML file or field."""
    config = tmp_path / "c.yaml"
    config.write_text("character:\n  name: Ann\n  personality: 3\n", encoding="utf-8")
    with pytest.raises(ConfigError) as e:
        load_config(config)
    assert str(e.value) == f"{config}: character.personality: expected a string, got a number"


def test_character_and_system_prompt_together_are_refused(tmp_path):
    """Guards against --system-prompt silently losing to (or silently overriding) the card."""
    card = write_card(tmp_path / "card.json", CARD)
    with pytest.raises(ConfigError, match="both set the system prompt"):
        load_config(None, {"character": str(card), "system_prompt": "You are a pirate."})


def test_compiled_prompt_reaches_train_run_card_and_chat_identically(tiny_model_dir, tmp_path):
    """Guards against train rendering one system prompt and chat (or the run card) another: the tokens chat
    sends for a training conversation are exactly the tokens train trained on, up to the reply."""
    from chatlora.inference.infer import ChatModel
    from chatlora.training.train import prepare_run, train

    card = write_card(tmp_path / "card.json", CARD)
    rows = [{"instruction": f"问题{i}", "input": "", "output": "臣妾做不到啊。"} for i in range(8)]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    cfg = TrainConfig(
        model=str(tiny_model_dir),
        data=str(data),
        character=str(card),
        max_steps=1,
        val_size=2,
        output_dir=str(tmp_path / "out"),
        eval_steps=0,
        save_steps=100,
        batch_size=2,
        max_length=512,
    )
    assert cfg.system_prompt == COMPILED
    run = prepare_run(cfg)
    assert len(run.train_ex) == len(run.split.train)  # nothing dropped: train_ex[i] is split.train[i]
    record, trained = run.split.train[0], run.train_ex[0]["input_ids"]
    result = train(cfg)
    template = result.run_card["template"]
    assert template["system_prompt"] == COMPILED
    assert template["character"]["name"] == "甄嬛"
    assert template["character"]["card_sha256"] == hashlib.sha256(card.read_bytes()).hexdigest()

    chat = ChatModel.load(result.output_dir, device="cpu")
    assert chat.system_prompt == COMPILED
    prompt = chat.prompt_ids(record.messages[:-1])
    assert trained[: len(prompt)] == prompt
    assert COMPILED in chat.tokenizer.decode(prompt)
    # chat --character CARD on the bare base model talks with the same system prompt
    args = build_parser().parse_args(["chat", "--model", str(tiny_model_dir), "--character", str(card)])
    assert _load_chat(args).prompt_ids(record.messages[:-1]) == prompt


def test_the_shipped_example_card_loads():
    """Guards against the README's example card (configs/huanhuan-card.json) going stale against the parser."""
    root = Path(__file__).resolve().parents[2]
    character = load_card(root / "configs" / "huanhuan-card.json")
    assert character.name == "甄嬛" and character.prompt.startswith("现在你要扮演皇帝身边的女人--甄嬛。")
    assert "{{" not in character.prompt and "<START>" not in character.prompt


def write_png_card(path: Path, chunks: dict[str, str], compressed: bool = False) -> Path:
    """A PNG image with text chunks, as card sites and SillyTavern export cards (Pillow writes the chunks)."""
    from PIL import Image, PngImagePlugin

    info = PngImagePlugin.PngInfo()
    for key, text in chunks.items():
        if compressed:
            info.add_itxt(key, text, zip=True)
        else:
            info.add_text(key, text)
    Image.new("RGB", (8, 8), "white").save(path, pnginfo=info)
    return path


def _b64(card: dict) -> str:
    import base64

    return base64.b64encode(json.dumps(card, ensure_ascii=False).encode()).decode()


@pytest.mark.parametrize("compressed", [False, True], ids=["tEXt", "iTXt-zip"])
def test_png_card_compiles_like_its_json(tmp_path, compressed):
    """Guards against PNG cards (the form card sites hand out) being refused or read from another chunk: the base64
    JSON of the 'chara' text chunk gives the same character as the JSON file; a V3 'ccv3' chunk beside it is not
    taken for the V2 card."""
    v3 = {**CARD, "spec": "chara_card_v3", "data": {**CARD["data"], "name": "V3"}}
    png = write_png_card(tmp_path / "card.png", {"ccv3": _b64(v3), "chara": _b64(CARD)}, compressed)
    character = load_card(png)
    assert character.name == "甄嬛" and character.prompt == COMPILED


@pytest.mark.parametrize(
    ("name", "make", "message"),
    [
        ("no-card", lambda p: write_png_card(p, {"Comment": "just a picture"}), "a PNG image without a character card"),
        ("not-base64", lambda p: write_png_card(p, {"chara": "{not base64}"}), "'chara' text chunk is not base64"),
        ("base64-not-json", lambda p: write_png_card(p, {"chara": "bm90IGpzb24="}), "invalid JSON"),
        ("truncated", lambda p: p.write_bytes(write_png_card(p, {"chara": _b64(CARD)}).read_bytes()[:60]) and p,
         "truncated PNG"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)  # fmt: skip
def test_broken_png_card_is_one_line_exit_2(tmp_path, capsys, name, make, message):
    """Guards against a PNG card without a card, with a damaged chunk or cut short giving a traceback (or being
    read as JSON bytes): one line naming the file, exit 2."""
    path = tmp_path / f"{name}.png"
    make(path)
    assert main(["train", "--character", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert str(path) in err and message in err, err
