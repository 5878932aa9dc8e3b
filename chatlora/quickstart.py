"""The main job: train on the embedded default, then show held-out prompts answered by base and tuned model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .config import TrainConfig
from .infer import ChatModel, SamplingConfig
from .train import TrainResult, train

if TYPE_CHECKING:
    from .eval import EvalResult

__all__ = ["Comparison", "compare_on_held_out", "eval_held_out", "quickstart"]


@dataclass
class Comparison:
    prompt: str
    reference: str
    base: str
    tuned: str
    tuned_finish: str


def compare_on_held_out(result: TrainResult, n: int = 4, max_new_tokens: int = 64) -> list[Comparison]:
    """Greedy replies of the base model (adapter off) and the tuned model on the first ``n`` held-out records."""
    records = result.split.val[:n] if result.split else []
    if not records:
        return []
    chat = ChatModel(result.model, result.tokenizer, result.run_card["template"]["system_prompt"])
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=0, repetition_penalty=1.1)
    convs = [r.messages[:-1] for r in records]
    base = chat.generate_batch(convs, sampling, use_adapter=False)
    tuned = chat.generate_batch(convs, sampling)
    return [
        Comparison(r.messages[-2]["content"], r.messages[-1]["content"], b.text, t.text, t.finish_reason)
        for r, b, t in zip(records, base, tuned, strict=True)
    ]


def quickstart(cfg: TrainConfig, examples: int = 4) -> tuple[TrainResult, list[Comparison]]:
    result = train(cfg)
    return result, compare_on_held_out(result, examples)


def eval_held_out(
    result: TrainResult, max_samples: int = 32, max_new_tokens: int = 64, batch_size: int = 16
) -> EvalResult | None:
    """Cheap eval of the just-trained model on (part of) its held-out split; report in ``output_dir/eval``."""
    from .eval import evaluate

    if not result.run_card or not result.split or not result.split.val:
        return None
    chat = ChatModel(result.model, result.tokenizer, result.run_card["template"]["system_prompt"])
    return evaluate(result.output_dir, max_samples=max_samples, max_new_tokens=max_new_tokens,
                    batch_size=batch_size, chat=chat)
