"""Every named paper reproduction composes, passes the preflight, and sweeps over real methods and bits."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from qexp.config import BITS
from qexp.methods import registry
from qexp.preflight import check

from .conftest import CONF

EXPERIMENTS = sorted(p.stem for p in (Path(CONF).parent / "experiments" / "experiment").glob("*.yaml"))


def test_each_paper_comparison_has_both_scales():
    stems = {e.rsplit("_", 1)[0] for e in EXPERIMENTS}
    main = {"lota_t1", "lrqat_t4", "l4q_t23", "qwha_t3", "lota_t1_tasks", "qwha_t3_gsm8k",
            "l4q_t1", "l4q_t4", "l4q_t56", "l4q_t78", "lrqat_t5", "lrqat_t5_sq",
            "qwha_t2", "qwha_t4", "qwha_t4_gsm8k", "qwha_t5", "qwha_t13", "qwha_t14"}
    # the baselines' tables and the budget study: a paper scale optional
    others = {"lrqat_t2", "lrqat_t3", "efficientqat_t4", "budget"}
    assert main <= stems and stems - main <= others
    assert all(f"{s}_{scale}" in EXPERIMENTS for s in main for scale in ("paper", "embedded"))
    assert all(f"{s}_embedded" in EXPERIMENTS for s in stems)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes_and_validates(name):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"+experiment={name}"], return_hydra_config=True)
    params = cfg.hydra.sweeper.params
    assert {int(b) for b in str(params.bits).split(",")} <= set(BITS)
    assert cfg.name == name
    for method in params.method.split(","):  # a method, or an experiment's variant of one (<name>/<method>)
        with initialize_config_dir(config_dir=CONF, version_base="1.3"):
            cell = compose(config_name="config", overrides=[f"+experiment={name}", f"method={method}"])
        # <experiment>/<method>, or a table's switch of a method (qwha_t4/dct: qwha with transform=dct,
        # qwha_t3/gptq_magr: gptq with quant.magr=true)
        leaf = method.split("/")[-1]
        assert cell.method.name in registry() and (leaf == cell.method.name or
                                                   method.startswith(f"{cell.method.name}_") or
                                                   leaf.startswith(f"{cell.method.name}_"))
        check(cell)  # the whole preflight a run does: values, files, shapes, tasks
    if name.endswith("_embedded"):  # offline data: the embedded corpora, or ASDiv for the generation tables
        assert cfg.model.name == "smollm2_135m" and cfg.data.name in ("embedded", "asdiv")
    else:
        assert cfg.model.source == "hub" and cfg.data.train.kind == "hub"
