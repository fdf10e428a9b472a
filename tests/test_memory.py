"""Memory for 7B/8B on one GPU (issue 14): fp weights freed after attach, gradient checkpointing,
GPTQ calibration states off the compute device, direct-dtype loading, streamed hub corpora."""

from __future__ import annotations

import gc
import json
import math
import weakref

import pytest
import torch

import qexp.adapt
import qexp.run
from qexp.run import run_cell


@pytest.mark.parametrize("method", ["peqa", "lora", "lrqat", "lota", "qwha", "gptq"])
def test_fp_target_weights_are_freed_after_attach(cfg_factory, monkeypatch, method):
    """Once the method layers are in, no original target weight storage is alive (base eval runs after)."""
    storages: list[weakref.ref] = []
    alive_at_eval: list[int] = []
    attach, perplexity = qexp.adapt.attach, qexp.run.perplexity

    def watched_attach(model, method, targets, *args, **kwargs):
        storages.extend(weakref.ref(m.weight.untyped_storage()) for m in targets.values())
        return attach(model, method, targets, *args, **kwargs)

    def watched_perplexity(*args, **kwargs):
        gc.collect()
        alive_at_eval.append(sum(r() is not None for r in storages))
        return perplexity(*args, **kwargs)

    monkeypatch.setattr(qexp.adapt, "attach", watched_attach)
    monkeypatch.setattr(qexp.run, "perplexity", watched_perplexity)
    rec = run_cell(cfg_factory(f"method={method}", "train.steps=1", "eval.max_windows=1"))
    assert rec["status"] == "ok"
    assert len(storages) == 14 and alive_at_eval[0] == 0


@pytest.mark.parametrize("method", ["peqa", "qlora", "lrqat", "lota", "qwha"])
def test_gradient_checkpointing_gives_the_same_losses(cfg_factory, monkeypatch, method):
    """fp32: recomputing each decoder block in backward changes no loss (LR-QAT also checkpoints its layers)."""
    import transformers.modeling_utils

    calls, states = [], []
    checkpoint, train = transformers.modeling_utils.checkpoint, qexp.run.train

    def counting_checkpoint(*args, **kwargs):
        calls.append(1)
        return checkpoint(*args, **kwargs)

    def train_and_look(model, *args, **kwargs):
        out = train(model, *args, **kwargs)
        flags = [m.gradient_checkpointing for m in model.modules() if hasattr(m, "gradient_checkpointing")]
        states.append((any(flags), hasattr(model, "_require_grads_hook")))
        return out

    monkeypatch.setattr(transformers.modeling_utils, "checkpoint", counting_checkpoint)
    monkeypatch.setattr(qexp.run, "train", train_and_look)
    losses = {}
    for on in (False, True):
        rec = run_cell(cfg_factory(f"method={method}", f"train.gradient_checkpointing={on}", "train.steps=2",
                                   "eval.base=false", "eval.max_windows=1", f"name=gc{on}"))
        losses[on] = rec["train"]["losses"]
        assert bool(calls) == on  # HF's checkpoint ran (only) when on
    assert losses[True] == losses[False]  # bit for bit
    assert states == [(False, False), (False, False)]  # off again after training


