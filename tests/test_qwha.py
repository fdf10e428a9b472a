"""QWHA (the fast WHT: test_hadamard.py): AdaAlloc budget, refinement optimality, training forward, merge, a cell."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from qexp.adapt import attach, merge
from qexp.methods.qwha import (
    QWHA,
    Hessians,
    QWHAConfig,
    QWHADeployed,
    QWHALinear,
    adaalloc,
    collect_hessians,
    layer_output_error,
    qwha_init,
)
from qexp.models import targets as find_targets
from qexp.quant import QuantLinear, QuantSpec, rtn
from qexp.quant.hadamard import fwht, ifwht
from tests.conftest import tiny_llama

F64 = torch.float64


def test_adaalloc_budget_cap_and_proportionality():
    w = torch.tensor([100.0, 1.0, 1.0, 2.0, 0.0, 3.0, 5.0, 50.0])
    for p in (10, 37, 61, 64):
        counts = adaalloc(w, p, cap=8)
        assert int(counts.sum()) == p and int(counts.max()) <= 8 and int(counts.min()) >= 0
    counts = adaalloc(torch.tensor([6.0, 3.0, 1.0]), 10, cap=100)
    assert counts.tolist() == [6, 3, 1]
    counts = adaalloc(torch.tensor([1000.0, 1.0, 1.0, 1.0]), 12, cap=6)  # overflow of the capped channel
    assert counts.tolist() == [6, 2, 2, 2]
    with pytest.raises(ValueError, match="exceeds"):
        adaalloc(torch.ones(3), 13, cap=4)


def correlated_layer(d_out: int = 96, d_in: int = 48, seed: int = 0):
    """A random layer, its 3-bit RTN error, and XᵀX of strongly correlated inputs."""
    g = torch.Generator().manual_seed(seed)
    w0 = torch.randn(d_out, d_in, generator=g, dtype=F64)
    mix = torch.randn(d_in, d_in, generator=g, dtype=F64) * torch.logspace(0, -2, d_in, dtype=F64)
    x = torch.randn(2000, d_in, generator=g, dtype=F64) @ mix.T + torch.randn(d_in, generator=g, dtype=F64)
    qw = rtn(w0.float(), QuantSpec(3, 16))
    return w0, qw, w0 - qw.dequantize().double(), x.T @ x / len(x)


def dense_update(idx: torch.Tensor, c: torch.Tensor, shape) -> torch.Tensor:
    f = torch.zeros(shape[0] * shape[1], dtype=F64)
    f[idx] = c.double()
    return ifwht(f.view(shape))


def test_refinement_lowers_layer_output_error():
    _, _, dq, h = correlated_layer()
    p = 4 * sum(dq.shape)
    err = {}
    for label, kw in [("zero", {"select": "random", "init": "zero"}), ("select", {"refine": False}), ("refined", {}),
                      ("random_refined", {"select": "random"})]:
        idx, c = qwha_init(dq, h, p, QWHAConfig(**kw), torch.Generator().manual_seed(0))
        assert idx.numel() == p == idx.unique().numel()
        err[label] = layer_output_error(dq, dense_update(idx, c, dq.shape), h)
    assert err["zero"] == pytest.approx(layer_output_error(dq, torch.zeros_like(dq), h))
    assert err["refined"] < 0.8 * err["select"] < 0.8 * err["zero"]  # paper Table 7 direction
    assert err["refined"] < 0.8 * err["random_refined"]  # AdaAlloc beats random locations (Table 2)


def test_refinement_is_the_least_squares_through_the_hessian_root():
    """The spec's c_j = (B'ᵀB')⁻¹B'ᵀv_j with R = Λ^½Vᵀ, B = R Hᵀ/d, v_j = R δ_j, solved here by lstsq."""
    _, _, dq, h = correlated_layer(d_out=8, d_in=48)
    cfg = QWHAConfig()
    idx, c = qwha_init(dq, h, 3 * 56, cfg)
    d_out, d_in = dq.shape
    hs = h + cfg.damp * h.diagonal().mean() * torch.eye(d_in, dtype=F64)
    lam, v = torch.linalg.eigh(hs)
    r = lam.sqrt().unsqueeze(1) * v.T
    basis = r @ fwht(torch.eye(d_in, dtype=F64)) / d_in  # fwht(I) = Hᵀ; column k: R h_kᵀ / d (h_k: k-th row of H)
    rows, cols = idx // d_in, idx % d_in
    for j in range(d_out):
        sel = cols[rows == j]
        if sel.numel():
            ref = torch.linalg.lstsq(basis[:, sel], r @ dq[j]).solution
            torch.testing.assert_close(c[rows == j], ref, rtol=1e-7, atol=1e-9)


def test_layer_first_forward_is_the_refined_update_and_only_c_trains():
    w0, qw, dq, h = correlated_layer()
    lin = torch.nn.Linear(48, 96, bias=True).double()
    lin.weight.data.copy_(w0)
    for semantics in ("code", "paper"):
        method = QWHA(QWHAConfig(rank=4, alpha_semantics=semantics), QuantSpec(3, 16))
        method.hessians = {"l": h}
        layer = method.layer("l", lin.float(), qw)
        assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["c"]
        idx, c = qwha_init(dq, h, 4 * 144, QWHAConfig(rank=4))
        torch.testing.assert_close(layer.delta().double(), dense_update(idx, c, dq.shape), rtol=1e-5, atol=1e-6)
        expected_scale = 4000 / (96**0.5 if semantics == "code" else 48**0.5)
        assert layer.scale == pytest.approx(expected_scale)
        x = torch.randn(7, 48)
        y = layer(x)
        torch.testing.assert_close(y, x @ (qw.dequantize() + layer.delta()).T + lin.bias.float())
        y.sum().backward()
        assert layer.c.grad is not None and layer.c.grad.abs().sum() > 0
        assert layer.locations.shape == (4 * 144, 2)


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match=r"method.select='svd'.*adaalloc, random, magnitude, loca, ssh"):
        QWHA(QWHAConfig(select="svd"), QuantSpec(3, 64))
    with pytest.raises(ValueError, match=r"method.transform='fft'.*wht, dct, dht, none"):
        QWHA(QWHAConfig(transform="fft"), QuantSpec(3, 64))
    method = QWHA(QWHAConfig(rank=64), QuantSpec(3, 64))
    with pytest.raises(ValueError, match=r"method.rank=64: budget p=8192 exceeds d_in·d_out=4096.*rank ≤ 32"):
        method.budget("q_proj", torch.nn.Linear(64, 64))


def test_attach_shares_hessians_and_merge_reproduces_the_training_forward():
    model = tiny_llama()
    tg = find_targets(model, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    method = QWHA(QWHAConfig(rank=4, calib_samples=0), QuantSpec(3, 32))
    calib = torch.randint(0, 128, (4, 32))
    method.prepare(model, tg, calib)
    hs = method.hessians
    pre = "model.layers.0."
    assert hs[pre + "self_attn.q_proj"] is hs[pre + "self_attn.k_proj"] is hs[pre + "self_attn.v_proj"]
    assert hs[pre + "mlp.gate_proj"] is hs[pre + "mlp.up_proj"]
    assert hs[pre + "mlp.down_proj"].shape == (128, 128)

    from omegaconf import OmegaConf
    quant_cfg = OmegaConf.create({"init": "rtn", "range": "minmax", "p": 4.0, "grid": 100})
    method = QWHA(QWHAConfig(rank=4, calib_samples=0), QuantSpec(3, 32))
    attach(model, method, tg, quant_cfg, lambda: calib)
    layers = [m for m in model.modules() if isinstance(m, QWHALinear)]
    assert len(layers) == 14 and method.stats["layers"] == 14
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == sum(
        4 * (m.base.in_features + m.base.out_features) for m in layers)
    with torch.no_grad():
        for m in layers:
            m.c.add_(0.01 * torch.randn_like(m.c))  # as if trained
    rec = merge(model, torch.randint(0, 128, (1, 24)))
    assert rec["max_abs_logit_diff"] == 0.0
    assert rec["deployed"] == "integer base + fp adapter" and not rec["on_grid"] and not rec["lossless"]
    deployed = [m for m in model.modules() if isinstance(m, QWHADeployed)]
    assert len(deployed) == 14 and all(isinstance(m.base, QuantLinear) for m in deployed)
    assert not any(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hessians_stream_one_block_at_a_time_with_the_one_pass_values(dtype):
    """Hessians holds one block's XᵀX at a time (a 8B model's are 62 GiB in fp64) and gives the
    values of whole-model forwards, bit for bit."""
    model = tiny_llama(layers=3).to(dtype)
    tg = find_targets(model, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    calib = torch.randint(0, 128, (5, 24))
    full = collect_hessians(model, tg, calib, 2)
    hs = Hessians(model, tg, calib, 2)
    assert not hs.ready and len(hs.pending) == 3  # nothing computed before it is asked for
    for i in range(3):
        names = [n for n in tg if n.startswith(f"model.layers.{i}.")]
        for n in names:
            h = hs.pop(n)
            assert set(hs.ready) <= set(names)  # only this block's
            assert torch.equal(h, full[n]), n
        assert not hs.ready and len(hs.pending) == 2 - i
    assert hs.inputs == [] and hs.pop("model.layers.0.self_attn.q_proj") is None


def test_zero_init_starts_from_the_base():
    _, qw, dq, _ = correlated_layer()
    lin = torch.nn.Linear(48, 96, bias=False)
    layer = QWHA(QWHAConfig(rank=4, select="random", init="zero"), QuantSpec(3, 16)).layer("l", lin, qw)
    assert torch.equal(layer.delta(), torch.zeros_like(dq, dtype=torch.float32))
    assert layer.idx.unique().numel() == 4 * 144


def test_run_cell_tiny(cfg_factory):
    from qexp.run import run_cell

    rec = run_cell(cfg_factory("method=qwha", "quant.init=rtn", "method.rank=4", "bits=3", "group_size=32"))
    assert rec["status"] == "ok"
    assert rec["merge"]["deployed"] == "integer base + fp adapter" and rec["merge"]["max_abs_logit_diff"] == 0.0
    assert rec["train"]["steps"] == 3 and all(map(torch.isfinite, torch.tensor(rec["train"]["losses"])))
    for k, v in rec["metrics"].items():
        assert v == v and v > 0, k


def test_config_dataclass_fields_match_yaml():
    from tests.conftest import make_cfg

    cfg = make_cfg("method=qwha")
    assert set(cfg.method) == {f.name for f in dataclasses.fields(QWHAConfig)}
    assert cfg.quant.init == "gptq" and cfg.quant.sym is False
