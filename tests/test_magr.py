"""MagR: the ℓ∞-regularised preprocessing of the base (qexp/quant/magr.py)."""

from __future__ import annotations

import pytest
import torch

from qexp.quant import QuantSpec, rtn
from qexp.quant.magr import magr, project_l1_ball

F64 = torch.float64


def test_l1_projection_is_the_euclidean_projection():
    g = torch.Generator().manual_seed(0)
    v = torch.randn(50, 16, generator=g, dtype=F64) * 0.3
    p = project_l1_ball(v)
    assert (p.abs().sum(1) <= 1 + 1e-12).all()
    inside = v.abs().sum(1) <= 1
    assert torch.equal(p[inside], v[inside])
    # outside the ball: the projection is a soft threshold on the boundary, and no random point of the
    # ball is closer to v
    assert torch.allclose(p[~inside].abs().sum(1), torch.ones(int((~inside).sum()), dtype=F64))
    for i in torch.nonzero(~inside).squeeze(1)[:5]:
        cand = torch.randn(2000, 16, generator=g, dtype=F64)
        cand = cand / cand.abs().sum(1, keepdim=True) * torch.rand(2000, 1, generator=g, dtype=F64)
        assert (cand - v[i]).norm(dim=1).min() >= (p[i] - v[i]).norm() - 1e-12


def low_rank_inputs(n: int = 4096, d_in: int = 64, rank: int = 24, seed: int = 0) -> torch.Tensor:
    """Activations spanning a subspace (as LLM features nearly do: the premise of MagR)."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(rank, d_in, generator=g, dtype=F64)
    return torch.randn(n, rank, generator=g, dtype=F64) @ basis + 1e-3 * torch.randn(n, d_in, generator=g, dtype=F64)


@pytest.mark.parametrize("group_size", [32, -1])
def test_magr_keeps_the_layer_output_and_lowers_the_max_weight(group_size):
    g = torch.Generator().manual_seed(1)
    x = low_rank_inputs()
    w = 0.02 * torch.randn(48, 64, generator=g, dtype=F64)  # LLM-like weight scale (α is absolute)
    w[:, 5] *= 8  # an outlier column, as in LLM weights
    alpha = 1e-4 if group_size != -1 else 1e-3  # the paper's per-group / per-channel α
    w2 = magr(w, x.T @ x, group_size, alpha, iters=200).double()
    rel = float((x @ (w2 - w).T).norm() / (x @ w.T).norm())
    assert rel < 0.02  # the layer output is kept (paper: MagR preserves the output on calibration data)
    gs = w.shape[1] if group_size == -1 else group_size
    before, after = (t.reshape(48, -1, gs).abs().amax(-1) for t in (w, w2))
    assert (after <= before + 1e-9).all() and after.mean() < 0.9 * before.mean()  # every group's max falls
    # the point of it: a finer grid, so less output error after rounding
    spec = QuantSpec(3, 32)
    err = {k: float((x @ (rtn(v.float(), spec).dequantize().double() - w).T).norm()) for k, v in
           {"rtn": w, "magr": w2}.items()}
    assert err["magr"] < err["rtn"]


def test_magr_stage_in_a_cell(cfg_factory):
    from qexp.run import run_cell

    rec = run_cell(cfg_factory("method=rtn", "quant.init=rtn", "quant.magr=true", "quant.magr_iters=20", "bits=3",
                               "group_size=32"))
    assert rec["status"] == "ok", rec.get("error")
    assert rec["config"]["quant"]["magr"] is True and rec["merge"]["lossless"]


def test_magr_before_gptq_rounds_the_magr_weights_and_leaves_the_model_alone():
    from omegaconf import OmegaConf

    from qexp.config import QuantConfig
    from qexp.models import targets as find_targets
    from qexp.quant.base import base_quantizer
    from qexp.quant.magr import magr_weights
    from tests.conftest import tiny_llama

    model = tiny_llama()
    tg = find_targets(model, ["q_proj", "down_proj"])
    before = {n: m.weight.detach().clone() for n, m in tg.items()}
    calib = torch.randint(0, 128, (4, 32))
    spec = QuantSpec(3, 32)
    cfg = OmegaConf.structured(QuantConfig(init="gptq", magr=True, magr_alpha=1e-3, magr_iters=20, cache=False))
    with_magr = base_quantizer(cfg, spec, model, dict(tg), lambda: calib)
    plain = base_quantizer(OmegaConf.merge(cfg, {"magr": False}), spec, model, dict(tg), lambda: calib)
    for n, m in tg.items():
        assert torch.equal(m.weight, before[n])  # the method still sees W0
    pre = magr_weights(spec, model, dict(tg), calib, 1e-3, 20)
    n = next(iter(tg))
    assert not torch.equal(pre[n], before[n]) and pre[n].abs().max() < before[n].abs().max()
    assert not torch.equal(with_magr(n, tg[n]).codes, plain(n, tg[n]).codes)


def test_magr_weights_are_cached_for_every_bit_width(tmp_path, monkeypatch):
    """One MagR result serves the same base at any bit width (the key has the group, not the bits);
    another α, other weights or other calibration ids compute it again."""
    from qexp.models import targets as find_targets
    from qexp.quant import magr as M
    from tests.conftest import tiny_llama

    model = tiny_llama()
    tg = dict(find_targets(model, ["q_proj", "down_proj"]))
    calib = torch.randint(0, 128, (4, 32))
    first = M.magr_cached(QuantSpec(3, 32), model, tg, calib, 1e-3, 5, tmp_path)
    assert len(list(tmp_path.glob("magr-*.pt"))) == 1

    def no_compute(*_):
        raise AssertionError("recomputed")

    monkeypatch.setattr(M, "magr_weights", no_compute)
    again = M.magr_cached(QuantSpec(2, 32), model, tg, calib, 1e-3, 5, tmp_path)  # 2 bits: same weights
    assert first.keys() == again.keys() and all(torch.equal(first[n], again[n]) for n in first)
    for spec, ids, alpha in [(QuantSpec(2, 32), calib, 2e-3), (QuantSpec(2, 16), calib, 1e-3),
                             (QuantSpec(2, 32), calib + 1, 1e-3)]:
        with pytest.raises(AssertionError, match="recomputed"):
            M.magr_cached(spec, model, tg, ids, alpha, 5, tmp_path)
