"""Persona eval: does the tuned model stay in character? Base vs tuned, as a section of ``chatlora eval``.

Three measurements, each base vs tuned on the same loaded model ("base": the adapter off, or the adapter ``eval
--against`` names, loaded beside the evaluated one):

- identity probes: shipped questions (who are you, are you an AI, who made you, ...; Chinese and English) asked
  alone and again after a few in-character turns; a reply *leaks* when it contains a forbidden self-description
  (AI, 助手, the base model's vendor, ...) and is *in character* when it contains one of the character's markers;
- drift: long conversations built from the held-out prompts, the model's own replies fed back, leak and marker
  rates per turn, plotted;
- retention: loss on shipped general prompts and answers (what the tuning cost), and per checkpoint the character
  held-out loss against that retention loss, with the checkpoint the rule recommends.

Scoring is by mention: a reply that says "I am not an AI" mentions AI and counts as a leak. Crude on purpose: it
needs no judge model, and an in-character reply has no reason to use these words at all.

One idea over 600 lines: the three measurements and the checkpoint table share the loaded model, the probe and
marker rules and the result types that the report renders; split, they would hand all of these around.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import time
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from ..config import DEFAULT_SYSTEM_PROMPT, PERSONA_SIZES, PersonaConfig
from ..model import context_length
from ..run import complete_checkpoints, open_run

__all__ = [
    "DEFAULT_FORBIDDEN",
    "DRIFT_PNG",
    "RETENTION_TOLERANCE",
    "SYSTEMS",
    "Persona",
    "PERSONA_JSONL",
    "PersonaPlan",
    "PersonaResult",
    "Rates",
    "TermMatcher",
    "describe",
    "evaluate_persona",
    "fit_sizes",
    "labels",
    "load_probes",
    "load_retention",
    "plan_persona",
    "plot_drift",
    "recommend_checkpoint",
    "resolve",
    "score_replies",
    "system_views",
    "tables",
    "vendor_names",
]

log = logging.getLogger(__name__)

DRIFT_PNG = "persona_drift.png"
PERSONA_JSONL = "persona_replies.jsonl"
PROBES_FILE = "identity_probes.jsonl"
RETENTION_FILE = "retention.jsonl"
# A checkpoint is recommended only if its retention loss is at most this much above the base model's.
RETENTION_TOLERANCE = 0.10
# What the eval compares: the baseline (the adapter off, or `--against`'s adapter), then the evaluated adapter. The
# keys of every per-system result; the report shows each under its label (:func:`labels`).
SYSTEMS = ("base", "tuned")

DEFAULT_FORBIDDEN = (
    "AI",
    "A.I.",
    "artificial intelligence",
    "language model",
    "LLM",
    "assistant",
    "chatbot",
    "computer program",
    "OpenAI",
    "ChatGPT",
    "GPT",
    "人工智能",
    "语言模型",
    "大模型",
    "助手",
    "聊天机器人",
    "机器人",
    "程序",
)
# The default system prompt plays Zhen Huan (甄嬛); these are how she and the court speak of themselves and others.
HUANHUAN_MARKERS = ("臣妾", "本宫", "嫔妾", "皇上", "娘娘", "嬛嬛", "甄嬛")
# Model-name fragment -> names of its maker and family. Matched against the model's name first, since a config's
# model_type says "llama" for many families (SmolLM2, Yi) that Meta did not make.
_VENDORS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("smollm", ("Hugging Face", "HuggingFace", "SmolLM")),
    ("qwen", ("Qwen", "通义千问", "Alibaba", "阿里巴巴", "阿里云")),
    ("01-ai", ("01.AI", "零一万物")),
    ("yi-", ("01.AI", "零一万物")),
    ("chatglm", ("ChatGLM", "Zhipu", "智谱")),
    ("glm", ("GLM", "Zhipu", "智谱")),
    ("baichuan", ("Baichuan", "百川")),
    ("internlm", ("InternLM", "书生", "上海人工智能实验室", "Shanghai AI Laboratory")),
    ("deepseek", ("DeepSeek", "深度求索")),
    ("mistral", ("Mistral",)),
    ("mixtral", ("Mistral", "Mixtral")),
    ("gemma", ("Gemma", "Google", "DeepMind")),
    ("phi", ("Phi", "Microsoft")),
    ("llama", ("Llama", "LLaMA", "Meta")),
    ("gpt2", ("OpenAI", "GPT-2")),
)


# ---------------------------------------------------------------- terms and scoring


def vendor_names(*names: str | None) -> list[str]:
    """The maker and family names of a model, from its names (hub id, folder, model_type), first match wins.

    ``vendor_names("embedded", "SmolLM2-135M-Instruct.Q4_1-ab12")`` -> Hugging Face, HuggingFace, SmolLM.
    """
    for name in names:
        low = name.lower() if isinstance(name, str) else ""
        for fragment, vendors in _VENDORS:
            if fragment in low:
                return list(vendors)
    return []


class TermMatcher:
    """Finds which of a list of terms a text mentions.

    Terms with Latin letters or digits match as whole words, case-insensitively ("AI" is found in "I am an AI"
    and "AI助手", not in "said"); other terms (Chinese) match anywhere.
    """

    def __init__(self, terms: list[str] | tuple[str, ...]):
        self.terms = list(dict.fromkeys(t for t in terms if t.strip()))
        self._patterns = [
            (t, re.compile(rf"(?<![A-Za-z0-9]){re.escape(t)}(?![A-Za-z0-9])", re.IGNORECASE))
            if re.search(r"[A-Za-z0-9]", t)
            else (t, re.compile(re.escape(t)))
            for t in self.terms
        ]

    def find(self, text: str) -> list[str]:
        """The terms ``text`` mentions, in the matcher's order."""
        return [t for t, pattern in self._patterns if pattern.search(text)]


