"""LoTA-QAF: ternary adapter, boundary masks, group offset factor, t-SignSGD, bit-exact merge."""

from __future__ import annotations

import pytest
import torch

from qexp import adapt
from qexp.config import TARGETS
from qexp.methods.lota import (
    LoTA,
    LoTAConfig,
    LoTALinear,
    TSignSGD,
    offset_factor,
    quantile_fp32,
    ternarize_init,
    ternary_adjustment,
)
from qexp.models import set_module, targets
from qexp.quant import QuantLinear, QuantSpec, QuantWeight, rtn

from .conftest import tiny_llama


def lota_model(bits: int = 3, group_size: int = 16, seed: int = 0, **cfg):
    """tiny_llama with every target swapped for a LoTA layer on an RTN base; also the base model."""
    model, base = tiny_llama(seed=seed), tiny_llama(seed=seed)
    spec = QuantSpec(bits, group_size)
    method = LoTA(LoTAConfig(**{"rank": 8, **cfg}), spec)
    torch.manual_seed(seed)
    for name, lin in targets(model, TARGETS).items():
        qw = rtn(lin.weight, spec)
        set_module(model, name, method.layer(name, lin, qw))
        set_module(base, name, QuantLinear(qw, lin.bias))
    return model, base, method


def batch(seed: int = 1, n: int = 4, t: int = 32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 128, (n, t), generator=g)


def train_steps(model, method, ids, steps: int, total: int | None = None) -> tuple[list[float], TSignSGD]:
    opt = method.optimizer(model, 1e-4, 0.0, total or steps)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, opt


def lota_layers(model) -> list[LoTALinear]:
    return [m for m in model.modules() if isinstance(m, LoTALinear)]


def test_initial_model_is_exactly_the_base():
    model, base, _ = lota_model(bits=2)
    ids = batch()
    for layer in lota_layers(model):
        assert set(layer.lora_A.unique().tolist()) == {-1.0, 0.0, 1.0}  # ternary Kaiming init
        assert not layer.lora_B.any()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, base(input_ids=ids).logits)


def test_ternary_init_density():
    a = ternarize_init(64, 4096, torch.empty(0))
    frac = (a != 0).float().mean().item()
    assert 0.5 < frac < 0.6  # TWN rule at 0.75·mean|A| on a normal: ~55 % non-zero


def test_training_keeps_ternary_and_merge_is_bit_exact():
    # ω = 1.5 so that entries of ΔW actually cross the threshold and codes move
    model, _, method = lota_model(bits=2, omega=1.5)
    ids = batch()
    before = [(m.lora_A.clone(), m.lora_B.clone(), m.codes.clone()) for m in lota_layers(model)]
    train_steps(model, method, ids, 6)
    changed = moved = 0
    for layer, (a0, b0, codes0) in zip(lota_layers(model), before, strict=True):
        for p in (layer.lora_A, layer.lora_B):
            assert set(p.unique().tolist()) <= {-1.0, 0.0, 1.0}
        changed += int((layer.lora_B != b0).sum() + (layer.lora_A != a0).sum())
        codes, _ = layer.operands()
        assert codes.min() >= 0 and codes.max() <= 3
        moved += int((codes != codes0.float()).sum())
    assert changed > 0 and moved > 0
    probe = batch(seed=7, n=1)
    with torch.no_grad():
        train_logits = model(input_ids=probe).logits
    report = adapt.merge(model, probe)
    assert report["lossless"] and report["max_abs_logit_diff"] == 0.0 and report["float_zero_points"]
    assert not lota_layers(model)
    with torch.no_grad():
        assert torch.equal(model(input_ids=probe).logits, train_logits)
    for m in model.modules():
        if isinstance(m, QuantLinear):
            assert m.codes.min() >= 0 and m.codes.max() <= 3


def test_quantile_schedule():
    p = torch.nn.Parameter(torch.zeros(3))
    opt = TSignSGD([p], total_steps=30)
    assert opt.level(0)[0] == pytest.approx(0.95)
    assert opt.level(1)[0] == pytest.approx(0.95 + 0.049 / 24)
    assert opt.level(24) == (pytest.approx(0.999), False)
    assert opt.level(27) == (pytest.approx(0.999 + 0.5 * 0.0009), True)
    assert opt.level(30) == (pytest.approx(0.9999), True)
    qs = [opt.level(t)[0] for t in range(31)]
    assert qs == sorted(qs)
    fixed = TSignSGD([p], total_steps=30, schedule="fixed")
    assert fixed.level(24)[0] == pytest.approx(0.999) and fixed.level(25)[0] == pytest.approx(0.9999)


