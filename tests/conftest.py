"""Shared fixtures: tiny random Llama layers/models, and the real Hydra config, shrunk."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig
from transformers import LlamaConfig, LlamaForCausalLM

from qexp.config import register

CONF = str(Path(__file__).resolve().parents[1] / "conf")
register()

# Fast settings for cells on tiny_random: a few steps, short eval, no W&B.
TINY = ["model=tiny_random", "tracking=disabled", "train.steps=3", "train.seqlen=64", "eval.seqlen=64",
        "eval.max_windows=2", "quant.calib_samples=4", "quant.calib_seqlen=64"]


def make_cfg(*overrides: str, results_dir: Path | None = None) -> DictConfig:
    """Compose ``conf/config.yaml`` with ``overrides`` (as the command line would)."""
    extra = [f"results_dir={results_dir}"] if results_dir is not None else []
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(config_name="config", overrides=[*TINY, *extra, *overrides])


@pytest.fixture
def cfg_factory(tmp_path):
    return lambda *o: make_cfg(*o, results_dir=tmp_path / "results")


def tiny_llama(vocab: int = 128, hidden: int = 64, inter: int = 128, layers: int = 2, seed: int = 0):
    """A random Llama small enough for exact checks (no tokenizer needed)."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return LlamaForCausalLM(cfg).eval().requires_grad_(False)


@pytest.fixture
def tiny():
    return tiny_llama()
