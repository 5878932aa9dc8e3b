"""Eval: pure reply metrics on hand-made replies, and `chatlora eval` end to end on a tiny random Llama (CPU)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import sacrebleu
import torch
import torch.nn.functional as F
import yaml
from conftest import write_jsonl

from chatlora.cli import main
from chatlora.config import DEFAULT_SYSTEM_PROMPT, PersonaConfig, TrainConfig
from chatlora.eval import bleu, chrf, distinct_n, mean_length, paired_bootstrap, reply_metrics, stop_rate
from chatlora.training.train import train

# ---------------------------------------------------------------- pure metrics


def test_distinct_n_counts_character_ngrams_by_hand():
    """Guards against distinct-n over words/tokens, n-grams spanning two replies, or per-reply averaging."""
    assert distinct_n(["abab"], 2) == pytest.approx(2 / 3)  # ab, ba, ab
    assert distinct_n(["aab", "ab"], 1) == pytest.approx(2 / 5)  # a a b a b
    assert distinct_n(["aab", "ab"], 2) == pytest.approx(2 / 3)  # aa ab | ab (no "ba" across replies)
    assert distinct_n(["皇上皇上"], 1) == pytest.approx(2 / 4)  # characters, not UTF-8 bytes
    assert distinct_n(["ab", ""], 3) == 0.0  # no n-grams at all
    assert distinct_n([], 1) == 0.0


def test_lengths_are_characters_and_stop_rate_counts_stop():
    """Guards against lengths in bytes/tokens and against counting 'length' finishes as stopped."""
    assert mean_length(["皇上", "万福金安。"]) == pytest.approx(3.5)
    assert stop_rate(["stop", "length", "stop", "stop"]) == pytest.approx(0.75)
    m = reply_metrics(["皇上", "万福金安。"], ["皇上万福", "金安"], ["stop", "length"])
    assert (m.n, m.mean_length, m.reference_length, m.length_ratio, m.stop_rate) == (2, 3.5, 3.0, 3.5 / 3, 0.5)
    assert m.distinct_1 == pytest.approx(1.0) and m.distinct_2 == pytest.approx(1.0)
    assert reply_metrics(["a"], ["a"]).stop_rate is None


def test_chrf_and_bleu_match_sacrebleu_corpus_scores():
    """Guards against sentence-averaged scores, swapped hyp/ref, and BLEU with the default 13a tokenizer on Chinese."""
    hyps = ["皇上万福金安。", "臣妾做不到啊", "好"]
    refs = ["皇上万福。", "臣妾做不到啊。", "不好"]
    assert chrf(hyps, refs) == pytest.approx(sacrebleu.corpus_chrf(hyps, [refs]).score)
    assert bleu(hyps, refs) == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs], tokenize="zh").score)
    # With 13a, a Chinese sentence is one "word": a near miss scores 0; character-level BLEU does not.
    assert sacrebleu.corpus_bleu(["皇上万福金安。"], [["皇上万福。"]]).score == 0.0
    assert bleu(["皇上万福金安。"], ["皇上万福。"]) > 40
    assert chrf(refs, refs) == pytest.approx(100.0)
    assert bleu(refs, refs) == pytest.approx(100.0)


LINES = [
    "皇上万福金安。",
    "臣妾做不到啊。",
    "本宫乏了，你们都退下吧。",
    "嬛嬛与皇上的情分，岂是旁人能比的。",
    "娘娘吉祥，奴婢这就去办。",
    "这碗药是温宜公主的，谁敢动？",
    "臣妾给皇后娘娘请安。",
    "今日的月色倒是极好。",
    "你下去吧，本宫想一个人静一静。",
    "皇上驾到！",
    "这宫里，谁不是步步惊心。",
    "臣妾惶恐，还请皇上明鉴。",
]


def test_paired_bootstrap_tells_a_clear_winner_from_a_tie(caplog):
    """Guards against swapped systems (the difference's sign), a p-value that is not the paired test's (a clear
    winner must be significant, identical or one-record-apart systems must not), scores that differ from the
    report's chrF/BLEU, an unseeded bootstrap (two calls must agree), and sacrebleu's progress lines in our output."""
    refs = LINES
    good = [line[:-1] for line in refs]  # each reply misses its last character
    bad = ["今天天气很好，我们去公园散步吧。"] * len(refs)
    with caplog.at_level(logging.INFO):
        won = paired_bootstrap(bad, good, refs)
    assert not [r.getMessage() for r in caplog.records if r.name.startswith("sacrebleu")]
    assert set(won) == {"chrF", "BLEU"}
    assert won["chrF"].tuned == pytest.approx(chrf(good, refs)) and won["chrF"].base == pytest.approx(chrf(bad, refs))
    assert won["BLEU"].tuned == pytest.approx(bleu(good, refs)) and won["BLEU"].base == pytest.approx(bleu(bad, refs))
    assert won["chrF"].difference > 50 and won["chrF"].p_value < 0.01 and won["BLEU"].p_value < 0.01
    assert paired_bootstrap(bad, good, refs)["chrF"].p_value == won["chrF"].p_value
    assert paired_bootstrap(good, bad, refs)["chrF"].difference == pytest.approx(-won["chrF"].difference)
    tie = paired_bootstrap(good, good, refs)
    assert tie["chrF"].difference == 0 and tie["chrF"].p_value == 1.0 and tie["BLEU"].p_value == 1.0
    one_off = [*good[:-1], bad[-1]]  # one record of twelve worse
    assert paired_bootstrap(one_off, good, refs)["chrF"].p_value > 0.05
    with pytest.raises(ValueError, match="2 base, 1 tuned"):
        paired_bootstrap(["a", "b"], ["a"], ["a", "b"])


def test_reply_metrics_rejects_mismatched_lengths():
    """Guards against zip() silently scoring replies against the wrong references."""
    with pytest.raises(ValueError, match="2 replies but 1 references"):
        reply_metrics(["a", "b"], ["a"])


# ---------------------------------------------------------------- CLI on a tiny model

SYSTEM = "S"
ROWS = [
    {"instruction": f"问题{i}", "input": "", "output": "臣妾做不到啊。" if i % 2 else "皇上万福金安。"}
    for i in range(12)
]


SMALL_PERSONA = PersonaConfig(probes=2, drift_conversations=1, drift_turns=2, max_new_tokens=4)


@pytest.fixture(scope="module")
def run(tiny_model_dir, tmp_path_factory) -> Path:
    """A tiny adapter trained enough (high lr) that tuned and base losses differ."""
    tmp = tmp_path_factory.mktemp("eval-run")
    data = write_jsonl(tmp / "tiny.jsonl", ROWS)
    cfg = TrainConfig(
        model=str(tiny_model_dir),
        data=str(data),
        max_steps=2,
        val_size=4,
        output_dir=str(tmp / "out"),
        logging_steps=1,
        eval_steps=0,
        save_steps=100,
        batch_size=4,
        lr=2e-2,
        lora_dropout=0.0,
        system_prompt=SYSTEM,
        persona=SMALL_PERSONA,  # the persona section's own tests are in test_persona.py
    )
    return train(cfg).output_dir


@pytest.fixture(scope="module")
def evaluated(run) -> Path:
    assert main(["eval", "--adapter", str(run), "--max-new-tokens", "8", "--batch-size", "3", "--examples", "2"]) == 0
    return run / "eval"


def _direct_loss(model, tokenizer, conversations, max_length) -> float:
    """Reference implementation: one sequence at a time, logits by hand, CE over the shifted assistant labels."""
    from chatlora.template import encode_conversation, with_system

    total, count = 0.0, 0
    for messages in conversations:
        enc = encode_conversation(with_system(messages, SYSTEM), tokenizer, max_length)
        with torch.no_grad():
            logits = model(torch.tensor([enc.input_ids])).logits[0].float()
        labels = torch.tensor(enc.labels)
        total += F.cross_entropy(logits[:-1], labels[1:], ignore_index=-100, reduction="sum").item()
        count += int((labels[1:] != -100).sum())
    return total / count


def test_eval_loss_equals_direct_cross_entropy_over_assistant_tokens(run, evaluated):
    """Guards against loss over prompt/padding tokens, unshifted labels, mean-of-batch-means, and a 'base' that
    still has the adapter on (base is checked against the plain model without PEFT)."""
    from peft import PeftModel

    from chatlora.data import load_records
    from chatlora.model import load_model, load_tokenizer

    card = json.loads((run / "chatlora.json").read_text())
    metrics = json.loads((evaluated / "metrics.json").read_text())
    val = [r for r in load_records(card["dataset"]["path"]) if r.index in card["dataset"]["val_indices"]]
    convs = [r.messages for r in val]
    tokenizer = load_tokenizer(str(run))
    base_model = load_model(card["base_model"]["resolved"]).eval()
    base = _direct_loss(base_model, tokenizer, convs, card["config"]["max_length"])
    tuned_model = PeftModel.from_pretrained(load_model(card["base_model"]["resolved"]), str(run)).eval()
    tuned = _direct_loss(tuned_model, tokenizer, convs, card["config"]["max_length"])

    assert abs(base - tuned) > 1e-3  # the adapter changed something, so the two checks are distinct
    assert metrics["loss"]["base"]["loss"] == pytest.approx(base, rel=1e-5)
    assert metrics["loss"]["tuned"]["loss"] == pytest.approx(tuned, rel=1e-5)
    assert metrics["loss"]["ratio"] == pytest.approx(tuned / base, rel=1e-5)
    n_tokens = sum(len(r.messages[-1]["content"]) * 3 + 1 for r in val)  # byte tokenizer: 3 per CJK char + <|im_end|>
    assert metrics["loss"]["tuned"]["tokens"] == n_tokens


def test_eval_uses_exactly_the_run_held_out_split(run, evaluated):
    """Guards against evaluating on training records (wrong indices, or a fresh split instead of the recorded one)."""
    card = json.loads((run / "chatlora.json").read_text())
    metrics = json.loads((evaluated / "metrics.json").read_text())
    rows = [json.loads(line) for line in (evaluated / "replies.jsonl").read_text().splitlines()]
    assert [r["index"] for r in rows] == card["dataset"]["val_indices"]
    assert [r["prompt"] for r in rows] == [ROWS[i]["instruction"] for i in card["dataset"]["val_indices"]]
    assert [r["reference"] for r in rows] == [ROWS[i]["output"] for i in card["dataset"]["val_indices"]]
    assert set(rows[0]) >= {"base", "tuned", "base_finish", "tuned_finish"}
    assert metrics["source"]["kind"] == "held-out"
    assert metrics["source"]["records"] == 4 and metrics["source"]["sha256_matches_run"] is True
    assert metrics["replies"]["reference"]["chrf"] == pytest.approx(100.0)


def test_report_has_sections_targets_curve_and_replies(evaluated):
    """Guards against a report missing sections, PASS lines that aren't earned, or an HTML that needs the PNG file."""
    md = (evaluated / "report.md").read_text()
    for section in ("## Targets", "## Held-out loss", "## Reply metrics", "## Training curve", "## Replies"):
        assert section in md
    metrics = json.loads((evaluated / "metrics.json").read_text())
    # A random tiny model never emits <|im_end|> within 8 tokens: the stop-rate target must FAIL, not PASS.
    assert metrics["replies"]["tuned"]["stop_rate"] < 0.9
    assert "**FAIL** tuned stop rate >= 90%" in md
    chrf_test = metrics["significance"]["chrF"]
    assert chrf_test["tuned"] == pytest.approx(metrics["replies"]["tuned"]["chrf"])
    assert chrf_test["base"] == pytest.approx(metrics["replies"]["base"]["chrf"])
    assert 0 < chrf_test["p_value"] <= 1 and chrf_test["samples"] == 1000
    assert f"chrF {chrf_test['difference']:+.2f}, p = {chrf_test['p_value']:.3f}" in md.split("## Reply metrics")[1]
    assert f"(paired bootstrap: {chrf_test['difference']:+.2f}, p = {chrf_test['p_value']:.3f}, not significant" in md
    assert "**INFO** chrF tuned > base (significant at p < 0.05)" in md  # p = 1 here: neither a pass nor a failure
    assert "![training loss](loss.png)" in md and (evaluated / "loss.png").stat().st_size > 0
    assert md.split("## Replies")[1].count("### ") == 2  # --examples 2
    html = (evaluated / "report.html").read_text()
    assert 'src="data:image/png;base64,' in html and "loss.png" not in html.split("<h2>Training curve</h2>")[1][:200]
    verdicts = sum(html.count(f'class="{v}"') for v in ("pass", "fail", "info"))
    assert verdicts == 3 + 1  # + persona leaks (no markers for "S")


def test_eval_on_a_data_file_takes_its_first_records(run, tmp_path, capsys):
    """Guards against --data being ignored in favour of the held-out split, or --max-samples not applied."""
    other = write_jsonl(
        tmp_path / "other.jsonl",
        [
            {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"答{i}"}]}
            for i in range(5)
        ],
    )
    out = tmp_path / "rep"
    args = [
        "eval",
        "--adapter",
        str(run),
        "--data",
        str(other),
        "--max-samples",
        "3",
        "--output",
        str(out),
        "--max-new-tokens",
        "4",
    ]
    assert main(args) == 0
    rows = [json.loads(line) for line in (out / "replies.jsonl").read_text().splitlines()]
    assert [r["reference"] for r in rows] == ["答0", "答1", "答2"]
    assert json.loads((out / "metrics.json").read_text())["source"]["kind"] == "file"
    printed = capsys.readouterr().out
    assert "held-out loss: base" in printed and "chrF: base" in printed and "stop rate" in printed


