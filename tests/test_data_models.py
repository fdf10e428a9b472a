"""The hub / local-files code paths (tested with local files), data formats, trainer determinism."""

import json

import pytest
import torch

from qexp import data, models
from qexp.config import ConfigError, ModelConfig, SourceConfig
from qexp.run import run_cell

from .conftest import make_cfg


@pytest.fixture(scope="module")
def tok():
    _, t = models.load(ModelConfig(name="tiny_random", source="random", random={"hidden_size": 32,
                       "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}))
    return t


def test_hub_path_loads_a_local_checkpoint(tmp_path, cfg_factory):
    model, tok = models.load(make_cfg().model)
    model.save_pretrained(tmp_path / "ckpt")
    tok.save_pretrained(tmp_path / "ckpt")
    rec = run_cell(cfg_factory("model=llama3_8b", f"model.path={tmp_path / 'ckpt'}", "model.dtype=float32",
                               "method=rtn"))
    assert rec["status"] == "ok" and rec["config"]["model"]["path"] == str(tmp_path / "ckpt")


def test_missing_local_model_dir_is_a_clear_error(cfg_factory):
    with pytest.raises(ConfigError, match="model.path='/nonexistent/llama' does not exist"):
        run_cell(cfg_factory("model=llama3_8b", "model.path=/nonexistent/llama"))


def test_local_alpaca_files_mask_the_prompt(tmp_path, tok):
    f = tmp_path / "train.jsonl"
    rows = [{"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
            {"instruction": "Say hi.", "input": "", "output": "Hi there"}]
    f.write_text("\n".join(json.dumps(r) for r in rows))
    chunks = data.lm_chunks(SourceConfig(kind="files", name="mine", files=[str(f)], format="alpaca"), tok, 96)
    assert chunks.shape == (2, 2, 96)
    ids, labels = chunks[0]
    answer = tok("5" + tok.eos_token, add_special_tokens=False).input_ids
    kept = labels[labels != -100].tolist()
    assert kept == answer  # only the response is trained on
    prompt_len = int((labels != -100).nonzero()[0])
    assert tok.decode(ids[:prompt_len]).endswith("### Response:\n")


def test_local_text_files_and_bad_column(tmp_path, tok):
    f = tmp_path / "a.jsonl"
    f.write_text("\n".join(json.dumps({"body": f"document number {i} " * 20}) for i in range(5)))
    src = SourceConfig(kind="files", name="mine", files=[str(f)], column="body")
    assert len(data.documents(src)) == 5
    with pytest.raises(ConfigError, match="column='text' is not a column of mine; columns: body"):
        data.documents(SourceConfig(kind="files", name="mine", files=[str(f)]))


def test_unknown_embedded_corpus_lists_choices():
    with pytest.raises(ConfigError, match="choose one of: dataset_build_en, wikitext_sample, xsum"):
        data.documents(SourceConfig(kind="embedded", name="austen"))


def test_embedded_train_and_eval_text_do_not_overlap():
    train = set(data.documents(SourceConfig(name="dataset_build_en")))
    for name in ("wikitext_sample", "xsum"):
        assert not train & set(data.documents(SourceConfig(name=name)))


def test_training_is_deterministic_and_accumulates(cfg_factory):
    a = run_cell(cfg_factory("method=lora", "train.steps=2", "train.grad_accum=2", "name=a"))
    b = run_cell(cfg_factory("method=lora", "train.steps=2", "train.grad_accum=2", "name=b"))
    assert a["train"]["losses"] == b["train"]["losses"] and len(a["train"]["losses"]) == 2
    assert a["metrics"] == b["metrics"]


def test_batches_cycle_epochs_and_skip():
    chunks = torch.arange(12).view(6, 2)
    it = data.batches(chunks, 2, seed=0)
    seen = [next(it)["input_ids"] for _ in range(6)]  # two epochs of three batches
    assert sorted(torch.cat(seen[:3]).flatten().tolist()) == list(range(12))
    resumed = data.batches(chunks, 2, seed=0, start=4)
    assert torch.equal(next(resumed)["input_ids"], seen[4])


def test_a_second_process_waits_for_the_embedded_conversion_and_reuses_it(tmp_path, monkeypatch):
    """Parallel test workers or launches on an empty cache: one converts the GGUF, the others wait on
    its lock and then load its files; none converts again nor deletes the cache under another's feet."""
    import threading

    from filelock import FileLock

    def convert(*a, **k):
        raise AssertionError("converted again")

    monkeypatch.setattr(models.AutoModelForCausalLM, "from_pretrained", convert)
    out = tmp_path / models.EMBEDDED.name
    result = {}
    with FileLock(str(out) + ".lock"):  # "another process" converting
        t = threading.Thread(target=lambda: result.setdefault("dir", models._embedded_dir(models.EMBEDDED, tmp_path)))
        t.start()
        t.join(1.0)
        assert t.is_alive()  # waiting on the lock, not converting
        out.mkdir()
        (out / "model.safetensors").write_bytes(b"x")
        (out / "tokenizer.json").write_text("{}")
    t.join(10)
    assert result["dir"] == out and (out / "model.safetensors").read_bytes() == b"x"
