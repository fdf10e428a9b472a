"""The generative tasks in Python: prompts and targets (training and evaluation), answer extraction.

The task YAMLs name these functions (``doc_to_text: !function generation.<task>``,
``process_results: !function generation.score_<task>``); :mod:`qexp.data.formats` builds training
pairs from the same prompt and target functions, so the model is asked at evaluation exactly what it
was trained on. lm-eval's YAML loader imports this file stand-alone: it imports nothing from qexp.


LoTA-QAF's task-specific protocol is HALO's (IST-DASLab/HALO ``preprocessing.py``): the prompt is the
user turn of the model's chat template, the target the assistant turn.
  gsm8k  user = the question; assistant = the reference answer (rationale, ``#### n``)
  sql    user = the sql-create-context schema and question (or a HALO ``messages`` row's user turn);
         assistant = the query
  viggo  user = HALO's instruction + the target sentence; assistant = the meaning representation
QWHA's GSM8K (no chat template; base models):
  gsm8k_cot  "Q: {question}\\nAnswer the above question. First think step by step and then answer
             the final number.\\n" -> "A: {rationale} The final answer is: {n}"
The offline ASDiv task uses QWHA's format (ASDiv has no rationales: "A: The final answer is: {n}").

Scoring (lm-eval averages the returned ``exact_match``):
  gsm8k (LoTA-QAF / HALO)  the text after the last ``####`` of the output equals the reference's
  gsm8k_cot, asdiv (QWHA)  the number after "The final answer is:", else the last number of the
                           output, equals the reference number (numerically; "1,000" = 1000)
  sql (LoTA-QAF / HALO)    the stripped output equals the stripped reference query
  viggo (LoTA-QAF / HALO)  the same function name and the same sorted list of attributes
"""

from __future__ import annotations

import re

COT = "Q: {question}\nAnswer the above question. First think step by step and then answer the final number.\n"
SQL = ("Write the SQL query that answers the question, using the table schema below.\n\n"
       "Schema: {context}\n\nQuestion: {question}")
VIGGO_FUNCTIONS = ["inform", "request", "give_opinion", "confirm", "verify_attribute", "suggest",
                   "request_explanation", "recommend", "request_attribute"]
VIGGO_ATTRIBUTES = ["name", "exp_release_date", "release_year", "developer", "esrb", "rating", "genres",
                    "player_perspective", "has_multiplayer", "platforms", "available_on_steam",
                    "has_linux_release", "has_mac_release", "specifier"]
# HALO's ViGGO instruction (the functions and attributes are the dataset's closed sets)
VIGGO = ("Given a target sentence construct the underlying meaning representation of the input sentence as a "
         "single function with attributes and attribute values. This function should describe the target "
         "string accurately and the function must be one of the following " + str(VIGGO_FUNCTIONS) + ". "
         "The attributes must be one of the following: " + str(VIGGO_ATTRIBUTES) + "\n\n### Target sentence:\n{target}")


def gsm8k(doc: dict) -> str:
    return doc["question"]


def gsm8k_target(doc: dict) -> str:
    return doc["answer"]


def gsm8k_cot(doc: dict) -> str:
    return COT.format(question=doc["question"])


def gsm8k_cot_target(doc: dict) -> str:
    rationale, _, n = doc["answer"].rpartition("####")
    return f"A: {rationale.strip()} The final answer is: {n.strip()}"


def asdiv(doc: dict) -> str:
    return COT.format(question=f"{doc['passage'].strip()} {doc['question'].strip()}")


def asdiv_target(doc: dict) -> str:
    return f"A: The final answer is: {doc['number']}"


def sql(doc: dict) -> str:
    if "messages" in doc:  # HALO's data/sql files: [{"role": "user", ...}, {"role": "assistant", ...}]
        return doc["messages"][0]["content"]
    return SQL.format(context=doc["context"], question=doc["question"])


def sql_target(doc: dict) -> str:
    return doc["messages"][1]["content"] if "messages" in doc else doc["answer"]


def viggo(doc: dict) -> str:
    return VIGGO.format(target=doc["target"])


def viggo_target(doc: dict) -> str:
    return doc["meaning_representation"]


NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
FINAL = "The final answer is:"


def after_hashes(text: str) -> str:
    """HALO's GSM8K answer: the stripped text after the last ``####`` (the whole text if none)."""
    return text.strip().split("####")[-1].strip()


def _number(s: str) -> float | None:
    s = s.replace(",", "").rstrip(".")
    try:
        return float(s)
    except ValueError:
        return None


def final_number(text: str) -> float | None:
    """QWHA's extraction: the first number after "The final answer is:", otherwise the last number."""
    if FINAL in text:
        m = NUMBER.search(text.split(FINAL)[-1])
        if m:
            return _number(m.group())
    found = NUMBER.findall(text)
    return _number(found[-1]) if found else None


def gsm8k_match(pred: str, label: str) -> bool:
    return after_hashes(pred) == after_hashes(label)


def number_match(pred: str, label: str | float) -> bool:
    """``pred``'s final number equals ``label`` (a number, or a GSM8K reference with ``####``)."""
    gold = label if isinstance(label, float | int) else _number(after_hashes(label))
    got = final_number(pred)
    return got is not None and gold is not None and abs(got - float(gold)) < 1e-6


def sql_match(pred: str, label: str) -> bool:
    return pred.strip() == label.strip()


def viggo_parts(mr: str) -> tuple[str, list[str]]:
    """``inform(name[X], rating[good])`` -> ("inform", sorted attributes)."""
    mr = mr.strip()
    fn, _, rest = mr.partition("(")
    attrs = rest[:-1] if rest.endswith(")") else rest
    return fn.strip(), sorted(a.strip() for a in attrs.split(","))


def viggo_match(pred: str, label: str) -> bool:
    return viggo_parts(pred) == viggo_parts(label)


def _score(match, pred: list[str], label) -> dict[str, float]:
    return {"exact_match": float(match(pred[0], label))}


# lm-eval ``process_results(doc, results)`` for each task YAML
def score_gsm8k(doc: dict, results: list[str]) -> dict[str, float]:
    return _score(gsm8k_match, results, doc["answer"])


def score_gsm8k_cot(doc: dict, results: list[str]) -> dict[str, float]:
    return _score(number_match, results, doc["answer"])


def score_asdiv(doc: dict, results: list[str]) -> dict[str, float]:
    return _score(number_match, results, float(doc["number"]))


def score_sql(doc: dict, results: list[str]) -> dict[str, float]:
    return _score(sql_match, results, sql_target(doc))


def score_viggo(doc: dict, results: list[str]) -> dict[str, float]:
    return _score(viggo_match, results, doc["meaning_representation"])


SQL_TEST = 1000  # sql-create-context has one split: its last rows are the test set, data=sql trains on the first


def sql_test_docs(ds):
    """The hub test set of qexp_sql: the last ``SQL_TEST`` rows of sql-create-context's train split."""
    return ds.select(range(max(len(ds) - SQL_TEST, 0), len(ds)))