def test_changed_dataset_warns_and_is_flagged_in_report(run, tmp_path, caplog):
    """Guards against silently evaluating a dataset that changed since training (indices may point elsewhere)."""
    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("eval", "checkpoint-*"))
    data = write_jsonl(tmp_path / "changed.jsonl", [*ROWS, {"instruction": "新", "input": "", "output": "新的。"}])
    card = json.loads((copy / "chatlora.json").read_text())
    card["dataset"]["path"] = str(data)
    (copy / "chatlora.json").write_text(json.dumps(card, ensure_ascii=False))
    with caplog.at_level(logging.WARNING, logger="chatlora.eval"):
        assert main(["eval", "--adapter", str(copy), "--max-new-tokens", "2", "--max-samples", "2"]) == 0
    assert any("changed since training" in r.getMessage() for r in caplog.records)
    assert json.loads((copy / "eval" / "metrics.json").read_text())["source"]["sha256_matches_run"] is False
    assert "WARNING: the dataset changed since training" in (copy / "eval" / "report.md").read_text()


def test_eval_errors_are_one_line_exit_2(run, tmp_path, capsys):
    """Guards against tracebacks for user errors: no run card without --data, bad --max-samples."""
    bare = tmp_path / "bare"
    shutil.copytree(run, bare, ignore=shutil.ignore_patterns("eval", "checkpoint-*", "chatlora.json"))
    assert main(["eval", "--adapter", str(bare)]) == 2
    err = capsys.readouterr().err
    assert err.strip() == (
        f"chatlora: error: {bare}: no chatlora.json run card, so no held-out split is known; pass --data PATH"
    )
    assert main(["eval", "--adapter", str(run), "--max-samples", "0"]) == 2
    assert capsys.readouterr().err.strip() == "chatlora: error: --max-samples must be > 0"


