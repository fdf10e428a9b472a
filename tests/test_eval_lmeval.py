"""lm-eval adapter: suite averages, records before/after merge, the papers' task names, embedded PIQA."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from qexp import models
from qexp.config import ConfigError, validate
from qexp.eval import lmeval
from qexp.eval.lmeval import MMLU_CATEGORIES, PAPER_TASKS, accuracy, check_tasks, suite_note, suite_scores, task_manager
from qexp.run import run_cell, summary
from qexp.tasks.build import build

from .conftest import make_cfg


@pytest.fixture(scope="module", autouse=True)
def offline_data():
    build()  # idempotent; `make setup` has normally done it


def test_suite_scores_metric_per_member():
    results = {"boolq": {"acc": 0.8}, "piqa": {"acc": 0.6, "acc_norm": 0.7}, "arc": {"acc": 0.3, "acc_norm": 0.5}}
    m, info = suite_scores(results, {"s": ["boolq", "piqa", "arc", "arc"], "gone": ["boolq", "wino"]})
    assert m["acc/s"] == pytest.approx((0.8 + 0.6 + 0.3 + 0.3) / 4)
    assert m["acc_norm/s"] == pytest.approx((0.8 + 0.7 + 0.5 + 0.5) / 4)  # boolq has no acc_norm: its acc
    assert info["s"]["acc_norm"] == ["acc", "acc_norm", "acc_norm", "acc_norm"]
    assert "acc/gone" not in m and "wino" in info["gone"]["skipped"]


def test_suite_stderr_counts_a_repeated_member_with_its_weight():
    """ARC stands twice in the papers' averages: its score, and so its error, counts twice (not as two
    independent tasks)."""
    details = {"suites": {"s": {"tasks": ["boolq", "arc", "arc"], "acc": ["acc"] * 3}},
               "results": {"boolq": {"acc_stderr": 0.03}, "arc": {"acc_stderr": 0.04}}}
    se, _ = suite_note(details, "s", "acc")
    assert se == pytest.approx(math.sqrt(0.03 ** 2 + (2 * 0.04) ** 2) / 3)


def test_default_eval_is_perplexity_only():
    cfg = make_cfg()
    assert list(cfg.eval.tasks) == []
    validate(make_cfg("eval=embedded"))
    with pytest.raises(ConfigError, match=r"eval\.accuracy_stages"):
        validate(make_cfg("eval=embedded", "eval.accuracy_stages=[after]"))


def test_run_cell_records_accuracy_at_base_and_final(cfg_factory):
    cfg = cfg_factory("method=rtn", "bits=4", "eval=embedded", "eval.limit=4",
                      "eval.tasks=[qexp_piqa,qexp_arc_standin]", "+eval.suites.pair=[qexp_piqa,qexp_arc_standin]")
    rec = run_cell(cfg)
    m = rec["metrics"]
    for stage in ("base", "final"):
        for key in ("ppl/wikitext_sample", "acc/qexp_piqa", "acc_norm/qexp_piqa", "acc/qexp_arc_standin",
                    "acc/pair", "acc_norm/pair"):
            assert 0 <= m[f"{key}/{stage}"] <= (1 if key.startswith("acc") else float("inf"))
        details = rec["eval"]["lm_eval"][stage]
        assert details["tasks"]["qexp_piqa"]["items"] == 4 and details["tasks"]["qexp_piqa"]["seconds"] > 0
        assert "skipped" in details["suites"]["csqa7_offline"]  # its other members were not run
        assert details["suites"]["pair"]["acc_norm"] == ["acc_norm", "acc_norm"]
        # per-item scores, one character per item, whose mean is the recorded accuracy (the bootstrap's input)
        for task in ("qexp_piqa", "qexp_arc_standin"):
            items = details["items"][task]
            for metric in ("acc", "acc_norm"):
                assert len(items[metric]) == 4 and set(items[metric]) <= {"0", "1"}
                assert items[metric].count("1") / 4 == pytest.approx(m[f"{metric}/{task}/{stage}"])
        windows = rec["eval"]["wikitext_sample"]["window_nll"][stage]
        assert len(windows) == rec["eval"]["wikitext_sample"]["windows"]
        assert math.exp(sum(windows) / len(windows)) == pytest.approx(m[f"ppl/wikitext_sample/{stage}"], rel=1e-3)
    assert len(json.dumps(rec["eval"])) < 20_000  # compact: a few KB here, a few hundred KB at most at full size
    # RTN's merge changes nothing, so the quantized base and the merged model score the same
    assert m["acc/pair/base"] == m["acc/pair/final"]
    assert "acc pair: base" in summary(rec)
    se = math.sqrt(sum(rec["eval"]["lm_eval"]["final"]["results"][t]["acc_stderr"] ** 2
                       for t in ("qexp_piqa", "qexp_arc_standin"))) / 2  # the standard error of a 2-task mean
    assert f"final {m['acc/pair/final']:.4f}±{se:.4f}  (4 items per task (eval.limit=4))" in summary(rec)
    assert rec["eval"]["lm_eval"]["final"]["suites"]["pair"]["stderr"]["acc"] == pytest.approx(se)  # in the record


def test_dequantized_once_gives_the_same_numbers_and_lets_go():
    from torch import nn

    from qexp.quant import QuantLinear, QuantSpec, rtn
    from qexp.quant.linear import dequantized_once

    torch.manual_seed(0)
    net = nn.Sequential(QuantLinear(rtn(torch.randn(32, 64), QuantSpec(3, 16)), torch.randn(32)), nn.ReLU(),
                        QuantLinear(rtn(torch.randn(8, 32), QuantSpec(2, 16))))
    x = torch.randn(5, 64)
    with torch.no_grad():
        want = net(x)
        with dequantized_once(net, torch.float32):
            assert all(m._dequantized is not None for m in net if isinstance(m, QuantLinear))
            net[0].codes.zero_()  # the pass reads the weights dequantized on entry, not the codes again
            got = net(x)
        assert torch.equal(got, want)
        assert net[0]._dequantized is None and not torch.equal(net(x), want)  # on exit: the codes again


def test_item_scores_are_compact_and_in_doc_order():
    rows = [{"doc_id": 2, "filter": "none", "acc": 1.0, "acc_norm": 0.0, "exact_match": 0.5},
            {"doc_id": 0, "filter": "none", "acc": 0.0, "acc_norm": 1.0, "exact_match": 0.25},
            {"doc_id": 0, "filter": "strict", "acc": 1.0, "acc_norm": 1.0}]  # another filter: not recorded
    out = lmeval.item_scores({"t": rows, "u": [{"doc_id": i, "acc": i % 2} for i in range(5)]})
    assert out["t"] == {"doc_ids": [0, 2], "acc": "01", "acc_norm": "10", "exact_match": [0.25, 0.5]}
    assert out["u"] == {"acc": "01010"}  # doc ids 0..n-1 are implied


def test_accuracy_leaves_global_rngs_alone():
    cfg = make_cfg("eval=embedded", "eval.limit=2", "eval.tasks=[qexp_boolq]")
    model, tok = models.load(cfg.model, cfg.cache_dir)
    states = torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()
    accuracy(model, tok, cfg.eval, cfg.cache_dir)
    assert torch.equal(states[0], torch.get_rng_state()) and states[1] == random.getstate()
    assert (states[2] == np.random.get_state()[1]).all()


def test_papers_task_names_are_in_lm_eval_registry():
    """conf/eval/papers.yaml names lm-eval's own tasks; all exist in its registry (no download)."""
    cfg = make_cfg("eval=papers")
    assert list(cfg.eval.tasks) == PAPER_TASKS and dict(cfg.eval.num_fewshot) == {"mmlu": 5}
    members = {t for ts in OmegaConf.to_container(cfg.eval.suites).values() for t in ts}
    assert set(MMLU_CATEGORIES) <= members
    registry = set(task_manager(True).all_tasks)
    assert set(PAPER_TASKS) | members <= registry
    check_tasks(PAPER_TASKS)
    with pytest.raises(ConfigError, match="arc_e"):
        check_tasks(["arc_e"])


@pytest.mark.slow
def test_embedded_piqa_above_chance():
    """SmolLM2-135M scores ~65 % on PIQA (chance 50 %): a broken prompt or label mapping fails this."""
    cfg = make_cfg("model=smollm2_135m", "eval=embedded", "eval.limit=200", "eval.tasks=[qexp_piqa]")
    model, tok = models.load(cfg.model, cfg.cache_dir)
    m, details = accuracy(model, tok, cfg.eval, cfg.cache_dir)
    assert details["tasks"]["qexp_piqa"]["items"] == 200
    assert m["acc_norm/qexp_piqa"] > 0.58 and m["acc/qexp_piqa"] > 0.55
