"""Evaluation of the model as deployed: perplexity (paper protocol), lm-eval accuracy suites and
generative exact match."""

from .lmeval import accuracy, check_generation
from .ppl import perplexity

__all__ = ["accuracy", "check_generation", "perplexity"]
