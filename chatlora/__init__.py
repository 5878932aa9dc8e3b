"""chatlora: give a chat LLM a character's voice with LoRA, then chat with it, serve it and measure it."""

__version__ = "0.1.0"
