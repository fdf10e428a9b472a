"""Export a merged model as packed integer checkpoints that inference stacks load, verified.

``export=gptq|compressed|fp16|all`` in a cell's config (run at the end of the cell), or
``python -m qexp.export <cell dir>`` afterwards, writes under ``<cell dir>/export/``:

* ``gptq/``: GPTQ v2 (``checkpoint_format: gptq_v2``), 2/3/4/8 bits (:mod:`.gptq`);
* ``compressed/``: compressed-tensors ``pack-quantized``, 4/8 bits (:mod:`.compressed`);
* ``gguf/``: ``model.gguf`` for llama.cpp, Q4_1 (bits <= 4) / Q8_0 (8-bit symmetric) with the
  exact codes (:mod:`.gguf_file`); asked for by name, not part of ``all``;
* ``fp16/``: the dequantized model in ``export.dtype``, always (plain transformers checkpoint);
* ``adapter/``: base + adapter state of layers that are not on the grid (LoRA, QLoRA, QWHA);
* ``peft/``: for LoRA-type adapters (lora, qlora, cloq) the base checkpoint + a PEFT adapter
  that ``PeftModel.from_pretrained`` loads (:mod:`.peft_adapter`);
* ``report.json``: sizes vs the fp16 model, rounding, verification, what was skipped and why.

Each directory holds ``config.json`` (with ``quantization_config``), the tokenizer and
``qexp_export.json``. Formats with integer zero points round fractional zeros (LoTA's μ,
L4Q's β, QA-LoRA) and the report says by how much the weights change (or
``export.zero_rounding=refuse`` fails); the exact float zeros and scales are kept in
``qexp_exact/`` so :func:`load` reproduces the merged model exactly. Every write is reloaded
and its logits compared with the merged model's.
"""

from __future__ import annotations

import copy
import json
import shutil
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from .. import dist
from ..config import ConfigError
from ..methods import MethodLayer
from ..models import set_module
from ..quant import QuantLinear, QuantSpec, QuantWeight, fp_linear
from . import compressed, gguf_file, gptq, peft_adapter
from .checkpoint import EXACT, META, WEIGHTS, float_state, load, save
from .common import ExportError, WeightError, integer_zeros, signed_back, storage_errors, unsigned

__all__ = ["ExportError", "adapters", "check", "export_model", "load", "write"]

FORMATS = ("gptq", "compressed", "gguf", "fp16")
ALL = ("gptq", "compressed", "fp16")  # export=all (gguf needs a llama-graph model: asked for by name)
PACKED = {"gptq": gptq, "compressed": compressed}
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
ZERO_ROUNDING = ("report", "refuse")


def check(formats: list[str], bits: int, dtype: str = "float16", zero_rounding: str = "report",
          group_size: int | None = None) -> None:
    """Fail fast on an export that cannot be written (names the key, value and choices)."""
    for f in formats:
        if f == "gguf" and group_size is not None:
            gguf_file.check(bits, group_size)
        if f not in (*FORMATS, "all"):
            raise ConfigError(f"export.formats: {f!r} is not valid; choose from: {', '.join(FORMATS)}, all")
        if f in PACKED and bits not in PACKED[f].BITS:
            raise ConfigError(f"export.formats: {f} cannot hold bits={bits}; {f} supports bits "
                              f"{', '.join(map(str, PACKED[f].BITS))}" +
                              (" (vLLM's kernels: 4/8 only); use export=gptq" if f == "compressed" else ""))
    if dtype not in DTYPES:
        raise ConfigError(f"export.dtype={dtype!r} is not valid; choose one of: {', '.join(DTYPES)}")
    if zero_rounding not in ZERO_ROUNDING:
        raise ConfigError(f"export.zero_rounding={zero_rounding!r} is not valid; choose one of: report, refuse")


