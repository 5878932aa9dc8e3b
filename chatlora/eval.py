"""Eval: base vs tuned model on held-out conversations -> loss, greedy replies, reply metrics, report.

By default the records are the run's held-out split, rebuilt from the run card (dataset path, format, columns,
``val_indices``), so nothing evaluated was trained on. The base model is the same loaded PEFT model with its
adapter disabled, so both systems share weights, tokenizer, template and system prompt.
"""

from __future__ import annotations

import base64
import contextlib
import html
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .data import Record, load_records, parse_columns
from .template import IGNORE_INDEX, encode_conversation, with_system
from .train import file_sha256

__all__ = [
    "TARGET_LOSS_RATIO",
    "TARGET_STOP_RATE",
    "EvalResult",
    "LossResult",
    "ReplyMetrics",
    "Target",
    "assistant_loss",
    "bleu",
    "chrf",
    "distinct_n",
    "evaluate",
    "held_out_records",
    "mean_length",
    "reply_metrics",
    "stop_rate",
]

log = logging.getLogger(__name__)

TARGET_LOSS_RATIO = 0.7  # tuned held-out loss must be at most this share of the base model's
TARGET_STOP_RATE = 0.99  # share of tuned replies that must end with the end-of-turn token

REPORT_MD = "report.md"
REPORT_HTML = "report.html"
METRICS_JSON = "metrics.json"
REPLIES_JSONL = "replies.jsonl"
LOSS_PNG = "loss.png"


# ---------------------------------------------------------------- pure metrics


def distinct_n(texts: list[str], n: int) -> float:
    """Distinct-n over characters: unique character n-grams / total character n-grams, across all ``texts``.

    The n-grams of each text are its ``len(text) - n + 1`` windows of ``n`` consecutive characters (whitespace and
    punctuation included); n-grams never span two texts. Uniqueness is counted over the pooled n-grams of all texts,
    so a system that repeats itself within or across replies scores lower. Returns 0.0 when there are no n-grams.

    Example: ``distinct_n(["abab"], 2)`` has n-grams ab, ba, ab -> 2 unique / 3 total.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    grams = [text[i : i + n] for text in texts for i in range(len(text) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def mean_length(texts: list[str]) -> float:
    """Mean length in characters (0.0 for no texts)."""
    return sum(len(t) for t in texts) / len(texts) if texts else 0.0


def stop_rate(finish_reasons: list[str]) -> float:
    """Share of replies that ended with the end-of-turn token (``finish_reason == "stop"``) before the token limit."""
    return sum(r == "stop" for r in finish_reasons) / len(finish_reasons) if finish_reasons else 0.0


def chrf(hypotheses: list[str], references: list[str]) -> float:
    """Corpus chrF (sacrebleu defaults: character 6-grams, beta 2), 0-100."""
    import sacrebleu

    return float(sacrebleu.corpus_chrf(hypotheses, [references]).score)


def bleu(hypotheses: list[str], references: list[str]) -> float:
    """Corpus BLEU with sacrebleu's ``zh`` tokenizer (each CJK character is a token), 0-100."""
    import sacrebleu

    return float(sacrebleu.corpus_bleu(hypotheses, [references], tokenize="zh").score)


@dataclass
class ReplyMetrics:
    """Reply quality of one system against the references.

    Attributes:
        n: Number of replies.
        chrf: Corpus chrF vs the references (0-100).
        bleu: Corpus BLEU vs the references, ``tokenize="zh"`` (0-100).
        mean_length: Mean reply length in characters.
        reference_length: Mean reference length in characters.
        length_ratio: ``mean_length / reference_length``.
        stop_rate: Share of replies ending with the end-of-turn token (None for the references).
        distinct_1: Character distinct-1 over all replies (see :func:`distinct_n`).
        distinct_2: Character distinct-2 over all replies.
    """

    n: int
    chrf: float
    bleu: float
    mean_length: float
    reference_length: float
    length_ratio: float | None
    stop_rate: float | None
    distinct_1: float
    distinct_2: float


