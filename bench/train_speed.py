"""Training speed: the seed tutorial's recipe against chatlora, same workload, same machine, one run.

    python3 bench/train_speed.py --device cuda     # `make bench-gpu`: Yi-6B-shaped Llama, random weights
    python3 bench/train_speed.py --device cpu      # `make bench-cpu`: the embedded SmolLM2-135M

Workload: data/huanhuan.json rendered with the seed's Yi ChatML strings and response-only labels (its
``process_func``), max 384 tokens, tokenized with the SmolLM2 tokenizer (no Yi tokenizer offline; its 49152 ids fit
the 64000 vocab). That tokenizer ships in ``bench/tokenizer/`` (xz-compressed, 0.45 MB), so the benchmark needs
neither internet nor the embedded model; the tokenized workload is cached in ``bench/workload/`` (git-ignored).

Each recipe runs in its own process (clean peak memory, no kernel patches leaking). Real tokens are the
conversations' own tokens (padding excluded), counted per micro-batch in training order; time runs from the end
of the warm-up steps to the end of the last step, with the device synchronised. On CPU the seed recipe (fp16, which
this CPU has no units for) is timed over its first micro-batch (8 conversations, half a step) from the start of
training, because one micro-batch takes minutes there (``--seed-micro-batches``). Prints a table, writes JSON, and
ends with ``gpu speedup: X.XX×`` / ``cpu speedup: X.XX×`` (chatlora / seed real tokens/s).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WORKLOAD = ROOT / "bench" / "workload"
SHIPPED_TOKENIZER = ROOT / "bench" / "tokenizer"  # SmolLM2-135M-Instruct's (see its README.md)
SEED_SYSTEM = "现在你要扮演皇帝身边的女人--甄嬛.<|im_end|>"
SEED_TARGETS = ["q_attn", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]  # sic: the seed's typo
MAX_LEN = 384
LOG_STEPS = 5  # the tutorial logs every 10; every step would add a host sync per step to both recipes
# Yi-6B's shape (01-ai/Yi-6B config.json), built with random weights.
YI_6B = dict(
    hidden_size=4096,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=4,
    intermediate_size=11008,
    vocab_size=64000,
    rope_theta=5_000_000.0,
    max_position_embeddings=4096,
    rms_norm_eps=1e-5,
    hidden_act="silu",
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)

# name -> (recipe, TrainConfig overrides for chatlora recipes)
FAST = dict(packing=True, logits_at_labels=True, lora_dropout=0.0)
VARIANTS = {
    "seed": ("seed", {}),
    # the tutorial with its fp16 weights swapped for fp32: what the seed costs where fp16 has no fast path (CPUs)
    "seed-fp32": ("seed", {"dtype": "fp32"}),
    "chatlora": ("chatlora", dict(FAST, compile=True, tokens_per_batch=4608)),
    "chatlora-bucket": ("chatlora", dict(FAST, compile=True, tokens_per_batch=4608, packing_strategy="bucket")),
    "chatlora-liger": ("chatlora", dict(FAST, liger=True, tokens_per_batch=4096)),
    "chatlora-memory": ("chatlora", dict(FAST, liger=True, tokens_per_batch=4096, memory_mode=True)),
    "chatlora-noliger": ("chatlora", dict(FAST, tokens_per_batch=4096)),
    "chatlora-drop0.1": ("chatlora", dict(FAST, liger=True, tokens_per_batch=4096, lora_dropout=0.1)),
    "chatlora-liger-6k": ("chatlora", dict(FAST, liger=True, tokens_per_batch=6144)),
    "chatlora-6k": ("chatlora", dict(FAST, compile=True, tokens_per_batch=6144)),
    "chatlora-8k": ("chatlora", dict(FAST, compile=True, tokens_per_batch=8192)),
    "chatlora-compile": ("chatlora", dict(FAST, compile=True, tokens_per_batch=4096)),
    "chatlora-compile-liger": ("chatlora", dict(FAST, compile=True, liger=True, tokens_per_batch=4096)),
    "chatlora-compile-6k": ("chatlora", dict(FAST, compile=True, tokens_per_batch=6144)),
    "chatlora-compile-memory": ("chatlora", dict(FAST, compile=True, tokens_per_batch=4096, memory_mode=True)),
    "chatlora-cpu": ("chatlora", dict(FAST, tokens_per_batch=1536)),
    "chatlora-cpu-compile": ("chatlora", dict(FAST, tokens_per_batch=1536, compile=True)),
    "chatlora-cpu-unpacked": ("chatlora", dict(lora_dropout=0.0, batch_size=8)),
}
DEFAULTS = {"cuda": ["seed", "chatlora", "chatlora-memory"], "cpu": ["seed", "chatlora-cpu", "seed-fp32"]}


# --------------------------------------------------------------------------------------------- workload
def seed_process_func(example: dict, tokenizer) -> dict:
    """The seed tutorial's process_func, verbatim apart from returning plain lists."""
    instruction = tokenizer(
        "\n".join(
            [
                "<|im_start|>system",
                SEED_SYSTEM + "\n<|im_start|>user\n" + example["instruction"] + example["input"] + "<|im_end|>\n",
            ]
        ).strip(),
        add_special_tokens=False,
    )
    response = tokenizer("<|im_start|>assistant\n" + example["output"] + "<|im_end|>\n", add_special_tokens=False)
    input_ids = instruction["input_ids"] + response["input_ids"] + [tokenizer.pad_token_id]
    attention_mask = instruction["attention_mask"] + response["attention_mask"] + [1]
    labels = [-100] * len(instruction["input_ids"]) + response["input_ids"] + [tokenizer.pad_token_id]
    return {"input_ids": input_ids[:MAX_LEN], "attention_mask": attention_mask[:MAX_LEN], "labels": labels[:MAX_LEN]}