def adapters(model: nn.Module) -> dict[str, dict]:
    """Before merge: the state of every adapted layer that is not on the grid (base + adapter)."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, MethodLayer) and not type(m).ON_GRID:
            attrs = {k: v for k, v in vars(m).items()
                     if not k.startswith("_") and k != "training" and isinstance(v, (int, float, str, bool))}
            if isinstance(getattr(m, "spec", None), QuantSpec):
                attrs["spec"] = asdict(m.spec)
            out[name] = {"class": f"{type(m).__module__}.{type(m).__qualname__}", "attrs": attrs,
                         "tensors": {k: v.detach().cpu().clone() for k, v in m.state_dict().items()}}
    return out


def write(model: nn.Module, tok, rec: dict, cfg, adapter_state: dict | None = None) -> dict:
    """In-cell export (``qexp.run``): ``cfg.export`` picks the formats; ``rec`` is the cell's record."""
    if rec.get("status") not in ("ok", "running"):
        raise ExportError(f"cell {rec.get('dir')} has status={rec.get('status')!r} "
                          f"({rec.get('error')}): there is no merged model to export; rerun the cell first")
    if not rec.get("merge"):
        raise ExportError(f"cell {rec.get('dir')} has no merge record: export runs after merge")
    if not dist.is_main():  # under accelerate launch, one writer
        return {}
    e = cfg.export
    source = {"cell_id": rec["cell_id"], "cell_dir": rec["dir"], "method": cfg.method.name,
              "model": cfg.model.name, "bits": cfg.bits, "group_size": cfg.group_size, "merge": rec["merge"]}
    out = Path(e.dir) if e.dir else Path(rec["dir"]) / "export"
    pre = _tokenizer_pre(cfg.model) if "gguf" in e.formats else "default"
    return export_model(model, tok, out, list(e.formats), list(cfg.model.targets), e.dtype, e.zero_rounding,
                        source, adapter_state, e.verify, pre)


def _tokenizer_pre(model_cfg) -> str:
    """llama.cpp's pre-tokenizer name: the one in the model's own GGUF (embedded models), else
    ``default`` (llama.cpp's GPT-2 split; the report says which)."""
    if model_cfg.source != "embedded":
        return "default"
    import gguf

    from ..models import gguf_path

    field = gguf.GGUFReader(str(gguf_path(model_cfg))).get_field("tokenizer.ggml.pre")
    return field.contents() if field is not None else "default"


def export_model(model: nn.Module, tok, out: str | Path, formats: list[str], targets: list[str],
                 dtype: str = "float16", zero_rounding: str = "report", source: dict | None = None,
                 adapter_state: dict | None = None, verify: bool = True, tokenizer_pre: str = "default") -> dict:
    """Write ``formats`` (plus the dense fp16 checkpoint, always) of a merged ``model`` whose
    adapted linears are named by the leaf names ``targets``; return the report."""
    out = Path(out)
    mods = {n: m for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in targets and n != "lm_head"}
    if not mods:
        raise ExportError(f"targets={targets} match no module of this model")
    check(formats, 4, dtype, zero_rounding)  # names and switches (bit widths below, once known)
    wanted = [f for f in FORMATS if f in formats or f == "fp16" or ("all" in formats and f in ALL)]
    integer = all(isinstance(m, QuantLinear) for m in mods.values())
    if integer:
        spec = next(iter(mods.values())).spec
        check([f for f in wanted if f in (*PACKED, "gguf")], spec.bits, group_size=spec.group_size)
        if "gguf" in wanted:  # before any file is written: every layer's grid fits a block type
            gguf_file.check_model(model)
            for n, m in mods.items():
                gguf_file.block_type(m.qweight, n)
    report: dict = {"dir": str(out), "dtype": dtype, "source": source or {}, "formats": {}, "skipped": {},
                    "notes": _notes(mods, integer, source or {}, bool(adapter_state))}
    fp16_bytes = _fp16_bytes(model, mods)
    merged = _logits(model, next(model.parameters()).device) if verify else None  # the reference, once
    for fmt in wanted:
        path = out / fmt
        if fmt in (*PACKED, "gguf") and not integer:
            report["skipped"][fmt] = ("the adapted layers are not integer codes (not on the grid): "
                                      "fp16/ holds the merged dense model, adapter/ the base + adapter")
            continue
        _clear(path)
        if fmt == "gguf":
            r = _write_gguf(model, tok, mods, path, merged, tokenizer_pre)
        else:
            write_fmt = _write_packed if fmt in PACKED else _write_dense
            r = write_fmt(fmt, model, tok, mods, path, DTYPES[dtype], zero_rounding, merged)
        r["size"] = _sizes(path, r.pop("linear_bytes"), r.pop("linear_weights"), fp16_bytes,
                           gguf_file.FILE if fmt == "gguf" else WEIGHTS)
        meta = {"format": fmt, "dtype": dtype, "source": source or {}, **r}
        (path / META).write_text(json.dumps(meta, indent=2, default=str) + "\n")
        report["formats"][fmt] = r
    if adapter_state:
        report["adapter"] = _write_adapter(out / "adapter", adapter_state)
        _clear(out / "peft")
        report["peft"] = peft_adapter.write(out / "peft", model, tok, adapter_state, DTYPES[dtype])
        if (out / "peft").exists():
            (out / "peft" / META).write_text(json.dumps({"format": "peft", **report["peft"]}) + "\n")
    report["fp16_model_bytes"] = fp16_bytes
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    return report


