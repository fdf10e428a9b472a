"""Full-weight LSQ+ QAT: starts at the base RTN model, every weight trains, LSQ+ gradients,
bit-exact merge, golden loss of one step, one cell."""

from __future__ import annotations

import pytest
import torch

from qexp import adapt, models
from qexp.config import TARGETS, QuantConfig
from qexp.methods import get
from qexp.methods.qat import QATConfig, QATLinear
from qexp.quant import QuantLinear, QuantSpec, rtn

from .conftest import tiny_llama


def _attach(model, spec: QuantSpec, **kw) -> None:
    method = get("qat")(QATConfig(name="qat", **kw), spec)
    adapt.attach(model, method, models.targets(model, TARGETS), QuantConfig(sym=spec.symmetric), lambda: None)


def _layers(model) -> list[QATLinear]:
    return [m for m in model.modules() if isinstance(m, QATLinear)]


@pytest.mark.parametrize("sym", [True, False])
def test_init_is_the_rtn_model(sym):
    spec = QuantSpec(3, 32, sym)
    ref, model = tiny_llama(), tiny_llama()
    for name, lin in models.targets(ref, TARGETS).items():
        models.set_module(ref, name, QuantLinear(rtn(lin.weight, spec), lin.bias))
    _attach(model, spec)
    x = torch.randint(0, 128, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=x).logits, ref(input_ids=x).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sym", [True, False])
def test_merge_is_bit_exact_after_training_moves(sym):
    spec = QuantSpec(2, 32, sym)
    model = tiny_llama()
    _attach(model, spec)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for lay in _layers(model):
            lay.weight.add_(torch.randn(lay.weight.shape, generator=g) * 0.01)
            lay.scale.mul_(0.7 + 0.6 * torch.rand(lay.scale.shape, generator=g))
            lay.offset.add_(lay.scale * (torch.rand(lay.offset.shape, generator=g) - 0.5))
    x = torch.randint(0, 128, (3, 40))
    with torch.no_grad():
        before = model(input_ids=x).logits
    report = adapt.merge(model, x[:1, :16])
    assert report["lossless"] and report["float_zero_points"]
    with torch.no_grad():
        assert torch.equal(before, model(input_ids=x).logits)
    for m in model.modules():
        if isinstance(m, QuantLinear):
            assert m.codes.min() >= spec.qmin and m.codes.max() <= spec.qmax


def test_all_weights_train_with_lsq_plus_gradients():
    torch.manual_seed(0)
    spec = QuantSpec(3, 16, True)
    w = torch.randn(8, 32, dtype=torch.float64)
    qw = rtn(w, spec)
    lay = QATLinear(w, None, qw, learn_offset=True, use_grad_scale=True)
    with torch.no_grad():
        lay.scale.mul_(0.6)  # make some entries clip
        lay.offset.add_(0.05)
    x = torch.randn(6, 32, dtype=torch.float64)
    gy = torch.randn(6, 8, dtype=torch.float64)
    lay(x).backward(gy)
    s, beta = lay.scale.detach().unsqueeze(-1), lay.offset.detach().unsqueeze(-1)
    wn = (w.view(8, 2, 16) - beta) / s
    mask = (wn >= spec.qmin) & (wn <= spec.qmax)
    codes = wn.clamp(spec.qmin, spec.qmax).round()
    gw = (gy.T @ x).view(8, 2, 16)
    gscale = 1 / (16 * spec.qmax) ** 0.5
    assert (~mask).any() and mask.any()
    torch.testing.assert_close(lay.weight.grad, (gw * mask).view(8, 32))  # STE, clipped entries masked
    torch.testing.assert_close(lay.scale.grad, (gw * (codes - mask * wn)).sum(-1) * gscale)
    torch.testing.assert_close(lay.offset.grad, (gw * ~mask).sum(-1) * gscale)


def test_fixed_offset_switch():
    model = tiny_llama()
    _attach(model, QuantSpec(3, 32, False), learn_offset=False)
    names = {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad}
    assert names == {"weight", "scale"}


# Golden losses of one AdamW step (lr 1e-3) on a fixed batch: tiny_llama(seed 0), 3-bit g32 symmetric.
GOLDEN_QAT = (4.871232, 4.751755)


def test_one_step_lowers_loss_golden():
    model = tiny_llama()
    _attach(model, QuantSpec(3, 32, True))
    torch.manual_seed(123)
    ids = torch.randint(0, 128, (2, 32))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.0)
    model.train()
    loss0 = model(input_ids=ids, labels=ids).loss
    loss0.backward()
    assert all(lay.weight.grad is not None and lay.weight.grad.abs().sum() > 0 for lay in _layers(model))
    opt.step()
    with torch.no_grad():
        loss1 = model(input_ids=ids, labels=ids).loss
    assert loss1 < loss0
    assert (loss0.item(), loss1.item()) == pytest.approx(GOLDEN_QAT, abs=1e-4)


def test_cell_runs(cfg_factory):
    from qexp.run import run_cell

    rec = run_cell(cfg_factory("method=qat", "bits=2"))
    assert rec["status"] == "ok"
    assert rec["merge"]["lossless"] and rec["merge"]["deployed"] == "integer"


def test_weight_lr_param_groups():
    model = tiny_llama()
    method = get("qat")(QATConfig(name="qat", weight_lr=1e-5), QuantSpec(3, 32, True))
    adapt.attach(model, method, models.targets(model, TARGETS), QuantConfig(sym=True), lambda: None)
    groups = method.optimizer(model, lr=1e-3, weight_decay=0.01, total_steps=1).param_groups
    layers = _layers(model)
    assert [g["lr"] for g in groups] == [1e-5, 1e-3] and [g["weight_decay"] for g in groups] == [0.01, 0.0]
    assert len(groups[0]["params"]) == len(layers) and len(groups[1]["params"]) == 2 * len(layers)
    n = sum(len(g["params"]) for g in groups)
    assert n == sum(1 for p in model.parameters() if p.requires_grad)