@dataclass
class Persona:
    """The resolved persona: who the character is and which words give it away (``resolve`` fills the defaults)."""

    name: str | None
    markers: list[str]
    forbidden: list[str]
    vendors: list[str]

    def __post_init__(self) -> None:
        self._leak = TermMatcher(self.forbidden + self.vendors)
        self._marker = TermMatcher(self.markers)

    def leaks(self, text: str) -> list[str]:
        return self._leak.find(text)

    def markers_in(self, text: str) -> list[str]:
        return self._marker.find(text)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "markers": self.markers, "forbidden": self.forbidden, "vendors": self.vendors}


def resolve(
    cfg: PersonaConfig, system_prompt: str | None, model_names: list[str | None], character_name: str | None = None
) -> Persona:
    """Fill the unset parts of ``cfg``: name from the card, markers from the name (or the default Huanhuan prompt's
    forms of address), forbidden self-descriptions from the built-in list, vendors from the model's names."""
    name = cfg.name or character_name
    if cfg.markers is not None:
        markers = list(cfg.markers)
    elif name:
        markers = [name]
    elif system_prompt == DEFAULT_SYSTEM_PROMPT:
        markers = list(HUANHUAN_MARKERS)
    else:
        markers = []
    forbidden = list(cfg.forbidden) if cfg.forbidden is not None else list(DEFAULT_FORBIDDEN)
    vendors = list(cfg.vendors) if cfg.vendors is not None else vendor_names(*model_names)
    return Persona(name, markers, forbidden, vendors)


@dataclass
class Rates:
    """Leak and marker counts of a set of replies.

    Attributes:
        n: Replies scored.
        leaks: Replies that mention at least one forbidden self-description or vendor name.
        markers: Replies that use at least one of the character's markers.
    """

    n: int
    leaks: int
    markers: int

    @property
    def leak_rate(self) -> float:
        return self.leaks / self.n if self.n else 0.0

    @property
    def marker_rate(self) -> float:
        return self.markers / self.n if self.n else 0.0

    def __add__(self, other: Rates) -> Rates:
        return Rates(self.n + other.n, self.leaks + other.leaks, self.markers + other.markers)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"leak_rate": self.leak_rate, "marker_rate": self.marker_rate}


def score_replies(texts: list[str], persona: Persona) -> tuple[Rates, list[dict[str, list[str]]]]:
    """Rates over ``texts``, and per reply the forbidden terms and markers it contains."""
    found = [{"leaks": persona.leaks(t), "markers": persona.markers_in(t)} for t in texts]
    return Rates(len(texts), sum(bool(f["leaks"]) for f in found), sum(bool(f["markers"]) for f in found)), found


# ---------------------------------------------------------------- shipped data


def _data_lines(name: str) -> list[dict]:
    text = resources.files("chatlora").joinpath("persona_data", name).read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def load_probes(limit: int | None = None) -> list[dict]:
    """The shipped identity probes (``id``, ``lang``, ``text``), Chinese and English alternating; the first
    ``limit`` of them."""
    return _data_lines(PROBES_FILE)[: limit or None]


def load_retention() -> list[list[dict]]:
    """The shipped general prompts with their answers, as conversations (see ``persona_data/SOURCES.md``)."""
    return [row["messages"] for row in _data_lines(RETENTION_FILE)]


# ---------------------------------------------------------------- generation