def _clear(path: Path) -> None:
    """Remove a previous export of this format (never a directory qexp did not write)."""
    if path.exists():
        if not (path / META).exists():
            raise ExportError(f"{path} exists and is not a qexp export (no {META}); refusing to overwrite it")
        shutil.rmtree(path)


def _notes(mods: dict, integer: bool, source: dict, adapter: bool) -> list[str]:
    merge = source.get("merge", {})
    where = "; adapter/ holds base + adapter as trained" if adapter else ""
    if not integer:
        return ["not on the grid: the merged model is float (or base + adapter); no packed integer format is "
                f"written, only the dense checkpoint{where}"]
    notes = []
    if merge and not merge.get("on_grid", True):
        notes.append(f"the integer model is a re-quantization of base + adapter (deployed="
                     f"{merge.get('deployed')!r}, max |Δlogit| vs the trained model "
                     f"{merge.get('max_abs_logit_diff')}){where}")
    if any(not torch.equal(m.zero, torch.round(m.zero)) for m in mods.values()):
        notes.append("fractional zero points: GPTQ qzeros / compressed-tensors zero_point are integers, so "
                     "they are rounded (see rounding.zero_points); the exact float zeros are in qexp_exact/")
    return notes


def _write_packed(fmt: str, model: nn.Module, tok, mods: dict[str, QuantLinear], path: Path, dt: torch.dtype,
                  zero_rounding: str, merged: Tensor | None) -> dict:
    specs = {m.spec for m in mods.values()}
    if len(specs) != 1:
        raise ExportError(f"{fmt}: the quantized layers use different grids {sorted(map(str, specs))}")
    spec = specs.pop()
    sym = spec.symmetric and all(not m.zero.any() for m in mods.values())
    tensors, exact, stored = float_state(model, set(mods), dt), {}, {}
    err = {"zero_points": WeightError(), "scales": WeightError(), "total": WeightError()}
    fractional = clamped = 0
    linear_bytes = 0
    for name, m in mods.items():
        u, z_u = unsigned(m.codes, m.zero, spec)
        z_int, c = integer_zeros(z_u, spec.bits)
        clamped += c
        s_st = m.scale.to(dt)
        if not torch.equal(z_int.double(), z_u.double()):
            fractional += 1
            exact[f"{name}.zero"] = m.zero.contiguous()
        if not torch.equal(s_st.to(m.scale.dtype), m.scale):
            exact[f"{name}.scale"] = m.scale.contiguous()
        errors, ref_sq = storage_errors(u, z_u, z_int, m.scale, s_st, spec.group_size)
        for k, (mx, sq) in errors.items():
            err[k].add(mx, sq, ref_sq)
        if merged is not None:
            stored[name] = signed_back(u, s_st.float(), z_int.float(), spec)
        layer = PACKED[fmt].layer(name, u, m.scale, z_int, m.bias, spec.bits, spec.group_size, sym, dt)
        linear_bytes += sum(t.numel() * t.element_size() for t in layer.values())
        tensors.update(layer)
    rounding = {k: v.summary() for k, v in err.items()}
    rounding["zero_points"].update(fractional_layers=fractional, clamped_groups=clamped)
    rounding["scales"]["dtype"] = str(dt).removeprefix("torch.")
    if fractional and zero_rounding == "refuse":
        z = rounding["zero_points"]
        raise ExportError(f"{fmt}: {fractional} layers have fractional zero points and {fmt} stores integer zeros; "
                          f"rounding would change the weights by max |ΔW| = {z['max_abs_dW']:.3g} (relative "
                          f"Frobenius {z['rel_fro_dW']:.3g}). Set export.zero_rounding=report to round and keep "
                          "the exact floats in qexp_exact/, or export fp16")
    qc = PACKED[fmt].quant_config(spec.bits, spec.group_size, sym, sorted({n.rsplit(".", 1)[-1] for n in mods}))
    save(path, model, tok, tensors, dt, qc)
    if fmt == "gptq":
        (path / "quantize_config.json").write_text(json.dumps(qc, indent=2) + "\n")
    if exact:
        (path / EXACT).parent.mkdir(exist_ok=True)
        save_file({k: t.cpu().contiguous() for k, t in exact.items()}, str(path / EXACT), metadata={"format": "pt"})
    r = {"spec": asdict(spec), "sym": sym, "rounding": rounding, "linear_bytes": linear_bytes,
         "linear_weights": sum(m.in_features * m.out_features for m in mods.values()),
         "exact_tensors": len(exact)}
    # the spec must be on disk before the reload below
    (path / META).write_text(json.dumps({"format": fmt, "spec": r["spec"]}) + "\n")
    if merged is not None:
        r["verify"] = _verify_packed(model, merged, mods, path, dt, stored)
    return r


