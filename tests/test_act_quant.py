"""Weight-activation-KV quantization: act_bits=16 is an exact no-op, the per-token fake-quant error
falls as act_bits rises, K/V are quantized inside attention, SmoothQuant keeps the fp function and
flattens what the quantizer sees, the record states the settings, bad values are refused first."""

from __future__ import annotations

import pytest
import torch

from qexp.config import ConfigError, validate
from qexp.quant.act import fake_quant_tokens, install, quantize_tokens
from qexp.quant.smoothquant import smooth
from tests.conftest import tiny_llama

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _names(model) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in TARGETS]


def _acts(seed: int = 0) -> torch.Tensor:
    x = torch.randn(64, 256, generator=torch.Generator().manual_seed(seed))
    x[:, :4] *= 30  # outlier channels
    return x


def test_act_bits_16_is_an_exact_no_op():
    x = _acts()
    assert fake_quant_tokens(x, 16) is x
    model, ids = tiny_llama(), torch.randint(0, 128, (2, 24))
    ref = model(ids).logits
    rep = install(model, _names(model), 16, 16)
    assert rep["act"] == "none" and rep["kv"] == "none"
    assert all(not m._forward_pre_hooks for m in model.modules())
    assert torch.equal(model(ids).logits, ref)


def test_fake_quant_error_falls_as_act_bits_rise_and_grid_is_per_token():
    x = _acts()
    errs = [float((quantize_tokens(x, b) - x).norm()) for b in (4, 6, 8)]
    assert errs[0] > errs[1] > errs[2] > 0
    q = quantize_tokens(x, 4)
    for row, orig in zip(q, x, strict=True):  # each token: at most 16 levels, one step of its own range
        step = (orig.max().clamp(min=0) - orig.min().clamp(max=0)) / 15
        assert row.unique().numel() <= 16 and (row - orig).abs().max() <= step * (1 + 1e-5)
    x.requires_grad_(True)
    fake_quant_tokens(x, 4).sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))  # straight-through


def test_model_error_falls_as_bits_rise_and_kv_is_quantized_in_attention():
    ids = torch.randint(0, 128, (2, 24))
    ref = tiny_llama()(ids).logits
    errs = {}
    for a, kv in [(4, 16), (8, 16), (16, 4), (16, 8)]:
        model = tiny_llama()
        rep = install(model, _names(model), a, kv)
        errs[(a, kv)] = float((model(ids).logits - ref).abs().max())
        assert (rep["act"] == "none") == (a == 16) and (rep["kv"] == "none") == (kv == 16)
    assert errs[(4, 16)] > errs[(8, 16)] > 0 and errs[(16, 4)] > errs[(16, 8)] > 0


def test_smoothquant_keeps_the_function_and_flattens_the_activations():
    ids = torch.randint(0, 128, (4, 32))
    model = tiny_llama()
    with torch.no_grad():  # outlier channels in the residual stream's norm, as in real LLMs
        for layer in model.model.layers:
            layer.input_layernorm.weight[:3] = 20.0
    ref = model(ids).logits

    def act_error(m) -> float:
        seen = []
        h = m.model.layers[0].self_attn.q_proj.register_forward_pre_hook(lambda mod, a: seen.append(a[0]))
        m(ids)
        h.remove()
        x = seen[0]
        return float(((quantize_tokens(x, 4) - x) @ m.model.layers[0].self_attn.q_proj.weight.T).norm())

    before = act_error(model)
    rep = smooth(model, ids, 0.5)
    assert rep["groups"] == 4 and rep["alpha"] == 0.5
    torch.testing.assert_close(model(ids).logits, ref, rtol=1e-4, atol=1e-4)
    assert act_error(model) < before


def test_cell_records_the_settings_and_merge_keeps_the_quantizer(cfg_factory):
    from qexp.run import run_cell

    rec = run_cell(cfg_factory("method=l4q", "bits=4", "group_size=32", "quant.act_bits=8", "quant.kv_bits=4",
                               "quant.smoothquant=true", "eval.fp_reference=true"))
    assert rec["status"] == "ok"
    q = rec["quant_act"]
    assert q["act_bits"] == 8 and q["kv_bits"] == 4 and "INT8" in q["act"] and "INT4" in q["kv"]
    assert q["smoothquant"]["alpha"] == 0.5
    assert rec["merge"]["lossless"]  # the merged layers inherit the activation quantizer
    assert rec["config"]["quant"]["act_bits"] == 8


@pytest.mark.parametrize("key", ["act_bits", "kv_bits"])
def test_bits_outside_the_choices_are_refused(cfg_factory, key):
    with pytest.raises(ConfigError, match=rf"quant.{key}=5 is not valid; choose one of: 4, 6, 8, 16"):
        validate(cfg_factory(f"quant.{key}=5"))
    with pytest.raises(ConfigError, match=r"quant.smoothquant=1.5 is not valid"):
        validate(cfg_factory("quant.smoothquant=1.5"))


def test_a_method_that_cannot_take_activation_quantization_says_so_first(cfg_factory, monkeypatch):
    from qexp.methods import get

    monkeypatch.setattr(get("lora"), "ACT_QUANT", False)
    monkeypatch.setattr(get("lora"), "ACT_QUANT_WHY", "a reason")
    with pytest.raises(ConfigError, match=r"method=lora cannot combine with activation quantization .*a reason"):
        validate(cfg_factory("method=lora", "quant.act_bits=8"))
    validate(cfg_factory("method=lora"))  # 16 bits: fine
    with pytest.raises(ConfigError, match=r"export files hold weights only"):
        validate(cfg_factory("method=peqa", "quant.kv_bits=8", "export=gptq"))
