"""Model configuration: a typed dataclass, validated when it is built."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from smallm.errors import SmallmError


@dataclass
class GPTConfig:
    """The shape of a GPT. Defaults are the seed: ~30.0M parameters with the head tied to the embedding."""

    vocab_size: int = 50257  # GPT-2 BPE
    block_size: int = 128  # context length (learned positions)
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    dropout: float = 0.1
    bias: bool = True  # biases in Linear and LayerNorm, as GPT-2

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise SmallmError(f"GPTConfig.{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head != 0:
            raise SmallmError(f"GPTConfig.n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise SmallmError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if not isinstance(self.bias, bool):
            raise SmallmError(f"GPTConfig.bias must be true or false, got {self.bias!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> GPTConfig:
        """Build from a dict, ignoring keys that are not model fields (e.g. "tokenizer")."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})
