"""Training formats of prompt/answer data: the prompt is masked from the loss, the answer is learned.

``data.<source>.format`` picks one (``text`` is plain packed LM text, handled in :mod:`qexp.data`):
  alpaca     the Alpaca prompt (instruction, optional input) -> output
  gsm8k      LoTA-QAF (HALO): chat template, question -> reference answer (rationale, ``#### n``)
  gsm8k_cot  QWHA: "Q: ... First think step by step ..." -> "A: {rationale} The final answer is: {n}"
  sql        LoTA-QAF (HALO): chat template, sql-create-context schema + question (or a HALO
             ``messages`` row) -> query
  viggo      LoTA-QAF (HALO): chat template, HALO's instruction + sentence -> meaning representation
  asdiv      the offline ASDiv problems in QWHA's format -> "A: The final answer is: {n}"
The prompts and targets are the evaluation tasks' own (qexp/tasks/generation.py). With the chat
template, the prompt is the template up to the assistant turn (``add_generation_prompt``) and the
answer the rest of the templated conversation (HALO's split); otherwise the answer ends with EOS.
``data.<source>.max_source`` / ``max_target`` cut the prompt / answer tokens (LoTA-QAF: 1024 / 256).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..tasks import generation as g

ALPACA_PROMPT = ("Below is an instruction that describes a task{ctx}. Write a response that appropriately "
                 "completes the request.\n\n### Instruction:\n{instruction}\n\n{input}### Response:\n")


def alpaca(r: dict) -> str:
    return ALPACA_PROMPT.format(ctx=", paired with an input" if r.get("input") else "",
                                instruction=r["instruction"],
                                input=f"### Input:\n{r['input']}\n\n" if r.get("input") else "")


@dataclass(frozen=True)
class Format:
    prompt: Callable[[dict], str]
    target: Callable[[dict], str]
    chat: bool = False  # the protocol wraps prompt and answer in the model's chat template


FORMATS: dict[str, Format] = {
    "alpaca": Format(alpaca, lambda r: r["output"]),
    "gsm8k": Format(g.gsm8k, g.gsm8k_target, chat=True),
    "gsm8k_cot": Format(g.gsm8k_cot, g.gsm8k_cot_target),
    "sql": Format(g.sql, g.sql_target, chat=True),
    "viggo": Format(g.viggo, g.viggo_target, chat=True),
    "asdiv": Format(g.asdiv, g.asdiv_target),
}


def texts(fmt: str, row: dict, tok: Any) -> tuple[str, str]:
    """(prompt, answer) text of one row, as the model sees it (chat-templated where the format is)."""
    f = FORMATS[fmt]
    prompt, target = f.prompt(row), f.target(row)
    if not f.chat:
        return prompt, target + tok.eos_token
    turn = [{"role": "user", "content": prompt}]
    head = tok.apply_chat_template(turn, tokenize=False, add_generation_prompt=True)
    full = tok.apply_chat_template([*turn, {"role": "assistant", "content": target}], tokenize=False)
    if not full.startswith(head):
        raise ValueError(f"format {fmt}: the chat template's conversation does not start with its prompt")
    return head, full[len(head):]


def example_ids(fmt: str, row: dict, tok: Any, max_source: int | None = None,
                max_target: int | None = None) -> tuple[list[int], list[int]]:
    """Prompt and answer token ids of one row (each cut to its maximum; no special tokens added)."""
    prompt, answer = texts(fmt, row, tok)
    p = tok(prompt, add_special_tokens=False).input_ids[:max_source]
    a = tok(answer, add_special_tokens=False).input_ids[:max_target]
    return p, a
