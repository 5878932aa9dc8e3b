"""`chatlora eval --adapter B --against A`: two runs' adapters on one loaded base, on the held-out records of the SFT
run a preference run started from, in one report (tiny random Llama, CPU)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import make_model_dir, write_jsonl
from test_eval import ROWS, SMALL_PERSONA
from test_train import tiny_cfg

pytest.importorskip("trl")

from chatlora.cli import main  # noqa: E402
from chatlora.eval import chrf, paired_bootstrap  # noqa: E402

EVAL = ["--max-new-tokens", "8", "--batch-size", "3", "--examples", "2"]
SYSTEM = "你是甄嬛。"  # the SFT run adds it; the pairs carry none, so the DPO run adds none


def _cfg(model_dir, data, out, **kw):
    """test_train's tiny run: 2 steps without warm-up, the small persona block."""
    short = dict(max_steps=2, eval_steps=0, save_steps=100, warmup_ratio=0.0, persona=SMALL_PERSONA)
    return tiny_cfg(model_dir, data, out, **{**short, **kw})


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    """An SFT run holding out 4 of the 12 conversations (with a system prompt it adds), and a DPO run started from it
    (--from-adapter) on pairs of the SFT prompts, trained hard enough (high lr) that the two adapters answer
    differently."""
    from chatlora.training.align import train_preference
    from chatlora.training.train import train

    tmp = tmp_path_factory.mktemp("compare")
    data = write_jsonl(tmp / "sft.jsonl", ROWS)
    sft = train(_cfg(tiny_model_dir, data, tmp / "sft", val_size=4, lr=2e-2, system_prompt=SYSTEM))
    pairs = write_jsonl(
        tmp / "pairs.jsonl",
        [{"prompt": f"问题{i}", "chosen": "臣妾做不到啊。", "rejected": "I am an AI assistant."} for i in range(8)],
    )
    dpo = train_preference(
        _cfg(tiny_model_dir, pairs, tmp / "dpo", method="dpo", val_size=2, lr=5e-2, from_adapter=str(sft.output_dir))
    )
    return {"sft": sft.output_dir, "dpo": dpo.output_dir, "tmp": tmp}


BOOTSTRAPPED: list[tuple] = []  # the paired bootstrap's (base, tuned, references) in the comparison


@pytest.fixture(scope="module")
def compared(runs) -> Path:
    """``eval --adapter dpo --against sft``, counting the base models loaded and keeping what the paired bootstrap
    was given."""
    import chatlora.eval.command
    import chatlora.run

    loads = []
    real_load, real_bootstrap = chatlora.run.load_model, chatlora.eval.command.paired_bootstrap

    def counting(*args, **kwargs):
        loads.append(args[0])
        return real_load(*args, **kwargs)

    def recording(base, tuned, references, *args, **kwargs):
        BOOTSTRAPPED.append((list(base), list(tuned), list(references)))
        return real_bootstrap(base, tuned, references, *args, **kwargs)

    out = runs["tmp"] / "report"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(chatlora.run, "load_model", counting)
        mp.setattr(chatlora.eval.command, "paired_bootstrap", recording)
        argv = ["eval", "--adapter", str(runs["dpo"]), "--against", str(runs["sft"]), "--output", str(out)]
        assert main([*argv, *EVAL]) == 0
    assert len(loads) == 1  # both adapters on one base, never two copies
    return out


def _greedy(adapter: Path, prompts: list[list[dict]]) -> list[str]:
    """Each adapter alone, loaded on its own: what its replies in the comparison must be."""
    from chatlora.inference.infer import ChatModel, SamplingConfig

    chat = ChatModel.load(adapter, device="cpu", dtype="fp32")
    sampling = SamplingConfig(max_new_tokens=8, temperature=0, repetition_penalty=1.1)
    return [r.text for r in chat.generate_many(prompts, sampling, batch_size=3, desc=None)]


def test_both_adapters_reply_as_they_do_alone_and_the_bootstrap_compares_them(runs, compared):
    """Guards against the baseline being the base model (adapter off) instead of --against's adapter, the two
    systems swapped, one reply list reused for both, the paired bootstrap fed the wrong lists, and the records asked
    without the system prompt the SFT run trained them with (the DPO run added none: its pairs carry their own)."""
    rows = [json.loads(line) for line in (compared / "replies.jsonl").read_text().splitlines()]
    prompts = [[{"role": "system", "content": SYSTEM}, {"role": "user", "content": r["prompt"]}] for r in rows]
    base, tuned = [r["base"] for r in rows], [r["tuned"] for r in rows]
    assert base == _greedy(runs["sft"], prompts)
    assert tuned == _greedy(runs["dpo"], prompts)
    assert base != tuned  # else a swap could not show
    references = [r["reference"] for r in rows]
    assert BOOTSTRAPPED == [(base, tuned, references)]
    metrics = json.loads((compared / "metrics.json").read_text())
    assert metrics["settings"]["system_prompt"] == SYSTEM  # the held-out loss is rendered with it too
    want = paired_bootstrap(base, tuned, references)["chrF"]
    got = metrics["significance"]["chrF"]
    assert (got["base"], got["tuned"], got["p_value"]) == pytest.approx((want.base, want.tuned, want.p_value))
    assert metrics["replies"]["base"]["chrf"] == pytest.approx(chrf(base, references))
    assert metrics["replies"]["tuned"]["chrf"] == pytest.approx(chrf(tuned, references))


