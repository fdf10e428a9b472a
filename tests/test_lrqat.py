"""LR-QAT: int8 Φ₀ and no fp W₀ in the layer, rounding inside the low-rank update, exact merge."""

import pytest
import torch

from qexp import adapt
from qexp.config import TARGETS, ConfigError, QuantConfig
from qexp.methods.lrqat import LRQAT, LRQATConfig, LRQATLinear, _codes
from qexp.models import targets as find_targets
from qexp.quant import QuantSpec, rtn

from .conftest import tiny_llama

LP4 = QuantConfig(sym=True, range="lp", p=4.0, grid=20)  # fewer candidates than the default 100: fast


def _attach(bits: int = 3, group_size: int = 32, layers: int = 1, **kw):
    model = tiny_llama(layers=layers)
    targets = find_targets(model, TARGETS)
    weights = {n: m.weight.clone() for n, m in targets.items()}
    method = LRQAT(LRQATConfig(name="lrqat", **kw), QuantSpec(bits, group_size, symmetric=True))
    adapt.attach(model, method, targets, LP4, lambda: None)
    layers = {n: model.get_submodule(n) for n in weights}  # attach consumed `targets`
    assert all(isinstance(m, LRQATLinear) for m in layers.values())
    return model, method, layers, weights


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_phi0_is_int8_fixed_point_and_no_fp_weight_is_kept(bits):
    _model, _method, layers, weights = _attach(bits)
    frac = 8 - bits
    for n, layer in layers.items():
        w0 = weights[n]
        assert layer.phi0.dtype == torch.int8
        fp_full = [k for k, t in layer.state_dict().items()
                   if t.is_floating_point() and t.shape == w0.shape and not k.startswith("lora_")]
        assert fp_full == [], f"{n} keeps a fp [d_out, d_in] tensor: {fp_full}"
        # Φ₀ holds W₀/s₀ (+ z − 2^(b−1) on the asymmetric grid) to 8−b fractional bits
        half = 2 ** (bits - 1)
        x = (w0.view(w0.shape[0], -1, 32) / layer.scale.detach().unsqueeze(-1)
             + (layer.zero - layer.offset).unsqueeze(-1)).reshape(w0.shape).clamp(-half, half - 1)
        assert (layer.phi0.float() / 2**frac - x).abs().max() <= 2.0 ** -(frac + 1) + 1e-6


@pytest.mark.parametrize("bits", [2, 3])
def test_init_is_rtn_on_the_lp4_range(bits):
    """C = 0 at init: with an exact Φ₀ (fp32) the codes are RTN's on the searched range."""
    _, method, layers, weights = _attach(bits, phi="fp32")
    for n, layer in layers.items():
        ref = rtn(weights[n], method.spec, "lp", p=4.0, grid=LP4.grid)
        assert torch.equal(layer.codes(), ref.codes.float())
        assert torch.equal(layer.scale.detach(), ref.scale) and torch.equal(layer.zero, ref.zero)
        assert torch.count_nonzero(layer.lora_A) == 0 and torch.count_nonzero(layer.lora_B) > 0


def test_asymmetric_path_is_on_at_two_bits():
    assert not LRQAT(LRQATConfig(), QuantSpec(2, 64, True)).spec.symmetric
    assert LRQAT(LRQATConfig(), QuantSpec(3, 64, True)).spec.symmetric
    assert LRQAT(LRQATConfig(asym=False), QuantSpec(2, 64, True)).spec.symmetric
    assert not LRQAT(LRQATConfig(asym=True), QuantSpec(4, 64, True)).spec.symmetric
    _, method, layers, _ = _attach(2)
    layer = next(iter(layers.values()))
    assert (method.spec.qmin, method.spec.qmax) == (0, 3) and layer.offset == 2
    assert (layer.zero > 0).any() and torch.equal(layer.zero, layer.zero.round())  # integer, from the range