def reply_metrics(replies: list[str], references: list[str], finish_reasons: list[str] | None = None) -> ReplyMetrics:
    """All reply metrics of one system; ``finish_reasons`` None (e.g. for the references) leaves stop_rate None."""
    if len(replies) != len(references):
        raise ValueError(f"{len(replies)} replies but {len(references)} references")
    ref_len = mean_length(references)
    return ReplyMetrics(
        n=len(replies),
        chrf=chrf(replies, references),
        bleu=bleu(replies, references),
        mean_length=mean_length(replies),
        reference_length=ref_len,
        length_ratio=mean_length(replies) / ref_len if ref_len else None,
        stop_rate=stop_rate(finish_reasons) if finish_reasons is not None else None,
        distinct_1=distinct_n(replies, 1),
        distinct_2=distinct_n(replies, 2),
    )


# ---------------------------------------------------------------- loss


@dataclass
class LossResult:
    """Token-weighted mean cross-entropy over the assistant tokens (labels != -100) of a set of conversations."""

    loss: float
    perplexity: float | None
    tokens: int


def _adapter_off(model, use_adapter: bool):
    if not use_adapter and hasattr(model, "disable_adapter"):
        return model.disable_adapter()
    return contextlib.nullcontext()


@torch.inference_mode()
def assistant_loss(
    model,
    tokenizer,
    conversations: list[list[dict]],
    system_prompt: str | None,
    max_length: int | None,
    batch_size: int = 4,
    use_adapter: bool = True,
) -> LossResult:
    """Held-out loss on the assistant tokens only, encoded exactly as in training.

    Each conversation goes through ``with_system`` + ``encode_conversation`` (the run's system prompt and
    ``max_length``); the loss is the sum of next-token cross-entropies over positions whose label is not -100,
    divided by their count (token-weighted, not a mean of per-batch means). ``use_adapter=False`` disables the
    LoRA adapter (``model.disable_adapter()``), giving the base model.
    """
    from .train import collate

    encoded = [encode_conversation(with_system(m, system_prompt), tokenizer, max_length) for m in conversations]
    examples = [{"input_ids": e.input_ids, "labels": e.labels} for e in encoded]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        with _adapter_off(model, use_adapter):
            for start in range(0, len(examples), batch_size):
                batch = collate(examples[start : start + batch_size], tokenizer.pad_token_id)
                logits = model(
                    input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
                ).logits
                labels = batch["labels"].to(device)[:, 1:]
                total += F.cross_entropy(
                    logits[:, :-1].float().reshape(-1, logits.size(-1)),
                    labels.reshape(-1),
                    ignore_index=IGNORE_INDEX,
                    reduction="sum",
                ).item()
                count += int((labels != IGNORE_INDEX).sum())
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("no assistant tokens to evaluate (empty data, or every reply cut by max_length)")
    loss = total / count
    return LossResult(loss, math.exp(loss) if loss < 100 else None, count)


# ---------------------------------------------------------------- data


def held_out_records(card: dict[str, Any], max_samples: int | None = None) -> tuple[list[Record], dict[str, Any]]:
    """The run's held-out records, reloaded from the dataset named in its run card, and where they came from.

    Warns (log) when the file's sha256 differs from the one recorded at training time: the indices may then point
    at different conversations than the ones held out.
    """
    ds = card.get("dataset") or {}
    if "val_indices" not in ds or "path" not in ds:
        raise ValueError("the run card records no held-out split (dataset.val_indices); pass --data PATH")
    path = Path(ds["path"])
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the run's dataset is gone; pass --data PATH to evaluate another file")
    sha = file_sha256(path)
    if ds.get("sha256") and sha != ds["sha256"]:
        log.warning(
            "%s changed since training (sha256 %s, run card %s): held-out indices may not match",
            path,
            sha[:12],
            ds["sha256"][:12],
        )
    cfg = card.get("config") or {}
    records = load_records(path, cfg.get("format", "auto"), parse_columns(cfg.get("columns")))
    by_index = {r.index: r for r in records}
    missing = [i for i in ds["val_indices"] if i not in by_index]
    if missing:
        raise ValueError(f"{path}: held-out indices {missing[:5]} are not in the file (was it changed?)")
    picked = [by_index[i] for i in ds["val_indices"]][: max_samples or None]
    source = {
        "kind": "held-out",
        "path": str(path),
        "sha256": sha,
        "sha256_matches_run": sha == ds.get("sha256"),
        "records": len(picked),
        "held_out_records": len(ds["val_indices"]),
    }
    return picked, source


