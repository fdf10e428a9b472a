"""Bad input is refused before any work: every value of issue 16's table, and a sweep with one bad cell."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException

from qexp.config import ConfigError

from .conftest import TINY, make_cfg

ROOT = Path(__file__).resolve().parents[1]

BAD = {  # overrides -> what the error must say (key, value, valid range or choices)
    "bits": (["bits=5"], r"bits=5 is not valid; choose one of: 2, 3, 4, 8"),
    "steps": (["train.steps=-1"], r"train.steps=-1 is not valid; use a number >= 1"),
    "eval_seqlen": (["eval.seqlen=0"], r"eval.seqlen=0 is not valid; use a number >= 2"),
    "lr_nan": (["train.lr=nan"], r"train.lr=nan is not valid; use a number >= 0"),
    "warmup": (["train.warmup_ratio=2"], r"train.warmup_ratio=2.0 is not valid; use a number 0 to 1"),
    "files": (["data.train.kind=files", "data.train.files=[/nonexistent.jsonl]"],
              r"data.train.files=\['/nonexistent.jsonl'\]: \['/nonexistent.jsonl'\] not found"),
    "path_embedded": (["model=smollm2_135m", "model.path={empty}"],
                      r"model.path='.*' has no meaning for model=smollm2_135m \(model.source=embedded"),
    "path_random": (["model.path={empty}"], r"model.path='.*' has no meaning for model=tiny_random"),
    "path_hub": (["model=llama2_7b", "model.path={empty}"], r"model.path='.*' is not a checkpoint directory"),
    "plus_key": (["+train.stpes=3"], r"train.stpes is not a config key; valid keys under train: steps, "),
    "plus_root": (["+lerning_rate=3"], r"lerning_rate is not a config key; valid keys under the root"),
    "group_size": (["group_size=48"], r"group_size=48 does not divide .*; valid for this model: 16, 32, 64, -1"),
    "scheduler": (["train.scheduler=cosin"], r"train.scheduler='cosin' is not valid; choose one of: linear, cosine"),
    "export": (["export=compressed", "bits=3"], r"export.formats: compressed cannot hold bits=3"),
    "method_key": (["method=lrqat", "method.phi=int4"], r"method.phi='int4' is not valid"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_each_bad_value_is_refused_before_any_model_loads(case, tmp_path, monkeypatch):
    from qexp import models
    from qexp.run import run_cell

    def no_load(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(models, "load", no_load)
    empty = tmp_path / "empty"
    empty.mkdir()
    overrides, message = BAD[case]
    cfg = make_cfg(*(o.format(empty=empty) for o in overrides), results_dir=tmp_path / "results")
    with pytest.raises(ConfigError, match=message):
        run_cell(cfg)
    assert not (tmp_path / "results").exists()  # a pure config error writes no record folder


def test_a_misspelt_key_without_plus_is_refused_by_composition():
    with pytest.raises(ConfigCompositionException, match="stpes"):
        make_cfg("train.stpes=3")


def test_plus_stays_open_where_the_schema_allows_extras():
    from qexp.preflight import check

    check(make_cfg("+model.random.rope_theta=5000", "+eval.num_fewshot.qexp_mmlu=5"))


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "qexp.run", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)


def test_a_sweep_with_one_bad_cell_runs_nothing_and_names_it(tmp_path):
    r = _cli("--multirun", "method=rtn,peqa", "bits=3,5", *TINY, f"results_dir={tmp_path}/r",
             f"hydra.sweep.dir={tmp_path}/h")
    assert r.returncode == 2
    assert "2 of 4 cells of this sweep are invalid; nothing was run" in r.stderr
    assert "- method=rtn bits=5: ConfigError: bits=5 is not valid; choose one of: 2, 3, 4, 8" in r.stderr
    assert "- method=peqa bits=5: ConfigError" in r.stderr and "bits=3:" not in r.stderr
    assert "skip_invalid=true" in r.stderr
    assert not (tmp_path / "r").exists() and ": load ..." not in r.stdout + r.stderr


def test_skip_invalid_runs_the_good_cells_and_lists_the_bad(tmp_path):
    r = _cli("--multirun", "method=rtn", "group_size=48,32", *TINY, f"results_dir={tmp_path}/r",
             f"hydra.sweep.dir={tmp_path}/h", "skip_invalid=true")
    assert r.returncode != 0  # the sweep still reports the bad cell at the end
    assert "1 of 2 cells of this sweep are invalid; running the valid ones" in r.stderr
    assert "1 of 2 cells failed" in r.stderr and "group_size=48 does not divide" in r.stderr
    records = list((tmp_path / "r").rglob("result.json"))  # the bad cell came first; the sweep went on
    assert [p.parent.name.split("-")[2] for p in records] == ["w3g32"]  # no record for the bad cell
