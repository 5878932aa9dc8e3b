"""Padding-free batches: conversations packed into rows, attention kept per conversation.

Each row holds several whole conversations back to back; ``position_ids`` restart at 0 at each one. With no
``attention_mask``, transformers (>= 4.53, ``masking_utils.find_packed_sequence_indices``) reads the restarts as
sequence boundaries and builds a block-diagonal causal mask, so no token attends across conversations. The first
label of each conversation is ``-100`` so the last token of one conversation is never trained to predict the next.

Micro-batches are either a fixed number per epoch (:func:`plan_steps`: as many optimizer steps per epoch as the
unpacked recipe, so batch size, epochs and learning-rate schedule keep their meaning) or sized by a token budget
(:func:`plan_batches`, ``tokens_per_batch``); either way every step does about the same work whatever the
conversation lengths.
"""

from __future__ import annotations

import random
from typing import Any

import torch

from .template import IGNORE_INDEX

__all__ = [
    "PackedDataset",
    "collate_buckets",
    "collate_packed",
    "pack_rows",
    "plan_batches",
    "plan_buckets",
    "plan_steps",
]


def pack_rows(lengths: list[int], row_length: int) -> list[list[int]]:
    """First-fit-decreasing bin packing of example indices into rows of at most ``row_length`` tokens."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    rows: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = min(lengths[i], row_length)
        for r, free in enumerate(room):
            if free >= n:
                rows[r].append(i)
                room[r] -= n
                break
        else:
            rows.append([i])
            room.append(row_length - n)
    return rows


def plan_batches(lengths: list[int], row_length: int, tokens_per_batch: int, seed: int = 0) -> list[list[list[int]]]:
    """Micro-batches of packed rows: each a list of rows (lists of example indices), ``tokens_per_batch // row_length``
    rows at most. Rows are shuffled with ``seed`` so a micro-batch mixes long and short conversations."""
    rows = pack_rows(lengths, row_length)
    random.Random(seed).shuffle(rows)
    per_batch = max(1, tokens_per_batch // row_length)
    return [rows[i : i + per_batch] for i in range(0, len(rows), per_batch)]


def plan_steps(lengths: list[int], row_length: int, n_batches: int, seed: int = 0) -> list[list[list[int]]]:
    """Exactly ``n_batches`` micro-batches of packed rows (fewer only with fewer conversations than that).

    Rows are packed over the whole dataset (first-fit decreasing, nearly full), shuffled with ``seed`` and spread
    as evenly as possible (row counts differ by at most one). When there are fewer rows than micro-batches (short
    conversations, small batches), the conversations are shuffled into ``n_batches`` groups of near-equal count
    first, and each group is packed into its own rows.

    With ``n_batches = ceil(conversations / (batch_size x grad_accum)) x grad_accum``, an epoch has as many optimizer
    steps as without packing and each step holds, on average, the tokens of batch_size x grad_accum conversations.
    """
    rng = random.Random(seed)
    rows = pack_rows(lengths, row_length)
    n = max(1, min(n_batches, len(lengths)))
    if len(rows) < n:
        order = list(range(len(lengths)))
        rng.shuffle(order)
        return [
            [[group[i] for i in row] for row in pack_rows([lengths[i] for i in group], row_length)]
            for group in _spread(order, n)
        ]
    rng.shuffle(rows)
    return _spread(rows, n)


def _spread(items: list, n: int) -> list[list]:
    """``items`` cut into ``n`` consecutive runs whose lengths differ by at most one."""
    size, extra = divmod(len(items), n)
    out, at = [], 0
    for b in range(n):
        take = size + (b < extra)
        out.append(items[at : at + take])
        at += take
    return out


def plan_buckets(lengths: list[int], tokens_per_batch: int, seed: int = 0) -> list[list[list[int]]]:
    """Micro-batches of conversations of near-equal length, one per row, ``rows x longest <= tokens_per_batch``.

    The alternative to packing: rows are right-padded (little padding, as neighbours in length order are alike)
    and need no attention mask at all, because with right padding a causal mask alone keeps every real token
    from seeing padding, so attention runs on the fused causal kernels (flash, native GQA).
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches: list[list[list[int]]] = []
    group: list[int] = []
    for i in order:
        if group and (len(group) + 1) * lengths[i] > tokens_per_batch:
            batches.append([[j] for j in group])
            group = []
        group.append(i)
    if group:
        batches.append([[j] for j in group])
    random.Random(seed).shuffle(batches)
    return batches


