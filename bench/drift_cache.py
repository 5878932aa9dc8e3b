"""The persona drift with and without the rows' keys and values kept across turns: time, prompt tokens encoded,
and whether the replies are the same.

    # a trained run (its base and adapter), the eval's default drift before issue 28 F (4 x 20 turns, 64 tokens,
    # the model's whole context), cut to the first turns so that the re-encoding run ends:
    .venv/bin/python bench/drift_cache.py --adapter runs/quickstart --conversations 4 --turns 8 --max-new-tokens 64

The drift prompts are the user turns of the first 64 records of ``--data`` (default: the run's dataset), taken as
the eval takes them from its records.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's chatlora, whichever one the venv installed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", required=True)
    parser.add_argument("--data", default=None, help="records whose user turns are the drift prompts")
    parser.add_argument("--conversations", type=int, default=4)
    parser.add_argument("--turns", type=int, default=20)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--context", type=int, default=None, help="drift_context (default: the model's)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    from chatlora.config import PersonaConfig
    from chatlora.data import load_records
    from chatlora.eval.persona import _drift_phase, resolve
    from chatlora.inference.infer import ChatModel, SamplingConfig
    from chatlora.runcard import read_run_card

    card = read_run_card(args.adapter)
    data = args.data or card["dataset"]["path"]
    records = [r.messages for r in load_records(Path(data), "auto", None)][:64]
    chat = ChatModel.load(args.adapter, device=args.device)
    cfg = PersonaConfig(
        drift_conversations=args.conversations,
        drift_turns=args.turns,
        max_new_tokens=args.max_new_tokens,
        drift_context=args.context,
    )
    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=0, repetition_penalty=1.1)
    persona = resolve(cfg, chat.system_prompt, [])
    out = {}
    for reuse in (True, False):
        started = time.perf_counter()
        drift, rows = _drift_phase(chat, persona, records, cfg, sampling, chat.system_prompt, args.batch_size, reuse)
        seconds = time.perf_counter() - started
        out[reuse] = rows
        print(
            json.dumps(
                {
                    "kept_across_turns": reuse,
                    "seconds": round(seconds, 1),
                    "prompt_tokens": drift.tokens["prompt"],
                    "reused_tokens": drift.tokens["reused"],
                    "encoded_tokens": drift.tokens["prompt"] - drift.tokens["reused"],
                }
            ),
            flush=True,
        )
    same = [a["reply"] == b["reply"] for a, b in zip(out[True], out[False], strict=True)]
    print(json.dumps({"same_replies": sum(same), "replies": len(same), "device": str(chat.device)}))


if __name__ == "__main__":
    main()
