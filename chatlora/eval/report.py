"""The eval report: an :class:`~chatlora.eval.results.EvalResult` as files (``metrics.json``, ``replies.jsonl``,
``report.md``, ``report.html``).

The report is a list of sections, each rendered to Markdown and to HTML by the function in :data:`SECTIONS` that
builds it; a new measurement adds its own function there (returning None when the result has nothing for it).
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .results import METRICS_JSON, REPLIES_JSONL, REPORT_HTML, REPORT_MD, EvalResult

__all__ = [
    "SECTIONS",
    "Section",
    "html_report",
    "markdown_report",
    "sections",
    "write_report",
]


@dataclass
class Section:
    """One ``##`` section of the report, rendered both ways. Backticks in ``title`` only mark code in Markdown."""

    title: str
    markdown: list[str]  # body lines
    html: str  # body


def write_report(result: EvalResult, examples: int) -> None:
    """Write the result's files into ``result.output_dir``; ``examples`` replies are shown in the reports."""
    out = result.output_dir
    (out / METRICS_JSON).write_text(
        json.dumps(result.to_dict(), ensure_ascii=False, indent=2) + "\n", encoding="utf-8"
    )
    with (out / REPLIES_JSONL).open("w", encoding="utf-8") as f:
        for row in result.rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    parts = sections(result, examples)
    (out / REPORT_MD).write_text(markdown_report(result, parts), encoding="utf-8")
    (out / REPORT_HTML).write_text(html_report(result, parts), encoding="utf-8")


def sections(result: EvalResult, examples: int) -> list[Section]:
    """The report's sections, in order."""
    return [s for build in SECTIONS if (s := build(result, examples)) is not None]


def markdown_report(result: EvalResult, parts: list[Section]) -> str:
    s = result.settings
    lines = [
        "# chatlora eval",
        "",
        f"Adapter `{s['adapter']}`, {_compared(result)}, evaluated on {_source_line(result)}.",
        f"Decoding: {s['decoding']}, max_new_tokens={s['max_new_tokens']}; device {s['device']}.",
    ]
    for part in parts:
        lines += ["", f"## {part.title}", "", *part.markdown]
    return "\n".join(lines) + "\n"


def html_report(result: EvalResult, parts: list[Section]) -> str:
    e = html.escape
    s = result.settings
    body = "".join(f"<h2>{e(part.title.replace('`', ''))}</h2>{part.html}" for part in parts)
    return (
        '<!doctype html><html><head><meta charset="utf-8"><title>chatlora eval</title>'
        f"<style>{_CSS}</style></head><body>"
        "<h1>chatlora eval</h1>"
        f"<p>Adapter <code>{e(s['adapter'])}</code>, {e(_compared(result))}, evaluated on "
        f"{e(_source_line(result))}.<br>"
        f"Decoding: {e(s['decoding'])}, max_new_tokens={s['max_new_tokens']}; device {e(s['device'])}.</p>"
        f"{body}</body></html>\n"
    )


# ---------------------------------------------------------------- sections


def _targets(result: EvalResult, examples: int) -> Section:
    e = html.escape
    items = "".join(
        f'<li><span class="{t.verdict.lower()}">{t.verdict}</span> {e(t.name)}: {e(t.detail)}</li>'
        for t in result.targets
    )
    return Section(
        "Targets",
        [f"- **{t.verdict}** {t.name}: {t.detail}" for t in result.targets],
        f"<ul>{items}</ul>",
    )


def _loss(result: EvalResult, examples: int) -> Section:
    head = ["system", "loss", "perplexity", "assistant tokens"]
    names = result.names
    rows = [[names[k], _fmt(v.loss, ".4f"), _fmt(v.perplexity), str(v.tokens)] for k, v in result.loss.items()]
    rows.append([f"{names['tuned']} / {names['base']}", _fmt(result.loss_ratio, ".3f"), "", ""])
    return Section("Held-out loss (assistant tokens)", _md_table(head, rows), _html_table(head, rows))


_NOTES = (
    "Loss: token-weighted mean cross-entropy over assistant tokens only (labels != -100), same template, system "
    "prompt and max_length as training; {base}. "
    "Replies: greedy, prompt = the conversation minus its last assistant turn. chrF and BLEU are corpus scores vs "
    "the reference (BLEU with sacrebleu tokenize='zh'). Lengths in characters. Stop rate: share of replies ending "
    "with the end-of-turn token before max_new_tokens. distinct-n: unique / total character n-grams over all "
    "replies of a system."
)


