"""Export a tuned model to GGUF (llama.cpp, Ollama, LM Studio) with an Ollama Modelfile, then prove it matches.

:func:`export` merges the adapter into its base (or takes a merged model), writes one GGUF file with the ``gguf``
package (llama.cpp's own writer) following llama.cpp's conventions, a ``Modelfile`` beside it and a manifest, and
runs :func:`check_export`. The check reloads the GGUF with transformers and compares it with the adapter on held-out
prompts, and compares every place that decides how a prompt is built or where a reply stops (the GGUF's chat
template and special tokens, the Modelfile's TEMPLATE, SYSTEM and stop parameters) with the training template.
``--lora-only`` writes the adapter alone as a llama.cpp LoRA GGUF instead.

One module per idea:

- :mod:`.quants`: the ``--quant`` types; :mod:`.arch`: architectures (hyperparameters, tensor names, Q/K order);
  :mod:`.vocab`: tokenizers as llama.cpp reads them;
- :mod:`.writer`: the model GGUF; :mod:`.lora`: the LoRA GGUF; :mod:`.ollama`: TEMPLATE and Modelfile;
- :mod:`.source`: the run or merged model being exported; :mod:`.command`: ``chatlora export`` itself;
- :mod:`.parity`: the parity check; :mod:`.runtimes`: llama.cpp and Ollama in it; :mod:`.results`: its table.
"""

from .command import ExportResult, export
from .lora import write_lora_gguf
from .ollama import MODELFILE, modelfile_text, ollama_template, parse_modelfile, render_go_template
from .parity import check_export
from .quants import QUANTS, Quant
from .results import MANIFEST, Check, format_checks, run_commands
from .writer import write_gguf

__all__ = [
    "MANIFEST",
    "MODELFILE",
    "QUANTS",
    "Check",
    "ExportResult",
    "Quant",
    "check_export",
    "export",
    "format_checks",
    "modelfile_text",
    "ollama_template",
    "parse_modelfile",
    "render_go_template",
    "run_commands",
    "write_gguf",
    "write_lora_gguf",
]