def test_optimizer_updates_top_quantile_and_resumes():
    torch.manual_seed(0)
    n = 20_000
    p = torch.nn.Parameter(torch.zeros(n))
    grad = (torch.randperm(n).float() + 1) * torch.where(torch.rand(n) < 0.5, -1.0, 1.0)
    opt = TSignSGD([p], total_steps=10)
    seen = []
    for _ in range(3):
        p.grad = grad.clone()
        before = p.detach().clone()
        opt.step()
        q = opt.param_groups[0]["q"]
        seen.append(q)
        moved = (p != before).sum().item()
        # strictly above the q-quantile of distinct |g|: floor((1-q)(n-1)) entries, where not clipped
        assert moved <= int((1 - q) * (n - 1)) + 1
    assert p.min() >= -1 and p.max() <= 1 and (p != 0).any()
    top = grad.abs() > quantile_fp32(grad.abs(), seen[0])
    assert torch.equal(p[top], -torch.sign(grad[top]))  # moved against the gradient sign, clipped at ±1
    assert seen == [pytest.approx(opt.level(t)[0]) for t in (1, 2, 3)]
    resumed = TSignSGD([p], total_steps=10)
    resumed.load_state_dict(opt.state_dict())
    p.grad = grad.clone()
    resumed.step()
    assert resumed.steps_done == 4 and resumed.param_groups[0]["q"] == pytest.approx(opt.level(4)[0])