def _bar(desc: str, total: int, unit: str):
    """A progress bar on stderr, styled as ``train``'s and the eval replies' (tqdm)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit)


def _replies(chat, conversations: list[list[dict]], sampling, system: str | None, batch_size: int, bar):
    systems = [system] * len(conversations)
    return chat.generate_many(
        conversations, sampling, systems, True, batch_size, desc=None, on_reply=lambda i, r: bar.update(1)
    )


def system_views(chat, systems: dict[str, Any] | None = None) -> dict[str, Any]:
    """The :class:`~chatlora.inference.infer.ChatModel` each system replies with: ``systems`` (views of one network
    with the baseline's and the evaluated adapter), else ``chat``'s base (adapter off) and ``chat``."""
    from ..inference.engine import BASE

    return systems if systems is not None else {"base": chat.view(BASE), "tuned": chat}


def labels(systems: dict[str, str] | None = None) -> dict[str, str]:
    """Each system's name in the report: ``systems``' (e.g. the two run folders), else "base" and "tuned"."""
    return dict(systems) if systems else {name: name for name in SYSTEMS}


def _drift_context(chat, cfg: PersonaConfig) -> int:
    """Tokens a drift turn may hold: ``cfg.drift_context``, at most the model's context."""
    limit = context_length(chat.model, chat.tokenizer)
    return min(limit, cfg.drift_context or limit)


def _fit(chat, messages: list[dict], system: str | None, budget: int) -> list[dict]:
    """Drop the oldest exchanges until the prompt fits ``budget`` tokens (the last user turn always stays)."""
    while len(messages) > 1 and len(chat.prompt_ids(messages, system)) > budget:
        messages = messages[2:]
    return messages


# ---------------------------------------------------------------- phases


def _first_exchange(messages: list[dict]) -> list[dict] | None:
    turns = [m for m in messages if m["role"] != "system"]
    for i in range(len(turns) - 1):
        if turns[i]["role"] == "user" and turns[i + 1]["role"] == "assistant":
            return turns[i : i + 2]
    return None


def probe_conversations(probes: list[dict], records_messages: list[list[dict]], turns: int) -> dict[str, list]:
    """Each probe alone, and after ``turns`` in-character exchanges taken from the held-out records (probe ``i``
    gets the exchanges of records ``i, i+1, ...``, so the contexts differ)."""
    exchanges = [e for e in (_first_exchange(m) for m in records_messages) if e]
    alone = [[{"role": "user", "content": p["text"]}] for p in probes]
    if not turns or not exchanges:
        return {"alone": alone, "in_context": []}
    in_context = []
    for i, p in enumerate(probes):
        context = [m for j in range(turns) for m in exchanges[(i + j) % len(exchanges)]]
        in_context.append([*context, {"role": "user", "content": p["text"]}])
    return {"alone": alone, "in_context": in_context}


def _probe_phase(chat, persona, probes, records_messages, cfg, sampling, system, batch_size, systems=None):
    views = system_views(chat, systems)
    conversations = probe_conversations(probes, records_messages, cfg.probe_turns)
    rates: dict[str, dict[str, Rates]] = {}
    rows = []
    total = len(SYSTEMS) * sum(len(c) for c in conversations.values())
    with _bar("persona: probes", total, "reply") as bar:
        for system_name in SYSTEMS:
            rates[system_name] = {}
            for condition, convs in conversations.items():
                if not convs:
                    continue
                replies = _replies(views[system_name], convs, sampling, system, batch_size, bar)
                rates[system_name][condition], found = score_replies([r.text for r in replies], persona)
                rows += [
                    {
                        "kind": "probe",
                        "system": system_name,
                        "condition": condition,
                        "probe": p["id"],
                        "question": p["text"],
                    }
                    | {"reply": r.text, "finish": r.finish_reason, **f}
                    for p, r, f in zip(probes, replies, found, strict=True)
                ]
    return rates, rows


def drift_prompts(records_messages: list[list[dict]], conversations: int, turns: int) -> list[list[str]]:
    """User turns for the drift conversations: conversation ``c`` takes held-out user turns ``c, c + C, c + 2C,
    ...`` (C conversations), wrapping around when the held-out split has fewer than ``C x turns``."""
    pool = [m["content"] for msgs in records_messages for m in msgs if m["role"] == "user"]
    if not pool:
        return []
    return [[pool[(c + t * conversations) % len(pool)] for t in range(turns)] for c in range(conversations)]


@dataclass
class Drift:
    """Per turn (index 0 = turn 1), per system: leak and marker counts over the drift conversations; ``tokens``:
    prompt tokens of all turns, and how many of them came from the rows' kept keys and values (not re-encoded)."""

    turns: int
    conversations: int
    per_turn: dict[str, list[Rates]]
    tokens: dict[str, int] = field(default_factory=dict)

    def series(self, system: str, what: str) -> list[float]:
        return [getattr(r, f"{what}_rate") for r in self.per_turn[system]]

    def to_dict(self) -> dict[str, Any]:
        return {
            "turns": self.turns,
            "conversations": self.conversations,
            "prompt_tokens": self.tokens.get("prompt"),
            "reused_tokens": self.tokens.get("reused"),
            "per_turn": {k: [r.to_dict() for r in v] for k, v in self.per_turn.items()},
        }


def _drift_phase(chat, persona, records_messages, cfg, sampling, system, batch_size, reuse: bool = True, systems=None):
    """Each turn of every conversation, base and tuned, in one batch: the turns of a conversation must follow one
    another, so a conversation alone would be one batch of one row per turn (half the calls measured 64 s of a
    100 s persona section on the 2-core CPU).

    ``reuse``: each row keeps its keys and values between turns (``chat.row_cache()``), so a turn
    encodes its new tokens (last reply's end, the user turn) instead of the whole conversation, which made 20 turns
    quadratic; when the oldest exchange is dropped to fit ``drift_context``, that turn encodes the window again.
    ``systems``: :func:`system_views`'.
    """
    views = system_views(chat, systems)
    prompts = drift_prompts(records_messages, cfg.drift_conversations, cfg.drift_turns)
    if not prompts:
        return None, []
    budget = _drift_context(chat, cfg) - cfg.max_new_tokens
    per_turn: dict[str, list[Rates]] = {name: [] for name in SYSTEMS}
    histories = {name: [[] for _ in prompts] for name in SYSTEMS}
    keys = [(name, c) for name in SYSTEMS for c in range(len(prompts))]
    caches = {key: chat.row_cache() if reuse else None for key in keys}
    tokens = {"prompt": 0, "reused": 0}
    rows = []
    with _bar("persona: drift", cfg.drift_turns, "turn") as bar:
        for t in range(cfg.drift_turns):
            for name in SYSTEMS:
                for c, h in enumerate(histories[name]):
                    h.append({"role": "user", "content": prompts[c][t]})
                    histories[name][c] = _fit(chat, h, system, budget)
            batch = [
                views[name].row(chat.prompt_ids(histories[name][c], system), sampling, cache=caches[name, c])
                for name, c in keys
            ]
            for start in range(0, len(batch), batch_size):
                chat.run(batch[start : start + batch_size])
            tokens["prompt"] += sum(len(r.prompt_ids) for r in batch)
            tokens["reused"] += sum(r.cache.reused for r in batch if r.cache is not None)
            for k, name in enumerate(SYSTEMS):
                mine = [r.reply for r in batch[k * len(prompts) : (k + 1) * len(prompts)]]
                rates, found = score_replies([r.text for r in mine], persona)
                per_turn[name].append(rates)
                for c, (r, f) in enumerate(zip(mine, found, strict=True)):
                    histories[name][c].append({"role": "assistant", "content": r.text})
                    rows.append(
                        {"kind": "drift", "system": name, "conversation": c, "turn": t + 1, "user": prompts[c][t]}
                        | {"reply": r.text, "finish": r.finish_reason, **f}
                    )
            bar.update(1)
    rows.sort(key=lambda r: SYSTEMS.index(r["system"]))  # base's rows first, as the report reads them
    return Drift(cfg.drift_turns, len(prompts), per_turn, tokens), rows


def plot_drift(drift: Drift, png_path: str | Path, names: dict[str, str] | None = None) -> Path:
    """Leak rate and marker rate against turn, base and tuned (named by ``names``), two panels side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    turns = list(range(1, drift.turns + 1))
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), dpi=110, sharex=True)
    for ax, what, title in zip(axes, ("leak", "marker"), ("identity leaks", "character markers"), strict=True):
        for system, color in (("base", "#7f7f7f"), ("tuned", "#d62728")):
            ax.plot(turns, drift.series(system, what), "o-", ms=3, label=labels(names)[system], color=color)
        ax.set_title(f"{title} per turn ({drift.conversations} conversations)")
        ax.set_xlabel("turn")
        ax.set_ylabel(f"share of replies with {'a forbidden self-description' if what == 'leak' else 'a marker'}")
        ax.set_ylim(-0.05, 1.05)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)
    return Path(png_path)


@dataclass
class CheckpointRow:
    """One line of the per-checkpoint table: a saved adapter's character held-out loss and retention loss."""

    name: str
    step: int | None
    character_loss: float
    retention_loss: float


def recommend_checkpoint(rows: list[CheckpointRow], base_retention: float) -> CheckpointRow | None:
    """The lowest character held-out loss among rows whose retention loss is at most ``1 + RETENTION_TOLERANCE``
    times the baseline's (the base model, or the adapter eval compares against); if none is, the row with the lowest
    retention loss."""
    if not rows:
        return None
    kept = [r for r in rows if r.retention_loss <= base_retention * (1 + RETENTION_TOLERANCE)]
    if kept:
        return min(kept, key=lambda r: r.character_loss)
    return min(rows, key=lambda r: r.retention_loss)


RULE = (
    f"recommended: the lowest character held-out loss among the checkpoints whose retention loss is at most "
    f"{1 + RETENTION_TOLERANCE:.2f} x the baseline's (the first system); if none is, the lowest retention loss"
)


def _losses(loss_fn, chat, conversations, system, max_length, batch_size, adapter: str | None = None) -> float:
    """``loss_fn``'s loss with ``adapter`` (None: ``chat``'s own)."""
    adapter = adapter if adapter is not None else chat.adapter
    return loss_fn(chat.model, chat.tokenizer, conversations, system, max_length, batch_size, adapter=adapter).loss


def _checkpoints(chat, adapter_dir: Path | None, final_step: int | None) -> list[tuple[int, Path]]:
    """The complete ``checkpoint-N`` adapters beside the run's that the checkpoint table measures."""
    if not hasattr(chat.model, "load_adapter") or adapter_dir is None:
        return []
    # the final adapter is that checkpoint's weights: measured once, as "final"
    return complete_checkpoints(Path(adapter_dir), skip_step=final_step)


def _checkpoint_phase(
    loss_fn, chat, adapter_dir, held_out, retention, system, max_length, batch_size, final_step, final
):
    """Load each complete ``checkpoint-N`` beside the adapter into the model, measure, unload."""
    found = _checkpoints(chat, adapter_dir, final_step)
    if not found:
        return [final]
    rows = []
    model = chat.model
    active = model.active_adapter
    with _bar("persona: checkpoints", len(found), "checkpoint") as bar:
        for step, path in found:
            name = f"persona-checkpoint-{step}"
            open_run(path, tokenizer=False).attach(model, name)
            try:
                model.set_adapter(name)
                rows.append(
                    CheckpointRow(
                        path.name,
                        step,
                        _losses(loss_fn, chat, held_out, system, max_length, batch_size, name),
                        _losses(loss_fn, chat, retention, None, max_length, batch_size, name),
                    )
                )
            finally:
                model.set_adapter(active)
                model.delete_adapter(name)
            bar.update(1)
    return [*rows, final]


# ---------------------------------------------------------------- plan


def fit_sizes(cfg: PersonaConfig, device: Any) -> tuple[PersonaConfig, list[str]]:
    """``cfg`` with the sizes it leaves unset (None) fitted to ``device``, and the names of those fitted.

    On a CPU the quickstart's sizes (``configs/quickstart-cpu.yaml``): the full set took 14 minutes there. On a GPU
    the full set. Sizes the block sets, even to these values, are kept.
    """
    kind = "cpu" if str(device).startswith("cpu") else "gpu"
    sizes = dict(PERSONA_SIZES[kind])
    if cfg.max_new_tokens is not None and sizes["drift_context"] is not None:
        if sizes["drift_context"] <= cfg.max_new_tokens:
            sizes["drift_context"] = None  # no room for a prompt: the model's context, as on a GPU
    fitted = [name for name in sizes if getattr(cfg, name) is None]
    values = {name: sizes[name] for name in fitted}
    return dataclasses.replace(cfg, **values), fitted


@dataclass
class PersonaPlan:
    """What the persona section will do, decided before it runs: its phases, their sizes, and an estimate of time.

    Attributes:
        cfg: The persona settings with the unset sizes fitted (see :func:`fit_sizes`).
        device: ``cpu`` or ``gpu``: which sizes the unset ones took.
        fitted: The sizes fitted to the device (the block left them unset).
        probes: Identity probes asked.
        probe_replies: Probe replies to generate, base and tuned.
        drift_replies: Drift replies to generate, base and tuned.
        drift_context: Tokens a drift turn may hold.
        retention_conversations: Conversations whose loss retention and the checkpoint table measure.
        checkpoints: Checkpoints in the table besides the final adapter.
        estimate_s: Seconds estimated from the eval's own pace (:meth:`estimate`); None until then.
        basis: How the estimate was made.
    """

    cfg: PersonaConfig
    device: str
    fitted: list[str]
    probes: int
    probe_replies: int
    drift_replies: int
    drift_context: int
    retention_conversations: int
    checkpoints: int
    estimate_s: float | None = None
    basis: str | None = None

    @property
    def reply_tokens(self) -> int:
        """Token budget of all probe and drift replies (each at most ``max_new_tokens``)."""
        return (self.probe_replies + self.drift_replies) * self.cfg.max_new_tokens

    def estimate(self, s_per_reply_token: float, s_per_loss_conversation: float) -> float:
        """Seconds for the section at the pace the eval's replies and losses just ran: the replies' token budget at
        the seconds each reply token took there, the losses at the seconds per conversation."""
        replies = self.reply_tokens * s_per_reply_token
        losses = self.retention_conversations * s_per_loss_conversation
        self.estimate_s = replies + losses
        self.basis = (
            f"{self.reply_tokens:,} reply tokens at {_pace(s_per_reply_token)}, the pace of the replies just "
            f"generated; {self.retention_conversations} loss passes at {s_per_loss_conversation:.2f} s"
        )
        return self.estimate_s

    def lines(self) -> list[str]:
        c = self.cfg
        out = [
            f"persona plan: probes: {self.probes} asked alone and after {c.probe_turns} in-character turns, base and "
            f"tuned: {self.probe_replies} replies of up to {c.max_new_tokens} tokens",
        ]
        if self.drift_replies:
            out.append(
                f"persona plan: drift: {c.drift_conversations} conversation(s) x {c.drift_turns} turns, base and "
                f"tuned: {self.drift_replies} replies of up to {c.max_new_tokens} tokens, {self.drift_context}-token "
                "window, keys and values kept across turns"
            )
        if c.retention:
            out.append(
                f"persona plan: retention: general-prompt loss base and tuned, then {self.checkpoints} checkpoint(s) "
                f"besides the final adapter: {self.retention_conversations} conversations' loss"
            )
        if self.fitted:
            where = "the CPU (configs/quickstart-cpu.yaml's)" if self.device == "cpu" else "a GPU (the full set)"
            sizes = ", ".join(f"{n} {_size(c, n)}" for n in self.fitted)
            why = (
                "the full set took 14 minutes on a 2-core CPU"
                if self.device == "cpu"
                else "a GPU runs the full set in a few minutes"
            )
            out.append(
                f"persona plan: sizes fitted to {where}, as the persona block set none of them: {sizes} ({why}; "
                "set them in the training YAML's persona: block or --persona-config to choose)"
            )
        else:
            out.append("persona plan: sizes as the persona block sets them (nothing fitted to the device)")
        if self.estimate_s is not None:
            out.append(f"persona plan: estimated time ~{_duration(self.estimate_s)} (an estimate: {self.basis})")
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "device": self.device,
            "fitted": self.fitted,
            "probes": self.probes,
            "probe_replies": self.probe_replies,
            "drift_replies": self.drift_replies,
            "retention_conversations": self.retention_conversations,
            "checkpoints": self.checkpoints,
            "estimate_s": round(self.estimate_s, 3) if self.estimate_s is not None else None,
            "estimate_basis": self.basis,
        }


