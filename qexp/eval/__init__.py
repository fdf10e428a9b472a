"""Evaluation of the model as deployed: perplexity (paper protocol) and, later, lm-eval suites."""

from .ppl import perplexity

__all__ = ["perplexity"]