def collate_buckets(
    examples: list[list[dict[str, list[int]]]], pad_id: int, label_index: bool = False
) -> dict[str, Any]:
    """Rows of one example each -> right-padded ``input_ids`` and ``labels``; no mask (see :func:`plan_buckets`)."""
    flat = [ex for row in examples for ex in row]
    width = max(len(ex["input_ids"]) for ex in flat)
    ids = torch.full((len(flat), width), pad_id, dtype=torch.long)
    labels = torch.full((len(flat), width), IGNORE_INDEX, dtype=torch.long)
    for r, ex in enumerate(flat):
        n = len(ex["input_ids"])
        ids[r, :n] = torch.tensor(ex["input_ids"])
        labels[r, :n] = torch.tensor(ex["labels"])
    out = {"input_ids": ids, "labels": labels, "num_real_tokens": sum(len(ex["input_ids"]) for ex in flat)}
    if label_index:
        out["label_index"] = (labels[:, 1:].reshape(-1) != IGNORE_INDEX).nonzero().squeeze(1)
    return out


def collate_packed(
    examples: list[list[dict[str, list[int]]]], pad_id: int, row_length: int | None = None, label_index: bool = False
) -> dict[str, Any]:
    """Rows of examples -> ``input_ids``, ``labels``, ``position_ids`` (no attention mask) of shape [rows, width].

    Width is the longest row, or ``row_length`` when given (fixed shapes). Padding at a row's end is its own
    "sequence" (positions restart) and is never a label, so it changes nothing that is trained. ``num_real_tokens``
    (an int) counts the conversations' tokens. With ``label_index``, also the flat positions of
    ``labels[:, 1:]`` that carry a label, computed here on the CPU so the loss needs no device sync to find them.
    """
    widths = [sum(len(ex["input_ids"]) for ex in row) for row in examples]
    width = row_length or max(widths)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    pos = torch.zeros((len(examples), width), dtype=torch.long)
    for r, row in enumerate(examples):
        at = 0
        for ex in row:
            n = min(len(ex["input_ids"]), width - at)
            if n <= 0:
                break
            ids[r, at : at + n] = torch.tensor(ex["input_ids"][:n])
            lab = torch.tensor(ex["labels"][:n])
            lab[0] = IGNORE_INDEX  # the previous conversation's last token must not predict this one's first
            labels[r, at : at + n] = lab
            pos[r, at : at + n] = torch.arange(n)
            at += n
        if at < width:
            pos[r, at:] = torch.arange(width - at)
    out = {
        "input_ids": ids,
        "labels": labels,
        "position_ids": pos,
        "num_real_tokens": sum(min(w, width) for w in widths),
    }
    if label_index:
        out["label_index"] = (labels[:, 1:].reshape(-1) != IGNORE_INDEX).nonzero().squeeze(1)
    return out


class PackedDataset(torch.utils.data.Dataset):
    """One item = one packed micro-batch (use with ``per_device_train_batch_size=1`` and :func:`collate_packed`).

    Give either ``n_batches`` (micro-batches per epoch, :func:`plan_steps`) or ``tokens_per_batch`` (a token budget
    per micro-batch, :func:`plan_batches`; the only choice for the ``bucket`` strategy).
    """

    def __init__(
        self,
        examples: list[dict],
        row_length: int,
        tokens_per_batch: int | None = None,
        seed: int = 0,
        strategy: str = "pack",
        n_batches: int | None = None,
    ):
        lengths = [len(ex["input_ids"]) for ex in examples]
        if strategy not in ("pack", "bucket"):
            raise ValueError(f"packing strategy must be 'pack' or 'bucket', not {strategy!r}")
        if (tokens_per_batch is None) == (n_batches is None):
            raise ValueError("give exactly one of tokens_per_batch and n_batches")
        if strategy == "bucket":
            if tokens_per_batch is None:
                raise ValueError("the bucket strategy needs tokens_per_batch")
            plan = plan_buckets(lengths, tokens_per_batch, seed)
        elif n_batches is not None:
            plan = plan_steps(lengths, row_length, n_batches, seed)
        else:
            plan = plan_batches(lengths, row_length, tokens_per_batch, seed)
        self.plan = plan
        self.batches = [[[examples[i] for i in row] for row in batch] for batch in plan]
        self.row_length, self.strategy = row_length, strategy

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> list[list[dict]]:
        return self.batches[i]
