"""L4Q: clip-free init, masked LoRA gradients, LSQ+ gradients of the custom autograd vs a float64
autograd reference, only x/W₀/A/B/s/β saved for backward, bit-exact merge, golden loss, one cell."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from qexp import adapt, models
from qexp.config import TARGETS, ConfigError, QuantConfig
from qexp.methods import get
from qexp.methods.l4q import L4QConfig, L4QFunction, L4QLinear
from qexp.quant import QuantLinear, QuantSpec

from .conftest import tiny_llama


def _attach(model, bits: int = 3, group_size: int = 32, seed: int = 0, **kw) -> None:
    torch.manual_seed(seed)
    cls = get("l4q")
    method = cls(L4QConfig(name="l4q", **kw), QuantSpec(bits, group_size, symmetric=True))
    adapt.attach(model, method, models.targets(model, TARGETS), QuantConfig(sym=True), lambda: None)


def _layers(model) -> list[L4QLinear]:
    return [m for m in model.modules() if isinstance(m, L4QLinear)]


def _perturb(model, seed: int = 1) -> None:
    """Move A, B, s, β away from init so that B A ≠ 0, β ≠ 0 and some entries clip."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for lay in _layers(model):
            lay.lora_B.copy_(torch.randn(lay.lora_B.shape, generator=g) * 0.5)
            lay.scale.mul_(0.6 + 0.6 * torch.rand(lay.scale.shape, generator=g))
            lay.offset.copy_(lay.scale * (torch.rand(lay.offset.shape, generator=g) - 0.5))


def test_init_clips_nothing_and_scale_is_tightest():
    model = tiny_llama()
    _attach(model, bits=3)
    spec = QuantSpec(3, 32, True)
    for lay in _layers(model):
        wn, _, mask = lay.quantized()
        assert mask.all(), "L4Q_init must clip nothing"
        assert (lay.offset == 0).all() and (lay.lora_B == 0).all()
        # s = max(|min W/Q_N|, |max W/Q_P|): every group touches Q_N or Q_P (a smaller s would clip)
        g = wn.view(wn.shape[0], -1, 32)
        touch = (g.amin(-1) - spec.qmin).abs().lt(1e-5) | (g.amax(-1) - spec.qmax).abs().lt(1e-5)
        assert touch.all()


def test_merge_is_bit_exact_and_codes_in_range():
    model = tiny_llama()
    _attach(model, bits=2)
    _perturb(model)
    clipped = sum(int((~lay.quantized()[2]).sum()) for lay in _layers(model))
    assert clipped > 0  # the check covers clipped entries and a float β
    x = torch.randint(0, 128, (3, 40))
    with torch.no_grad():
        before = model(input_ids=x).logits
    report = adapt.merge(model, x[:1, :16])
    assert report["lossless"] and report["float_zero_points"]
    with torch.no_grad():
        after = model(input_ids=x).logits
    assert torch.equal(before, after)
    spec = QuantSpec(2, 32, True)
    for m in model.modules():
        if isinstance(m, QuantLinear):
            assert m.codes.min() >= spec.qmin and m.codes.max() <= spec.qmax


def _reference(x, w0, a, b, s, beta, alpha: float, spec: QuantSpec) -> Tensor:
    """The L4Q formula with plain autograd: STE through round, torch.clamp masks out-of-range."""
    wc = w0 + alpha * (b @ a)
    d_out, d_in = wc.shape
    g = wc.view(d_out, -1, spec.group_size)
    w = (g - beta.unsqueeze(-1)) / s.unsqueeze(-1)
    wc_ = w.clamp(spec.qmin, spec.qmax)
    w_int = wc_ + (torch.round(wc_) - wc_).detach()
    w_q = (w_int * s.unsqueeze(-1) + beta.unsqueeze(-1)).view(d_out, d_in)
    return x @ w_q.T