def load_workload() -> tuple[list[dict], object]:
    """Tokenized workload + tokenizer, from bench/workload/ or built there from the tokenizer in bench/tokenizer/."""
    from transformers import AutoTokenizer

    data_file, tok_dir = WORKLOAD / "huanhuan-seed.json", WORKLOAD / "tokenizer"
    if not (tok_dir / "tokenizer.json").is_file():
        import lzma
        import shutil

        tok_dir.mkdir(parents=True, exist_ok=True)
        for f in SHIPPED_TOKENIZER.iterdir():
            if f.suffix == ".xz":
                (tok_dir / f.stem).write_bytes(lzma.decompress(f.read_bytes()))
            elif f.name != "README.md":
                shutil.copy(f, tok_dir / f.name)
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not data_file.is_file():
        rows = json.loads((ROOT / "data" / "huanhuan.json").read_text(encoding="utf-8"))
        data_file.write_text(json.dumps([seed_process_func(r, tokenizer) for r in rows]), encoding="utf-8")
    return json.loads(data_file.read_text(encoding="utf-8")), tokenizer


def yi6b_dir(tokenizer) -> Path:
    """A model dir holding only config.json + tokenizer: what `chatlora train --model DIR --random-init` takes."""
    from transformers import LlamaConfig

    d = WORKLOAD / "yi-6b-shape"
    if not (d / "config.json").is_file():
        LlamaConfig(**YI_6B).save_pretrained(d)
        tokenizer.save_pretrained(d)
    return d


# --------------------------------------------------------------------------------------------- one recipe
class Enough(Exception):
    """Raised by the timer once ``stop_after`` micro-batches are done: ends a run that is timed on micro-batches."""