@pytest.mark.parametrize("guard", [True, False])
def test_phase2_guard_drops_the_extreme_tail(guard):
    n = 100_000
    grad = torch.arange(1, n + 1).float()  # ||g|| >> 10
    p = torch.nn.Parameter(torch.zeros(n))
    opt = TSignSGD([p], total_steps=10, guard=guard)
    opt.param_groups[0]["step"] = 8  # next step t=9 is in phase 2
    p.grad = grad
    opt.step()
    assert opt.param_groups[0]["guarded"] is guard
    assert p[-40] == -1  # inside the top 0.055 %: moved
    assert bool(p[-1] == 0) is guard  # the top 0.005 % is dropped only by the guard
    assert (p[: n // 2] == 0).all()


def test_tau_blocks_zero_gradients():
    p = torch.nn.Parameter(torch.zeros(100))
    p.grad = torch.zeros(100)
    TSignSGD([p], total_steps=5).step()
    assert not p.any()  # B = 0 makes A's gradient 0 at the first step: nothing may move


def test_quantile_matches_torch():
    torch.manual_seed(0)
    x = torch.randn(10_001).abs()
    for q in (0.0, 0.5, 0.95, 0.99995, 1.0):
        assert torch.allclose(quantile_fp32(x, q), torch.quantile(x, q), rtol=1e-6, atol=0)
    assert quantile_fp32(x.bfloat16(), 0.9).dtype == torch.float32


def test_mu_follows_group_structure():
    torch.manual_seed(0)
    d_out, d_in, g, omega = 4, 64, 16, 6.0
    dw = torch.randint(-8, 9, (d_out, d_in)).float()
    w_hat = torch.zeros_like(dw)
    mu = offset_factor(dw, w_hat, omega, g)
    assert mu.shape == (d_out, d_in // g)
    assert torch.allclose(mu, dw.view(d_out, 4, g).mean(-1) / omega)
    dw2 = dw.clone()
    dw2[2, 17:20] += 5  # only (output 2, group 1)
    mu2 = offset_factor(dw2, w_hat, omega, g)
    diff = mu2 != mu
    assert diff[2, 1] and diff.sum() == 1
    assert torch.allclose(offset_factor(dw, w_hat, omega, g, "paper"), mu * omega)
    # W̃ = ΔW - ω·Ŵ: a move of Ŵ subtracts ω from its entry's share of the mean
    w_hat[0, 0] = 1.0
    assert offset_factor(dw, w_hat, omega, g)[0, 0] == pytest.approx(mu[0, 0].item() - 1 / g)


def test_masks_block_moves_at_the_boundaries():
    spec = QuantSpec(2, 8)
    codes = torch.tensor([[0, 3, 1, 2, 3, 0, 2, 1]] * 2).float()
    qw = QuantWeight(codes, torch.ones(2, 1), torch.full((2, 1), 1.5), spec)
    layer = LoTALinear(qw, None, rank=4, omega=3.0, mu_scaling="code", dtype=torch.float32)
    with torch.no_grad():
        layer.lora_A.fill_(1.0)
        layer.lora_B.copy_(torch.tensor([[1.0] * 4, [-1.0] * 4]))  # ΔW row 0 = +4 > ω, row 1 = -4 < -ω
    new, _ = layer.operands()
    assert torch.equal(new[0], torch.tensor([1, 3, 2, 3, 3, 1, 3, 2]).float())  # 3 never goes up
    assert torch.equal(new[1], torch.tensor([0, 2, 0, 1, 2, 0, 1, 0]).float())  # 0 never goes down
    w_hat = ternary_adjustment(layer.delta(), 3.0, layer.up, layer.down)
    blocked = (w_hat == 0)
    assert blocked.sum() == 4
    # where a mask blocked the move, W̃ = ΔW: μ sees the full ΔW there
    mu = offset_factor(layer.delta(), w_hat, 3.0, 8)
    assert torch.allclose(mu, torch.tensor([[(2 * 4 + 6 * 1) / 8 / 3], [-(2 * 4 + 6 * 1) / 8 / 3]]))
    layer.merge()  # QuantWeight validates the range


def test_ternary_ste_and_mu_gradient():
    """∂L/∂ΔW = s·G + (1/(ω|γ|)) Σ_{i'∈γ} s·G_{i'} (identity STE, masks included, ω·Ŵ detached)."""
    torch.manual_seed(0)
    spec = QuantSpec(3, 8)
    qw = rtn(torch.randn(4, 16), spec)
    omega = 2.0
    layer = LoTALinear(qw, None, rank=4, omega=omega, mu_scaling="code", dtype=torch.float32)
    dw = torch.randint(-4, 5, (4, 16)).float().requires_grad_(True)
    codes, zero = layer.operands(dw)
    from qexp.quant import dequantize

    w = dequantize(codes, layer.scale, zero, 8)
    g_out = torch.randn_like(w)
    (w * g_out).sum().backward()
    s = layer.scale.repeat_interleave(8, dim=1)
    sg = (s * g_out).view(4, 2, 8).sum(-1, keepdim=True).expand(4, 2, 8).reshape(4, 16)
    assert torch.allclose(dw.grad, s * g_out + sg / (omega * 8), atol=1e-6)


# recorded on CPU fp32 (torch 2.13); the drop (~1.9e-3) comes from μ alone: ΔW stays below ω
GOLDEN = (4.872390270233154, 4.8705010414123535)


def test_one_step_lowers_the_loss_golden():
    model, _, method = lota_model(bits=3, seed=0)
    ids = batch(seed=3, n=2, t=48)
    losses, _ = train_steps(model, method, ids, 1, total=30)
    with torch.no_grad():
        after = model(input_ids=ids, labels=ids).loss.item()
    assert after < losses[0]
    for layer in lota_layers(model):  # no code moved: the whole step went through the offset factor μ
        assert torch.equal(layer.operands()[0], layer.codes.float())
    assert losses[0] == pytest.approx(GOLDEN[0], abs=1e-5)
    assert after == pytest.approx(GOLDEN[1], abs=1e-5)


def test_bad_switch_names_the_key():
    with pytest.raises(ValueError, match=r"method.mu_scaling='ω'.*code, paper"):
        LoTA(LoTAConfig(mu_scaling="ω"), QuantSpec(2, 16))
    with pytest.raises(ValueError, match=r"method.schedule='cosine'.*anneal, fixed"):
        LoTA(LoTAConfig(schedule="cosine"), QuantSpec(2, 16))


def test_cell_records_lossless_merge(cfg_factory):
    from qexp.run import run_cell

    rec = run_cell(cfg_factory("method=lota", "quant.init=rtn", "bits=2", "group_size=32", "method.rank=4"))
    assert rec["status"] == "ok"
    assert rec["merge"]["lossless"] is True and rec["merge"]["max_abs_logit_diff"] == 0.0
    assert rec["config"]["train"]["max_grad_norm"] is None
