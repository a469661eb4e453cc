"""smallm: train a small GPT on TinyStories from scratch, then sample, evaluate, export and serve it."""

from smallm.config import GPTConfig
from smallm.errors import SmallmError
from smallm.tokenizer import get_tokenizer

__all__ = ["GPT", "GPTConfig", "SmallmError", "get_tokenizer"]
__version__ = "0.1.0"


def __getattr__(name):
    # GPT (and with it torch, ~1 s) is imported on first use, so that `smallm prepare` starts fast.
    if name == "GPT":
        from smallm.model import GPT

        return GPT
    raise AttributeError(f"module 'smallm' has no attribute {name!r}")