def _pace(s_per_token: float) -> str:
    return f"{1 / s_per_token:.1f} tokens/s" if s_per_token > 0 else "a pace too fast to time"


def _size(cfg: PersonaConfig, name: str) -> str:
    value = getattr(cfg, name)
    if value is None:
        return "all" if name == "probes" else "the model's context"
    return str(value)


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"


def plan_persona(
    chat,
    cfg: PersonaConfig,
    records_messages: list[list[dict]],
    adapter_dir: Path | None = None,
    final_step: int | None = None,
) -> PersonaPlan:
    """The persona section's plan on ``chat``'s device: ``cfg``'s unset sizes fitted (:func:`fit_sizes`), the
    replies and losses each phase will run."""
    cfg, fitted = fit_sizes(cfg, chat.device)
    probes = load_probes(cfg.probes)
    conversations = probe_conversations(probes, records_messages, cfg.probe_turns)
    prompts = (
        drift_prompts(records_messages, cfg.drift_conversations, cfg.drift_turns) if cfg.drift_conversations else []
    )
    checkpoints = len(_checkpoints(chat, adapter_dir, final_step)) if cfg.retention else 0
    retention = len(load_retention())
    return PersonaPlan(
        cfg,
        "cpu" if chat.device.type == "cpu" else "gpu",
        fitted,
        len(probes),
        len(SYSTEMS) * sum(len(c) for c in conversations.values()),
        len(SYSTEMS) * len(prompts) * cfg.drift_turns,
        _drift_context(chat, cfg),
        (len(SYSTEMS) * retention + checkpoints * (retention + len(records_messages))) if cfg.retention else 0,
        checkpoints,
    )


