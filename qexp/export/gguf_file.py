"""GGUF, the file llama.cpp runs on CPU, written with the ``gguf`` package.

qexp's grid ``W = (u - z)·s`` per group maps onto llama.cpp's block formats without touching a
code: **Q4_1** (blocks of 32: fp16 ``d``, fp16 ``m``, 4-bit ``q``; ``W = d·q + m``) holds any grid
of at most 4 bits whose groups are a multiple of 32, with ``d = s`` and ``m = -s·z`` (float zero
points included: LoTA's μ, L4Q's β); **Q8_0** (fp16 ``d``, int8 ``q``; ``W = d·q``) holds 8-bit
symmetric grids. The only loss is the fp16 rounding of ``d`` and ``m`` (reported). Embeddings and
``lm_head`` are F16, norm vectors F32 (as llama.cpp's own converter stores them). ``dense=True``
writes every linear as F16 instead: the baseline the integer file is measured against.

Tensor names, ``llama.*`` metadata and the byte-level BPE tokenizer are what llama.cpp's
``llama`` graph reads. Its attention expects q/k rows interleaved per head (GGUF's rotary
layout), so those rows are permuted here; transformers' GGUF loader permutes them back.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import gguf
import numpy as np
import torch
from torch import Tensor, nn

from ..config import ConfigError
from ..quant import QuantWeight
from .common import ExportError, unsigned

FILE = "model.gguf"
ARCHS = ("LlamaForCausalLM", "MistralForCausalLM")  # llama.cpp's "llama" graph, no biases, default rope
BLOCK = 32
Q = gguf.GGMLQuantizationType


def holders(bits: int) -> str:
    """The other formats that can hold a ``bits``-bit grid (for refusals)."""
    return ", ".join([*(["gptq"] if bits in (2, 3, 4, 8) else []), *(["compressed"] if bits in (4, 8) else []),
                      "fp16"])


def check(bits: int, group_size: int) -> None:
    """Fail fast on a grid no GGUF block type holds exactly (names the grid and who can hold it)."""
    if (bits <= 4 or bits == 8) and (group_size == -1 or (group_size > 0 and group_size % BLOCK == 0)):
        return
    raise ConfigError(f"export.formats: gguf cannot hold the grid bits={bits} group_size={group_size}: llama.cpp's "
                      f"Q4_1 takes bits <= 4 and Q8_0 8-bit symmetric grids, both with groups a multiple of "
                      f"{BLOCK} (or per channel); formats that can hold it: {holders(bits)}")


def block_type(qw: QuantWeight, name: str) -> Q:
    """Q4_1 or Q8_0 for one layer's grid, or a refusal naming it."""
    spec, d_in = qw.spec, qw.codes.shape[1]
    grid = f"bits={spec.bits} group_size={spec.group_size} symmetric={spec.symmetric}"
    if spec.group_len(d_in) % BLOCK:
        raise ExportError(f"gguf: {name} ({grid}, d_in={d_in}): groups of {spec.group_len(d_in)} do not fill "
                          f"llama.cpp's blocks of {BLOCK}; formats that can hold it: {holders(spec.bits)}")
    if spec.bits <= 4:
        return Q.Q4_1
    _, z_u = unsigned(qw.codes, qw.zero, spec)
    if spec.bits == 8 and bool((z_u == 2 ** (spec.bits - 1)).all()):
        return Q.Q8_0
    raise ExportError(f"gguf: {name} ({grid}) has zero points Q8_0 cannot hold (it stores d·q only; 8-bit needs a "
                      f"symmetric grid) and Q4_1 holds at most 4 bits; formats that can hold it: {holders(spec.bits)}")


def blocks(qw: QuantWeight, qtype: Q) -> tuple[np.ndarray, np.ndarray]:
    """The raw GGUF bytes ``[d_out, d_in/32 · block bytes]`` of one grid, and the weight they
    dequantize to in float64 (``d·q + m`` with the stored fp16 ``d``, ``m``)."""
    u, z_u = unsigned(qw.codes, qw.zero, qw.spec)
    d_out, d_in = u.shape
    reps = qw.spec.group_len(d_in) // BLOCK  # blocks per group
    s = qw.scale.double().repeat_interleave(reps, dim=1)  # [d_out, n_blocks]
    z = z_u.double().repeat_interleave(reps, dim=1)
    q = u.reshape(d_out, -1, BLOCK)
    d16 = s.to(torch.float16)
    nb = q.shape[1]
    as_bytes = lambda t: t.contiguous().numpy().view(np.uint8).reshape(d_out, nb, -1)
    if qtype == Q.Q4_1:
        m16 = (-s * z).to(torch.float16)
        q8 = q.to(torch.uint8)
        packed = q8[..., :16] | (q8[..., 16:] << 4)  # byte j: element j (low nibble), j + 16 (high)
        raw = [as_bytes(d16), as_bytes(m16), as_bytes(packed)]
        w = d16.double().unsqueeze(-1) * q.double() + m16.double().unsqueeze(-1)
    else:  # Q8_0: signed codes around the zero 2^(b-1)
        c = (q - 2 ** (qw.spec.bits - 1)).to(torch.int8)
        raw = [as_bytes(d16), as_bytes(c)]
        w = d16.double().unsqueeze(-1) * c.double()
    byts = np.concatenate(raw, axis=-1)
    return byts.reshape(d_out, -1), w.reshape(d_out, d_in).numpy()


