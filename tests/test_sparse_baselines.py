"""QWHA's sparse baselines (SSH, LoCA, SHiRA), the fast DCT/DHT, and QWHA's Table 4 switches."""

from __future__ import annotations

import math

import pytest
import torch
from scipy.fft import dct as scipy_dct

from qexp.methods.loca import LoCA, LoCAConfig, LoCALinear, LoCAOptimizer
from qexp.methods.qwha import QWHAConfig, layer_output_error, qwha_init, sparse_delta
from qexp.methods.shira import SHiRA, SHiRAConfig
from qexp.methods.ssh import SSH, SSHConfig, ssh_locations
from qexp.quant import QuantSpec, rtn
from qexp.quant import transforms as T
from tests.test_qwha import correlated_layer

F64 = torch.float64


@pytest.mark.parametrize("n", [7, 12, 48, 576, 1536])
def test_hartley_transform_is_its_own_inverse_up_to_scale(n):
    x = torch.randn(5, n, dtype=F64)
    torch.testing.assert_close(T.dht(T.dht(x)), n * x)
    j = torch.arange(n, dtype=F64)
    cas = torch.cos(2 * math.pi * torch.outer(j, j) / n) + torch.sin(2 * math.pi * torch.outer(j, j) / n)
    torch.testing.assert_close(T.dht(x), x @ cas)  # the definition, densely


@pytest.mark.parametrize("n", [7, 48, 576, 14336])
def test_fast_dct_is_the_orthonormal_dct_ii_and_inverts(n):
    x = torch.randn(3, n, dtype=F64)
    torch.testing.assert_close(T.dct(x), torch.from_numpy(scipy_dct(x.numpy(), type=2, norm="ortho")))
    torch.testing.assert_close(T.idct(T.dct(x)), x)


@pytest.mark.parametrize("name", T.TRANSFORMS)
def test_every_transform_has_qwha_scaling_and_an_exact_inverse(name):
    n = 48  # = 12·4, a WHT size too
    t_transposed = T.forward(torch.eye(n, dtype=F64), name)  # rows of I → Tᵀ
    torch.testing.assert_close(t_transposed.T @ t_transposed, n * torch.eye(n, dtype=F64))
    x = torch.randn(4, n, dtype=F64)
    torch.testing.assert_close(T.inverse(T.forward(x, name), name), x)
    torch.testing.assert_close(T.inverse2d(T.forward2d(x, name), name), x)
    with pytest.raises(ValueError, match=r"transform='fft' is not valid; choose one of: wht, dct, dht, none"):
        T.check("fft", n)


@pytest.mark.parametrize("transform", ["dct", "dht", "none"])
def test_table4_transforms_refine_like_qwha(transform):
    """DCA / DHA / plain sparse under QA init: AdaAlloc + refinement lowers the layer-output error."""
    _, _, dq, h = correlated_layer()
    p = 4 * sum(dq.shape)
    cfg = QWHAConfig(transform=transform)
    idx, c = qwha_init(dq, h, p, cfg)
    assert idx.numel() == p == idx.unique().numel()
    delta = sparse_delta(idx, c, dq.shape, 1.0, transform)
    assert layer_output_error(dq, delta, h) < 0.8 * layer_output_error(dq, torch.zeros_like(dq), h)