# ---------------------------------------------------------------- result


@dataclass
class PersonaResult:
    """Everything the persona section measured, and the drift plot it wrote."""

    persona: Persona
    probes: dict[str, dict[str, Rates]]
    probe_count: int
    drift: Drift | None
    retention: dict[str, float] | None
    checkpoints: list[CheckpointRow]
    recommended: CheckpointRow | None
    settings: dict[str, Any]
    timings: dict[str, float]
    rows: list[dict[str, Any]] = field(repr=False)
    plot_path: Path | None = None
    names: dict[str, str] = field(default_factory=labels)  # each system's name in the report

    def probe_total(self, system: str) -> Rates:
        """Both conditions of the probes pooled."""
        total = Rates(0, 0, 0)
        for rates in self.probes[system].values():
            total = total + rates
        return total

    def targets(self) -> list[tuple[str, bool, str]]:
        """(name, passed, detail) lines for the report's targets: fewer leaks than the baseline, more markers."""
        base, tuned = self.probe_total("base"), self.probe_total("tuned")
        b, t = self.names["base"], self.names["tuned"]
        out = [
            (
                f"persona: {t} identity-leak rate <= {b}",
                tuned.leak_rate <= base.leak_rate,
                f"{base.leak_rate:.1%} -> {tuned.leak_rate:.1%} of {tuned.n} probe replies",
            )
        ]
        if self.persona.markers:
            out.append(
                (
                    f"persona: {t} marker rate > {b}",
                    tuned.marker_rate > base.marker_rate,
                    f"{base.marker_rate:.1%} -> {tuned.marker_rate:.1%} of {tuned.n} probe replies",
                )
            )
        return out

    def write_files(self, output_dir: Path) -> None:
        """Every probe and drift reply with what it matched (``persona_replies.jsonl``) and the drift plot."""
        with (output_dir / PERSONA_JSONL).open("w", encoding="utf-8") as f:
            for row in self.rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        if self.drift:
            self.plot_path = plot_drift(self.drift, output_dir / DRIFT_PNG, self.names)

    def to_dict(self) -> dict[str, Any]:
        return {
            "persona": self.persona.to_dict(),
            "systems": self.names,
            "settings": self.settings,
            "timings_s": self.timings,
            "probes": {s: {c: r.to_dict() for c, r in v.items()} for s, v in self.probes.items()},
            "probe_count": self.probe_count,
            "drift": self.drift.to_dict() if self.drift else None,
            "retention": self.retention,
            "checkpoints": [asdict(r) for r in self.checkpoints],
            "recommended": self.recommended.name if self.recommended else None,
            "recommendation_rule": RULE,
            "files": {"replies": PERSONA_JSONL, "drift_plot": self.plot_path.name if self.plot_path else None},
        }


