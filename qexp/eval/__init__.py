"""Evaluation of the model as deployed: perplexity (paper protocol) and lm-eval accuracy suites."""

from .lmeval import accuracy
from .ppl import perplexity

__all__ = ["accuracy", "perplexity"]