def rope_rows(n_rows: int, n_head: int) -> Tensor:
    """Row order that turns HF's rotary layout (per head: all first halves, then all second
    halves) into GGUF's interleaved pairs; ``w[perm]`` converts, ``argsort(perm)`` converts back."""
    return torch.arange(n_rows).reshape(n_head, 2, n_rows // n_head // 2).transpose(1, 2).reshape(-1)


def heads(name: str, config) -> int | None:
    leaf = name.rsplit(".", 1)[-1]
    return {"q_proj": config.num_attention_heads, "k_proj": config.num_key_value_heads}.get(leaf)


def check_model(model: nn.Module) -> None:
    arch, cfg = type(model).__name__, model.config
    if arch not in ARCHS:
        raise ExportError(f"gguf: {arch} is not written by qexp; llama.cpp's llama graph covers {', '.join(ARCHS)}")
    rope = getattr(cfg, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default" or getattr(cfg, "attention_bias", False):
        raise ExportError(f"gguf: rope_type={rope.get('rope_type')!r} / attention_bias: qexp writes default rope "
                          "without attention biases only; use export=gptq or fp16")


def write(path: Path, model: nn.Module, tok, weights: dict[str, QuantWeight | Tensor], float_tensors: dict,
          pre: str = "default") -> dict:
    """``path/model.gguf`` from ``weights`` (per target: a grid, written Q4_1 / Q8_0, or a dense
    weight, written F16) and the model's other tensors ``float_tensors`` (HF names); returns the
    block types used and each grid's weight as stored (float64, HF row order)."""
    check_model(model)
    cfg = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    path.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(path / FILE), "llama")
    types, stored = {}, {}
    for key, t in float_tensors.items():
        gname = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if gname is None:
            raise ExportError(f"gguf: no llama.cpp name for tensor {key}")
        arr = t.float().numpy() if t.ndim == 1 else t.to(torch.float16).numpy()
        w.add_tensor(gname, arr)
    for name, qw in weights.items():
        gname = names.get_name(f"{name}.weight", try_suffixes=(".weight",))
        n_head = heads(name, cfg)
        perm = rope_rows(qw.shape[0] if isinstance(qw, Tensor) else qw.codes.shape[0], n_head) if n_head else None
        if isinstance(qw, Tensor):
            w.add_tensor(gname, (qw if perm is None else qw[perm]).to(torch.float16).numpy())
            types[name] = "F16"
            continue
        qtype = block_type(qw, name)
        if perm is not None:
            qw = QuantWeight(qw.codes[perm], qw.scale[perm], qw.zero[perm], qw.spec)
        raw, dense = blocks(qw, qtype)
        w.add_tensor(gname, raw, raw_dtype=qtype)  # element shape from the byte shape
        types[name], stored[name] = qtype.name, dense if perm is None else dense[torch.argsort(perm).numpy()]
    _metadata(w, cfg, set(types.values()))
    if tok is not None:
        _tokenizer(w, tok, cfg.vocab_size, pre)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return {"types": types, "stored": stored}


def _metadata(w: gguf.GGUFWriter, cfg, kinds: set[str]) -> None:
    w.add_name(getattr(cfg, "_name_or_path", "") or "qexp export")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(float((getattr(cfg, "rope_parameters", None) or {}).get("rope_theta", 10000.0)))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_rope_dimension_count(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
    ft = gguf.LlamaFileType
    w.add_file_type(ft.MOSTLY_Q4_1 if "Q4_1" in kinds else ft.MOSTLY_Q8_0 if "Q8_0" in kinds else ft.MOSTLY_F16)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _tokenizer(w: gguf.GGUFWriter, tok, n_vocab: int, pre: str) -> None:
    """Byte-level BPE (GPT-2 style) tokenizer keys: tokens by id, their types, merges, special ids."""
    spec = json.loads(tok.backend_tokenizer.to_str()) if hasattr(tok, "backend_tokenizer") else {}
    if spec.get("model", {}).get("type") != "BPE" or "ByteLevel" not in json.dumps(spec.get("pre_tokenizer")):
        raise ExportError("gguf: qexp writes byte-level BPE tokenizers (GPT-2 style: SmolLM, Llama-3, Qwen); this "
                          "one is not; use export=gptq or fp16, or llama.cpp's convert_hf_to_gguf.py on fp16/")
    vocab = tok.get_vocab()
    if max(vocab.values()) >= n_vocab:
        raise ExportError(f"gguf: the tokenizer has ids up to {max(vocab.values())}, the model {n_vocab} rows")
    added = {t["content"]: t["special"] for t in spec.get("added_tokens", [])}
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    types = [gguf.TokenType.UNUSED] * n_vocab
    for text, i in vocab.items():
        tokens[i] = text
        types[i] = (gguf.TokenType.NORMAL if text not in added else
                    gguf.TokenType.CONTROL if added[text] else gguf.TokenType.USER_DEFINED)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    with tempfile.TemporaryDirectory() as tmp:  # merges, special ids, add_bos, chat template: gguf reads the files
        tok.save_pretrained(tmp)
        gguf.SpecialVocab(tmp, load_merges=True, n_vocab=n_vocab).add_to_gguf(w)


def read_dense(file: Path, model_config) -> dict[str, np.ndarray]:
    """Every tensor of a GGUF file dequantized by the ``gguf`` package (llama.cpp names, q/k rows
    back in HF order): what an engine computes with."""
    r = gguf.GGUFReader(str(file))
    out = {}
    for t in r.tensors:
        a = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float64)
        a = a.reshape([int(x) for x in reversed(t.shape)]) if a.ndim != 1 else a
        leaf = {"attn_q": model_config.num_attention_heads, "attn_k": model_config.num_key_value_heads}
        n_head = leaf.get(t.name.split(".")[-2]) if t.name.startswith("blk.") else None
        out[t.name] = a[torch.argsort(rope_rows(a.shape[0], n_head)).numpy()] if n_head else a
    return out