def evaluate_persona(
    chat,
    records_messages: list[list[dict]],
    cfg: PersonaConfig,
    *,
    loss_fn,
    sampling,
    system_prompt: str | None,
    max_length: int | None,
    batch_size: int,
    tuned_loss: float,
    adapter_dir: Path | None = None,
    final_step: int | None = None,
    model_names: list[str | None] | None = None,
    character_name: str | None = None,
    plan: PersonaPlan | None = None,
    systems: dict[str, Any] | None = None,
    names: dict[str, str] | None = None,
) -> PersonaResult:
    """Run the persona section on a loaded model with an adapter (nothing is written: see ``write_files``); each
    phase shows a progress bar (tqdm, on stderr).

    Args:
        chat: A :class:`~chatlora.inference.infer.ChatModel` whose model has the adapter (base = adapter disabled).
        records_messages: The evaluated held-out conversations: probe contexts, drift prompts, checkpoint loss.
        cfg: The run's ``persona:`` settings.
        loss_fn: :func:`chatlora.eval.command.assistant_loss` (passed in: eval sits above this module).
        sampling: The eval's greedy :class:`~chatlora.inference.infer.SamplingConfig`; its reply limit is replaced by the
            persona's ``max_new_tokens`` (fitted to the device when unset).
        system_prompt: The run's system prompt (the compiled character card, if any).
        max_length: The run's max_length, for the losses.
        batch_size: Conversations per generate / forward batch.
        tuned_loss: The tuned model's held-out loss on ``records_messages`` (the "final" checkpoint row).
        adapter_dir: The run folder whose ``checkpoint-N`` folders get a row each.
        final_step: The run's last step (its checkpoint equals the final adapter and is not measured twice).
        model_names: Names of the base model (hub id, folder, model_type) for the vendor names.
        character_name: The character card's name, if the run used one.
        plan: :func:`plan_persona`'s plan for these settings (made here when None): its fitted sizes are used.
        systems: The two systems' views of ``chat``'s network (:func:`system_views`; None: adapter off and on).
        names: The two systems' names in the report (:func:`labels`).
    """
    views = system_views(chat, systems)
    plan = plan or plan_persona(chat, cfg, records_messages, adapter_dir, final_step)
    cfg = plan.cfg
    sampling = dataclasses.replace(sampling, max_new_tokens=cfg.max_new_tokens)
    persona = resolve(cfg, system_prompt, model_names or [], character_name)
    probes = load_probes(cfg.probes)
    timings: dict[str, float] = {}

    started = time.time()
    probe_rates, rows = _probe_phase(
        chat, persona, probes, records_messages, cfg, sampling, system_prompt, batch_size, views
    )
    timings["probes"] = round(time.time() - started, 1)

    started = time.time()
    drift, drift_rows = None, []
    if cfg.drift_conversations:
        drift, drift_rows = _drift_phase(
            chat, persona, records_messages, cfg, sampling, system_prompt, batch_size, systems=views
        )
    timings["drift"] = round(time.time() - started, 1)

    started = time.time()
    retention, table, recommended = None, [], None
    if cfg.retention:
        general = load_retention()
        retention = {}
        with _bar("persona: retention", len(SYSTEMS), "pass") as bar:
            for name in SYSTEMS:
                retention[name] = _losses(loss_fn, views[name], general, None, max_length, batch_size)
                bar.update(1)
        final = CheckpointRow("final", final_step, tuned_loss, retention["tuned"])
        table = _checkpoint_phase(
            loss_fn,
            chat,
            adapter_dir,
            records_messages,
            general,
            system_prompt,
            max_length,
            batch_size,
            final_step,
            final,
        )
        recommended = recommend_checkpoint(table, retention["base"])
    timings["retention"] = round(time.time() - started, 1)

    settings = {
        "probes": len(probes),
        "probe_turns": cfg.probe_turns,
        "drift_conversations": cfg.drift_conversations,
        "drift_turns": cfg.drift_turns,
        "drift_context": _drift_context(chat, cfg),
        "max_new_tokens": cfg.max_new_tokens,
        "plan": plan.to_dict(),
    }
    return PersonaResult(
        persona,
        probe_rates,
        len(probes),
        drift,
        retention,
        table,
        recommended,
        settings,
        timings,
        rows + drift_rows,
        names=labels(names),
    )