def test_gptq_updates_the_calibration_states_in_place(monkeypatch):
    """Block-sequential GPTQ holds one set of block inputs (+ one batch), never a second list."""
    from qexp.config import QuantConfig
    from qexp.models import targets as find_targets
    from qexp.quant import QuantSpec
    from qexp.quant import gptq as g

    from .conftest import tiny_llama

    monkeypatch.setattr(g, "CALIB_BATCH", 2)
    model = tiny_llama(layers=3)
    hidden, seqlen, n = model.config.hidden_size, 16, 12
    live: list[int] = []

    def count_states(mod, args, out) -> None:  # hidden states alive after each block forward
        live.append(sum(1 for o in gc.get_objects()
                        if type(o) is torch.Tensor and o.dim() == 3 and o.shape[1:] == (seqlen, hidden)))

    for block in model.model.layers:
        block.register_forward_hook(count_states)
    ids = torch.randint(0, 128, (n, seqlen), generator=torch.Generator().manual_seed(0))
    targets = find_targets(model, ["q_proj", "down_proj"])
    res = g.gptq_results(QuantConfig(init="gptq"), QuantSpec(3, 32), model, targets, ids, device="cpu")
    assert len(res) == 6
    assert max(live) == n // 2 + 1  # every batch's input, and the output that is about to replace one


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_local_checkpoint_loads_straight_in_its_dtype(tmp_path, dtype):
    """source=hub on a saved fp32 tiny_random: every tensor arrives in model.dtype, on the asked device."""
    from qexp import models

    from .conftest import make_cfg

    cfg = make_cfg().model
    model, tok = models.load(cfg)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    hub = models.ModelConfig(name="local", source="hub", path=str(tmp_path), dtype=dtype)
    loaded, _ = models.load(hub, device="cpu")
    assert {t.dtype for t in loaded.state_dict().values() if t.is_floating_point()} == {getattr(torch, dtype)}
    assert loaded.device == torch.device("cpu") and not any(p.requires_grad for p in loaded.parameters())
    want = model.state_dict()
    assert all(torch.equal(t, want[k].to(t.dtype)) for k, t in loaded.state_dict().items())


def test_a_gpu_device_is_the_device_map_in_one_process():
    from qexp.models import _placement

    assert _placement("cuda:0") == {"low_cpu_mem_usage": True, "device_map": {"": torch.device("cuda:0")}}
    assert _placement("cpu") == _placement(None) == {"low_cpu_mem_usage": True}


@pytest.fixture(scope="module")
def tok():
    from qexp import models

    from .conftest import make_cfg

    return models.load(make_cfg().model)[1]


def _spy_streams(monkeypatch) -> list[int]:
    """Rows pulled from each streamed ``load_dataset`` (the real one, on local JSON files)."""
    import datasets

    load, reads = datasets.load_dataset, []

    def spy(*args, **kwargs):
        assert kwargs.get("streaming") is True  # a hub training source is never loaded whole
        reads.append(0)
        i = len(reads) - 1
        for row in load(*args, **kwargs):
            reads[i] += 1
            yield row

    monkeypatch.setattr(datasets, "load_dataset", spy)
    return reads


def test_hub_text_streams_only_the_tokens_the_run_needs(tmp_path, tok, monkeypatch):
    from qexp import data
    from qexp.config import SourceConfig

    docs = [f"Document {i} says " + "something rather plain " * (3 + i % 5) for i in range(200)]
    f = tmp_path / "docs.jsonl"
    f.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    seqlen, examples = 32, 20  # e.g. 5 steps × batch 2 × accumulation 2
    whole = data.lm_chunks(SourceConfig(kind="files", name="docs", files=[str(f)]), tok, seqlen, examples)
    reads = _spy_streams(monkeypatch)
    hub = SourceConfig(kind="hub", name="json", files=[str(f)], split="train")
    chunks = data.lm_chunks(hub, tok, seqlen, examples)
    need = math.ceil(examples * data.MARGIN) * seqlen
    lengths = [len(tok(d, add_special_tokens=False).input_ids) for d in docs]
    docs_needed = next(m for m in range(1, len(docs)) if sum(lengths[:m]) + m - 1 >= need)
    assert reads == [docs_needed] and docs_needed < len(docs) // 2
    assert chunks.shape == (22, seqlen)
    assert torch.equal(chunks.flatten(), whole.flatten()[:need])  # the packing of the whole-file path
    assert len(whole) > 2 * len(chunks)  # files (and embedded) are still read whole


def test_hub_alpaca_streams_only_the_rows_the_run_needs(tmp_path, tok, monkeypatch):
    from qexp import data
    from qexp.config import SourceConfig

    rows = [{"instruction": f"Say {i}.", "input": "", "output": f"{i}"} for i in range(50)]
    f = tmp_path / "alpaca.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    reads = _spy_streams(monkeypatch)
    src = SourceConfig(kind="hub", name="json", files=[str(f)], split="train", format="alpaca")
    chunks = data.lm_chunks(src, tok, 48, examples=10)
    assert reads == [11] and chunks.shape == (11, 2, 48)