@pytest.mark.parametrize("select", ["ssh", "loca", "magnitude", "random"])
def test_table4_selections(select):
    _, _, dq, h = correlated_layer()
    p = 4 * sum(dq.shape)
    g = torch.Generator().manual_seed(0)
    idx, _ = qwha_init(dq, h, p, QWHAConfig(select=select), g)
    assert idx.numel() == p == idx.unique().numel()
    idx0, c0 = qwha_init(dq, h, p, QWHAConfig(select=select, init="zero"), torch.Generator().manual_seed(0))
    assert torch.equal(idx, idx0) and not c0.any()  # init=zero: the same locations, c = 0
    if select == "ssh":  # half of the budget is the magnitude selection's top half
        top, _ = qwha_init(dq, h, p // 2, QWHAConfig(select="magnitude"))
        assert set(top.tolist()) <= set(idx.tolist())


def _layer(method_cls, cfg, d_out=40, d_in=24):
    lin = torch.nn.Linear(d_in, d_out)
    qw = rtn(lin.weight.detach(), QuantSpec(3, 8))
    return lin, qw, method_cls(cfg, QuantSpec(3, 8)).layer("l", lin, qw)


@pytest.mark.parametrize("method_cls, cfg", [(SSH, SSHConfig(rank=2)), (LoCA, LoCAConfig(rank=2)),
                                             (SHiRA, SHiRAConfig(rank=2))])
def test_zero_init_budget_and_honest_merge(method_cls, cfg):
    lin, qw, layer = _layer(method_cls, cfg)
    x = torch.randn(6, 24)
    base = x @ qw.dequantize().T + lin.bias
    torch.testing.assert_close(layer(x).detach(), base)  # zero init: exactly the integer base
    assert layer.c.numel() == 2 * (24 + 40)  # QWHA's budget rule
    assert not layer.ON_GRID
    layer(x).pow(2).sum().backward()
    assert layer.c.grad.abs().sum() > 0
    with torch.no_grad():
        layer.c.add_(0.01 * torch.randn_like(layer.c))
    torch.testing.assert_close(layer.merge()(x), layer(x).detach(), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"method.rank=20: budget p=1280 exceeds d_in·d_out=960 of l; "
                                         r"use method.rank ≤ 15"):
        method_cls(type(cfg)(rank=20), QuantSpec(3, 8)).prepare(None, {"l": lin}, None)


def test_ssh_takes_half_by_hartley_magnitude_half_at_random():
    w0 = torch.randn(40, 24, dtype=F64)
    p = 100
    spectrum = T.forward2d(w0, "dht").abs().flatten()
    idx = ssh_locations(w0, p, 0.5, torch.Generator().manual_seed(1))
    other = ssh_locations(w0, p, 0.5, torch.Generator().manual_seed(2))
    top = set(torch.topk(spectrum, p // 2).indices.tolist())
    assert idx.numel() == p == idx.unique().numel()
    assert top <= set(idx.tolist()) and top <= set(other.tolist())  # the magnitude half is fixed
    assert set(idx.tolist()) != set(other.tolist())  # the random half is not
    _, _, layer = _layer(SSH, SSHConfig(rank=2))
    assert layer.two_d and layer.transform == "dht"


def test_shira_mask_never_changes():
    *_, layer = _layer(SHiRA, SHiRAConfig(rank=2))
    mask = layer.idx.clone()
    opt = torch.optim.AdamW([layer.c], lr=1e-2)
    target = torch.randn(40, 24)
    for _ in range(5):
        x = torch.randn(8, 24)
        loss = (layer(x) - x @ target.T).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.equal(layer.idx, mask)
    delta = (layer.delta() != 0).flatten()
    assert delta.any() and set(delta.nonzero().squeeze(1).tolist()) <= set(mask.tolist())  # ΔW only at the mask


def test_loca_location_gradient_moves_locations_toward_the_signal():
    """One coefficient at (3, 3) of a 2-D DCT spectrum whose target sits at (3, 4): the central
    difference of ∂L/∂F says "move right", and a location step moves it there."""
    d_out, d_in = 8, 16
    qw = rtn(torch.zeros(d_out, d_in), QuantSpec(4, 16))
    layer = LoCALinear(qw, None, torch.tensor([[3, 3]]), torch.tensor([1.0]), scale=1.0)
    f_target = torch.zeros(d_out, d_in)
    f_target[3, 4] = 1.0
    target = T.inverse2d(f_target, "dct")
    opt = LoCAOptimizer([layer], lr=0.0, weight_decay=0.0, total_steps=4,
                        cfg=LoCAConfig(loc_lr=1.0, loc_start=0.0, loc_end=1.0, loc_every=1))
    assert opt.is_location_step(0)
    loss = (layer.delta() - target).pow(2).sum()
    loss.backward()
    assert layer.loc.grad is None  # the estimate bypasses autograd (and gradient clipping)
    assert layer.loc_grad[0, 1] < 0 and layer.loc_grad[0, 0] == 0  # toward larger column, no row signal
    opt.step()
    assert layer.idx.tolist() == [3 * d_in + 4]
    assert float((layer.delta().detach() - target).pow(2).sum()) < 1e-12  # the coefficient now sits on the signal


def test_loca_schedule_alternates_and_freezes():
    opt = LoCAOptimizer([], lr=1e-3, weight_decay=0.0, total_steps=20, cfg=LoCAConfig())
    moves = [t for t in range(20) if opt.is_location_step(t)]
    assert moves == [3, 5, 7, 9, 11, 13, 15]  # after 10 %, every 2nd step, until 80 %


def test_loca_trains_coefficients_then_locations(cfg_factory):
    from qexp.run import run_cell

    rec = run_cell(cfg_factory("method=loca", "quant.init=rtn", "method.rank=2", "train.steps=6", "bits=3",
                               "group_size=32", "method.loc_start=0.2", "method.loc_every=1", "train.lr=1e-2"))
    assert rec["status"] == "ok", rec.get("error")
    assert rec["merge"]["deployed"] == "integer base + fp adapter" and not rec["merge"]["lossless"]


@pytest.mark.parametrize("override, message", [
    ("method=qwha method.transform=fft", r"method.transform='fft' is not valid; choose one of: wht, dct, dht, none"),
    ("method=qwha method.select=top", r"method.select='top' is not valid; choose one of: adaalloc, random, magnitude"),
    ("method=shira method.mask=grad", r"method.mask='grad' is not valid; choose one of: random, magnitude"),
    ("method=loca method.loc_every=0", r"loc_every=0: need"),
])
def test_bad_choices_are_refused_by_validate_before_any_work(cfg_factory, override, message):
    from qexp.config import validate

    with pytest.raises(ValueError, match=message):
        validate(cfg_factory(*override.split()))
