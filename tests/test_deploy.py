"""Deployment formats read by code other than qexp's writer: GGUF blocks decoded from raw bytes
and by transformers' GGUF loader, PEFT adapters loaded by ``PeftModel.from_pretrained``, and GPTQ
checkpoints imported as a base (``quant.init=checkpoint``)."""

import json

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from qexp.config import ConfigError, validate
from qexp.export import ExportError, check, export_model
from qexp.export.gguf_file import FILE, rope_rows
from qexp.models import gguf_path
from qexp.run import run_cell
from tests.test_export import T, logits, merged_tiny, quant_layers

# --- GGUF ---------------------------------------------------------------------------------------


def gguf_blocks(t, qtype: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Independent Q4_1 / Q8_0 decoder: raw block bytes -> (d, m, codes) per row and block."""
    raw = np.asarray(t.data).view(np.uint8)
    rows = raw.shape[0]
    size = {"Q4_1": 20, "Q8_0": 34}[qtype]
    b = raw.reshape(rows, -1, size)
    d = b[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float64)
    if qtype == "Q4_1":
        m = b[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float64)
        qs = b[..., 4:].astype(np.int64)
        return d, m, np.concatenate([qs & 15, qs >> 4], -1)  # element j low nibble, j + 16 high
    return d, np.zeros_like(d), b[..., 2:].copy().view(np.int8).astype(np.int64)


@pytest.mark.parametrize("bits, sym, frac, qtype", [(2, False, False, "Q4_1"), (3, True, False, "Q4_1"),
                                                    (4, False, True, "Q4_1"), (8, True, False, "Q8_0")])
def test_gguf_blocks_hold_the_exact_codes_and_transformers_loads_the_file(tmp_path, bits, sym, frac, qtype):
    model = merged_tiny(bits, sym, frac=frac)  # frac: LoTA-like float zero points, held exactly by m = -s·z
    report = export_model(model, None, tmp_path, ["gguf"], T, dtype="float32")
    r = report["formats"]["gguf"]
    assert r["types"] == {qtype: 14} and r["rounding"]["fp16_d_and_m"]["max_abs_dW"] < 1e-3
    reader = gguf.GGUFReader(str(tmp_path / "gguf" / FILE))
    tensors = {t.name: t for t in reader.tensors}
    heads = {"q_proj": 4, "k_proj": 2}
    for name, m in quant_layers(model).items():
        i, leaf = name.split(".")[2], name.rsplit(".", 1)[-1]
        gname = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
                 "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}[leaf]
        t = tensors[f"blk.{i}.{gname}.weight"]
        assert t.tensor_type.name == qtype
        perm = rope_rows(m.codes.shape[0], heads[leaf]) if leaf in heads else torch.arange(m.codes.shape[0])
        shift = 2 ** (bits - 1) if sym else 0  # groups of 32: one block per group
        d, mins, q = gguf_blocks(t, qtype)
        codes = (m.codes.long() + shift)[perm].reshape(q.shape).numpy()
        s, z = m.scale[perm].double().numpy(), (m.zero.double() + shift)[perm].numpy()
        assert np.array_equal(q, codes - (shift if qtype == "Q8_0" else 0))  # the codes themselves
        assert np.array_equal(d, s.astype(np.float16).astype(np.float64))
        if qtype == "Q4_1":
            assert np.array_equal(mins, (-s * z).astype(np.float16).astype(np.float64))
        # the gguf package's own dequantization gives d·q + m
        w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float64).reshape(m.codes.shape)
        assert np.array_equal(w, (d[..., None] * q + mins[..., None]).astype(np.float32).reshape(w.shape))
    assert tensors["token_embd.weight"].tensor_type.name == "F16"
    assert tensors["output_norm.weight"].tensor_type.name == "F32"
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "gguf", gguf_file=FILE, dtype=torch.float32)
    diff = float((logits(hf) - logits(model)).abs().max())  # q/k rows permuted back by transformers
    assert diff < 5e-3 and r["verify"]["max_abs_logit_diff_vs_merged"] < 5e-3


def test_cli_exports_a_finished_cell_to_gguf_with_the_tokenizer_llama_cpp_reads(cfg_factory, capsys):
    from qexp.export.__main__ import main
    from qexp.results import cell_dir

    cfg = cfg_factory("method=rtn", "bits=4", "group_size=32", "eval.base=false", "eval.max_windows=1")
    run_cell(cfg)
    assert main([str(cell_dir(cfg)), "--formats", "gguf"]) == 0
    assert "gguf" in capsys.readouterr().out
    report = json.loads((cell_dir(cfg) / "export" / "report.json").read_text())
    assert report["rerun"]["matches_record"] and report["formats"]["gguf"]["types"] == {"Q4_1": 14}
    ours = gguf.GGUFReader(str(cell_dir(cfg) / "export" / "gguf" / FILE))
    ref = gguf.GGUFReader(str(gguf_path(validate_model())))  # the packaged SmolLM2 GGUF (same tokenizer)
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
                "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id"):
        assert ours.get_field(key).contents() == ref.get_field(key).contents(), key
    assert ours.get_field("general.architecture").contents() == "llama"
    assert ours.get_field("llama.attention.head_count_kv").contents() == 2
    assert report["formats"]["gguf"]["verify"]["max_abs_logit_diff_vs_merged"] < 1e-2


def validate_model():
    from tests.conftest import make_cfg

    return make_cfg("model=smollm2_135m").model


def test_grids_gguf_cannot_hold_are_refused_before_work(cfg_factory, tmp_path):
    with pytest.raises(ConfigError, match=r"gguf cannot hold the grid bits=3 group_size=48: .*formats that can "
                                          r"hold it: gptq, fp16"):
        validate(cfg_factory("export=gguf", "bits=3", "group_size=48"))
    check(["gguf"], 4, group_size=-1)
    model = merged_tiny(8, False)  # 8-bit with zero points: Q8_0 stores d·q only
    with pytest.raises(ExportError, match=r"bits=8 group_size=32 symmetric=False\) has zero points Q8_0 cannot "
                                          r"hold.*gptq, compressed, fp16"):
        export_model(model, None, tmp_path, ["gguf"], T)
    assert not (tmp_path / "fp16").exists()  # refused before any file was written


# --- PEFT adapters ------------------------------------------------------------------------------

def adapted_tiny(method: str) -> torch.nn.Module:
    """tiny_llama with every target a trained-looking (B != 0) LoRA / QLoRA / CLoQ layer."""
    from qexp.methods.cloq import CLoQLinear
    from qexp.methods.lora import LoRALinear
    from qexp.methods.qlora import QLoRALinear
    from qexp.models import set_module
    from qexp.quant import QuantSpec, rtn
    from tests.conftest import tiny_llama

    model, g = tiny_llama(), torch.Generator().manual_seed(3)
    for name, lin in list(model.named_modules()):
        if name.rsplit(".", 1)[-1] in T:
            qw = rtn(lin.weight, QuantSpec(4, 32, False))
            if method == "lora":
                layer = LoRALinear(lin.weight, lin.bias, 4, 8.0)
            elif method == "qlora":
                layer = QLoRALinear(qw, lin.bias, 4, 8.0, "minmax")
            else:
                a = torch.randn(4, lin.in_features, generator=g)
                layer = CLoQLinear(qw, lin.bias, a, torch.zeros(lin.out_features, 4), 0.25, 0.1)
            with torch.no_grad():
                layer.lora_B.normal_(0, 0.05, generator=g)
            set_module(model, name, layer.eval())
    return model


@pytest.mark.parametrize("method", ["lora", "qlora", "cloq"])
def test_peft_loads_the_adapter_on_the_exported_base_with_the_unmerged_logits(tmp_path, method):
    from peft import PeftModel

    from qexp.export import adapters
    from qexp.models import set_module

    model = adapted_tiny(method)
    unmerged, state = logits(model), adapters(model)
    for name, m in list(model.named_modules()):
        if name.rsplit(".", 1)[-1] in T:
            set_module(model, name, m.merge())
    report = export_model(model, None, tmp_path, ["fp16"], T, dtype="float32", adapter_state=state, verify=False)
    assert report["peft"]["layers"] == 14
    cfg = json.loads((tmp_path / "peft" / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["lora_alpha"] / cfg["r"] == next(iter(state.values()))["attrs"]["scaling"]
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "peft" / "base", dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, tmp_path / "peft" / "adapter").eval()
    assert torch.equal(logits(peft_model), unmerged)  # bit for bit: same base, same A, B, α/r


def test_adapters_peft_cannot_hold_stay_in_qexp_format(tmp_path):
    from qexp.export import peft_adapter

    state = {"model.layers.0.mlp.down_proj": {"class": "qexp.methods.qwha.QWHALinear", "attrs": {},
                                              "tensors": {"c": torch.zeros(3)}}}
    r = peft_adapter.write(tmp_path, None, None, state, torch.float32)
    assert r == {"skipped": "PEFT has no adapter type matching QWHALinear; adapter/ holds qexp's format"}


# --- the base from a GPTQ checkpoint ---------------------------------------------------------------

def gptq_targets(model) -> dict:
    return {n: m for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in T}


def to_v1(d) -> None:
    """Rewrite a v2 export as GPTQ v1 (AutoGPTQ): qzeros hold zero - 1, checkpoint_format gptq."""
    from safetensors.torch import load_file, save_file

    from qexp.export.common import pack, unpack

    sd = load_file(str(d / "model.safetensors"))
    bits = json.loads((d / "config.json").read_text())["quantization_config"]["bits"]
    for k in [k for k in sd if k.endswith(".qzeros")]:
        z = unpack(sd[k], bits, dim=1, n=sd[k].shape[1] * 32 // bits)
        sd[k] = pack((z - 1) % 2**bits, bits, dim=1)
    save_file(sd, str(d / "model.safetensors"))
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"]["checkpoint_format"] = "gptq"
    (d / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("bits, sym, v1", [(4, False, False), (3, True, False), (2, False, True), (8, True, True)])
def test_gptq_checkpoint_import_round_trips_bit_for_bit(tmp_path, bits, sym, v1):
    from qexp.config import QuantConfig
    from qexp.quant import QuantLinear, QuantSpec
    from qexp.quant.base import base_quantizer
    from tests.conftest import tiny_llama

    model = merged_tiny(bits, sym)
    export_model(model, None, tmp_path, ["gptq"], T, dtype="float32", verify=False)
    if v1:
        to_v1(tmp_path / "gptq")
    fresh = tiny_llama()
    spec = QuantSpec(bits, 32, sym)
    quantize = base_quantizer(QuantConfig(init="checkpoint", path=str(tmp_path / "gptq")), spec, fresh,
                              gptq_targets(fresh), lambda: None)
    x = torch.randn(3, 64)
    for name, lin in gptq_targets(fresh).items():
        qw, want = quantize(name, lin), model.get_submodule(name)
        assert qw.spec == want.spec and torch.equal(qw.codes, want.codes)
        assert torch.equal(qw.scale, want.scale) and torch.equal(qw.zero, want.zero)
        xi = x if lin.in_features == 64 else torch.randn(3, lin.in_features)
        assert torch.equal(QuantLinear(qw)(xi), want(xi))


def test_gptq_checkpoint_import_refuses_act_order_bits_and_grid_mismatch(tmp_path):
    from safetensors.torch import load_file, save_file

    from qexp.quant import QuantSpec
    from qexp.quant.checkpoint import checkpoint_quantizer
    from tests.conftest import tiny_llama

    export_model(merged_tiny(4, False), None, tmp_path, ["gptq"], T, dtype="float32", verify=False)
    d, fresh = tmp_path / "gptq", tiny_llama()
    with pytest.raises(ConfigError, match="has bits=4 group_size=32; this run has bits=3 group_size=32"):
        checkpoint_quantizer(str(d), QuantSpec(3, 32), gptq_targets(fresh))
    sd = load_file(str(d / "model.safetensors"))
    key = next(k for k in sd if k.endswith(".g_idx"))
    sd[key] = sd[key].flip(0)  # act-order: groups no longer contiguous
    save_file(sd, str(d / "model.safetensors"))
    with pytest.raises(ConfigError, match=r"g_idx is not contiguous groups of 32 \(desc_act / act-order"):
        checkpoint_quantizer(str(d), QuantSpec(4, 32), gptq_targets(fresh))
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"]["bits"] = 5
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"the checkpoint has bits=5; qexp's grids hold \(2, 3, 4, 8\)"):
        checkpoint_quantizer(str(d), QuantSpec(4, 32), gptq_targets(fresh))
    with pytest.raises(ConfigError, match="quant.init=checkpoint needs quant.path"):
        checkpoint_quantizer(None, QuantSpec(4, 32), gptq_targets(fresh))


def test_a_cell_starts_from_an_exported_gptq_checkpoint_with_the_same_metrics(cfg_factory, tmp_path):
    fast = ["bits=4", "eval.base=false", "eval.max_windows=1"]
    rec = run_cell(cfg_factory("method=rtn", *fast, "export=gptq", "export.dtype=float32", "export.verify=false"))
    path = f"{rec['dir']}/export/gptq"
    again = run_cell(cfg_factory("method=rtn", *fast, "quant.init=checkpoint", f"quant.path={path}"))
    assert again["status"] == "ok" and again["dir"] != rec["dir"]
    final = {k: v for k, v in rec["metrics"].items() if k.startswith("ppl/") and k.endswith("/final")}
    assert final and all(again["metrics"][k] == v for k, v in final.items())  # the same base, bit for bit
    trained = run_cell(cfg_factory("method=peqa", *fast, "train.steps=1", "quant.init=checkpoint",
                                   f"quant.path={path}"))
    assert trained["status"] == "ok"
    with pytest.raises(ConfigError, match="quant.init=checkpoint needs quant.path"):
        validate(cfg_factory("quant.init=checkpoint"))
