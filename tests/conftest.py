import pytest
import torch

from smallm import GPTConfig


@pytest.fixture
def small_config():
    """A model small enough for fast tests, with the real GPT-2 vocabulary."""
    return GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=32, dropout=0.0)


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)