def _reply_metrics(result: EvalResult, examples: int) -> Section:
    head = [
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
    rows = [
        [
            result.names.get(k, k),
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
    baseline = (
        "base = the same model with the adapter disabled"
        if result.settings.get("against", "base") == "base"
        else f"{result.names['base']} = the other run's adapter, loaded beside this one on the same base model"
    )
    notes = [_NOTES.format(base=baseline)]
    if result.significance:
        n = result.replies["tuned"].n
        tests = "; ".join(f"{s.metric} {s.describe()}" for s in result.significance.values())
        samples = next(iter(result.significance.values())).samples
        notes.append(
            f"{result.names['tuned']} minus {result.names['base']}, paired bootstrap over the {n} records ({samples} resamples): {tests}. A p-value "
            "above 0.05 means these records cannot tell the two systems apart on that metric."
        )
    return Section(
        "Reply metrics",
        [*_md_table(head, rows), *(line for note in notes for line in ("", note))],
        _html_table(head, rows) + "".join(f'<p class="note">{html.escape(note)}</p>' for note in notes),
    )


def _curve(result: EvalResult, examples: int) -> Section:
    if result.plot_path is None:
        missing = "(no metrics.jsonl in the adapter dir)"
        return Section("Training curve", [missing], f"<p>{missing}</p>")
    png = base64.b64encode(result.plot_path.read_bytes()).decode("ascii")  # the HTML page stands alone
    return Section(
        "Training curve",
        [f"![training loss]({result.plot_path.name})"],
        f'<img alt="training loss" src="data:image/png;base64,{png}">',
    )


def _persona(result: EvalResult, examples: int) -> Section | None:
    if result.persona is None:
        return None
    from .persona import PERSONA_JSONL, describe, tables

    p = result.persona
    t = tables(p)
    e = html.escape
    md = [*[f"{line}  " for line in describe(p)], "", "### Identity probes", "", *_md_table(*t["probes"])]
    body = f'<p class="note">{"<br>".join(e(x) for x in describe(p))}</p><h3>Identity probes</h3>'
    body += _html_table(*t["probes"])
    if "drift" in t:
        md += ["", "### Long-conversation drift", "", *_md_table(*t["drift"])]
        body += f"<h3>Long-conversation drift</h3>{_html_table(*t['drift'])}"
        if p.plot_path is not None:
            md += ["", f"![persona drift]({p.plot_path.name})"]
            png = base64.b64encode(p.plot_path.read_bytes()).decode("ascii")
            body += f'<img alt="persona drift" src="data:image/png;base64,{png}">'
    if "checkpoints" in t:
        md += ["", "### Retention and checkpoints", "", *_md_table(*t["checkpoints"])]
        body += f"<h3>Retention and checkpoints</h3>{_html_table(*t['checkpoints'])}"
    md += ["", f"Every probe and drift reply, with what it matched: `{PERSONA_JSONL}`."]
    body += f"<p>Every probe and drift reply, with what it matched: {e(PERSONA_JSONL)}</p>"
    return Section("Persona", md, body)


def _replies(result: EvalResult, examples: int) -> Section:
    from .persona import SYSTEMS

    shown = result.rows[:examples]

    def mark(row: dict, system: str) -> str:
        return row[system] + ("" if row[f"{system}_finish"] == "stop" else " [cut at max_new_tokens]")

    md: list[str] = []
    for i, row in enumerate(shown, 1):
        table = [["prompt", row["prompt"]], ["reference", row["reference"]]]
        table += [[result.names[system], mark(row, system)] for system in SYSTEMS]
        md += [""] if md else []
        md += [f"### {i}. record {row['index']}", "", *_md_table(["", "text"], table)]
    html_rows = [[str(r["index"]), r["prompt"], r["reference"], *(mark(r, s) for s in SYSTEMS)] for r in shown]
    return Section(
        f"Replies (first {len(shown)} of {len(result.rows)}; all in `{REPLIES_JSONL}`)",
        md,
        _html_table(["record", "prompt", "reference", *(result.names[s] for s in SYSTEMS)], html_rows, "replies"),
    )


# Each builds one section from a result and the number of replies to show, or returns None to leave it out.
SECTIONS: list[Callable[[EvalResult, int], Section | None]] = [
    _targets,
    _loss,
    _reply_metrics,
    _persona,
    _curve,
    _replies,
]


# ---------------------------------------------------------------- formatting


def _fmt(value: float | None, spec: str = ".2f") -> str:
    return "—" if value is None else format(value, spec)


def _compared(result: EvalResult) -> str:
    against = result.settings.get("against", "base")
    if against == "base":
        return "compared with its base model (the adapter off)"
    return f"compared with `{against}` (another run's adapter on the same base model)"


def _source_line(result: EvalResult) -> str:
    s = result.source
    if s["kind"] == "held-out":
        run = s.get("run")
        if run is None or Path(run).resolve() == Path(result.settings["adapter"]).resolve():
            what = f"{s['records']} of the run's {s['held_out_records']} held-out records (never trained on)"
        else:  # a preference run: the held-out split of the SFT run it started from
            what = (
                f"{s['records']} of the {s['held_out_records']} held-out records of the run `{run}` (the evaluated "
                "run holds out preference pairs, not conversations; it started from that run)"
            )
        if not s["sha256_matches_run"]:
            what += " — WARNING: the dataset changed since training"
    else:
        what = f"the first {s['records']} records of a dataset file"
    return f"{what}, from `{s['path']}`"


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\r", "").replace("\n", "<br>")


def _md_table(head: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return lines + ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]


_CSS = (
    "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
    "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:top}"
    "th{background:#f4f4f4}.pass{color:#1a7f37;font-weight:bold}.fail{color:#cf222e;font-weight:bold}.info{color:#57606a;font-weight:bold}"
    ".replies td{white-space:pre-wrap;width:25%}.note{color:#555;font-size:.9em}"
)


def _html_table(head: list[str], rows: list[list[str]], cls: str = "") -> str:
    e = html.escape
    th = "".join(f"<th>{e(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{cls}"><tr>{th}</tr>{body}</table>'