def test_held_out_records_are_the_sft_runs_split(runs, compared):
    """Guards against a preference run being measured on its own held-out pairs (read as conversations), on a fresh
    split, or on records the SFT run trained on."""
    card = json.loads((runs["sft"] / "chatlora.json").read_text())
    rows = [json.loads(line) for line in (compared / "replies.jsonl").read_text().splitlines()]
    assert [r["index"] for r in rows] == card["dataset"]["val_indices"]
    assert [r["reference"] for r in rows] == [ROWS[i]["output"] for i in card["dataset"]["val_indices"]]
    source = json.loads((compared / "metrics.json").read_text())["source"]
    assert Path(source["run"]).resolve() == runs["sft"].resolve() and source["records"] == 4
    md = (compared / "report.md").read_text()
    assert f"4 of the 4 held-out records of the run `{source['run']}`" in md


def test_the_report_names_both_runs_and_judges_the_loss_against_an_adapter_as_info(runs, compared):
    """Guards against a comparison reported as "base"/"tuned" (a reader would take the SFT run for the base model)
    and against the 0.7 x loss target, which is against the base model, deciding a comparison of two adapters."""
    sft, dpo = str(runs["sft"]), str(runs["dpo"])
    metrics = json.loads((compared / "metrics.json").read_text())
    assert metrics["systems"] == {"base": sft, "tuned": dpo}
    assert metrics["settings"]["against"] == str(runs["sft"].resolve())
    md = (compared / "report.md").read_text()
    loss = md.split("## Held-out loss")[1].split("##")[0]
    assert f"| {sft} |" in loss and f"| {dpo} |" in loss and f"| {dpo} / {sft} |" in loss
    assert "| base |" not in md and "| tuned |" not in md
    assert f"**INFO** held-out loss {dpo} vs {sft}: " in md
    assert f"{dpo} stop rate >= 90%" in md and f"chrF {dpo} > {sft}" in md
    assert f"Adapter `{runs['dpo'].resolve()}`, compared with `{runs['sft'].resolve()}` (another run's" in md
    persona = metrics["persona"]
    assert persona["systems"] == {"base": sft, "tuned": dpo}
    probes = md.split("### Identity probes")[1].split("###")[0]
    assert f"| {sft} | all |" in probes and f"| {dpo} | all |" in probes
    assert f"persona: {dpo} identity-leak rate <= {sft}" in md
    assert f"| {sft} (baseline) |" in md.split("### Retention and checkpoints")[1]
    html = (compared / "report.html").read_text()
    assert f"<th>{sft}</th><th>{dpo}</th>" in html  # the replies table's columns


def test_adapters_of_different_bases_and_a_run_against_itself_exit_2_before_weights(
    runs, tmp_path, capsys, monkeypatch
):
    """Guards against comparing adapters whose LoRA weights belong to different base models (one of them would be
    measured on a base it never saw) and against a run compared with itself; both before any weights load."""
    other = make_model_dir(tmp_path / "other-base", seed=1)
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(runs["sft"], elsewhere, ignore=shutil.ignore_patterns("eval", "checkpoint-*"))
    card = json.loads((elsewhere / "chatlora.json").read_text())
    card["base_model"].update(spec=str(other), resolved=str(other))
    (elsewhere / "chatlora.json").write_text(json.dumps(card, ensure_ascii=False))
    monkeypatch.setattr("chatlora.run.load_model", lambda *a, **k: pytest.fail("weights loaded"))

    assert main(["eval", "--adapter", str(runs["dpo"]), "--against", str(elsewhere)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"chatlora: error: --against {elsewhere}: trained on {other} (")
    assert err.strip().endswith(": eval compares two adapters of one base model")
    assert main(["eval", "--adapter", str(runs["dpo"]), "--against", str(runs["dpo"])]) == 2
    assert "is the evaluated --adapter itself" in capsys.readouterr().err


def test_a_preference_run_without_a_start_run_asks_for_data(runs, tmp_path, capsys, monkeypatch):
    """Guards against a preference run's held-out pairs being read as conversations (or a traceback) when it
    started from no SFT run and no --data is given."""
    alone = tmp_path / "alone"
    shutil.copytree(runs["dpo"], alone, ignore=shutil.ignore_patterns("eval", "checkpoint-*"))
    card = json.loads((alone / "chatlora.json").read_text())
    card["config"]["from_adapter"] = None
    (alone / "chatlora.json").write_text(json.dumps(card, ensure_ascii=False))
    monkeypatch.setattr("chatlora.run.load_model", lambda *a, **k: pytest.fail("weights loaded"))
    assert main(["eval", "--adapter", str(alone)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"chatlora: error: {alone}: a dpo run holds out preference pairs, not conversations, and did not start from "
        "an SFT run (--from-adapter): pass --data PATH (e.g. the SFT dataset) or --against the SFT run"
    )
