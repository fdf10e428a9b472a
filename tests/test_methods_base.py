"""The first four methods pinned to their defining properties, on tiny random Llamas."""

import pytest
import torch

from qexp import adapt, models
from qexp.config import QuantConfig
from qexp.methods import Method, get, register, registry
from qexp.methods.lora import LoRAConfig
from qexp.methods.qlora import QLoRAConfig
from qexp.quant import QuantLinear, QuantSpec

from .conftest import tiny_llama

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def attach(model, name: str, cfg=None, spec: QuantSpec | None = None):
    method = get(name)(cfg or get(name).Config(name=name), spec or QuantSpec(3, 32))
    adapt.attach(model, method, models.targets(model, TARGETS), QuantConfig(), calib=lambda: None)
    return method


def batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 128, (2, 32), generator=g)


def train_steps(model, method, steps=5, lr=1e-2):
    opt = method.optimizer(model, lr, 0.0, steps)
    x = batch()
    losses = []
    for _ in range(steps):
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def test_registry_refuses_duplicate_names():
    assert {"rtn", "lora", "qlora", "peqa"} <= set(registry())

    class Fake(Method):
        name = "peqa"

    with pytest.raises(ValueError, match="already registered"):
        register(Fake)


def test_unknown_method_names_choices():
    with pytest.raises(KeyError, match="choose one of: .*peqa"):
        get("nope")


def test_rtn_is_exactly_the_quantized_base():
    model = tiny_llama()
    x = batch()
    attach(model, "rtn")
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, QuantLinear)
    rep = adapt.merge(model, x)
    assert rep["on_grid"] and rep["lossless"] and rep["max_abs_logit_diff"] == 0.0


def test_peqa_trains_only_scales_and_codes_never_change():
    model = tiny_llama()
    method = attach(model, "peqa")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(".scale") for n in trainable)
    layer = model.model.layers[1].mlp.down_proj
    codes0, scale0 = layer.codes.clone(), layer.scale.detach().clone()
    losses = train_steps(model, method)
    assert losses[-1] < losses[0]
    assert torch.equal(layer.codes, codes0) and not torch.equal(layer.scale.detach(), scale0)
    rep = adapt.merge(model, batch(1))
    merged = model.model.layers[1].mlp.down_proj
    assert isinstance(merged, QuantLinear) and torch.equal(merged.codes, codes0)
    assert rep["lossless"] and rep["max_abs_logit_diff"] == 0.0


def test_lora_starts_at_fp_model_and_merges_to_float():
    model = tiny_llama()
    x = batch()
    ref = model(input_ids=x).logits
    method = attach(model, "lora", LoRAConfig(name="lora", rank=4, alpha=8))
    assert torch.allclose(model(input_ids=x).logits, ref, atol=1e-6)  # B = 0 at init
    train_steps(model, method)
    rep = adapt.merge(model, x)
    assert not rep["on_grid"] and not rep["lossless"] and rep["deployed"] == "float"
    assert rep["max_abs_logit_diff"] < 1e-3  # folding BA into W is exact up to float rounding


def test_qlora_merged_requantized_differs_from_unmerged_and_says_so():
    model = tiny_llama()
    method = attach(model, "qlora", QLoRAConfig(name="qlora", rank=4, alpha=8), QuantSpec(2, 32))
    train_steps(model, method, steps=10, lr=5e-2)
    rep = adapt.merge(model, batch(1))
    assert rep["deployed"] == "integer (re-quantized)"
    assert not rep["on_grid"] and not rep["lossless"] and rep["max_abs_logit_diff"] > 0
    assert isinstance(model.model.layers[0].mlp.up_proj, QuantLinear)