def test_quickstart_ends_with_eval_headline(tiny_model_dir, tmp_path, capsys, monkeypatch):
    """Guards against the quickstart skipping its eval step or printing no headline numbers / no report, and
    against replies generated in bf16 where training ran bf16 (bf16 kernels differ between CPUs: so would the
    replies and the targets)."""
    monkeypatch.setattr("chatlora.model.cpu_bf16_speedup", lambda: 1.6)  # a CPU where training runs bf16
    import chatlora.eval as eval_module

    seen, real_evaluate = {}, eval_module.evaluate

    def spy(cfg, chat):
        seen["weights"] = {n: p.detach().clone() for n, p in chat.model.named_parameters() if "lora_" not in n}
        return real_evaluate(cfg, chat)

    monkeypatch.setattr(eval_module, "evaluate", spy)
    data = write_jsonl(tmp_path / "tiny.jsonl", ROWS)
    out = tmp_path / "qs"
    config = tmp_path / "small-persona.yaml"
    # the quickstart config's prompt (a file of your own gets none): the persona section's markers follow from it
    settings = {"system_prompt": DEFAULT_SYSTEM_PROMPT, "persona": SMALL_PERSONA.to_dict()}
    config.write_text(yaml.safe_dump(settings, allow_unicode=True), encoding="utf-8")
    args = [
        "quickstart",
        "--config",
        str(config),
        "--model",
        str(tiny_model_dir),
        "--data",
        str(data),
        "--output-dir",
        str(out),
        "--max-steps",
        "1",
        "--val-size",
        "4",
        "--batch-size",
        "4",
        "--eval-steps",
        "0",
        "--logging-steps",
        "1",
        "--save-steps",
        "100",
        "--examples",
        "1",
    ]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "held-out loss: base" in printed and "ratio" in printed
    assert "chrF: base" in printed and "stop rate: base" in printed
    assert sum(printed.count(f"{v}  ") for v in ("PASS", "FAIL", "INFO")) == 5  # 3 + the persona section's 2
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    assert json.loads((out / "chatlora.json").read_text())["hardware"]["precision"] == "bf16"
    assert metrics["settings"]["dtype"] == "float32"
    # the base weights the eval used are the checkpoint's fp32 ones, not the bf16 copy training kept
    from transformers import AutoModelForCausalLM

    want = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).state_dict()
    name = "model.layers.0.mlp.up_proj.weight"
    ends = (name.replace(".weight", ".base_layer.weight"), name)
    got = next(v for n, v in seen["weights"].items() if n.endswith(ends))
    assert torch.equal(got, want[name])
    # the reply limit is `chatlora eval`'s own (128: room for the data's long replies), not a quickstart shortcut
    assert metrics["source"]["records"] == 4 and metrics["settings"]["max_new_tokens"] == 128
    # run again (a newcomer's second `make quickstart`): succeeds beside the first run, which stays as it was
    card = (out / "chatlora.json").read_bytes()
    assert main(args) == 0
    assert (out / "chatlora.json").read_bytes() == card
    assert (tmp_path / "qs-2" / "chatlora.json").is_file() and "qs-2" in capsys.readouterr().out


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"max_samples": 0}, "--max-samples must be > 0"),
        ({"max_new_tokens": 0}, "--max-new-tokens must be > 0"),
        ({"batch_size": -1}, "--batch-size must be > 0"),
        ({"repetition_penalty": 0.0}, "--repetition-penalty must be > 0"),
        ({"format": "alpaca"}, "--format and --columns apply to --data only"),
        ({"columns": "output=reply"}, "--format and --columns apply to --data only"),
    ],
)
def test_eval_config_refuses_bad_settings_naming_the_flag(settings, message):
    """Guards against a bad eval setting getting past the config, to fail as a traceback once the model has loaded,
    or failing with an error that does not name the flag."""
    from chatlora.config import ConfigError
    from chatlora.eval import EvalConfig

    with pytest.raises(ConfigError, match=message):
        EvalConfig("runs/x", **settings)
    EvalConfig("runs/x", data="d.jsonl", format="alpaca", columns="output=reply")  # with --data they apply


@pytest.mark.parametrize(
    ("base", "tuned", "p", "verdict"),
    [(2.64, 2.68, 0.38, "INFO"), (2.77, 2.73, 0.34, "INFO"), (2.0, 3.5, 0.01, "PASS"), (3.0, 2.0, 0.004, "FAIL")],
)
def test_chrf_decides_a_target_only_when_significant(base, tuned, p, verdict):
    """Guards against a chrF gain that is chance (+0.04, p = 0.38: the quickstart's, which flipped to a loss on
    another CPU) printed as PASS, and against a significant loss not printed as FAIL."""
    from chatlora.eval.command import Significance, _closer_target

    target = _closer_target(Significance("chrF", base, tuned, p, 0.5, 0.5, 1000))
    assert target.verdict == verdict
    assert target.detail.startswith(f"{base:.2f} -> {tuned:.2f} (paired bootstrap: {tuned - base:+.2f}, p = {p:.3f}")