def _write_gguf(model: nn.Module, tok, mods: dict[str, QuantLinear], path: Path, merged: Tensor | None,
                pre: str) -> dict:
    """``gguf/model.gguf``: exact codes, fp16 ``d = s`` and ``m = -s·z`` (the only rounding,
    reported against the merged weights); verified by transformers' own GGUF loader."""
    written = gguf_file.write(path, model, tok, {n: m.qweight for n, m in mods.items()},
                              float_state(model, set(mods), torch.float32), pre)
    err = WeightError()
    for n, m in mods.items():
        exact = m.weight_fp().double()
        d = torch.from_numpy(written["stored"][n]) - exact
        err.add(float(d.abs().max()), float((d * d).sum()), float((exact * exact).sum()))
    block = {"Q4_1": 20, "Q8_0": 34}
    r = {"types": dict(sorted(Counter(written["types"].values()).items())), "tokenizer": tok is not None,
         "tokenizer_pre": pre if tok is not None else None,
         "float_tensors": "F16 (embeddings, lm_head), F32 (norms)",
         "rounding": {"fp16_d_and_m": err.summary()},
         "linear_bytes": sum(m.in_features * m.out_features // gguf_file.BLOCK * block[written["types"][n]]
                             for n, m in mods.items()),
         "linear_weights": sum(m.in_features * m.out_features for m in mods.values())}
    (path / META).write_text(json.dumps({"format": "gguf", "spec": asdict(next(iter(mods.values())).spec)}) + "\n")
    if merged is not None:  # an independent reader: transformers dequantizes with the gguf package
        from transformers import AutoModelForCausalLM

        loaded = AutoModelForCausalLM.from_pretrained(path, gguf_file=gguf_file.FILE, dtype=_dtype(model)).eval()
        r["verify"] = {"loader": "transformers (gguf_file=)", "max_abs_logit_diff_vs_merged":
                       float((_logits(loaded, next(model.parameters()).device) - merged).abs().max())}
    return r


def _write_dense(fmt: str, model: nn.Module, tok, mods: dict[str, nn.Module], path: Path, dt: torch.dtype,
                 zero_rounding: str, merged: Tensor | None) -> dict:
    tensors, dense = float_state(model, set(mods), dt), {}
    for name, m in mods.items():
        w, b = _dense(name, m, _dtype(model))
        dense[name] = (w.to(dt), None if b is None else b.to(dt))
        tensors[f"{name}.weight"] = dense[name][0].contiguous()
        if b is not None:
            tensors[f"{name}.bias"] = dense[name][1]
    save(path, model, tok, tensors, dt)
    nbytes = sum(w.numel() * w.element_size() + (0 if b is None else b.numel() * b.element_size())
                 for w, b in dense.values())
    r = {"linear_bytes": nbytes, "linear_weights": sum(w.numel() for w, _ in dense.values())}
    if merged is not None:
        ref = _stored_copy(model, dt, {n: fp_linear(w.to(_dtype(model)), None if b is None else
                                                          b.to(_dtype(model))) for n, (w, b) in dense.items()})
        r["verify"] = _compare(model, merged, ref, load(path, dtype=_dtype(model)))
    return r


@torch.no_grad()
def _dense(name: str, m: nn.Module, dtype: torch.dtype) -> tuple[Tensor, Tensor | None]:
    """The dense weight and bias of a target after merge (any affine module, probed with ``I`` in
    the model's ``dtype``: what the module computes on the model's activations)."""
    if isinstance(m, QuantLinear):
        return m.weight_fp(), m.bias
    if isinstance(m, nn.Linear):
        return m.weight.detach(), None if m.bias is None else m.bias.detach()
    d_in = getattr(m, "in_features", None)
    if d_in is None:
        raise ExportError(f"{name}: {type(m).__name__} has no in_features; cannot compute its dense weight")
    dev = next(iter([*m.parameters(), *m.buffers()])).device
    zero = m(torch.zeros(1, d_in, dtype=dtype, device=dev))[0]
    w = (m(torch.eye(d_in, dtype=dtype, device=dev)) - zero).T
    return w, zero if getattr(m, "bias", None) is not None else None


