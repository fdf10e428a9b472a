"""GPTQ: lower layer-output error than RTN on the calibration inputs, codes on the grid."""

import pytest
import torch

from qexp.config import QuantConfig
from qexp.models import targets as find_targets
from qexp.quant import QuantSpec, rtn
from qexp.quant.base import base_quantizer
from qexp.quant.gptq import gptq, gptq_results

from .conftest import tiny_llama


def _correlated_inputs(n: int = 1024, d_in: int = 128, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d_in, d_in, generator=g) / d_in**0.5
    x = torch.randn(n, d_in, generator=g) @ mix + 0.3 * torch.randn(n, d_in, generator=g)
    x[:, :4] *= 8  # a few outlier features, as in LLM activations
    return x


def _out_err(x: torch.Tensor, w: torch.Tensor, w_hat: torch.Tensor) -> float:
    return float((x @ w.T - x @ w_hat.T).norm())


@pytest.mark.parametrize("bits", [2, 3])
@pytest.mark.parametrize(("group_size", "symmetric", "act_order"), [
    (32, False, False), (32, False, True), (-1, False, False), (-1, True, True), (32, True, False)])
def test_gptq_beats_rtn_on_layer_output(bits, group_size, symmetric, act_order):
    x = _correlated_inputs()
    w = torch.randn(48, 128, generator=torch.Generator().manual_seed(1)) * 0.05
    spec = QuantSpec(bits, group_size, symmetric)
    qw = gptq(w, 2 * x.T @ x / len(x), spec, act_order=act_order)
    assert qw.codes.min() >= spec.qmin and qw.codes.max() <= spec.qmax
    assert qw.scale.shape == qw.zero.shape == (48, 1 if group_size == -1 else 4)
    e_gptq, e_rtn = _out_err(x, w, qw.dequantize()), _out_err(x, w, rtn(w, spec).dequantize())
    assert e_gptq < 0.85 * e_rtn, (e_gptq, e_rtn)


@pytest.mark.parametrize("act_order", [False, True])
def test_diagonal_hessian_is_rtn(act_order):
    """With uncorrelated inputs there is no error to feed back: GPTQ must reduce to RTN exactly."""
    torch.manual_seed(0)
    w = torch.randn(16, 64)
    spec = QuantSpec(3, 16)
    qw = gptq(w, torch.diag(torch.rand(64) + 0.5), spec, act_order=act_order)
    ref = rtn(w, spec)
    assert torch.equal(qw.codes, ref.codes) and torch.equal(qw.scale, ref.scale)


def test_dead_inputs_are_handled():
    x = _correlated_inputs(512, 64)
    x[:, 5] = 0.0  # an input feature that never fires: H has a zero row/column
    w = torch.randn(8, 64) * 0.05
    qw = gptq(w, 2 * x.T @ x / len(x), QuantSpec(3, 32))
    assert torch.isfinite(qw.scale).all() and torch.isfinite(qw.dequantize()).all()


def _linear_inputs(model, names, ids) -> dict[str, torch.Tensor]:
    xs, hooks = {}, []

    def keep(name):
        def hook(mod, args, out):
            xs[name] = args[0].reshape(-1, args[0].shape[-1])
        return hook

    for n in names:
        hooks.append(model.get_submodule(n).register_forward_hook(keep(n)))
    with torch.no_grad():
        model(input_ids=ids)
    for h in hooks:
        h.remove()
    return xs


