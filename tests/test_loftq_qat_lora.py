"""LoftQ* and QAT-LoRA (L4Q's baselines): LoftQ's alternation lowers ‖W − Q − AB‖ round by round;
QAT-LoRA starts at its base, trains s, β, A, B, deploys base + 16-bit LoRA, and needs more training
memory than L4Q (qexp.plan's meter, the one qexp.bench shares)."""

from __future__ import annotations

from itertools import pairwise

import pytest
import torch

from qexp.config import ConfigError
from qexp.methods.cloq import CLoQDeployed
from qexp.methods.loftq import LoftQ, LoftQConfig, loftq_init
from qexp.methods.qat_lora import QATLoRA, QATLoRAConfig
from qexp.quant import QuantSpec, rtn


def _weight(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(96, 128, generator=g) * 0.02
    w[:, :3] *= 8  # outlier input channels, as in LLM weights
    return w


@pytest.mark.parametrize("bits,sym", [(2, True), (3, False), (4, True)])
def test_each_loftq_alternation_lowers_the_error(bits, sym):
    w = _weight()
    spec = QuantSpec(bits, 32, sym)
    grid, b, a, errors = loftq_init(w, spec, rank=8, iters=6)
    assert all(later < earlier for earlier, later in pairwise(errors)), errors
    first = rtn(w, spec).dequantize()  # round 1's base is plain RTN; the SVD of its residual comes on top
    assert errors[0] < float((w - first).norm() / w.norm())
    final = float((w - grid.dequantize() - b @ a).norm() / w.norm())
    assert final == pytest.approx(errors[-1], rel=1e-5)


def test_loftq_layer_starts_at_q_plus_ab_and_deploys_base_plus_lora():
    lin = torch.nn.Linear(128, 96, bias=True)
    lin.weight.data.copy_(_weight(1))
    method = LoftQ(LoftQConfig(rank=4, alpha=16.0, iters=3), QuantSpec(3, 32))
    layer = method.layer("l", lin, None)
    grid, b, a, _ = loftq_init(lin.weight, QuantSpec(3, 32), 4, 3)
    torch.testing.assert_close(layer.delta(), b @ a, rtol=1e-4, atol=1e-6)
    assert torch.equal(layer.base.codes, grid.codes)
    assert {n for n, p in layer.named_parameters() if p.requires_grad} == {"lora_A", "lora_B"}
    assert not layer.ON_GRID and layer.DEPLOYED == "integer base + fp adapter"
    x = torch.randn(5, 128)
    merged = layer.merge()
    assert isinstance(merged, CLoQDeployed) and torch.equal(layer(x), merged(x))
    assert len(method.report()["loftq_error"]) == 3
    with pytest.raises(ConfigError, match=r"method.iters=0 is not valid"):
        LoftQ(LoftQConfig(iters=0), QuantSpec(3, 32))


def test_qat_lora_starts_at_its_base_trains_s_beta_a_b_and_is_not_on_grid():
    w = _weight(2)
    spec = QuantSpec(3, 32, True)
    lin = torch.nn.Linear(128, 96, bias=False)
    lin.weight.data.copy_(w)
    qw = rtn(w, spec)
    layer = QATLoRA(QATLoRAConfig(), spec).layer("l", lin, qw)
    x = torch.randn(7, 128)
    torch.testing.assert_close(layer(x), x @ qw.dequantize().T)  # B = 0, s/β from the base
    layer(x).square().sum().backward()
    trained = {n for n, p in layer.named_parameters() if p.grad is not None}
    assert trained == {"scale", "offset", "lora_A", "lora_B"} and layer.weight.grad is None  # W₀ frozen
    with torch.no_grad():
        layer.lora_B.normal_()
    merged = layer.merge()
    assert isinstance(merged, CLoQDeployed) and not layer.ON_GRID
    torch.testing.assert_close(merged(x), layer(x))  # base + 16-bit LoRA: the training forward


def test_qat_lora_training_needs_more_memory_than_l4q():
    """Paper Table 1 (41.9 vs 25.4 GB on LLaMA-1 7B): one layer's forward + backward peak above its
    state, counted by qexp.bench's meter (live tensor bytes, as CUDA's max_memory_allocated) on
    qexp.bench's layer step, at 512 x 1024 and 128 tokens."""
    from qexp.bench.measure import TensorMemory
    from qexp.bench.worker import layer_inputs, layer_step_fns
    from qexp.methods.l4q import L4Q, L4QConfig

    spec, lin = QuantSpec(4, 128, True), torch.nn.Linear(512, 1024, bias=False)
    peak = {}
    for name, method in [("l4q", L4Q(L4QConfig(), spec)), ("qat_lora", QATLoRA(QATLoRAConfig(), spec))]:
        with TensorMemory() as mem:
            layer = mem.adopt(method.layer("l", lin, rtn(lin.weight.detach(), spec)))
            x, gy = layer_inputs(512, 1024, 128, torch.device("cpu"))
            fwd, bwd = layer_step_fns(layer, x, gy)
            before = mem.now()
            mem.reset_peak()
            bwd(fwd())
            peak[name] = mem.peak() - before
    assert peak["qat_lora"] > 1.5 * peak["l4q"], peak  # measured 12.8 vs 7.4 MB


@pytest.mark.parametrize("method", ["loftq", "qat_lora"])
def test_cell_runs_tiny(cfg_factory, method):
    from qexp.run import run_cell

    rec = run_cell(cfg_factory(f"method={method}", "bits=3", "group_size=32"))
    assert rec["status"] == "ok" and rec["train"]["steps"] == 3
    assert rec["merge"]["deployed"] == "integer base + fp adapter" and not rec["merge"]["lossless"]
    assert rec["merge"]["max_abs_logit_diff"] == 0.0  # the deployed module computes the training forward
    if method == "loftq":
        errs = rec["init"]["loftq_error"]
        assert len(errs) == 5 and errs == sorted(errs, reverse=True)


def test_l4q_table4_inits_differ_as_the_paper_describes():
    """L4Q_init clips nothing; symm (absmax/2^(b−1)) clips the positive maxima; asymm covers [min, max]
    with a float β; LSQ+'s 3σ init clips the tails. Every init gives the same layer shapes."""
    from qexp.methods.l4q import init_range
    from qexp.quant.lsq import lsq_codes

    w, spec = _weight(3), QuantSpec(3, 32, True)
    clipped = {}
    for how in ("l4q", "symm", "asymm", "lsq"):
        s, beta = init_range(w, spec, how)
        wn, _, _ = lsq_codes(w, s, beta, spec)
        clipped[how] = int(((wn < spec.qmin - 1e-4) | (wn > spec.qmax + 1e-4)).sum())  # beyond float rounding
        assert (beta == 0).all() == (how != "asymm")
    assert clipped["l4q"] == 0 and clipped["asymm"] == 0 and clipped["symm"] > 0 and clipped["lsq"] > 0


def test_loftq_lowrank_svd_is_near_the_exact_fit():
    w, spec = _weight(4), QuantSpec(3, 32)
    exact = loftq_init(w, spec, 4, 3)[3]
    torch.manual_seed(0)
    fast = loftq_init(w, spec, 4, 3, svd="lowrank")[3]
    assert all(f <= e * 1.01 for f, e in zip(fast, exact, strict=True)), (fast, exact)
