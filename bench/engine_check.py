"""The engine on one model: CUDA graphs vs eager steps vs the old ``model.generate`` batches, and each reply alone.

    # GPU, the random Yi-6B shape and four random adapters (bench/generate_speed.py --make-random DIR --adapters 4):
    python bench/engine_check.py --model /dev/shm/yi6b --adapters /dev/shm/yi6b-adapter-{1,2,3,4} --prompts 64
    # CPU, the embedded model:
    .venv/bin/python bench/engine_check.py --model embedded --prompts 8 --max-new-tokens 16

Prompt i is answered by adapter i modulo (adapters + 1), the last being the base, greedy, on user turns from
data/huanhuan.json. Prints one row per path: seconds, completion tokens/s and how many replies equal the graph path's
token for token (greedy; the batched bf16 products of another batch size may part at near-ties).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="embedded")
    p.add_argument("--adapters", nargs="*", default=[], help="adapter dirs (served as a1, a2, ...)")
    p.add_argument("--device", default="auto")
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--alone", type=int, default=8, help="prompts also answered one at a time")
    p.add_argument("--max-new-tokens", type=int, default=64)
    args = p.parse_args()

    import torch

    from chatlora.inference.infer import SamplingConfig, generate_rows
    from chatlora.serve import load_models

    models = load_models({f"a{i + 1}": d for i, d in enumerate(args.adapters)}, args.model, device=args.device)
    views = [m.chat for m in models.models.values()][1:] + [next(iter(models.models.values())).chat]
    records = json.loads((ROOT / "data" / "huanhuan.json").read_text(encoding="utf-8"))
    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=0, repetition_penalty=1.0)
    prompts = [
        (views[i % len(views)], [{"role": "user", "content": r["instruction"] + r.get("input", "")}])
        for i, r in enumerate(records[: args.prompts])
    ]
    chat = views[0]
    engine = chat.engine
    engine.max_batch = args.prompts
    cuda = chat.device.type == "cuda"

    def rows(subset):
        return [view.row(view.prompt_ids(m), sampling) for view, m in subset]

    def timed(name, fn, subset):
        batch = rows(subset)
        if cuda:
            torch.cuda.synchronize()
        started = time.perf_counter()
        fn(batch)
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        return name, seconds, sum(r.reply.completion_tokens for r in batch), [r._tokens for r in batch]

    engine.run(rows(prompts[:4]))  # warm-up
    results = []
    graphs = engine.graphs
    results.append(timed(f"engine, graphs {'on' if graphs else 'off (not CUDA)'}", engine.run, prompts))
    results.append(timed("engine, graphs (again: captured)", engine.run, prompts))
    engine.graphs = False
    results.append(timed("engine, eager steps", engine.run, prompts))
    engine.graphs = graphs
    old = timed(
        "model.generate batch (before the engine)",
        lambda b: generate_rows(chat.model, b, chat.tokenizer.pad_token_id),
        prompts,
    )
    results.append(old)
    alone_tokens, alone_s = [], 0.0
    for item in prompts[: args.alone]:
        _, s, _, tokens = timed("alone", engine.run, [item])
        alone_s += s
        alone_tokens += tokens
    reference = results[1][3]
    print(
        f"\nmodel {args.model} on {chat.device}, {len(args.adapters)} adapters + base, {args.prompts} prompts, greedy, "
        f"{args.max_new_tokens} new tokens; {engine.steps} decode steps, {engine.prefills} prefills so far"
    )
    print("| path | seconds | completion tok/s | replies equal to the captured graph path |")
    print("|---|---|---|---|")
    for name, seconds, tokens, got in results:
        same = sum(a == b for a, b in zip(got, reference, strict=True))
        print(f"| {name} | {seconds:.2f} | {tokens / seconds:,.0f} | {same}/{len(reference)} |")
    same = sum(a == b for a, b in zip(alone_tokens, reference, strict=False))
    print(f"| each of the first {args.alone} alone (engine) | {alone_s:.2f} | - | {same}/{args.alone} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
