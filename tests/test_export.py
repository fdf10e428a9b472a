"""qexp.export: packed checkpoints unpacked by independent code (numpy bit arrays, the
compressed-tensors library, transformers) must give back the merged QuantWeight and logits."""

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM

from qexp.config import ConfigError, validate
from qexp.export import ExportError, check, export_model, load
from qexp.export.__main__ import export_cell, main
from qexp.export.common import pack, unpack
from qexp.models import set_module
from qexp.quant import QuantLinear, QuantSpec, rtn
from qexp.results import cell_dir
from qexp.run import run_cell
from tests.conftest import tiny_llama

T = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def merged_tiny(bits: int, sym: bool, group_size: int = 32, frac: bool = False) -> nn.Module:
    """tiny_llama whose targets are QuantLinear (RTN), optionally with fractional zero points."""
    model, g = tiny_llama(), torch.Generator().manual_seed(1)
    for name, lin in list(model.named_modules()):
        if name.rsplit(".", 1)[-1] in T:
            qw = rtn(lin.weight, QuantSpec(bits, group_size, sym))
            if frac:
                qw.zero = qw.zero + torch.rand(qw.zero.shape, generator=g) - 0.5
            set_module(model, name, QuantLinear(qw, None))
    return model


def quant_layers(model: nn.Module) -> dict[str, QuantLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def values(words: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Independent unpacker: int32 words (packed along the last dim) -> bit array -> values."""
    w = words.contiguous().numpy().view("<u4")
    bit = np.unpackbits(w.view(np.uint8), axis=-1, bitorder="little")[..., : n * bits]
    bit = bit.reshape(*w.shape[:-1], n, bits).astype(np.int64)
    return torch.from_numpy((bit << np.arange(bits)).sum(-1))


def logits(model: nn.Module) -> torch.Tensor:
    ids = torch.arange(24).remainder(model.get_input_embeddings().num_embeddings).unsqueeze(0)
    with torch.no_grad():
        return model(input_ids=ids).logits


# --- packing ---------------------------------------------------------------------------------

@pytest.mark.parametrize("bits, vals, words", [
    (3, {10: 5}, [0x40000000, 0x1, 0x0]),  # value 10 straddles words 0/1: bits 30-31 get 01, word 1 bit 0 gets 1
    (3, {21: 6}, [0x0, 0x0, 0x3]),  # value 21 starts at bit 63: its low bit (0) ends word 1, "11" opens word 2
    (3, {0: 7, 9: 7, 11: 7, 31: 7}, [0x38000007, 0xE, 0xE0000000]),
    (3, dict.fromkeys(range(32), 7), [-1, -1, -1]),
    (4, {i: i + 1 for i in range(8)}, [0x87654321]),
    (2, {i: [1, 2, 3, 0][i % 4] for i in range(16)}, [0x39393939]),
    (8, {0: 1, 1: 2, 2: 3, 3: 0xFF}, [0xFF030201]),
])
def test_known_vectors_pack_to_known_words_incl_gptq_3bit_layout(bits, vals, words):
    v = torch.zeros(1, len(words) * 32 // bits, dtype=torch.int64)
    for i, x in vals.items():
        v[0, i] = x
    got = pack(v, bits, dim=1)[0].tolist()
    assert got == [w if w < 2**31 else w - 2**32 for w in words]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_matches_independent_bit_array_unpacker(bits):
    v = torch.randint(0, 2**bits, (5, 64), generator=torch.Generator().manual_seed(bits))
    assert torch.equal(values(pack(v, bits, dim=1), bits, 64), v)
    assert torch.equal(values(pack(v.T, bits, dim=0).T, bits, 64), v)  # along dim 0 too (GPTQ qweight)
    assert torch.equal(unpack(pack(v, bits, dim=1), bits, dim=1, n=64), v)
    assert torch.equal(unpack(pack(v.T, bits, dim=0), bits, dim=0, n=64), v.T)
    with pytest.raises(ValueError, match="outside"):
        pack(v + 2**bits, bits, dim=1)


# --- GPTQ v2 ---------------------------------------------------------------------------------

@pytest.mark.parametrize("bits, sym", [(2, False), (3, True), (4, False), (8, True)])
def test_gptq_round_trip_codes_scales_zeros_and_logits(tmp_path, bits, sym):
    model = merged_tiny(bits, sym)
    export_model(model, None, tmp_path, ["gptq"], T, dtype="float32", verify=False)
    d = tmp_path / "gptq"
    qc = json.loads((d / "config.json").read_text())["quantization_config"]
    assert qc | {"bits": bits, "group_size": 32, "sym": sym, "desc_act": False} == qc
    assert qc["checkpoint_format"] == "gptq_v2" and qc["quant_method"] == "gptq"
    sd, shift = load_file(str(d / "model.safetensors")), 2 ** (bits - 1) if sym else 0
    for name, m in quant_layers(model).items():
        d_out, d_in = m.codes.shape
        assert sd[f"{name}.qweight"].shape == (d_in * bits // 32, d_out)
        assert torch.equal(values(sd[f"{name}.qweight"].T, bits, d_in), m.codes.long() + shift)
        assert torch.equal(values(sd[f"{name}.qzeros"], bits, d_out).T, m.zero.long() + shift)  # v2: zero itself
        assert torch.equal(sd[f"{name}.scales"], m.scale.T)
        assert torch.equal(sd[f"{name}.g_idx"].long(), torch.arange(d_in) // 32)
    assert "lm_head.weight" in sd and "model.embed_tokens.weight" in sd
    reloaded = load(d)
    for name, m in quant_layers(model).items():
        r = reloaded.get_submodule(name)
        assert r.spec == m.spec and torch.equal(r.codes, m.codes) and torch.equal(r.zero, m.zero)
    assert torch.equal(logits(reloaded), logits(model))
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "fp16", dtype=torch.float32)  # loads anywhere
    assert torch.equal(logits(dense), logits(model))


def test_fp16_scales_are_explicit_and_the_exact_sidecar_restores_the_merged_model(tmp_path):
    model = merged_tiny(4, False)
    report = export_model(model, None, tmp_path, ["gptq"], T, dtype="float16")
    d, sd = tmp_path / "gptq", load_file(str(tmp_path / "gptq" / "model.safetensors"))
    layers = quant_layers(model)
    assert all(torch.equal(sd[f"{n}.scales"], m.scale.T.half()) for n, m in layers.items())
    # format only == the merged model with fp16 scales and every float tensor stored as fp16
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for t in ref.state_dict().values():
            if t.is_floating_point():
                t.copy_(t.half())
    assert torch.equal(logits(load(d, exact=False)), logits(ref))
    exact = load(d)  # fp32 scales from qexp_exact/: identical QuantWeights
    assert all(torch.equal(exact.get_submodule(n).scale, m.scale) for n, m in layers.items())
    r = report["formats"]["gptq"]
    assert r["verify"]["exact"]["logits_equal"] and r["verify"]["format_only"]["logits_equal"]
    assert 0 < r["rounding"]["scales"]["max_abs_dW"] < 1e-3 and r["rounding"]["zero_points"]["max_abs_dW"] == 0
    s = r["size"]
    assert s["weights_bytes"] == (d / "model.safetensors").stat().st_size and s["exact_sidecar_bytes"] > 0
    assert 4 < s["linear_bits_per_weight"] < 6  # 4-bit codes + fp16 scale, qzeros, g_idx per group of 32


@pytest.mark.parametrize("sym", [False, True])
def test_fractional_zero_points_are_rounded_with_an_exact_report_or_refused(tmp_path, sym):
    model = merged_tiny(4, sym, frac=True)  # LoTA's μ / QA-LoRA (asym), L4Q's β (signed codes)
    report = export_model(model, None, tmp_path, ["gptq", "compressed"], T, dtype="float32")
    layers, shift = quant_layers(model), 8 if sym else 0
    dz = [(m.zero + shift - torch.round(m.zero + shift)).abs() * m.scale for m in layers.values()]
    sq = sum(float((x.double() ** 2).sum()) * 32 for x in dz)
    ref = sum(float((m.weight_fp().double() ** 2).sum()) for m in layers.values())
    for fmt in ("gptq", "compressed"):
        r = report["formats"][fmt]
        assert not r["sym"] and r["rounding"]["zero_points"]["fractional_layers"] == len(layers)
        assert r["rounding"]["zero_points"]["max_abs_dW"] == pytest.approx(max(float(x.max()) for x in dz), rel=1e-6)
        assert r["rounding"]["zero_points"]["rel_fro_dW"] == pytest.approx((sq / ref) ** 0.5, rel=1e-6)
        exact, fmt_only = load(tmp_path / fmt), load(tmp_path / fmt, exact=False)
        assert torch.equal(logits(exact), logits(model))  # float zeros kept in qexp_exact/
        for n, m in layers.items():
            assert torch.equal(fmt_only.get_submodule(n).codes, m.codes)
            assert torch.equal(fmt_only.get_submodule(n).zero, torch.round(m.zero + shift) - shift)
        assert not torch.equal(logits(fmt_only), logits(model))
    assert any("fractional zero points" in n for n in report["notes"])
    with pytest.raises(ExportError, match=r"fractional zero points .* max \|ΔW\| = "):
        export_model(model, None, tmp_path / "r", ["gptq"], T, zero_rounding="refuse")


# --- compressed-tensors ----------------------------------------------------------------------

@pytest.mark.parametrize("bits, sym", [(4, False), (8, True)])
def test_compressed_tensors_library_decompresses_to_the_merged_model(tmp_path, bits, sym):
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from transformers import CompressedTensorsConfig

    model = merged_tiny(bits, sym)
    export_model(model, None, tmp_path, ["compressed"], T, dtype="float32", verify=False)
    d, off = tmp_path / "compressed", 2 ** (bits - 1)
    qc = json.loads((d / "config.json").read_text())["quantization_config"]
    w = qc["config_groups"]["group_0"]["weights"]
    assert (qc["quant_method"], qc["format"], qc["ignore"]) == ("compressed-tensors", "pack-quantized", ["lm_head"])
    assert (w["num_bits"], w["symmetric"], w["strategy"], w["group_size"]) == (bits, sym, "group", 32)
    sd = load_file(str(d / "model.safetensors"))
    for name, m in quant_layers(model).items():
        signed = m.codes.long() - (0 if sym else off)  # compressed-tensors codes are signed
        assert torch.equal(unpack_from_int32(sd[f"{name}.weight_packed"], bits, m.codes.shape).long(), signed)
        assert torch.equal(sd[f"{name}.weight_scale"], m.scale)
        if sym:
            assert f"{name}.weight_zero_point" not in sd
        else:
            zp = unpack_from_int32(sd[f"{name}.weight_zero_point"], bits, m.zero.shape, packed_dim=0)
            assert torch.equal(zp.long(), m.zero.long() - off)
    # transformers + compressed-tensors (the format's own loader) give the merged logits exactly
    ct = CompressedTensorsConfig(dequantize=True)
    hf = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, quantization_config=ct)
    assert torch.equal(logits(hf), logits(model))
    if sym:  # the default (run-compressed) path too; asymmetric zero points hit a transformers layout mismatch
        assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)), logits(model))


# --- not on the grid, bad cases ----------------------------------------------------------------

class BaseAdapter(nn.Module):
    """A QWHA-like merged layer: frozen base + dense adapter, not integer codes."""

    def __init__(self, lin: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = lin.in_features, lin.out_features
        self.register_buffer("base", lin.weight.detach().clone())
        self.register_buffer("delta", torch.randn_like(lin.weight) * 0.01)

    def forward(self, x):
        return nn.functional.linear(x, self.base) + nn.functional.linear(x, self.delta)


def test_layers_not_on_the_grid_skip_packed_formats_and_say_so(tmp_path):
    model = tiny_llama()
    for name, lin in list(model.named_modules()):
        if name.rsplit(".", 1)[-1] in T:
            set_module(model, name, BaseAdapter(lin))
    report = export_model(model, None, tmp_path, ["gptq", "compressed"], T, dtype="float32")
    assert set(report["skipped"]) == {"gptq", "compressed"} and not (tmp_path / "gptq").exists()
    assert "not on the grid" in report["notes"][0]
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "fp16", dtype=torch.float32)
    m = model.model.layers[0].mlp.down_proj
    assert torch.allclose(dense.model.layers[0].mlp.down_proj.weight, m.base + m.delta, atol=1e-6)
    assert (logits(dense) - logits(model)).abs().max() < 1e-4


def test_bad_formats_and_bit_widths_are_clear_errors(cfg_factory):
    with pytest.raises(ConfigError, match="export.formats: compressed cannot hold bits=3; compressed supports "
                                          "bits 4, 8 .*vLLM"):
        validate(cfg_factory("export=compressed", "bits=3"))
    with pytest.raises(ConfigError,
                       match="export.formats: 'awq' is not valid; choose from: gptq, compressed, gguf, fp16, all"):
        check(["awq"], 4)
    with pytest.raises(ConfigError, match="export.dtype='int8' is not valid"):
        check(["gptq"], 4, dtype="int8")
    validate(cfg_factory("export=all", "bits=4"))
    assert cell_dir(cfg_factory("export=gptq")) == cell_dir(cfg_factory())  # export is not part of the identity


def test_exporting_a_failed_cell_or_a_foreign_dir_is_a_clear_error(cfg_factory, tmp_path, capsys):
    texts = tmp_path / "texts.jsonl"  # a column only reading the file finds missing: the cell fails at work
    texts.write_text('{"text": "a sentence."}\n')
    cfg = cfg_factory("data.eval.xsum.kind=files", f"data.eval.xsum.files=[{texts}]", "data.eval.xsum.column=nope")
    with pytest.raises(ConfigError):
        run_cell(cfg)
    with pytest.raises(ExportError, match="status='failed' .*column='nope'.*no merged model to export"):
        export_cell(cell_dir(cfg))
    assert main([str(cell_dir(cfg))]) == 2 and "status='failed'" in capsys.readouterr().err
    with pytest.raises(ExportError, match="no result.json"):
        export_cell(tmp_path)
    (tmp_path / "x" / "gptq").mkdir(parents=True)
    with pytest.raises(ExportError, match="not a qexp export .*refusing to overwrite"):
        export_model(merged_tiny(4, False), None, tmp_path / "x", ["gptq"], T)


# --- whole cells -------------------------------------------------------------------------------
# Every registered method exports from a whole cell: tests/test_precision.py (its bf16 cell per
# method runs with export=gptq and checks the report with check_export_report below).


def check_export_report(rec: dict) -> None:
    """A cell's export=gptq report: the fp16 twin reloads to its logits; integer methods get a GPTQ
    checkpoint that reloads to the merged codes and logits; the others are skipped and say why."""
    report, merge = rec["export"], rec["merge"]
    out = Path(rec["dir"]) / "export"
    assert json.loads((out / "report.json").read_text())["formats"].keys() == report["formats"].keys()
    assert report["formats"]["fp16"]["verify"]["logits_equal"]
    assert (out / "fp16" / "tokenizer.json").exists() and (out / "fp16" / "config.json").exists()
    integer = merge["on_grid"] or merge["deployed"] == "integer (re-quantized)"
    if integer:  # integer codes after merge: a GPTQ checkpoint that reloads to the same logits
        v = report["formats"]["gptq"]["verify"]
        assert v["exact"] == {"codes_scales_zeros_equal": True, "logits_equal": True,
                              "max_abs_logit_diff_vs_merged": v["exact"]["max_abs_logit_diff_vs_merged"]}
        assert v["format_only"]["logits_equal"] and v["format_only"]["codes_scales_zeros_equal"]
        assert report["formats"]["gptq"]["size"]["linear_bits_per_weight"] < 5
        assert (out / "gptq" / "quantize_config.json").exists() and (out / "gptq" / "tokenizer.json").exists()
    else:
        assert "gptq" in report["skipped"]
    if not merge["on_grid"]:  # LoRA, QLoRA, QWHA: base + adapter, and the report says so
        assert report["adapter"]["layers"] == 14 and (out / "adapter" / "adapter.safetensors").exists()
        assert report["notes"]


def test_cli_exports_a_finished_cell_by_rerunning_it(cfg_factory, capsys):
    cfg = cfg_factory("method=rtn", "bits=3", "eval.base=false", "eval.max_windows=1")
    run_cell(cfg)
    assert main([str(cell_dir(cfg)), "--formats", "gptq", "--dtype", "float32"]) == 0
    printed = capsys.readouterr().out
    report = json.loads((cell_dir(cfg) / "export" / "report.json").read_text())
    assert report["rerun"]["matches_record"] and "gptq" in printed and "reload logits equal: True" in printed
    model = load(cell_dir(cfg) / "export" / "gptq")
    dense = AutoModelForCausalLM.from_pretrained(cell_dir(cfg) / "export" / "fp16", dtype=torch.float32)
    assert torch.equal(logits(model), logits(dense))  # float32 export: integer model == its dequantized twin
