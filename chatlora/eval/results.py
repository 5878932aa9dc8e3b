"""What an eval measured, shared by the eval that fills it and the report that renders it (neither imports the other).

:class:`EvalResult` holds the measurements (held-out loss, reply metrics, their significance, the targets, the
persona section); the file names are those the eval writes into its output folder.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .persona import PersonaResult

__all__ = [
    "LOSS_PNG",
    "METRICS_JSON",
    "REPLIES_JSONL",
    "REPORT_HTML",
    "REPORT_MD",
    "EvalResult",
    "LossResult",
    "ReplyMetrics",
    "Significance",
    "Target",
]

REPORT_MD = "report.md"
REPORT_HTML = "report.html"
METRICS_JSON = "metrics.json"
REPLIES_JSONL = "replies.jsonl"
LOSS_PNG = "loss.png"


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


@dataclass
class Significance:
    """Paired bootstrap test of tuned against base on one corpus metric (Koehn 2004, as sacrebleu's PairedTest
    runs it): the records are resampled with replacement and both systems are scored on each resample.

    Attributes:
        metric: ``chrF`` or ``BLEU``.
        base: The base model's score on all records.
        tuned: The tuned model's score on all records.
        p_value: Two-sided: how often a difference at least this large would come from resampling if the systems
            were equally good. 1.0 when the scores are equal.
        base_ci: Half-width of the base score's 95 % interval over the resamples.
        tuned_ci: The same for the tuned score.
        samples: Number of resamples.
    """

    metric: str
    base: float
    tuned: float
    p_value: float
    base_ci: float
    tuned_ci: float
    samples: int

    @property
    def difference(self) -> float:
        return self.tuned - self.base

    def describe(self) -> str:
        """E.g. ``-0.66, p = 0.018``."""
        return f"{self.difference:+.2f}, p = {self.p_value:.3f}"


@dataclass
class LossResult:
    """Token-weighted mean cross-entropy over the assistant tokens (labels != -100) of a set of conversations."""

    loss: float
    perplexity: float | None
    tokens: int


@dataclass
class Target:
    """One line of the report's targets: PASS, FAIL, or INFO for a measurement that decides nothing (``passed``
    None: a difference that is not significant is neither a pass nor a failure)."""

    name: str
    passed: bool | None
    detail: str

    @property
    def verdict(self) -> str:
        return "INFO" if self.passed is None else "PASS" if self.passed else "FAIL"


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
    significance: dict[str, Significance] = field(default_factory=dict)
    plot_path: Path | None = None
    persona: PersonaResult | None = None
    # each system's name in the report: "base" and "tuned", or the two run folders of an eval --against a run
    names: dict[str, str] = field(default_factory=lambda: {"base": "base", "tuned": "tuned"})

    @property
    def loss_ratio(self) -> float:
        """Tuned / base held-out loss."""
        return self.loss["tuned"].loss / self.loss["base"].loss if self.loss["base"].loss else math.inf

    def to_dict(self) -> dict[str, Any]:
        return {
            "systems": self.names,
            "source": self.source,
            "settings": self.settings,
            "loss": {k: asdict(v) for k, v in self.loss.items()} | {"ratio": self.loss_ratio},
            "replies": {k: asdict(v) for k, v in self.replies.items()},
            "significance": {k: asdict(v) | {"difference": v.difference} for k, v in self.significance.items()},
            "targets": [asdict(t) for t in self.targets],
            "persona": self.persona.to_dict() if self.persona else None,
            "files": {
                "report_md": REPORT_MD,
                "report_html": REPORT_HTML,
                "replies": REPLIES_JSONL,
                "loss_plot": self.plot_path.name if self.plot_path else None,
            },
        }