class Timer:
    """Per-micro-batch real-token counts (in training order) and synchronised step-end and micro-batch-end times.
    With ``stop_after``, training is cut off (:class:`Enough`) after that many micro-batches."""

    def __init__(self, device, stop_after: int = 0):
        self.device, self.counts, self.ends, self.micro_ends = device, [], [], []
        self.stop_after = stop_after

    def micro_batch_done(self) -> float:
        """Synchronise, record and return the end time of a micro-batch; raise :class:`Enough` at ``stop_after``."""
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()
        now = time.perf_counter()
        self.micro_ends.append(now)
        if self.stop_after and len(self.micro_ends) >= self.stop_after:
            raise Enough
        return now

    def wrap(self, collate, count):
        def collate_and_count(batch):
            out = collate(batch)
            self.counts.append(int(count(batch, out)))
            return out

        return collate_and_count

    def callback(self):
        import torch
        from transformers import TrainerCallback

        timer = self

        profile_at = int(os.environ.get("BENCH_PROFILE_STEP", "0"))  # profile 2 steps from this one (GPU only)

        class StepTimer(TrainerCallback):
            prof = None

            def on_train_begin(self, args, state, control, **kw):
                timer.begin = time.perf_counter()

            def on_step_begin(self, args, state, control, **kw):
                if profile_at and state.global_step == profile_at and timer.device == "cuda":
                    self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA])
                    self.prof.__enter__()

            def on_substep_end(self, args, state, control, **kw):  # a micro-batch that is not a step's last
                timer.micro_batch_done()

            def on_step_end(self, args, state, control, **kw):  # a step's last micro-batch ends the step
                timer.ends.append(timer.micro_batch_done())
                if self.prof is not None and state.global_step == profile_at + 2:
                    self.prof.__exit__(None, None, None)
                    print(self.prof.key_averages().table(sort_by="cuda_time_total", row_limit=30), flush=True)
                    self.prof = None

        return StepTimer()


def _args_kw(steps: int, out: str, cpu: bool) -> dict:
    return dict(
        output_dir=out,
        max_steps=steps,
        logging_steps=1 if cpu else LOG_STEPS,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=cpu,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        seed=42,
        log_level="warning",
    )


def run_seed(examples, tokenizer, model_dir, device, steps, out, micro_batches=0, dtype="fp16"):
    """The tutorial: fp16 weights, its LoraConfig, bs 8 x accum 2, gradient checkpointing, Seq2Seq padding, lr 1e-4.
    With ``micro_batches``, training stops after that many micro-batches (timed from the start). ``dtype="fp32"``
    is the one deviation offered (the ``seed-fp32`` variant)."""
    import torch
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM, DataCollatorForSeq2Seq, Trainer, TrainingArguments

    weights = {"fp16": torch.half, "fp32": torch.float32}[dtype]
    if device == "cuda":
        with torch.device("cuda"):
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir), dtype=weights)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=weights)
    model.enable_input_require_grads()
    config = LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        target_modules=SEED_TARGETS,
        inference_mode=False,
        r=8,
        lora_alpha=32,
        lora_dropout=0.1,
    )
    model = get_peft_model(model, config)
    kw = _args_kw(steps, out, device == "cpu")
    kw.update(per_device_train_batch_size=8, gradient_accumulation_steps=2, learning_rate=1e-4)
    fields = TrainingArguments.__dataclass_fields__
    kw["activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"] = True
    timer = Timer(device, stop_after=micro_batches)
    collate = DataCollatorForSeq2Seq(tokenizer=tokenizer, padding=True)
    data = [dict(ex) for ex in examples]
    trainer = Trainer(
        model=model,
        args=TrainingArguments(**kw),
        train_dataset=_List(data),
        data_collator=timer.wrap(collate, lambda b, o: o["attention_mask"].sum()),
        callbacks=[timer.callback()],
    )
    try:
        trainer.train()
    except Enough:
        pass
    return trainer, timer, model, 2


def run_chatlora(examples, tokenizer, model_dir, device, steps, out, overrides):
    """chatlora's own path (prepare_model + make_trainer), on the seed's tokenized workload."""
    import torch

    from chatlora.config import TrainConfig
    from chatlora.model import pick_precision
    from chatlora.train import make_trainer, prepare_model, training_args

    cfg = TrainConfig(
        model=str(model_dir),
        output_dir=out,
        max_steps=steps,
        lr=1e-4,
        logging_steps=1 if device == "cpu" else LOG_STEPS,
        eval_steps=0,
        save_steps=10**6,
        max_length=MAX_LEN,
        random_init=device == "cuda",
        device=device,
        dtype="bf16" if device == "cuda" else "fp32",
        **overrides,
    )
    dev = torch.device(device)
    precision = pick_precision(dev, cfg.dtype)
    model = prepare_model(cfg, str(model_dir), dev, precision)
    args = training_args(cfg, precision, dev, has_eval=False)
    exs = [{"input_ids": ex["input_ids"], "labels": ex["labels"]} for ex in examples]
    trainer = make_trainer(cfg, model, tokenizer, args, exs, [])
    timer = Timer(device)

    def count(batch, out):
        if "num_real_tokens" in out:  # packed: the conversations' own tokens
            return out["num_real_tokens"]
        return out["attention_mask"].sum()

    trainer.data_collator = timer.wrap(trainer.data_collator, count)
    trainer.add_callback(timer.callback())
    trainer.train()
    return trainer, timer, model, cfg.grad_accum


