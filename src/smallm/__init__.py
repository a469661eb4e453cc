"""smallm: train a small GPT on TinyStories from scratch, then sample, evaluate, export and serve it."""

from smallm.config import GPTConfig
from smallm.errors import SmallmError
from smallm.model import GPT
from smallm.tokenizer import get_tokenizer

__all__ = ["GPT", "GPTConfig", "SmallmError", "get_tokenizer"]
__version__ = "0.1.0"
