"""Persona eval: probe scoring, defaults, drift plotting, checkpoint rule, and the section in a real eval report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import write_jsonl

from chatlora.config import ConfigError, PersonaConfig, TrainConfig, load_config
from chatlora.eval.persona import (
    DEFAULT_FORBIDDEN,
    HUANHUAN_MARKERS,
    CheckpointRow,
    Drift,
    Persona,
    PersonaResult,
    Rates,
    TermMatcher,
    drift_prompts,
    fit_sizes,
    load_probes,
    load_retention,
    plot_drift,
    probe_conversations,
    recommend_checkpoint,
    resolve,
    score_replies,
    vendor_names,
)

# ---------------------------------------------------------------- scoring


def test_latin_terms_match_whole_words_any_case_and_chinese_anywhere():
    """Guards against "AI" matching inside "said"/"PAID" (every English reply would leak) or being missed next to
    Chinese text ("AI助手") or in another case."""
    m = TermMatcher(["AI", "language model", "助手"])
    assert m.find("I am an AI.") == ["AI"]
    assert m.find("我是AI助手") == ["AI", "助手"]
    assert m.find("As a Language Model, I ...") == ["language model"]
    assert m.find("She said she PAID for it.") == []
    assert m.find("臣妾给皇上请安") == []


def test_score_replies_counts_replies_not_mentions():
    """Guards against a reply mentioning two forbidden terms counting as two leaks, or markers and leaks mixed."""
    persona = Persona("甄嬛", ["臣妾", "本宫"], ["AI", "助手"], ["Hugging Face"])
    rates, found = score_replies(
        ["我是AI助手。", "臣妾在此。", "本宫是甄嬛，不是Hugging Face做的AI。", "Hello there."], persona
    )
    assert rates == Rates(n=4, leaks=2, markers=2)
    assert (rates.leak_rate, rates.marker_rate) == (0.5, 0.5)
    assert found[0] == {"leaks": ["AI", "助手"], "markers": []}
    assert found[2] == {"leaks": ["AI", "Hugging Face"], "markers": ["本宫"]}


def test_vendor_names_come_from_the_model_name_before_model_type():
    """Guards against SmolLM2 (model_type llama) being taken for Meta's model, or the vendor list staying empty."""
    assert vendor_names("embedded", "/cache/SmolLM2-135M-Instruct.Q4_1-ab12", "llama")[0] == "Hugging Face"
    assert "零一万物" in vendor_names("01-ai/Yi-6B-Chat", None, "llama")
    assert "通义千问" in vendor_names("Qwen/Qwen2.5-0.5B-Instruct")
    assert vendor_names("/models/mine", None, "llama") == ["Llama", "LLaMA", "Meta"]
    assert vendor_names("/models/mine", None, None) == []


def test_resolve_fills_defaults_and_keeps_what_is_set():
    """Guards against configured markers/forbidden lists being replaced by defaults, or the defaults missing."""
    from chatlora.config import DEFAULT_SYSTEM_PROMPT

    huanhuan = resolve(PersonaConfig(), DEFAULT_SYSTEM_PROMPT, ["embedded", "SmolLM2-135M"])
    assert huanhuan.markers == list(HUANHUAN_MARKERS)
    assert huanhuan.forbidden == list(DEFAULT_FORBIDDEN) and "Hugging Face" in huanhuan.vendors
    card = resolve(PersonaConfig(), "You are Ann.", [], character_name="Ann")
    assert (card.name, card.markers, card.vendors) == ("Ann", ["Ann"], [])
    own = resolve(PersonaConfig(markers=["吾"], forbidden=["bot"], vendors=[]), None, ["SmolLM2"])
    assert (own.markers, own.forbidden, own.vendors) == (["吾"], ["bot"], [])


