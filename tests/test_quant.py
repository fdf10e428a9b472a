"""Quantization core: grids, round-trip error bounds, per-group shapes, range search."""

import pytest
import torch

from qexp.quant import QuantLinear, QuantSpec, QuantWeight, dequantize, rtn, search_range, ste_round
from qexp.quant.rtn import minmax_range


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("group_size", [-1, 16, 64])
def test_rtn_codes_in_range_and_error_bounded(bits, symmetric, group_size):
    torch.manual_seed(bits)
    w = torch.randn(32, 64)
    spec = QuantSpec(bits, group_size, symmetric)
    qw = rtn(w, spec)
    assert qw.codes.min() >= spec.qmin and qw.codes.max() <= spec.qmax
    n_groups = 1 if group_size == -1 else 64 // group_size
    assert qw.scale.shape == qw.zero.shape == (32, n_groups)
    # min-max clips nothing, so every weight is within half a step of its grid point
    err = (qw.dequantize() - w).abs()
    step = qw.scale.repeat_interleave(64 // n_groups, dim=1)
    assert (err <= step / 2 + 1e-6).all()


def test_more_bits_less_error():
    w = torch.randn(64, 128)
    errs = [(rtn(w, QuantSpec(b, 64)).dequantize() - w).pow(2).mean() for b in (2, 3, 4, 8)]
    assert errs == sorted(errs, reverse=True)


def test_symmetric_init_clips_nothing():
    w = torch.randn(16, 64) * 3
    spec = QuantSpec(3, 32, symmetric=True)
    scale, zero = minmax_range(w, spec)
    assert (zero == 0).all()
    wg = (w.view(16, 2, 32) / scale.unsqueeze(-1))
    assert wg.min() >= spec.qmin - 1e-5 and wg.max() <= spec.qmax + 1e-5


@pytest.mark.parametrize("p", [2.0, 4.0])
def test_range_search_never_worse_than_minmax(p):
    torch.manual_seed(0)
    w = torch.randn(32, 128)
    w[0, 0] = 12.0  # an outlier that min-max wastes range on
    spec = QuantSpec(3, 64)
    scale, _ = search_range(w, spec, p=p)
    assert (scale <= minmax_range(w, spec)[0] + 1e-7).all()  # the search only shrinks the range
    base = rtn(w, spec, "minmax")
    searched = rtn(w, spec, "lp", p=p)
    e0 = (base.dequantize() - w).abs().pow(p).view(32, 2, 64).sum(-1)
    e1 = (searched.dequantize() - w).abs().pow(p).view(32, 2, 64).sum(-1)
    assert (e1 <= e0 + 1e-5).all() and (e1 < e0).any()


def test_group_size_must_divide():
    with pytest.raises(ValueError, match="group_size=48 does not divide d_in=64"):
        rtn(torch.randn(4, 64), QuantSpec(4, 48))


def test_quantweight_rejects_out_of_grid_codes():
    spec = QuantSpec(2, -1)
    with pytest.raises(ValueError, match="outside the 2-bit grid"):
        QuantWeight(torch.tensor([[0.0, 4.0]]), torch.ones(1, 1), torch.zeros(1, 1), spec)


def test_ste_round_identity_gradient():
    x = torch.tensor([0.2, 1.7, -2.5], requires_grad=True)
    y = ste_round(x)
    y.sum().backward()
    assert torch.equal(y, torch.tensor([0.0, 2.0, -2.0])) and torch.equal(x.grad, torch.ones(3))


def test_quant_linear_matches_dequantized_matmul():
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 16)
    qw = rtn(lin.weight.detach(), QuantSpec(4, 32))
    ql = QuantLinear(qw, lin.bias)
    x = torch.randn(3, 64)
    ref = x @ dequantize(qw.codes.float(), qw.scale, qw.zero, 32).T + lin.bias
    assert torch.equal(ql(x), ref)
