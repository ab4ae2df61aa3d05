"""Built-in models: the default model the CLI and examples convert."""
from .gpt import GPT, GPTConfig

__all__ = ["GPT", "GPTConfig"]