def test_persona_yaml_block_is_typed_and_checked(tmp_path):
    """Guards against the persona block skipping the type checks every other config key gets."""
    good = tmp_path / "p.yaml"
    good.write_text("persona:\n  markers: [臣妾, 本宫]\n  drift_conversations: 2\n  probes: 8\n", encoding="utf-8")
    cfg = load_config(good)
    assert cfg.persona.markers == ["臣妾", "本宫"] and cfg.persona.drift_conversations == 2
    assert TrainConfig(persona=cfg.persona.to_dict()).persona == cfg.persona  # run card round trip
    bad = tmp_path / "bad.yaml"
    bad.write_text("persona:\n  drift_turns: many\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"bad.yaml: `persona`.drift_turns: expected an integer"):
        load_config(bad)
    bad.write_text("persona:\n  marker: [x]\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="unknown persona key"):
        load_config(bad)


@pytest.mark.parametrize(
    "block,message",
    [
        ("probes: 1e20", "`persona.probes` (100000000000000000000) must be 1 to 24"),
        ("probes: 25", "`persona.probes` (25) must be 1 to 24"),
        ("drift_context: 1e12", "`persona.drift_context` (1000000000000) must be at most 1000000 tokens"),
        ("drift_turns: 1e9", "`persona.drift_turns` (1000000000) must be 1 to 10000"),
        ("markers: []", "`persona.markers` ([]) is empty"),
    ],
)
def test_persona_sizes_past_sane_bounds_and_empty_markers_are_refused(tmp_path, block, message):
    """Bug: `probes: 1e20` and `drift_context: 1e12` were accepted (probes silently cut to the shipped ones, drift
    silently clamped), and `markers: []` silently dropped the in-character target."""
    bad = tmp_path / "p.yaml"
    bad.write_text(f"persona:\n  {block}\n", encoding="utf-8")
    with pytest.raises(ConfigError) as e:
        load_config(bad)
    assert message in str(e.value)
    assert PersonaConfig(probes=len(load_probes()), drift_context=10**6).probes == len(load_probes())  # the bounds


def test_eval_checks_the_persona_block_before_loading_the_model(persona_run, tmp_path, capsys, monkeypatch):
    """Bug: a missing --persona-config file or a bad persona value surfaced only after the model had loaded and the
    held-out loss and replies were computed (minutes on a real model)."""
    from chatlora.cli import main
    from chatlora.inference.infer import ChatModel

    def no_load(*a, **k):
        raise AssertionError("the model loaded before the persona block was checked")

    monkeypatch.setattr(ChatModel, "load", no_load)
    bad = tmp_path / "bad.yaml"
    bad.write_text("persona:\n  drift_context: 1e12\n", encoding="utf-8")
    for path, needle in ((tmp_path / "missing.yaml", "missing.yaml"), (bad, "persona.drift_context")):
        args = ["eval", "--adapter", str(persona_run), "--output", str(tmp_path / "ev"), "--persona-config", str(path)]
        assert main(args) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and needle in err, err
    assert not (tmp_path / "ev").exists()


# ---------------------------------------------------------------- shipped data and conversations


def test_shipped_probes_and_retention_set_are_package_data_and_bilingual():
    """Guards against the probe/retention files missing from the built package (eval would crash after a wheel
    install: the editable install of the tests would not notice) or the probes losing a language."""
    import fnmatch

    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    root = Path(__file__).resolve().parents[2]
    patterns = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["chatlora"]
    for name in ("identity_probes.jsonl", "retention.jsonl", "SOURCES.md"):
        assert any(fnmatch.fnmatch(f"persona_data/{name}", pattern) for pattern in patterns), name
    probes = load_probes()
    assert len(probes) >= 20 and {p["lang"] for p in probes[:2]} == {"zh", "en"}
    assert len(load_probes(5)) == 5
    retention = load_retention()
    assert len(retention) >= 20 and all([m["role"] for m in c] == ["user", "assistant"] for c in retention)


def test_probes_asked_alone_and_after_in_character_turns():
    """Guards against the in-context probes having no context, the same context for all, or the probe not last."""
    probes = load_probes(3)
    records = [
        [
            {"role": "system", "content": "S"},
            {"role": "user", "content": f"u{i}"},
            {"role": "assistant", "content": f"a{i}"},
        ]
        for i in range(4)
    ]
    convs = probe_conversations(probes, records, turns=2)
    assert convs["alone"][0] == [{"role": "user", "content": probes[0]["text"]}]
    first = convs["in_context"][1]
    assert [m["content"] for m in first] == ["u1", "a1", "u2", "a2", probes[1]["text"]]
    assert probe_conversations(probes, records, turns=0)["in_context"] == []


def test_drift_conversations_take_distinct_held_out_prompts_and_wrap():
    """Guards against every drift conversation asking the same prompts, or an index error past the pool."""
    records = [[{"role": "user", "content": f"u{i}"}, {"role": "assistant", "content": "a"}] for i in range(5)]
    prompts = drift_prompts(records, conversations=2, turns=4)
    assert prompts == [["u0", "u2", "u4", "u1"], ["u1", "u3", "u0", "u2"]]


# ---------------------------------------------------------------- plot and checkpoint rule


def test_drift_plot_draws_each_system_per_turn(tmp_path, monkeypatch):
    """Guards against the plot drawing the wrong series (tuned twice, markers for leaks) or an empty file."""
    import matplotlib.figure

    drawn = {}
    save = matplotlib.figure.Figure.savefig

    def capture(fig, path, *a, **kw):
        drawn.update(
            {
                (ax.get_title().split(" per")[0], line.get_label()): list(line.get_ydata())
                for ax in fig.axes
                for line in ax.lines
            }
        )
        return save(fig, path, *a, **kw)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", capture)
    drift = Drift(
        turns=3,
        conversations=2,
        per_turn={
            "base": [Rates(2, 2, 0), Rates(2, 1, 0), Rates(2, 2, 1)],
            "tuned": [Rates(2, 0, 2), Rates(2, 0, 1), Rates(2, 1, 1)],
        },
    )
    path = plot_drift(drift, tmp_path / "drift.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert drawn[("identity leaks", "base")] == [1.0, 0.5, 1.0]
    assert drawn[("identity leaks", "tuned")] == [0.0, 0.0, 0.5]
    assert drawn[("character markers", "tuned")] == [1.0, 0.5, 0.5]


def test_recommended_checkpoint_follows_the_stated_rule():
    """Guards against recommending the lowest character loss regardless of what it cost in retention."""
    rows = [
        CheckpointRow("checkpoint-10", 10, character_loss=3.0, retention_loss=2.00),
        CheckpointRow("checkpoint-20", 20, character_loss=2.5, retention_loss=2.15),
        CheckpointRow("final", 30, character_loss=2.0, retention_loss=2.60),
    ]
    assert recommend_checkpoint(rows, base_retention=2.0).name == "checkpoint-20"
    assert recommend_checkpoint(rows, base_retention=1.0).name == "checkpoint-10"  # none within: least cost
    assert recommend_checkpoint([], 1.0) is None


def test_targets_leak_at_most_base_and_markers_above_base():
    """Guards against the targets comparing the wrong way (e.g. tuned leaks >= base passing)."""

    def result(base: Rates, tuned: Rates, markers=("臣妾",)) -> PersonaResult:
        persona = Persona(None, list(markers), ["AI"], [])
        probes = {"base": {"alone": base}, "tuned": {"alone": tuned}}
        return PersonaResult(persona, probes, base.n, None, None, [], None, {}, {}, [])

    good = {name: ok for name, ok, _ in result(Rates(10, 6, 0), Rates(10, 6, 3)).targets()}
    assert good == {"persona: tuned identity-leak rate <= base": True, "persona: tuned marker rate > base": True}
    bad = {name: ok for name, ok, _ in result(Rates(10, 2, 3), Rates(10, 3, 3)).targets()}
    assert bad == {"persona: tuned identity-leak rate <= base": False, "persona: tuned marker rate > base": False}
    assert len(result(Rates(1, 0, 0), Rates(1, 0, 0), markers=()).targets()) == 1  # no markers: not a target


# ---------------------------------------------------------------- sizes fitted to the device


def test_unset_sizes_fit_the_device_and_set_sizes_are_kept(tmp_path):
    """Bug: the persona sizes were the GPU's on every device (14 minutes of persona on a 2-core CPU), or fitting
    replaced sizes the block set, even to the GPU defaults' values (a YAML asking 4 drift conversations on a CPU
    got 1)."""
    cpu, fitted = fit_sizes(PersonaConfig(), "cpu")
    assert (cpu.probes, cpu.drift_conversations, cpu.drift_context, cpu.max_new_tokens) == (8, 1, 256, 24)
    assert fitted == ["probes", "drift_conversations", "drift_context", "max_new_tokens"]
    gpu, fitted = fit_sizes(PersonaConfig(), "cuda:0")
    assert (gpu.probes, gpu.drift_conversations, gpu.drift_context, gpu.max_new_tokens) == (None, 4, None, 64)
    assert len(fitted) == 4

    yaml = tmp_path / "p.yaml"
    yaml.write_text("persona:\n  drift_conversations: 4\n  max_new_tokens: 64\n", encoding="utf-8")
    kept, fitted = fit_sizes(load_config(yaml).persona, "cpu")
    assert (kept.drift_conversations, kept.max_new_tokens) == (4, 64)  # set to the GPU's values: kept
    assert (kept.probes, kept.drift_context) == (8, 256) and fitted == ["probes", "drift_context"]
    assert fit_sizes(PersonaConfig(max_new_tokens=300), "cpu")[0].drift_context is None  # 256 leaves no room


# ---------------------------------------------------------------- in a real eval


ROWS = [
    {"instruction": f"问题{i}", "input": "", "output": "臣妾做不到啊。" if i % 2 else "皇上万福金安。"}
    for i in range(12)
]


@pytest.fixture(scope="module")
def persona_run(tiny_model_dir, tmp_path_factory) -> Path:
    """A tiny adapter with a checkpoint before its final step, and a small persona block."""
    from chatlora.training.train import train

    tmp = tmp_path_factory.mktemp("persona-run")
    cfg = TrainConfig(
        model=str(tiny_model_dir),
        data=str(write_jsonl(tmp / "tiny.jsonl", ROWS)),
        max_steps=2,
        val_size=4,
        output_dir=str(tmp / "out"),
        eval_steps=0,
        save_steps=1,
        batch_size=4,
        lr=2e-2,
        lora_dropout=0.0,
        system_prompt="S",
        persona=PersonaConfig(markers=["臣妾"], probes=4, drift_conversations=2, drift_turns=3, max_new_tokens=6),
    )
    return train(cfg).output_dir


def test_eval_report_has_the_persona_section_plot_and_targets(persona_run, capsys):
    """Guards against eval skipping the persona section, its plot or targets, or the report not showing them."""
    from chatlora.cli import main

    assert main(["eval", "--adapter", str(persona_run), "--max-new-tokens", "4", "--examples", "1"]) == 0
    printed = capsys.readouterr().out
    assert "persona probes: identity leaks base" in printed
    out = persona_run / "eval"
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    persona = metrics["persona"]
    assert persona["probes"]["tuned"]["alone"]["n"] == 4 and persona["probes"]["base"]["in_context"]["n"] == 4
    assert len(persona["drift"]["per_turn"]["tuned"]) == 3
    assert {t["name"] for t in metrics["targets"]} >= {
        "persona: tuned identity-leak rate <= base",
        "persona: tuned marker rate > base",
    }
    assert (out / "persona_drift.png").read_bytes()[:4] == b"\x89PNG"
    report = (out / "report.md").read_text(encoding="utf-8")
    for heading in (
        "## Persona",
        "### Identity probes",
        "### Long-conversation drift",
        "### Retention and checkpoints",
    ):
        assert heading in report
    assert "![persona drift](persona_drift.png)" in report
    assert "<h2>Persona</h2>" in (out / "report.html").read_text(encoding="utf-8")
    replies = [json.loads(line) for line in (out / "persona_replies.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(replies) == 2 * (4 + 4) + 2 * 2 * 3  # probes alone + in context, drift, for base and tuned


def test_checkpoint_rows_measure_each_checkpoint_not_the_final_adapter(persona_run, tmp_path):
    """Guards against the checkpoint table measuring the loaded (final) adapter for every checkpoint, or the model
    being left on a checkpoint's adapter afterwards."""
    import torch
    from peft import PeftModel

    from chatlora.eval import EvalConfig, assistant_loss, evaluate, held_out_records
    from chatlora.inference.infer import ChatModel
    from chatlora.model import load_model
    from chatlora.training.train import read_run_card

    chat = ChatModel.load(persona_run, device="cpu")
    result = evaluate(EvalConfig(persona_run, output=tmp_path / "ev", max_new_tokens=2, batch_size=4), chat)
    rows = {r.name: r for r in result.persona.checkpoints}
    assert set(rows) == {"checkpoint-1", "final"}  # checkpoint-2 is the final adapter: measured once
    assert rows["final"].character_loss == pytest.approx(result.loss["tuned"].loss)
    assert chat.model.active_adapter == "default" and set(chat.model.peft_config) == {"default"}

    card = read_run_card(persona_run)
    records, _ = held_out_records(card)
    base = load_model(card["base_model"]["resolved"], torch.float32, torch.device("cpu"))
    ckpt = PeftModel.from_pretrained(base, str(persona_run / "checkpoint-1"))
    direct = assistant_loss(ckpt, chat.tokenizer, [r.messages for r in records], "S", card["config"]["max_length"])
    assert rows["checkpoint-1"].character_loss == pytest.approx(direct.loss, rel=1e-5)
    assert rows["checkpoint-1"].character_loss != pytest.approx(rows["final"].character_loss, rel=1e-6)
    assert result.persona.recommended in result.persona.checkpoints


class _Bars:
    """Stands in for tqdm: records each bar (desc, total, the updates it got) and, in ``events``, when it opened."""

    def __init__(self, events: list, bars: list):
        self.events, self.bars = events, bars

    def __call__(self, *args, total=None, desc=None, disable=False, **kwargs):
        bar = {"desc": desc, "total": total, "n": 0, "disable": disable}
        self.bars.append(bar)
        self.events.append(("bar", desc))

        class Bar:
            def update(self, n=1):
                bar["n"] += n

            def close(self):
                pass

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return False

        return Bar()


@pytest.fixture(scope="module")
def eval_events(persona_run, tmp_path_factory):
    """One eval of the persona run with its log lines and progress bars recorded, in order."""
    import logging

    from chatlora.eval import EvalConfig, evaluate
    from chatlora.inference.infer import ChatModel

    chat = ChatModel.load(persona_run, device="cpu")  # before tqdm is replaced: loading iterates over a bar
    events: list = []
    bars: list = []

    class Lines(logging.Handler):
        def emit(self, record):
            events.append(("log", record.getMessage()))

    handler = Lines(level=logging.INFO)
    logger = logging.getLogger("chatlora")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr("tqdm.auto.tqdm", _Bars(events, bars))
            out = tmp_path_factory.mktemp("eval-events")
            result = evaluate(EvalConfig(persona_run, output=out, max_new_tokens=2, batch_size=4), chat)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    return events, bars, result


def test_eval_prints_the_persona_plan_before_the_persona_phase(eval_events):
    """Bug: the persona section (14 minutes on a 2-core CPU) started without a word of what it would run or how
    long it might take: the plan (phases, sizes, what was fitted to the device, an estimated time) must come first."""
    events, _, result = eval_events
    lines = [e[1] for e in events if e[0] == "log"]
    assert any(line.startswith("eval plan: 4 records") for line in lines)
    plan = [line for line in lines if line.startswith("persona plan:")]
    assert plan, "no persona plan logged"
    first_bar = next(i for i, e in enumerate(events) if e == ("bar", "persona: probes"))
    last_plan = max(i for i, e in enumerate(events) if e[0] == "log" and e[1].startswith("persona plan:"))
    assert last_plan < first_bar
    text = "\n".join(plan)
    assert "probes: 4 asked alone and after 2 in-character turns, base and tuned: 16 replies of up to 6 tokens" in text
    assert "drift: 2 conversation(s) x 3 turns, base and tuned: 12 replies" in text
    assert "1 checkpoint(s)" in text
    # the run's block sets probes, drift_conversations, max_new_tokens; drift_context is unset: fitted to the CPU
    assert (
        "sizes fitted to the CPU (configs/quickstart-cpu.yaml's), as the persona block set none of them: "
        "drift_context 256" in text
    )
    assert "estimated time ~" in text and "(an estimate: " in text
    assert result.persona.settings["drift_context"] == 256 and result.persona.settings["plan"]["estimate_s"] > 0


def test_every_persona_phase_drives_a_progress_bar(eval_events):
    """Bug: the persona phases ran without progress (probes, drift, retention and checkpoints silent for
    minutes), or a bar stopped short of its total (a phase's count wrong)."""
    _, bars, _ = eval_events
    persona = {b["desc"]: b for b in bars if (b["desc"] or "").startswith("persona")}
    assert set(persona) == {"persona: probes", "persona: drift", "persona: retention", "persona: checkpoints"}
    assert persona["persona: probes"]["total"] == 2 * (4 + 4)
    assert persona["persona: drift"]["total"] == 3
    assert persona["persona: retention"]["total"] == 2
    assert persona["persona: checkpoints"]["total"] == 1
    for bar in persona.values():
        assert bar["n"] == bar["total"] and not bar["disable"], bar