class _List:
    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def one(name: str, device: str, warmup: int, steps: int, result_path: str, micro_batches: int = 0) -> None:
    import torch

    recipe, overrides = VARIANTS[name]
    examples, tokenizer = load_workload()
    model_dir = yi6b_dir(tokenizer) if device == "cuda" else Path(_embedded_dir())
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as out:
        if recipe == "seed":
            trainer, timer, model, accum = run_seed(
                examples, tokenizer, model_dir, device, warmup + steps, out, micro_batches, **overrides
            )
        else:
            trainer, timer, model, accum = run_chatlora(
                examples, tokenizer, model_dir, device, warmup + steps, out, overrides
            )
    ends = timer.ends
    if micro_batches:  # timed from the start of training over its first micro-batches
        tokens = sum(timer.counts[:micro_batches])
        seconds = timer.micro_ends[micro_batches - 1] - timer.begin
        steps = micro_batches / accum
    else:
        tokens = sum(timer.counts[warmup * accum : (warmup + steps) * accum])
        seconds = ends[warmup + steps - 1] - (ends[warmup - 1] if warmup else timer.begin)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    params = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    row = {
        "variant": name,
        "recipe": recipe,
        "overrides": overrides,
        "tokens_per_s": tokens / seconds,
        "step_s": seconds / steps,
        "tokens_per_step": tokens / steps,
        "peak_gib": peak,
        "final_loss": losses[-1] if losses else None,
        "params": params,
        "timed_steps": steps,
        "warmup_steps": warmup,
        "timed_micro_batches": micro_batches or None,
    }
    Path(result_path).write_text(json.dumps(row), encoding="utf-8")


def _embedded_dir() -> str:
    from chatlora.model import resolve_model

    return resolve_model("embedded")