def _file_records(path: str | Path, format: str, columns: str | None, max_samples: int | None):
    path = Path(path)
    records = load_records(path, format, parse_columns(columns))[: max_samples or None]
    return records, {"kind": "file", "path": str(path.resolve()), "sha256": file_sha256(path), "records": len(records)}


# ---------------------------------------------------------------- evaluate


@dataclass
class Target:
    """One PASS/FAIL line of the report."""

    name: str
    passed: bool
    detail: str


@dataclass
class EvalResult:
    """Everything ``evaluate`` measured, plus the files it wrote."""

    output_dir: Path
    source: dict[str, Any]
    settings: dict[str, Any]
    loss: dict[str, LossResult]
    replies: dict[str, ReplyMetrics]
    targets: list[Target]
    rows: list[dict[str, Any]] = field(repr=False)
    plot_path: Path | None = None

    @property
    def loss_ratio(self) -> float:
        """Tuned / base held-out loss."""
        return self.loss["tuned"].loss / self.loss["base"].loss if self.loss["base"].loss else math.inf

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "settings": self.settings,
            "loss": {k: asdict(v) for k, v in self.loss.items()} | {"ratio": self.loss_ratio},
            "replies": {k: asdict(v) for k, v in self.replies.items()},
            "targets": [asdict(t) for t in self.targets],
            "files": {
                "report_md": REPORT_MD,
                "report_html": REPORT_HTML,
                "replies": REPLIES_JSONL,
                "loss_plot": self.plot_path.name if self.plot_path else None,
            },
        }


def _targets(loss: dict[str, LossResult], replies: dict[str, ReplyMetrics]) -> list[Target]:
    ratio = loss["tuned"].loss / loss["base"].loss if loss["base"].loss else math.inf
    tuned, base = replies["tuned"], replies["base"]
    return [
        Target(
            f"held-out loss tuned <= {TARGET_LOSS_RATIO} x base",
            ratio <= TARGET_LOSS_RATIO,
            f"{loss['base'].loss:.4f} -> {loss['tuned'].loss:.4f} (ratio {ratio:.3f})",
        ),
        Target(
            f"tuned stop rate >= {TARGET_STOP_RATE:.0%}",
            (tuned.stop_rate or 0) >= TARGET_STOP_RATE,
            f"{tuned.stop_rate:.1%} of {tuned.n} replies (base {base.stop_rate:.1%})",
        ),
        Target("chrF tuned > base", tuned.chrf > base.chrf, f"{base.chrf:.2f} -> {tuned.chrf:.2f}"),
    ]


def _generate(chat, prompts: list[list[dict]], sampling, batch_size: int, use_adapter: bool):
    # The batched path of `generate`: similar lengths share a batch, replies come back in input order.
    desc = "eval: tuned" if use_adapter else "eval: base"
    return chat.generate_many(prompts, sampling, use_adapter=use_adapter, batch_size=batch_size, desc=desc)


