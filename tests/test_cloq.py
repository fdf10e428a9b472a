"""CLoQ: the closed-form init is the best rank-r fit in the calibrated metric; merge is exact."""

from __future__ import annotations

import torch

from qexp.methods.cloq import CLoQ, CLoQConfig, CLoQDeployed, cloq_factors
from qexp.methods.qwha import layer_output_error
from qexp.quant import QuantSpec
from tests.test_qwha import correlated_layer


def test_cloq_init_is_the_best_rank_r_fit_in_the_x_metric():
    _, _, dq, h = correlated_layer()
    errs = []
    for rank in (1, 4, 16):
        b, a = cloq_factors(dq, h, rank, 1e-4)
        errs.append(layer_output_error(dq, b @ a, h))
        # Eckart–Young in the X metric: the error equals the tail of the singular values of ΔW_Q Rᵀ
        hs = h + 1e-4 * h.diagonal().mean() * torch.eye(48, dtype=h.dtype)
        s = torch.linalg.svdvals(dq @ torch.linalg.cholesky(hs))  # any root with R Rᵀ... = Hs gives the same σ
        tail = float(s[rank:].square().sum())
        dampterm = 1e-4 * float(h.diagonal().mean()) * float((dq - b @ a).square().sum())
        assert abs(errs[-1] + dampterm - tail) < 1e-6 * tail
        plain_u, plain_s, plain_v = torch.linalg.svd(dq)
        plain = (plain_u[:, :rank] * plain_s[:rank]) @ plain_v[:rank]
        assert errs[-1] < layer_output_error(dq, plain, h)  # beats the weight-space (LoftQ-style) SVD
    assert errs == sorted(errs, reverse=True)


def test_cloq_layer_starts_at_the_fit_and_merges_exactly():
    w0, qw, dq, h = correlated_layer()
    lin = torch.nn.Linear(48, 96, bias=True)
    lin.weight.data.copy_(w0.float())
    method = CLoQ(CLoQConfig(rank=4), QuantSpec(3, 16))
    method.hessians = {"l": h}
    layer = method.layer("l", lin, qw)
    b, a = cloq_factors(dq, h, 4, 1e-4)
    torch.testing.assert_close(layer.delta().double(), b @ a, rtol=1e-4, atol=1e-5)
    assert {n for n, p in layer.named_parameters() if p.requires_grad} == {"lora_A", "lora_B"}
    layer.eval()
    x = torch.randn(5, 48)
    merged = layer.merge()
    assert isinstance(merged, CLoQDeployed)
    assert torch.equal(layer(x), merged(x))
    layer.train()
    torch.manual_seed(0)
    assert not torch.equal(layer(x), merged(x))  # dropout on the adapter input while training


def test_cloq_run_cell_tiny(cfg_factory):
    from qexp.run import run_cell

    rec = run_cell(cfg_factory("method=cloq", "quant.init=rtn", "method.rank=4", "bits=3", "group_size=32"))
    assert rec["status"] == "ok" and rec["train"]["steps"] == 3
    assert rec["merge"]["deployed"] == "integer base + fp adapter" and rec["merge"]["max_abs_logit_diff"] == 0.0
    assert not rec["merge"]["lossless"]