def _case(seed: int, clip: float, alpha: float = 0.7, d_in: int = 64, d_out: int = 24, r: int = 4):
    g = torch.Generator().manual_seed(seed)
    spec = QuantSpec(3, 16, True)
    w0 = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    a = torch.randn(r, d_in, generator=g, dtype=torch.float64) * 0.3
    b = torch.randn(d_out, r, generator=g, dtype=torch.float64) * 0.3
    s = (w0.abs().view(d_out, -1, 16).amax(-1) / 4 * clip).requires_grad_()  # clip < 1: some entries clip
    beta = (torch.randn(d_out, d_in // 16, generator=g, dtype=torch.float64) * 0.1).requires_grad_()
    x = torch.randn(5, 7, d_in, generator=g, dtype=torch.float64, requires_grad=True)
    gy = torch.randn(5, 7, d_out, generator=g, dtype=torch.float64)
    return x, w0, a.requires_grad_(), b.requires_grad_(), s, beta, alpha, spec, gy


def _grads(fn, x, w0, a, b, s, beta, alpha, spec, gy) -> list[Tensor]:
    y = fn(x, w0, a, b, s, beta, alpha, spec)
    return [y.detach(), *torch.autograd.grad(y, (x, a, b, s, beta), gy)]


@pytest.mark.parametrize("clip", [1.0, 0.5])
def test_custom_backward_matches_float64_autograd_reference(clip):
    case = _case(0, clip)
    _, w0, a, b, s, beta, alpha, _, _ = case
    custom = _grads(lambda *t: L4QFunction.apply(*t[:6], None, t[6], t[7], 1.0), *case)
    ref = _grads(_reference, *case)
    for name, c, r in zip(["y", "x", "A", "B", "s", "beta"], custom, ref, strict=True):
        torch.testing.assert_close(c, r, rtol=1e-10, atol=1e-10, msg=f"gradient of {name}")
    mask = ((w0 + alpha * b @ a).view(24, -1, 16) - beta.unsqueeze(-1)).div(s.unsqueeze(-1)).abs()
    if clip < 1:
        assert (mask > 4).any()  # the reference exercised out-of-range entries (∂β ≠ 0 there)
        assert custom[5].abs().sum() > 0


def test_no_lora_gradient_through_clipped_entries():
    x, w0, a, b, s, beta, alpha, spec, gy = _case(1, clip=1.0)
    # clip all of output row 0 (tiny scale in row 0) and nothing else
    with torch.no_grad():
        s[0] = 1e-3
        s[1:] *= 4
    y = L4QFunction.apply(x, w0, a, b, s, beta, None, alpha, spec, 1.0)
    ga, gb, gs, gbeta = torch.autograd.grad(y, (a, b, s, beta), gy)
    assert torch.equal(gb[0], torch.zeros_like(gb[0]))  # row 0 of B only reaches clipped entries
    assert (gb[1:].abs() > 0).all()
    assert (gs[0].abs() > 0).all() and (gbeta[0].abs() > 0).all()  # s and β still learn there
    assert torch.equal(gbeta[1:], torch.zeros_like(gbeta[1:]))  # nothing clipped elsewhere: ∂β = 0
    # A's gradient is α Bᵀ(M⊙G): without row 0 of G
    g = gy.reshape(-1, 24).T @ x.detach().reshape(-1, 64)
    g[0] = 0
    torch.testing.assert_close(ga, alpha * b.detach().T @ g, rtol=1e-10, atol=1e-10)


def test_forward_saves_only_x_w0_a_b_s_beta():
    model_layer = L4QLinear(torch.randn(48, 64), None, QuantSpec(3, 32, True), 4, 1.0, False)
    x = torch.randn(2, 5, 64, requires_grad=True)
    saved: list[Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = model_layer(x)
    expect = [x, model_layer.weight, model_layer.lora_A, model_layer.lora_B, model_layer.scale, model_layer.offset]
    assert len(saved) == len(expect)
    assert all(s.data_ptr() == e.data_ptr() for s, e in zip(saved, expect, strict=True))
    y.sum().backward()  # and the backward works from those alone
    assert model_layer.scale.grad is not None and model_layer.lora_B.grad is not None


def test_lsq_grad_scale_switch():
    torch.manual_seed(0)
    w = torch.randn(16, 64)
    lays = [L4QLinear(w, None, QuantSpec(3, 32, True), 4, 1.0, gs) for gs in (False, True)]
    lays[1].load_state_dict(lays[0].state_dict())
    x = torch.randn(4, 64)
    for lay in lays:
        lay(x).pow(2).sum().backward()
    torch.testing.assert_close(lays[1].scale.grad, lays[0].scale.grad / (32 * 3) ** 0.5)
    torch.testing.assert_close(lays[1].lora_A.grad, lays[0].lora_A.grad)


# Golden losses of one AdamW step (lr 1e-2) on a fixed batch: tiny_llama(seed 0), 3-bit g32, seed 0.
GOLDEN_L4Q = (4.871232, 4.854436)


def test_one_step_lowers_loss_golden():
    model = tiny_llama()
    _attach(model, bits=3)
    torch.manual_seed(123)
    ids = torch.randint(0, 128, (2, 32))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    model.train()
    loss0 = model(input_ids=ids, labels=ids).loss
    loss0.backward()
    opt.step()
    with torch.no_grad():
        loss1 = model(input_ids=ids, labels=ids).loss
    assert loss1 < loss0
    assert (loss0.item(), loss1.item()) == pytest.approx(GOLDEN_L4Q, abs=1e-4)


def test_asymmetric_grid_is_refused():
    with pytest.raises(ConfigError, match=r"quant\.sym=False"):
        get("l4q")(L4QConfig(name="l4q"), QuantSpec(3, 32, symmetric=False))


def test_cell_runs(cfg_factory):
    from qexp.run import run_cell

    rec = run_cell(cfg_factory("method=l4q", "bits=3"))
    assert rec["status"] == "ok"
    assert rec["merge"]["lossless"] and rec["merge"]["deployed"] == "integer"
    assert rec["config"]["quant"]["sym"] is True