def evaluate(
    adapter: str | Path,
    data: str | Path | None = None,
    output: str | Path | None = None,
    max_samples: int | None = None,
    max_new_tokens: int = 128,
    batch_size: int = 8,
    repetition_penalty: float = 1.1,
    report_examples: int = 10,
    data_format: str = "auto",
    columns: str | None = None,
    device: str = "auto",
    chat=None,
) -> EvalResult:
    """Measure base (adapter off) and tuned model on the same conversations; write the report files.

    Args:
        adapter: A chatlora output dir (adapter + ``chatlora.json`` run card + ``metrics.jsonl``).
        data: Evaluate this dataset file (first ``max_samples`` records) instead of the run's held-out split.
        output: Report folder (default ``adapter/eval``).
        max_samples: Evaluate at most this many records (None: all).
        max_new_tokens: Reply token limit; a reply that reaches it counts as not stopped.
        batch_size: Conversations per forward / generate batch.
        repetition_penalty: Greedy decoding's repetition penalty (1.0: plain greedy).
        report_examples: Replies shown side by side in the report (all go to ``replies.jsonl``).
        data_format: Format of ``data`` (auto, alpaca, messages, sharegpt).
        columns: Field renames for ``data``, e.g. ``instruction=prompt,output=response``.
        device: auto, cpu, cuda or cuda:N (ignored when ``chat`` is given).
        chat: An already loaded :class:`~chatlora.infer.ChatModel` with the adapter (e.g. right after training).

    Returns:
        The measurements; ``report.md``, ``report.html``, ``metrics.json``, ``replies.jsonl`` and ``loss.png``
        are in ``result.output_dir``.
    """
    from .infer import ChatModel, SamplingConfig
    from .train import METRICS, plot_loss_curve, read_run_card

    adapter = Path(adapter)
    if max_samples is not None and max_samples <= 0:
        raise ValueError("max_samples must be > 0")
    if batch_size <= 0 or max_new_tokens <= 0:
        raise ValueError("batch_size and max_new_tokens must be > 0")
    card = read_run_card(adapter)
    if data is not None:
        records, source = _file_records(data, data_format, columns, max_samples)
    elif not card:
        raise ValueError(f"{adapter}: no chatlora.json run card, so no held-out split is known; pass --data PATH")
    else:
        records, source = held_out_records(card, max_samples)
    if not records:
        raise ValueError("no records to evaluate")

    if chat is None:
        chat = ChatModel.load(adapter, device=device)
    if not chat.has_adapter:
        raise ValueError(f"{adapter}: the loaded model has no LoRA adapter to compare against its base")
    cfg = card.get("config") or {}
    system_prompt = (card.get("template") or {}).get("system_prompt", chat.system_prompt)
    max_length = cfg.get("max_length")
    started = time.time()

    conversations = [r.messages for r in records]
    loss = {
        name: assistant_loss(
            chat.model,
            chat.tokenizer,
            conversations,
            system_prompt,
            max_length,
            batch_size=batch_size,
            use_adapter=name == "tuned",
        )
        for name in ("base", "tuned")
    }
    log.info("held-out loss: base %.4f, tuned %.4f", loss["base"].loss, loss["tuned"].loss)

    sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=0, repetition_penalty=repetition_penalty)
    prompts = [r.messages[:-1] for r in records]
    references = [r.messages[-1]["content"] for r in records]
    generated = {
        name: _generate(chat, prompts, sampling, batch_size, use_adapter=name == "tuned") for name in ("base", "tuned")
    }
    replies = {
        name: reply_metrics([r.text for r in out], references, [r.finish_reason for r in out])
        for name, out in generated.items()
    }
    replies["reference"] = reply_metrics(references, references)

    rows = [
        {
            "index": rec.index,
            "line": rec.line,
            "prompt": rec.messages[-2]["content"] if len(rec.messages) > 1 else "",
            "reference": ref,
            "base": b.text,
            "base_finish": b.finish_reason,
            "tuned": t.text,
            "tuned_finish": t.finish_reason,
        }
        for rec, ref, b, t in zip(records, references, generated["base"], generated["tuned"], strict=True)
    ]
    settings = {
        "adapter": str(adapter.resolve()),
        "system_prompt": system_prompt,
        "max_length": max_length,
        "max_new_tokens": max_new_tokens,
        "decoding": f"greedy, repetition_penalty={repetition_penalty}",
        "batch_size": batch_size,
        "device": str(chat.device),
        "runtime_s": round(time.time() - started, 1),
    }
    out_dir = Path(output) if output is not None else adapter / "eval"
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = adapter / METRICS
    plot_path = plot_loss_curve(metrics_path, out_dir / LOSS_PNG) if metrics_path.is_file() else None
    result = EvalResult(out_dir, source, settings, loss, replies, _targets(loss, replies), rows, plot_path)
    _write(result, report_examples)
    return result


