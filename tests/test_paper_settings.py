"""Every cell of the *_paper experiments composes to the papers' settings in experiments/paper_settings.yaml.

One case per experiment x grid method x bits (x group size): compose ``+experiment=<x> method=<m> bits=<b>``
as the sweep does and compare each key of the table. An entry marked ``gap`` is a known mismatch: the
composed value must still differ, so fixing the config means updating the table too.
"""

from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from .conftest import CONF

TABLE = yaml.safe_load((Path(CONF).parent / "experiments" / "paper_settings.yaml").read_text())
PAPER_EXPERIMENTS = sorted(p.stem for p in (Path(CONF).parent / "experiments" / "experiment").glob("*_paper.yaml"))


def _compose(*overrides: str, hydra: bool = False):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=hydra)


def _grid(name: str) -> dict[str, list]:
    params = _compose(f"+experiment={name}", hydra=True).hydra.sweeper.params
    return {k: [yaml.safe_load(v) for v in str(params[k]).split(",")] for k in params}


def _cells():
    for name in sorted(TABLE):
        grid = TABLE[name]["grid"]
        for method in grid["method"]:
            for bits in grid["bits"]:
                for gs in grid.get("group_size", [None]):
                    yield pytest.param(name, method, bits, gs, id=f"{name}-{method}-{bits}" + (f"-g{gs}" if gs else ""))


def _value(cfg, key: str):
    if key == "global_batch":
        return cfg.train.batch_size * cfg.train.grad_accum
    node = OmegaConf.select(cfg, key, default="<missing>")
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def test_table_covers_every_paper_experiment_and_its_grid():
    assert sorted(TABLE) == PAPER_EXPERIMENTS
    for name in PAPER_EXPERIMENTS:
        assert _grid(name) == TABLE[name]["grid"], f"{name}: sweep grid differs from paper_settings.yaml"


def test_every_entry_cites_methods_md():
    for name, exp in TABLE.items():
        sections = [exp["all"], *exp.get("methods", {}).values(),
                    *(e for per in exp.get("bits", {}).values() for e in per.values())]
        for entries in sections:
            for key, entry in entries.items():
                assert set(entry) >= {"value", "source"} and str(entry["source"]).startswith("§"), (name, key)
                assert set(entry) <= {"value", "source", "assumed", "code", "gap", "missing"}, (name, key)


@pytest.mark.parametrize("name,method,bits,group_size", list(_cells()))
def test_cell_matches_paper(name, method, bits, group_size):
    exp = TABLE[name]
    overrides = [f"+experiment={name}", f"method={method}", f"bits={bits}"]
    overrides += [f"group_size={group_size}"] if group_size is not None else []
    cfg = _compose(*overrides)
    entries = {**exp["all"], **exp.get("methods", {}).get(method, {}),
               **exp.get("bits", {}).get(method, {}).get(bits, {})}
    # the grid entry's last part, or the pinned name of a table's switch of a method (qwha_t4/dct is qwha)
    assert cfg.bits == bits and cfg.method.name == entries.get("method.name", {}).get("value", method.split("/")[-1])
    for key, entry in entries.items():
        got, paper = _value(cfg, key), entry["value"]
        where = f"{name} method={method} bits={bits}: {key} composes to {got!r}, the paper's is {paper!r}"
        if "gap" in entry:
            assert got != paper, f"{where}; the table marks a gap ({entry['gap']}): remove the mark"
        else:
            assert got == paper, where
