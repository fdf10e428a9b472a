"""OmniQuant, AWQ, EfficientQAT (Block-AP + E2E-QP) and IR-QLoRA (ICQ + IEC): base stages and methods."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from qexp.config import ConfigError, QuantConfig, validate
from qexp.models import targets as find_targets
from qexp.quant import QuantSpec, rtn
from qexp.quant.awq import awq_weights
from qexp.quant.base import base_quantizer
from qexp.quant.blockap import BlockAP, blockap_results
from qexp.quant.blockwise import block_errors
from qexp.quant.icq import code_entropy, icq
from qexp.quant.omniquant import omniquant_results
from tests.conftest import tiny_llama

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _setup(outliers: bool = False):
    model = tiny_llama()
    if outliers:  # a few large activation channels, as LLMs have (what AWQ protects)
        for layer in model.model.layers:
            layer.input_layernorm.weight.data[:3] *= 8
            layer.post_attention_layernorm.weight.data[5:8] *= 8
    tg = find_targets(model, TARGETS)
    ids = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(0))
    return model, tg, ids


def _rtn(tg, spec):
    return {n: rtn(m.weight.detach(), spec) for n, m in tg.items()}


@pytest.mark.parametrize("sym", [False, True])
def test_omniquant_lowers_the_block_output_error_against_rtn(sym):
    model, tg, ids = _setup()
    spec = QuantSpec(3, 32, sym)
    before = {n: m.weight.clone() for n, m in tg.items()}
    log: list = []
    omni = omniquant_results(spec, model, dict(tg), ids, epochs=20, batch=2, lr=5e-2, log=log)  # tiny: few steps
    assert all(torch.equal(m.weight, before[n]) for n, m in tg.items())  # the model keeps W0
    assert all(b["loss_last"] < 0.95 * b["loss_first"] for b in log)  # the clip factors learn
    e_omni, e_rtn = (sum(block_errors(model, dict(tg), ids, r)) for r in (omni, _rtn(tg, spec)))
    assert e_omni < 0.9 * e_rtn
    n = next(iter(omni))
    assert not torch.equal(omni[n].scale, _rtn(tg, spec)[n].scale)  # learned ranges, RTN's rounding
    assert omni[n].integer_zero


def test_blockap_lowers_the_block_output_error_and_its_result_is_its_forward():
    model, tg, ids = _setup()
    spec = QuantSpec(2, 32)
    res = blockap_results(spec, model, dict(tg), ids, epochs=10, batch=2, lr=1e-3, weight_lr=1e-3)
    assert sum(block_errors(model, dict(tg), ids, res)) < 0.9 * sum(block_errors(model, dict(tg), ids,
                                                                                 _rtn(tg, spec)))
    q = BlockAP(tg["model.layers.0.mlp.up_proj"].weight, spec)
    with torch.no_grad():
        q.weight.add_(0.01 * torch.randn_like(q.weight))
        q.zero.add_(0.3)  # a fractional zero point: rounded (STE) in the forward, stored rounded
        assert torch.equal(q.result().dequantize(), q())  # what trained is what is stored
    assert q.result().integer_zero


def test_awq_keeps_the_fp_model_and_lowers_the_block_output_error():
    model, tg, ids = _setup(outliers=True)
    spec = QuantSpec(3, 32)
    plain = _rtn(tg, spec)
    e_rtn = sum(block_errors(model, dict(tg), ids, plain))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    pre, report = awq_weights(spec, model, dict(tg), ids, grid=20, tokens=256)
    with torch.no_grad():  # scales folded into the norms / previous linears: the same fp function
        assert torch.allclose(model(input_ids=ids).logits, logits, atol=1e-4, rtol=1e-4)
    assert max(report["awq_alpha"].values()) > 0  # some input was scaled
    for n, m in tg.items():  # the rounding sees the model's own (scaled, folded) weight, at most clipped
        w = m.weight.detach()
        assert ((pre[n] - w).abs() <= (w.abs() - pre[n].abs()).clamp(min=0) + 1e-6).all(), n
        assert torch.equal(pre[n], w) if n.endswith(("q_proj", "k_proj")) else not torch.equal(pre[n], w)
    awq = {n: rtn(pre[n], spec) for n in tg}
    assert sum(block_errors(model, dict(tg), ids, awq)) < e_rtn


def test_icq_raises_the_code_entropy():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 128, generator=g) * 0.02 + 0.01 * torch.rand(64, 1, generator=g)  # off-centre rows
    w[:, ::17] *= 4  # heavy tails
    for spec in (QuantSpec(4, 64, True), QuantSpec(3, 32, True), QuantSpec(2, 64, True)):
        h_icq = code_entropy(icq(w, spec).codes, spec)
        h_rtn = code_entropy(rtn(w, spec).codes, spec)
        assert h_icq.mean() > h_rtn.mean() + 0.05 and (h_icq >= h_rtn - 1e-6).float().mean() > 0.9
        q = icq(w, spec)
        assert not q.integer_zero and (q.dequantize() - w).abs().max() < (w.abs().max() / 2 ** (spec.bits - 2))


def test_irqlora_iec_starts_at_the_base_and_merges_exactly():
    from qexp.methods.irqlora import IRQLoRALinear, iec_update

    spec = QuantSpec(3, 32, True)
    w = torch.randn(48, 64) * 0.02
    layer = IRQLoRALinear(icq(w, spec), None, rank=8, alpha=16.0, dropout=0.0)
    x = torch.randn(5, 64)
    assert torch.equal(layer(x), layer.base(x))  # B = 0 and β = 0: the ICQ base
    with torch.no_grad():
        layer.lora_B.normal_()
        layer.beta_A.fill_(0.5)
        layer.beta_B.fill_(-0.25)
    h = x @ layer.lora_A.T + 0.5 * x.reshape(5, 8, 8).mean(-1)  # IEC written out
    u = (h @ layer.lora_B.T).reshape(5, 8, 6) - 0.25 * h.unsqueeze(-1)
    assert torch.allclose(iec_update(x, layer.lora_A, layer.lora_B, layer.beta_A, layer.beta_B, 2.0),
                          2.0 * u.reshape(5, 48), atol=1e-6)
    layer.eval()
    assert torch.equal(layer.merge()(x), layer(x))


@pytest.mark.parametrize("method,extra", [("omniquant", []), ("awq", []), ("efficientqat", []), ("irqlora", []),
                                          ("lrqat", ["quant.init=omniquant"]), ("peqa", ["quant.awq=true"])])
def test_cells(cfg_factory, method, extra):
    from qexp.run import run_cell

    rec = run_cell(cfg_factory(f"method={method}", "group_size=32", *extra))
    assert rec["status"] == "ok", rec.get("error")
    m = rec["merge"]
    if method == "irqlora":
        assert m["deployed"] == "integer base + fp adapter" and m["max_abs_logit_diff"] == 0
    else:
        assert m["lossless"] and m["deployed"] == "integer"  # efficientqat: the merge is exact


def test_bad_input_is_refused_before_work(cfg_factory):
    with pytest.raises(ConfigError, match="method=efficientqat needs quant.init=blockap .*not quant.init=rtn"):
        validate(cfg_factory("method=efficientqat", "quant.init=rtn"))
    with pytest.raises(ConfigError, match="method=awq needs quant.awq=true"):
        validate(cfg_factory("method=awq", "quant.awq=false"))
    for over in (["method=omniquant"], ["method=awq"], ["method=peqa", "quant.init=omniquant"]):
        cfg = cfg_factory(*over)
        OmegaConf.set_struct(cfg, False)
        cfg.data.train.name = "???"  # no calibration source at all
        with pytest.raises(ConfigError, match=r"needs calibration data, but data.train.name is not set"):
            validate(cfg)
    with pytest.raises(ConfigError, match="quant.range=icq is a range of the RTN base"):
        validate(cfg_factory("method=irqlora", "quant.init=gptq"))
    with pytest.raises(ConfigError, match="choose one"):
        validate(cfg_factory("method=awq", "quant.magr=true"))
    with pytest.raises(ConfigError, match="quant.init='bogus' is not valid; choose one of: rtn, gptq, omniquant"):
        validate(cfg_factory("quant.init=bogus"))
    with pytest.raises(ConfigError, match="quant.recon.epochs"):
        validate(cfg_factory("method=omniquant", "quant.recon.epochs=0"))


def test_base_quantizer_runs_omniquant_after_awq_on_the_awq_weights():
    model, tg, ids = _setup(outliers=True)
    cfg = OmegaConf.structured(QuantConfig(init="omniquant", awq=True, awq_tokens=128))
    cfg.recon.epochs, cfg.recon.samples = 1, 4
    fn = base_quantizer(cfg, QuantSpec(3, 32), model, dict(tg), lambda: ids)
    n = "model.layers.0.mlp.gate_proj"
    assert fn(n, tg[n]).codes.shape == tg[n].weight.shape