# ---------------------------------------------------------------- report


def _write(result: EvalResult, examples: int) -> None:
    out = result.output_dir
    (out / METRICS_JSON).write_text(
        json.dumps(result.to_dict(), ensure_ascii=False, indent=2) + "\n", encoding="utf-8"
    )
    with (out / REPLIES_JSONL).open("w", encoding="utf-8") as f:
        for row in result.rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    (out / REPORT_MD).write_text(_markdown(result, examples), encoding="utf-8")
    (out / REPORT_HTML).write_text(_html(result, examples), encoding="utf-8")


def _fmt(value: float | None, spec: str = ".2f") -> str:
    return "—" if value is None else format(value, spec)


def _tables(result: EvalResult) -> tuple[list[str], list[list[str]], list[str], list[list[str]]]:
    """(header, rows) of the loss table and of the reply-metrics table, as display strings."""
    loss_head = ["system", "loss", "perplexity", "assistant tokens"]
    loss_rows = [[k, _fmt(v.loss, ".4f"), _fmt(v.perplexity), str(v.tokens)] for k, v in result.loss.items()]
    loss_rows.append(["tuned / base", _fmt(result.loss_ratio, ".3f"), "", ""])
    rep_head = [
        "system",
        "chrF",
        "BLEU (zh)",
        "mean chars",
        "ref chars",
        "length ratio",
        "stop rate",
        "distinct-1",
        "distinct-2",
    ]
    rep_rows = [
        [
            k,
            _fmt(m.chrf),
            _fmt(m.bleu),
            _fmt(m.mean_length, ".1f"),
            _fmt(m.reference_length, ".1f"),
            _fmt(m.length_ratio),
            "—" if m.stop_rate is None else f"{m.stop_rate:.1%}",
            _fmt(m.distinct_1, ".3f"),
            _fmt(m.distinct_2, ".3f"),
        ]
        for k, m in result.replies.items()
    ]
    return loss_head, loss_rows, rep_head, rep_rows


def _source_line(result: EvalResult) -> str:
    s = result.source
    if s["kind"] == "held-out":
        what = f"{s['records']} of the run's {s['held_out_records']} held-out records (never trained on)"
        if not s["sha256_matches_run"]:
            what += " — WARNING: the dataset changed since training"
    else:
        what = f"the first {s['records']} records of a dataset file"
    return f"{what}, from `{s['path']}`"


_NOTES = (
    "Loss: token-weighted mean cross-entropy over assistant tokens only (labels != -100), same template, system "
    "prompt and max_length as training; base = the same model with the adapter disabled. "
    "Replies: greedy, prompt = the conversation minus its last assistant turn. chrF and BLEU are corpus scores vs "
    "the reference (BLEU with sacrebleu tokenize='zh'). Lengths in characters. Stop rate: share of replies ending "
    "with the end-of-turn token before max_new_tokens. distinct-n: unique / total character n-grams over all "
    "replies of a system."
)


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\r", "").replace("\n", "<br>")


def _md_table(head: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return lines + ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]