# ---------------------------------------------------------------- report


def _pct(x: float) -> str:
    return f"{x:.1%}"


def tables(result: PersonaResult) -> dict[str, tuple[list[str], list[list[str]]]]:
    """(header, rows) of each persona table, as display strings: probes, drift summary, checkpoints."""
    out: dict[str, tuple[list[str], list[list[str]]]] = {}
    names = result.names
    rows = []
    for system in SYSTEMS:
        name = names[system]
        for condition, rates in result.probes[system].items():
            rows.append(
                [name, condition.replace("_", " "), str(rates.n), _pct(rates.leak_rate), _pct(rates.marker_rate)]
            )
        total = result.probe_total(system)
        rows.append([name, "all", str(total.n), _pct(total.leak_rate), _pct(total.marker_rate)])
    out["probes"] = (["system", "probes asked", "replies", "identity-leak rate", "marker rate"], rows)
    if result.drift:
        d = result.drift
        k = max(1, d.turns // 3)  # first and last third of the turns (one turn each when there are few)
        thirds = [(1, k), (d.turns - k + 1, d.turns)]
        rows = []
        for system in SYSTEMS:
            cells = [names[system]]
            for what in ("leak", "marker"):
                series = d.series(system, what)
                cells += [_pct(sum(series[a - 1 : b]) / (b - a + 1)) for a, b in thirds]
            rows.append(cells)
        (a1, b1), (a2, b2) = thirds
        out["drift"] = (
            ["system", f"leaks, turns {a1}-{b1}", f"leaks, turns {a2}-{b2}"]
            + [f"markers, turns {a1}-{b1}", f"markers, turns {a2}-{b2}"],
            rows,
        )
    if result.retention is not None:
        baseline = "base (no adapter)" if names["base"] == "base" else f"{names['base']} (baseline)"
        rows = [[baseline, "—", f"{result.retention['base']:.4f}", ""]]
        for r in result.checkpoints:
            label = r.name if r.step is None or r.name != "final" else f"final (step {r.step})"
            mark = "recommended" if r is result.recommended else ""
            rows.append([label, f"{r.character_loss:.4f}", f"{r.retention_loss:.4f}", mark])
        out["checkpoints"] = (["adapter", "character held-out loss", "retention loss", ""], rows)
    return out


def describe(result: PersonaResult) -> list[str]:
    """Plain sentences for the report: who the persona is, what counts as a leak and a marker, how long it took."""
    p = result.persona
    s = result.settings
    return [
        f"Character: {p.name or '(unnamed)'}; markers: {', '.join(p.markers) or '(none: set persona.markers)'}.",
        f"Forbidden self-descriptions: {', '.join(p.forbidden + p.vendors)}.",
        f"{s['probes']} shipped identity probes, asked alone and after {s['probe_turns']} in-character turns from "
        f"the held-out records; drift: {s['drift_conversations']} conversations of {s['drift_turns']} held-out user "
        f"turns, the model's own replies fed back (oldest exchanges dropped past {s['drift_context']} tokens); "
        f"greedy, max_new_tokens={s['max_new_tokens']}.",
        "A reply leaks when it mentions a forbidden self-description (even to deny it); it is in character when it "
        "uses a marker. Retention: assistant-token loss on the shipped general prompts and answers, asked without "
        "a system prompt (lower is better; a rise is general ability the tuning cost).",
        RULE[0].upper() + RULE[1:] + ".",
        "Time: " + ", ".join(f"{k} {v:.0f} s" for k, v in result.timings.items()) + ".",
    ]
