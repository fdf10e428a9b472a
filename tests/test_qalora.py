"""QA-LoRA: group-pooled adapter on a frozen integer base; merge folds it into float zero points."""

import pytest
import torch

from qexp.methods.qalora import QALoRALinear
from qexp.quant import QuantLinear, QuantSpec, rtn


def _layer(group_size: int = 16, symmetric: bool = False, rank: int = 4, train: bool = True):
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 24)
    qw = rtn(lin.weight.detach(), QuantSpec(3, group_size, symmetric))
    layer = QALoRALinear(qw, lin.bias, rank, alpha=16.0)
    if train:
        with torch.no_grad():
            layer.lora_B.normal_(0, 0.5)
    return layer, qw


def test_init_is_the_base_model():
    layer, qw = _layer(train=False)
    x = torch.randn(3, 5, 64)
    assert torch.equal(layer(x), QuantLinear(qw, layer.bias)(x))


def test_adapter_sees_group_averages():
    """The adapter is a weight constant within each group: (α/r)(BA)_{j,γ}/g for every input of γ."""
    layer, qw = _layer()
    x = torch.randn(7, 64)
    base = QuantLinear(qw, layer.bias)(x)
    dense = layer.scaling * (layer.lora_B @ layer.lora_A).repeat_interleave(16, dim=1) / 16
    torch.testing.assert_close(layer(x) - base, x @ dense.T, rtol=1e-5, atol=1e-5)
    assert layer.lora_A.shape == (4, 64 // 16) and layer.lora_B.shape == (24, 4)


@pytest.mark.parametrize(("group_size", "symmetric"), [(16, False), (32, True), (-1, False)])
def test_merge_folds_into_float_zero_points(group_size, symmetric):
    layer, qw = _layer(group_size, symmetric)
    x = torch.randn(4, 9, 64)
    with torch.no_grad():
        y = layer(x)
    merged = layer.merge()
    assert isinstance(merged, QuantLinear)
    assert torch.equal(merged.codes, qw.codes) and torch.equal(merged.scale, qw.scale)  # codes unchanged
    assert not merged.qweight.integer_zero  # lossless only because the zero points are floats
    torch.testing.assert_close(merged(x), y, rtol=1e-5, atol=1e-5)
    rounded = QuantLinear(type(qw)(qw.codes, qw.scale, merged.zero.round(), qw.spec), layer.bias)
    assert (rounded(x) - y).abs().max() > 1e-3  # an integer zero point could not hold the adapter


def test_qalora_cell(cfg_factory):
    from qexp.run import run_cell

    rec = run_cell(cfg_factory("method=qalora", "train.lr=1e-2"))
    m = rec["merge"]
    assert rec["status"] == "ok" and m["on_grid"] and m["float_zero_points"] and m["deployed"] == "integer"
    assert m["max_abs_logit_diff"] < 1e-3
