"""Retention loss on the shipped retention set's two halves, for the base model and each adapter given.

    python bench/retention_split.py RUN [RUN ...]

The first 12 prompts (A) are the half a mixing run may train on (``--data A.jsonl``: ``head -12`` of
``chatlora/persona_data/retention.jsonl``); the last 12 (B) stay a measurement. Each loss is computed as the eval's
persona section computes retention: no system prompt, the replies' tokens only. The adapters share one base model
(the first run's); bench/NOTES.md, issue 23, has the figures.
"""

from __future__ import annotations

import json
import sys

from chatlora.eval.command import assistant_loss
from chatlora.eval.persona import load_retention
from chatlora.inference.infer import BASE, ChatModel
from chatlora.run import open_run


def main(runs: list[str]) -> dict[str, dict[str, float]]:
    conversations = load_retention()
    halves = {"A (first 12)": conversations[:12], "B (last 12)": conversations[12:], "all": conversations}
    chat = ChatModel.load(runs[0], device="cpu", dtype="fp32")
    names = {BASE: "base", "default": runs[0]}
    for i, run in enumerate(runs[1:], 1):
        open_run(run).attach(chat.model, f"a{i}")
        names[f"a{i}"] = run
    table = {}
    for adapter, name in names.items():
        table[name] = {
            half: round(assistant_loss(chat.model, chat.tokenizer, convs, None, 384, 4, adapter=adapter).loss, 4)
            for half, convs in halves.items()
        }
        print(name, table[name], flush=True)
    return table


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    print(json.dumps(main(sys.argv[1:]), indent=1))
