"""Speed of `chatlora generate`'s batched path: the same prompts at several batch sizes, one model load, one table.

    # GPU, a Yi-6B-shaped model with random weights (built and saved first with --make-random):
    python bench/generate_speed.py --make-random /tmp/yi6b --device cuda
    python bench/generate_speed.py --model /tmp/yi6b --prompts 256 --batch-sizes 64,1 --limit 1=16
    # CPU, the embedded model:
    .venv/bin/python bench/generate_speed.py --model embedded --prompts 32 --batch-sizes 16,1 --max-new-tokens 32
    # the same in fp32, to compare with the default (bf16 on CPUs that multiply bf16 in hardware):
    .venv/bin/python bench/generate_speed.py --model embedded --prompts 32 --batch-sizes 16,1 --max-new-tokens 32 --dtype fp32

Each batch size runs :func:`chatlora.inference.infer.generate_file` (what `chatlora generate --batch-size N` calls) after the
model is loaded, greedy, on user turns taken from data/huanhuan.json. ``--limit B=N`` times batch size B on the first
N prompts only (batch size 1 on a 6B model takes ~10 minutes for 256 prompts); tokens/s is comparable either way.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def make_random(out: Path, device: str, adapters: int = 0) -> None:
    """Save a Yi-6B-shaped Llama with random bf16 weights and the shipped tokenizer into ``out``, and ``adapters``
    random LoRA adapters for it (rank 8 on chatlora's default targets, non-zero) into ``out``-adapter-1, ..."""
    import torch

    sys.path.insert(0, str(Path(__file__).parent))
    from train_speed import load_workload, shape_dir

    from chatlora.config import DEFAULT_TARGETS
    from chatlora.model import load_model

    _, tokenizer = load_workload()
    shape = shape_dir(tokenizer)
    with torch.device(device):  # random init on the GPU: seconds instead of minutes
        net = load_model(str(shape), torch.bfloat16, torch.device(device), random_init=True)
    net.save_pretrained(out)
    tokenizer.save_pretrained(out)
    if adapters:
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=8, lora_alpha=16, target_modules=list(DEFAULT_TARGETS), init_lora_weights=False)
        for i in range(1, adapters + 1):
            torch.manual_seed(i)
            lora = get_peft_model(net, config)
            where = Path(f"{out}-adapter-{i}")
            lora.save_pretrained(where)
            tokenizer.save_pretrained(where)
            net = lora.unload()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="embedded")
    p.add_argument("--make-random", metavar="DIR", help="only build the random Yi-6B-shaped model into DIR")
    p.add_argument("--adapters", type=int, default=0, help="with --make-random: also N random adapters, DIR-adapter-i")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", help="the base's dtype, as `chatlora generate --dtype` (default: auto)")
    p.add_argument("--prompts", type=int, default=256)
    p.add_argument("--batch-sizes", default="default,1", help="'default': what `chatlora generate` uses here")
    p.add_argument("--limit", action="append", default=[], metavar="B=N", help="batch size B: first N prompts only")
    p.add_argument("--max-new-tokens", type=int, default=64)
    args = p.parse_args()
    if args.make_random:
        started = time.perf_counter()
        make_random(Path(args.make_random), "cuda" if args.device == "auto" else args.device, args.adapters)
        print(f"saved a random Yi-6B-shaped model to {args.make_random} in {time.perf_counter() - started:.0f}s")
        return 0

    from chatlora.inference.infer import ChatModel, ReplyFile, SamplingConfig, generate_file

    records = json.loads((ROOT / "data" / "huanhuan.json").read_text(encoding="utf-8"))
    prompts = [
        {
            "row": {"i": i},
            "messages": [{"role": "user", "content": r["instruction"] + r.get("input", "")}],
            "system": None,
        }
        for i, r in enumerate(records[: args.prompts])
    ]
    limits = {int(b): int(n) for b, n in (x.split("=") for x in args.limit)}
    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=0, repetition_penalty=1.0)
    chat = ChatModel.load(model=args.model, device=args.device, dtype=args.dtype)
    chat.generate_many([p["messages"] for p in prompts[:4]], sampling, batch_size=4, desc=None)  # warm-up
    rows = []
    for b in (chat.batch_size if x == "default" else int(x) for x in args.batch_sizes.split(",")):
        subset = prompts[: limits.get(b, len(prompts))]
        with tempfile.TemporaryDirectory() as tmp, ReplyFile(Path(tmp) / "out.jsonl") as out:
            if chat.device.type == "cuda":
                import torch

                torch.cuda.synchronize()
            started = time.perf_counter()
            generate_file(chat, subset, out, sampling, batch_size=b)
            seconds = time.perf_counter() - started
            tokens = sum(
                json.loads(line)["usage"]["completion_tokens"] for line in out.output.read_text().splitlines()
            )
        rows.append((b, len(subset), tokens, seconds, tokens / seconds))
    dtype = str(next(chat.model.parameters()).dtype).removeprefix("torch.")
    print(f"\nmodel {args.model} on {chat.device} in {dtype}, greedy, max {args.max_new_tokens} new tokens")
    print("| --batch-size | prompts | completion tokens | seconds | tokens/s | vs last row |")
    print("|---|---|---|---|---|---|")
    for b, n, tokens, seconds, rate in rows:
        print(f"| {b} | {n} | {tokens} | {seconds:.1f} | {rate:.1f} | {rate / rows[-1][4]:.1f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