def _dtype(model: nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


def _stored_copy(model: nn.Module, dt: torch.dtype, replace: dict[str, nn.Module]) -> nn.Module:
    """The merged model as stored: every float tensor through ``dt`` and targets as ``replace``."""
    ref = copy.deepcopy(model)
    for name, new in replace.items():
        set_module(ref, name, new)
    grid = {f"{n}.{k}" for n, m in replace.items() if isinstance(m, QuantLinear) for k in ("scale", "zero")}
    with torch.no_grad():
        for key, t in ref.state_dict().items():  # what a checkpoint holds (not e.g. rotary inv_freq)
            if t.is_floating_point() and key not in grid:
                t.copy_(t.to(dt))
    return ref


@torch.no_grad()
def _logits(model: nn.Module, dev: torch.device) -> Tensor:
    vocab = model.get_input_embeddings().num_embeddings
    probe = torch.randint(0, vocab, (1, 32), generator=torch.Generator().manual_seed(0)).to(dev)
    return model.to(dev)(input_ids=probe).logits.float()


def _compare(model: nn.Module, merged: Tensor, ref: nn.Module, loaded: nn.Module) -> dict:
    dev = next(model.parameters()).device
    want, got = _logits(ref, dev), _logits(loaded, dev)
    return {"logits_equal": bool(torch.equal(want, got)), "max_abs_logit_diff_vs_merged":
            float((got - merged).abs().max())}


def _verify_packed(model: nn.Module, merged: Tensor, mods: dict, path: Path, dt: torch.dtype, stored: dict) -> dict:
    """Reload twice: with ``qexp_exact/`` (must equal the merged model with its float tensors at
    ``dt``) and the format's tensors alone (must equal the merged model as the format rounds it)."""
    out = {}
    for exact in (True, False):
        loaded = load(path, exact=exact, dtype=_dtype(model))
        got = {n: loaded.get_submodule(n).qweight for n in mods}
        want = {n: m.qweight for n, m in mods.items()} if exact else stored
        bias = {n: None if m.bias is None else m.bias.to(dt).to(m.bias.dtype) for n, m in mods.items()}
        ref = _stored_copy(model, dt, {n: QuantLinear(want[n], bias[n]) for n in mods})
        key = "exact" if exact else "format_only"
        out[key] = {"codes_scales_zeros_equal": all(_same(got[n], want[n]) for n in mods),
                    **_compare(model, merged, ref, loaded)}
    return out


def _same(a: QuantWeight, b: QuantWeight) -> bool:
    return (a.spec == b.spec and torch.equal(a.codes, b.codes) and torch.equal(a.scale.float(), b.scale.float())
            and torch.equal(a.zero.float(), b.zero.float()))


def _fp16_bytes(model: nn.Module, mods: dict) -> int:
    """Bytes of the whole model in fp16 (targets as dense d_out × d_in weights, tied tensors once)."""
    n = sum(t.numel() for t in float_state(model, set(mods), torch.float16).values())
    for m in mods.values():
        w = m.weight if isinstance(m, nn.Linear) and not isinstance(m, QuantLinear) else None
        n += w.numel() if w is not None else m.in_features * m.out_features
        n += 0 if getattr(m, "bias", None) is None else m.bias.numel()
    return 2 * n


def _sizes(path: Path, linear_bytes: int, linear_weights: int, fp16_bytes: int, weights: str = WEIGHTS) -> dict:
    files = {p.relative_to(path).as_posix(): p.stat().st_size for p in path.rglob("*") if p.is_file()}
    w = files[weights]
    return {"weights_bytes": w, "vs_fp16": round(w / fp16_bytes, 4), "dir_bytes": sum(files.values()),
            "exact_sidecar_bytes": files.get(EXACT.as_posix(), 0), "linear_bytes": linear_bytes,
            "linear_bits_per_weight": round(8 * linear_bytes / linear_weights, 4)}


def _write_adapter(path: Path, state: dict[str, dict]) -> dict:
    path.mkdir(parents=True, exist_ok=True)
    tensors = {f"{n}.{k}": t.contiguous() for n, s in state.items() for k, t in s["tensors"].items()}
    save_file(tensors, str(path / "adapter.safetensors"), metadata={"format": "pt"})
    layers = {n: {"class": s["class"], "attrs": s["attrs"], "tensors": sorted(s["tensors"])} for n, s in state.items()}
    (path / "adapter.json").write_text(json.dumps(layers, indent=2) + "\n")
    return {"layers": len(state), "bytes": (path / "adapter.safetensors").stat().st_size,
            "what": "base + adapter state of each adapted layer before merge (qexp's format; LoRA-type "
                    "adapters also go to peft/)"}