@pytest.mark.parametrize(("bits", "phi"), [(3, "int8"), (2, "int8"), (3, "bf16"), (4, "fp32")])
def test_merge_is_bit_exact_and_codes_stay_on_grid(bits, phi):
    model, method, layers, _ = _attach(bits, phi=phi)
    torch.manual_seed(1)
    changed = 0
    for layer in layers.values():
        before = layer.codes()
        with torch.no_grad():
            layer.lora_A.normal_(0, 3.0)  # large: many codes move, some past the grid's ends
            layer.scale.mul_(1 + 0.1 * torch.rand_like(layer.scale))
        codes = layer.codes()
        assert codes.min() >= method.spec.qmin and codes.max() <= method.spec.qmax
        changed += int((codes != before).sum())
    assert changed > 0
    probe = torch.randint(0, 128, (1, 24), generator=torch.Generator().manual_seed(0))
    rec = adapt.merge(model, probe)
    assert rec["lossless"] and rec["max_abs_logit_diff"] == 0.0 and rec["on_grid"]
    assert not rec["float_zero_points"]


def test_ste_and_clamp_gradient():
    """∂/∂C = ∂/∂W_int where ⌊Φ₀ + C⌉ is inside the grid, 0 where it is clamped (B = I so C = (α/r)A)."""
    spec = QuantSpec(3, -1, symmetric=True)
    torch.manual_seed(0)
    phi0 = torch.randint(-128, 97, (4, 8), dtype=torch.int8)
    a = (torch.randn(4, 8) * 40).requires_grad_()
    b = torch.eye(8)
    g = torch.randn(4, 8)
    (_codes(phi0, 5, 0, a, b, 8.0 / 8, spec) * g).sum().backward()
    pre = torch.round(phi0.float() / 32 + a.detach())
    inside = (pre >= spec.qmin) & (pre <= spec.qmax)
    assert (~inside).any() and inside.any()
    assert torch.equal(a.grad, torch.where(inside, g, torch.zeros_like(g)))


def test_checkpointing_gives_the_same_gradients():
    grads = []
    for ckpt in (True, False):
        model, _method, layers, _ = _attach(3, checkpoint=ckpt)
        torch.manual_seed(2)
        for layer in layers.values():
            with torch.no_grad():
                layer.lora_A.normal_(0, 0.5)
        model.train()
        ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append([p.grad.clone() for layer in layers.values() for p in (layer.lora_A, layer.lora_B, layer.scale)])
    assert all(torch.equal(x, y) for x, y in zip(*grads, strict=True))
    assert all(g.abs().sum() > 0 for g in grads[0])


def test_param_groups_and_optimizer():
    model, method, layers, _ = _attach(3)
    opt = method.optimizer(model, lr=5e-4, weight_decay=0.0, total_steps=10)
    ab, s = opt.param_groups
    assert ab["lr"] == 1e-3 and s["lr"] == 1e-5 and ab["betas"] == (0.9, 0.95)
    assert len(ab["params"]) == 2 * len(layers) and len(s["params"]) == len(layers)
    model, method, layers, _ = _attach(3, lr_ab=None, lr_s=0.0)
    (ab,) = method.optimizer(model, lr=5e-4, weight_decay=0.0, total_steps=10).param_groups
    assert ab["lr"] == 5e-4 and not any(m.scale.requires_grad for m in layers.values())


def test_one_step_lowers_loss_golden():
    model, method, _layers, _ = _attach(3, layers=2)
    ids = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    opt = method.optimizer(model, lr=1e-3, weight_decay=0.0, total_steps=1)
    model.train()
    loss0 = model(input_ids=ids, labels=ids).loss
    loss0.backward()
    opt.step()
    with torch.no_grad():
        loss1 = model(input_ids=ids, labels=ids).loss
    assert loss1 < loss0
    assert loss0.item() == pytest.approx(GOLDEN[0], abs=1e-4) and loss1.item() == pytest.approx(GOLDEN[1], abs=1e-4)


GOLDEN = (4.871474, 4.865737)  # tiny_llama(layers=2), W3 g32, Lp4 grid 20, int8 Φ₀, lr_ab 1e-3, lr_s 1e-5


def test_bad_phi_names_the_key():
    with pytest.raises(ConfigError, match=r"method.phi='int4'.*int8, bf16, fp32"):
        LRQAT(LRQATConfig(phi="int4"), QuantSpec(3, 64, True))


def test_lrqat_cell(cfg_factory):
    from qexp.run import run_cell

    cfg = cfg_factory("method=lrqat", "bits=2", "quant.grid=20")
    assert cfg.quant.sym and cfg.quant.range == "lp" and cfg.quant.p == 4.0
    rec = run_cell(cfg)
    assert rec["status"] == "ok" and rec["train"]["steps"] == 3
    assert rec["merge"]["lossless"] and rec["merge"]["deployed"] == "integer"