def _markdown(result: EvalResult, examples: int) -> str:
    loss_head, loss_rows, rep_head, rep_rows = _tables(result)
    s = result.settings
    lines = [
        "# chatlora eval",
        "",
        f"Adapter `{s['adapter']}`, evaluated on {_source_line(result)}.",
        f"Decoding: {s['decoding']}, max_new_tokens={s['max_new_tokens']}; device {s['device']}.",
        "",
        "## Targets",
        "",
        *[f"- **{'PASS' if t.passed else 'FAIL'}** {t.name}: {t.detail}" for t in result.targets],
        "",
        "## Held-out loss (assistant tokens)",
        "",
        *_md_table(loss_head, loss_rows),
        "",
        "## Reply metrics",
        "",
        *_md_table(rep_head, rep_rows),
        "",
        _NOTES,
        "",
        "## Training curve",
        "",
        f"![training loss]({result.plot_path.name})" if result.plot_path else "(no metrics.jsonl in the adapter dir)",
        "",
        f"## Replies (first {min(examples, len(result.rows))} of {len(result.rows)}; all in `{REPLIES_JSONL}`)",
        "",
    ]
    for i, row in enumerate(result.rows[:examples], 1):
        lines += [
            f"### {i}. record {row['index']}",
            "",
            *_md_table(
                ["", "text"],
                [
                    ["prompt", row["prompt"]],
                    ["reference", row["reference"]],
                    ["base", row["base"] + ("" if row["base_finish"] == "stop" else " [cut at max_new_tokens]")],
                    ["tuned", row["tuned"] + ("" if row["tuned_finish"] == "stop" else " [cut at max_new_tokens]")],
                ],
            ),
            "",
        ]
    return "\n".join(lines) + "\n"


_CSS = (
    "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
    "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:top}"
    "th{background:#f4f4f4}.pass{color:#1a7f37;font-weight:bold}.fail{color:#cf222e;font-weight:bold}"
    ".replies td{white-space:pre-wrap;width:25%}.note{color:#555;font-size:.9em}"
)


def _html_table(head: list[str], rows: list[list[str]], cls: str = "") -> str:
    e = html.escape
    th = "".join(f"<th>{e(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{cls}"><tr>{th}</tr>{body}</table>'


def _html(result: EvalResult, examples: int) -> str:
    e = html.escape
    loss_head, loss_rows, rep_head, rep_rows = _tables(result)
    s = result.settings
    targets = "".join(
        f'<li><span class="{"pass" if t.passed else "fail"}">{"PASS" if t.passed else "FAIL"}</span> '
        f"{e(t.name)}: {e(t.detail)}</li>"
        for t in result.targets
    )
    if result.plot_path:
        png = base64.b64encode(result.plot_path.read_bytes()).decode("ascii")
        curve = f'<img alt="training loss" src="data:image/png;base64,{png}">'
    else:
        curve = "<p>(no metrics.jsonl in the adapter dir)</p>"

    def mark(text: str, finish: str) -> str:
        return text + ("" if finish == "stop" else " [cut at max_new_tokens]")

    reply_rows = [
        [
            str(r["index"]),
            r["prompt"],
            r["reference"],
            mark(r["base"], r["base_finish"]),
            mark(r["tuned"], r["tuned_finish"]),
        ]
        for r in result.rows[:examples]
    ]
    return (
        '<!doctype html><html><head><meta charset="utf-8"><title>chatlora eval</title>'
        f"<style>{_CSS}</style></head><body>"
        "<h1>chatlora eval</h1>"
        f"<p>Adapter <code>{e(s['adapter'])}</code>, evaluated on {e(_source_line(result))}.<br>"
        f"Decoding: {e(s['decoding'])}, max_new_tokens={s['max_new_tokens']}; device {e(s['device'])}.</p>"
        f"<h2>Targets</h2><ul>{targets}</ul>"
        f"<h2>Held-out loss (assistant tokens)</h2>{_html_table(loss_head, loss_rows)}"
        f"<h2>Reply metrics</h2>{_html_table(rep_head, rep_rows)}"
        f'<p class="note">{e(_NOTES)}</p>'
        f"<h2>Training curve</h2>{curve}"
        f"<h2>Replies (first {len(reply_rows)} of {len(result.rows)}; all in {REPLIES_JSONL})</h2>"
        f"{_html_table(['record', 'prompt', 'reference', 'base', 'tuned'], reply_rows, 'replies')}"
        "</body></html>\n"
    )