def matmul_tflops() -> float:
    """The card's measured dense bf16 matmul rate (8192^3, median of 20), the MFU denominator."""
    import torch

    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(5):
        a @ b
    times = []
    for _ in range(20):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        a @ b
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    return 2 * 8192**3 / sorted(times)[len(times) // 2] / 1e12


# --------------------------------------------------------------------------------------------- driver
def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--variants", default=None, help=f"comma list of {', '.join(VARIANTS)}")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps (default 5 GPU, 1 CPU)")
    p.add_argument("--seed-warmup", type=int, default=None, help="the seed recipe's (default: --warmup)")
    p.add_argument("--seed-steps", type=int, default=None, help="the seed recipe's (default: --steps)")
    p.add_argument(
        "--seed-micro-batches",
        type=int,
        default=None,
        help="time the seed over its first N micro-batches from the start instead of steps (default: 1 on CPU)",
    )
    p.add_argument("--micro-batches", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 15 GPU, 2 CPU)")
    p.add_argument("--json", default=None, help="result file (default bench/results/train_speed-DEVICE.json)")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    warmup = a.warmup if a.warmup is not None else (5 if a.device == "cuda" else 1)
    steps = a.steps if a.steps is not None else (15 if a.device == "cuda" else 2)
    seed_warmup = a.seed_warmup if a.seed_warmup is not None else warmup
    seed_steps = a.seed_steps if a.seed_steps is not None else steps
    # fp16 on a CPU without fp16 units: one seed micro-batch (8 conversations) takes minutes, so on CPU the seed is
    # timed over its first micro-batch from the start of training (first-call overhead is small against that)
    seed_micro = a.seed_micro_batches if a.seed_micro_batches is not None else (1 if a.device == "cpu" else 0)
    if a.one:
        one(a.one, a.device, warmup, steps, a.result, a.micro_batches)
        return 0

    names = a.variants.split(",") if a.variants else DEFAULTS[a.device]
    load_workload()  # build the cache once, before the children
    info: dict = {
        "device": a.device,
        "warmup_steps": warmup,
        "timed_steps": steps,
        "seed_steps": [seed_warmup, seed_steps],
        "seed_micro_batches": seed_micro or None,
    }
    import torch

    if a.device == "cuda":
        info["card"] = torch.cuda.get_device_name()
        info["matmul_tflops"] = matmul_tflops()
        torch.cuda.empty_cache()
    else:
        info["card"] = f"CPU, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"
    import peft
    import transformers

    info["versions"] = {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}
    try:
        import liger_kernel  # noqa: F401

        info["versions"]["liger_kernel"] = "installed"
    except ImportError:
        info["versions"]["liger_kernel"] = None
    rows = []
    for name in names:
        with tempfile.NamedTemporaryFile(suffix=".json") as f:
            cmd = [
                sys.executable,
                __file__,
                "--device",
                a.device,
                "--one",
                name,
                "--result",
                f.name,
                "--warmup",
                str(seed_warmup if name.startswith("seed") else warmup),
                "--steps",
                str(seed_steps if name.startswith("seed") else steps),
                "--micro-batches",
                str(seed_micro if name.startswith("seed") else 0),
            ]
            t0 = time.time()
            # one GPU: on a machine with several, the seed's plain Trainer would otherwise use nn.DataParallel
            proc = subprocess.run(
                cmd, env={**os.environ, "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "0")}
            )
            if proc.returncode != 0 or not Path(f.name).stat().st_size:
                print(f"[{name}] failed (exit {proc.returncode})", flush=True)
                rows.append({"variant": name, "failed": proc.returncode})
                continue
            row = json.loads(Path(f.name).read_text())
            row["wall_s"] = round(time.time() - t0, 1)
            if a.device == "cuda":
                row["mfu"] = 4 * row["params"] * row["tokens_per_s"] / (info["matmul_tflops"] * 1e12)
            rows.append(row)
            print(f"[{name}] {row['tokens_per_s']:.0f} real tok/s, peak {row['peak_gib']:.1f} GiB", flush=True)
    info["results"] = rows
    out = Path(a.json or ROOT / "bench" / "results" / f"train_speed-{a.device}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    mem = "peak GiB (GPU alloc)" if a.device == "cuda" else "peak GiB (max RSS)"
    print(f"\n{info['card']}" + (f", bf16 matmul {info['matmul_tflops']:.0f} TFLOP/s" if a.device == "cuda" else ""))
    print(
        f"{'variant':<20} {'real tok/s':>10} {'step s':>7} {'tok/step':>8} {mem:>20} {'loss':>7}"
        + (f" {'MFU':>6}" if a.device == "cuda" else "")
    )
    for r in rows:
        if "failed" in r:
            print(f"{r['variant']:<20} failed")
            continue
        line = (
            f"{r['variant']:<20} {r['tokens_per_s']:>10.0f} {r['step_s']:>7.3f} {r['tokens_per_step']:>8.0f} "
            f"{r['peak_gib']:>20.2f} {r['final_loss'] or float('nan'):>7.3f}"
        )
        print(line + (f" {r['mfu']:>6.1%}" if a.device == "cuda" else ""))
    print(f"results: {out}")
    ok = {r["variant"]: r for r in rows if "failed" not in r}
    fast = next((ok[n] for n in names if not n.startswith("seed") and n in ok), None)
    if fast and "seed-fp32" in ok:  # informational; the contract line below compares with the seed as written
        print(f"{fast['variant']} / seed-fp32: {fast['tokens_per_s'] / ok['seed-fp32']['tokens_per_s']:.2f}×")
    speedup = fast["tokens_per_s"] / ok["seed"]["tokens_per_s"] if fast and "seed" in ok else float("nan")
    print(f"{'gpu' if a.device == 'cuda' else 'cpu'} speedup: {speedup:.2f}×")
    return 0 if speedup == speedup else 1


if __name__ == "__main__":
    sys.exit(main())
