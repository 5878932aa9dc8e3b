"""Dataset mixing: several sources in one SFT run, each seen ``weight`` times per epoch.

The first source is the run's data: its held-out split is the run's (what ``chatlora eval`` measures), and only
its training records are weighted with it. Every other source trains whole. A weight of 3 repeats each of a
source's records three times; 0.5 takes a seeded half of them; so a source of ``n`` records contributes
``floor(weight) * n + round(frac(weight) * n)`` examples to an epoch.

``retention`` names the general prompts shipped with chatlora (``persona_data/retention.jsonl``), the set the
eval's retention loss is measured on: mixed in, it holds general ability, but that eval number is then measured
on trained text.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from .data import load_records, parse_columns
from .errors import ConfigError

__all__ = ["RETENTION", "Mix", "Source", "mix_in", "resolve_path", "sources", "weighted"]

RETENTION = "retention"  # the shipped retention set, by name


@dataclass(frozen=True)
class Source:
    path: str
    format: str = "auto"
    columns: str | None = None
    weight: float = 1.0


def resolve_path(path: str) -> str:
    """A source's file: ``retention`` is the shipped retention set, anything else a path."""
    if path == RETENTION:
        return str(resources.files("chatlora").joinpath("persona_data", "retention.jsonl"))
    return path


def sources(cfg) -> list[Source]:
    """The run's sources: ``cfg.datasets`` (the first is ``cfg.data``), or ``cfg.data`` alone."""
    if not cfg.datasets:
        return [Source(cfg.data, cfg.format, cfg.columns)]
    return [
        Source(d["path"], d.get("format") or "auto", d.get("columns"), float(d.get("weight", 1.0)))
        for d in cfg.datasets
    ]


def weighted(items: list, weight: float, seed: int) -> list:
    """``items`` repeated ``floor(weight)`` times plus a seeded sample of ``frac(weight)`` of them."""
    whole = math.floor(weight)
    extra = round((weight - whole) * len(items))
    return items * whole + random.Random(seed).sample(items, extra)


@dataclass
class Mix:
    """What each source gave the training set: ``(source, records read, training records, examples trained)``."""

    rows: list[tuple[Source, int, int, int]]

    def line(self) -> str:
        parts = [f"{s.path} x{s.weight:g}: {train} training records -> {used}" for s, _, train, used in self.rows]
        return f"mix: {len(self.rows)} sources, {sum(r[3] for r in self.rows)} examples per epoch: " + "; ".join(parts)

    def to_dict(self) -> list[dict[str, Any]]:
        from .runcard import file_sha256

        return [
            {
                "path": s.path,
                "file": str(Path(resolve_path(s.path)).resolve()),
                "sha256": file_sha256(resolve_path(s.path)),
                "format": s.format,
                "columns": s.columns,
                "weight": s.weight,
                "records": n,
                "train_records": train,
                "examples_per_epoch": used,
            }
            for s, n, train, used in self.rows
        ]


def mix_in(cfg, primary_records: int, primary_train: list, encode) -> tuple[list, Mix]:
    """The training examples of every source, weighted: ``primary_train`` (the first source's encoded training
    examples, from ``primary_records`` records) and each other source read, validated and encoded with ``encode``
    (``encode(records, source_path) -> examples``). Seeded with the run's data order seed."""
    srcs = sources(cfg)
    examples = weighted(primary_train, srcs[0].weight, cfg.order_seed)
    rows = [(srcs[0], primary_records, len(primary_train), len(examples))]
    for i, src in enumerate(srcs[1:], 1):
        path = resolve_path(src.path)
        records = load_records(path, src.format, parse_columns(src.columns))
        encoded = encode(records, path)
        used = weighted(encoded, src.weight, cfg.order_seed + i)
        examples += used
        rows.append((src, len(records), len(encoded), len(used)))
    if not examples:
        raise ConfigError("every --data-weights is 0: nothing would be trained")
    return examples, Mix(rows)