@pytest.mark.parametrize("sequential", [False, True])
def test_quantizer_on_tiny_llama(sequential):
    model = tiny_llama()
    targets = find_targets(model, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    weights = {n: m.weight.clone() for n, m in targets.items()}
    ids = torch.randint(0, 128, (16, 32), generator=torch.Generator().manual_seed(0))
    spec = QuantSpec(2, 32)
    results = gptq_results(QuantConfig(init="gptq"), spec, model, targets, ids, sequential=sequential)
    assert all(torch.equal(m.weight, weights[n]) for n, m in targets.items())  # the fp model is restored
    assert set(results) == set(targets)
    xs = _linear_inputs(model, list(targets), ids)
    # one-pass: every layer saw fp inputs; sequential: block 0 did (later blocks see quantized inputs)
    checked = [n for n in targets if not sequential or ".layers.0." in n]
    for n in checked:
        qw = results[n]
        assert qw.codes.min() >= spec.qmin and qw.codes.max() <= spec.qmax
        w = weights[n]
        assert _out_err(xs[n], w, qw.dequantize()) < _out_err(xs[n], w, rtn(w, spec).dequantize()), n


def test_base_quantizer_dispatches_to_gptq():
    model = tiny_llama(layers=1)
    targets = find_targets(model, ["q_proj", "down_proj"])
    ids = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    fn = base_quantizer(QuantConfig(init="gptq", act_order=True), QuantSpec(3, -1), model, targets, lambda: ids)
    name = "model.layers.0.self_attn.q_proj"
    qw = fn(name, targets[name])
    assert qw.scale.shape == (64, 1) and qw.codes.dtype == torch.int8
    with pytest.raises(KeyError, match="no result"):
        fn("lm_head", model.lm_head)


def test_gptq_cell(cfg_factory):
    from qexp.run import run_cell

    rec = run_cell(cfg_factory("method=gptq", "bits=2"))
    assert rec["status"] == "ok" and rec["config"]["method"]["name"] == "gptq"
    assert rec["config"]["quant"]["init"] == "gptq"
    assert rec["merge"]["lossless"] and rec["merge"]["deployed"] == "integer"
    alias = cfg_factory("method=rtn", "quant.init=gptq")  # the same computation under the name rtn
    assert alias.quant.init == "gptq" and alias.method.name == "rtn"


def test_sequential_feeds_quantized_outputs_forward():
    """Block 0 sees the fp inputs either way; later blocks see the quantized blocks' outputs."""
    model = tiny_llama()
    targets = find_targets(model, ["q_proj", "down_proj"])
    ids = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(0))
    cfg, spec = QuantConfig(init="gptq"), QuantSpec(2, 32)
    seq = gptq_results(cfg, spec, model, targets, ids, sequential=True)
    one = gptq_results(cfg, spec, model, targets, ids, sequential=False)
    for n in targets:
        same = torch.equal(seq[n].codes, one[n].codes) and torch.equal(seq[n].scale, one[n].scale)
        assert same == (".layers.0." in n), n


def test_gptq_cache_reuses_only_an_identical_base(tmp_path, monkeypatch):
    import qexp.quant.gptq as g

    model = tiny_llama(layers=1)
    targets = find_targets(model, ["q_proj", "down_proj"])
    ids = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    cfg, spec = QuantConfig(init="gptq"), QuantSpec(3, 32)
    first = g.gptq_quantizer(cfg, spec, model, targets, ids, tmp_path)
    assert len(list(tmp_path.glob("*.pt"))) == 1
    calls = []
    real = g.gptq_results
    monkeypatch.setattr(g, "gptq_results", lambda *a: calls.append(1) or real(*a))
    again = g.gptq_quantizer(cfg, spec, model, targets, ids, tmp_path)
    assert not calls  # loaded, not recomputed
    for n, lin in targets.items():
        a, b = first(n, lin), again(n, lin)
        assert torch.equal(a.codes, b.codes) and torch.equal(a.scale, b.scale) and torch.equal(a.zero, b.zero)
    # anything GPTQ depends on changes the key: bits, settings, calibration ids, weights
    g.gptq_quantizer(cfg, QuantSpec(2, 32), model, targets, ids, tmp_path)
    g.gptq_quantizer(QuantConfig(init="gptq", damp=0.1), spec, model, targets, ids, tmp_path)
    g.gptq_quantizer(cfg, spec, model, targets, ids.flip(0), tmp_path)
    with torch.no_grad():
        next(iter(targets.values())).weight[0, 0] += 1.0
    g.gptq_quantizer(cfg, spec, model, targets, ids, tmp_path)
    assert len(calls) == 4 and len(list(tmp_path.glob("*.pt"))) == 5


def test_quant_cache_switch_keeps_the_cell_id(cfg_factory):
    from qexp.results import cell_id

    assert cell_id(cfg_factory("quant.cache=false")) == cell_id(cfg_factory())
    assert cell_id(cfg_factory("quant.init=gptq", "quant.damp=0.1")) != cell_id(cfg_factory("quant.init=gptq"))
