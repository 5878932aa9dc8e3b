"""GGUF quant types chatlora writes, and what the parity check demands of each."""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

import gguf

from ..errors import ModelError

_Q = gguf.GGMLQuantizationType
_F = gguf.LlamaFileType


@dataclass(frozen=True)
class Quant:
    """One ``--quant`` choice: the GGML type of the 2-D weights and what the parity check demands of it.

    Attributes:
        min_top1: share of reply tokens whose top-1 prediction must agree with the fp32 adapter's under teacher
            forcing (the rounding's cost; conversion errors are caught exactly, see :func:`check_export`).
        embeddings: type of ``token_embd``/``output``; 4/5-bit types keep them at q8_0, as llama.cpp's own
            4/5-bit mixes keep the output layer at higher precision.
        llama_cpp: written by llama.cpp's quantizer from an f32 GGUF (the K-quants, which the ``gguf`` package cannot
            encode); ``qtype`` is then the mix's main type, llama.cpp picks each tensor's own.
    """

    name: str
    qtype: gguf.GGMLQuantizationType
    file_type: gguf.LlamaFileType
    min_top1: float
    embeddings: gguf.GGMLQuantizationType | None = None
    llama_cpp: bool = False


QUANTS: dict[str, Quant] = {
    q.name: q
    for q in (
        Quant("f32", _Q.F32, _F.ALL_F32, 0.99),
        Quant("f16", _Q.F16, _F.MOSTLY_F16, 0.99),
        Quant("bf16", _Q.BF16, _F.MOSTLY_BF16, 0.95),
        Quant("q8_0", _Q.Q8_0, _F.MOSTLY_Q8_0, 0.95),
        Quant("q5_1", _Q.Q5_1, _F.MOSTLY_Q5_1, 0.85, _Q.Q8_0),
        Quant("q5_0", _Q.Q5_0, _F.MOSTLY_Q5_0, 0.85, _Q.Q8_0),
        Quant("q4_1", _Q.Q4_1, _F.MOSTLY_Q4_1, 0.80, _Q.Q8_0),
        Quant("q4_0", _Q.Q4_0, _F.MOSTLY_Q4_0, 0.80, _Q.Q8_0),
        # K-quants: llama.cpp's mixes (Q4_K_M keeps attn_v/ffn_down of some layers and the output at Q6_K). The
        # thresholds follow the bits, as above (6-bit between 8- and 5-bit). Measured 2026-12-07 (2-core EPYC, AVX2)
        # on the embedded SmolLM2 tuned 12 steps on Huanhuan, 426 reply tokens: q6_k 93.4 %, q5_k_m 77.9 % (FAIL),
        # q4_k_m 84.5 %; its 576-wide rows do not split into 256-value super-blocks, so those files are mostly
        # llama.cpp's fallbacks (Q8_0, Q5_1, Q5_0) on a base that was Q4_1. The tests' tiny models (nearly bigram,
        # every prediction wide-margin) give 100 % and say nothing about the rounding's cost.
        Quant("q6_k", _Q.Q6_K, _F.MOSTLY_Q6_K, 0.90, llama_cpp=True),
        Quant("q5_k_m", _Q.Q5_K, _F.MOSTLY_Q5_K_M, 0.85, llama_cpp=True),
        Quant("q4_k_m", _Q.Q4_K, _F.MOSTLY_Q4_K_M, 0.80, llama_cpp=True),
    )
}
LORA_QUANTS = ("f32", "f16")
GGUF_EXTRA = "pip install 'chatlora[gguf]'"


def _quant(quant: str) -> Quant:
    if quant not in QUANTS:
        raise ModelError(f"--quant {quant}: choose one of {', '.join(QUANTS)}")
    spec = QUANTS[quant]
    if spec.llama_cpp and importlib.util.find_spec("llama_cpp") is None:
        raise ModelError(f"--quant {quant} is written by llama.cpp's quantizer (llama-cpp-python): {GGUF_EXTRA}")
    return spec


def _llama_cpp():
    """llama-cpp-python (the ``gguf`` extra), imported with its OpenMP threads sleeping while idle."""
    # llama.cpp's OpenMP threads otherwise spin between ops, taking the cores from everything else on a busy machine;
    # libgomp reads this once, when llama.cpp loads it.
    os.environ.setdefault("OMP_WAIT_POLICY", "passive")
    import llama_cpp

    return llama_cpp
