"""Generative tasks: answer extraction and exact match, prompt formats with answer-only loss, the
offline ASDiv split, bad input, and task fine-tuning + generative evaluation end to end on tiny_random."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pandas as pd
import pytest

from qexp import data, models
from qexp.config import ConfigError, SourceConfig, validate
from qexp.data.formats import FORMATS, texts
from qexp.eval.lmeval import check_generation, task_config, task_manager, task_spec
from qexp.run import run_cell, summary
from qexp.tasks import FILES, data_dir
from qexp.tasks import generation as g
from qexp.tasks.build import asdiv, asdiv_rows, build

from .conftest import make_cfg

FIXTURES = Path(__file__).parent / "fixtures" / "tasks"
GENERATIVE = ["qexp_gsm8k", "qexp_gsm8k_cot", "qexp_sql", "qexp_viggo", "qexp_asdiv"]


@pytest.fixture(scope="module")
def tok():
    cfg = make_cfg()
    return models.load(cfg.model, cfg.cache_dir)[1]  # tiny_random: SmolLM2-Instruct's tokenizer


def test_gsm8k_answers_each_papers_way():
    ref = "3 + 4 = <<3+4=7>>7\n#### 1,007"
    # LoTA-QAF / HALO: the string after "####"
    assert g.gsm8k_match("so the total is 1,007.\n#### 1,007", ref)
    assert not g.gsm8k_match("#### 1007", ref)  # a string comparison: "1007" is not "1,007"
    assert not g.gsm8k_match("The answer is 1,007", ref)  # no "####": the whole output is compared
    # QWHA: the number after "The final answer is:", else the last number; compared as numbers
    assert g.final_number("A: 2 + 3 = 5. The final answer is: 1,007.") == 1007
    assert g.final_number("A: 12 apples, then 7 more makes 19") == 19
    assert g.final_number("The final answer is: -2.5 and 9") == -2.5
    assert g.final_number("no digits") is None
    assert g.number_match("A: 3 + 4 = 7 The final answer is: 1007", ref)
    assert not g.number_match("The final answer is: 7. Also 1007", ref)  # the marked number wins
    assert g.number_match("A: The final answer is: 15", 15.0) and not g.number_match("A: 16", 15.0)


def test_sql_and_viggo_match_as_halo():
    assert g.sql_match("  SELECT name FROM people\n", "SELECT name FROM people")
    assert not g.sql_match("select name from people", "SELECT name FROM people")
    ref = "inform(name[Portal 2], rating[excellent], genres[puzzle])"
    assert g.viggo_match("inform(genres[puzzle], name[Portal 2], rating[excellent])", ref)  # order free
    assert not g.viggo_match("give_opinion(name[Portal 2], rating[excellent], genres[puzzle])", ref)
    assert not g.viggo_match("inform(name[Portal 2], rating[excellent])", ref)
    assert not g.viggo_match("inform(name[Portal 2], rating[good], genres[puzzle])", ref)


def test_task_yamls_score_with_generation_functions():
    """Each generative YAML loads through lm-eval, decodes greedily, and its process_results gives 1 for
    the reference output and 0 for a wrong one."""
    build()
    tm = task_manager(False)
    for name, row, right in [
        ("qexp_gsm8k", json.loads((FIXTURES / "gsm8k.jsonl").read_text().splitlines()[0]), "He has 7.\n#### 7"),
        ("qexp_gsm8k_cot", json.loads((FIXTURES / "gsm8k.jsonl").read_text().splitlines()[0]),
         "A: 3 + 4 = 7 The final answer is: 7"),
        ("qexp_sql", json.loads((FIXTURES / "sql.jsonl").read_text().splitlines()[3]), "SELECT name FROM people"),
        ("qexp_viggo", json.loads((FIXTURES / "viggo.jsonl").read_text().splitlines()[1]), "request(developer[Valve])"),
        ("qexp_asdiv", asdiv_rows("test")[0], f"A: The final answer is: {asdiv_rows('test')[0]['number']}"),
    ]:
        cfg = task_config(name)
        assert cfg["output_type"] == "generate_until" and cfg["generation_kwargs"]["do_sample"] is False, name
        file = FIXTURES / f"{name[5:].removesuffix('_cot')}.jsonl"
        spec = task_spec(name, "~/.cache/qexp", make_cfg(f"+eval.task_data.{name}={file}").eval
                         if name != "qexp_asdiv" else None)
        task = tm.load([spec])["tasks"][name]
        assert task.process_results(row, [right]) == {"exact_match": 1.0}, name
        assert task.process_results(row, ["I do not know"]) == {"exact_match": 0.0}, name
        assert task.doc_to_text(row) == FORMATS[name[5:]].prompt(row), name  # the training prompt


def test_asdiv_split_is_disjoint_and_fixed():
    build()
    train, test = asdiv_rows("train"), asdiv_rows("test")
    def key(r: dict) -> str:
        return " ".join(f"{r['passage']} {r['question']}".lower().split())

    assert len(test) == 500 and len(train) == 1659
    assert not {key(r) for r in train} & {key(r) for r in test}
    for split, rows in (("train", train), ("test", test)):  # the pack's files are this split
        with open(data_dir() / f"asdiv_{split}.jsonl") as f:
            assert [json.loads(line) for line in f] == rows
    assert all(float(r["number"]) == float(r["answer"].split()[0].replace(",", "")) for r in test)
    # a problem that occurs twice goes to one split; non-numeric answers are left out
    rows = [{"passage": f"P{i}.", "question": "How many?", "answer": f"{i} cats"} for i in range(700)]
    rows += [rows[3], {"passage": "When?", "question": "Time?", "answer": "3:30 p.m."}]
    split = asdiv(rows)
    assert len(split["train"]) + len(split["test"]) == 701
    where = [s for s in split for r in split[s] if r["passage"] == "P3."]
    assert len(where) == 2 and where[0] == where[1]


@pytest.mark.parametrize("fmt,file", [("gsm8k", "gsm8k"), ("gsm8k_cot", "gsm8k"), ("sql", "sql"), ("viggo", "viggo")])
def test_formats_learn_only_the_answer(fmt, file, tok):
    src = SourceConfig(kind="files", name=file, files=[str(FIXTURES / f"{file}.jsonl")], format=fmt)
    chunks = data.lm_chunks(src, tok, 320)
    row = json.loads((FIXTURES / f"{file}.jsonl").read_text().splitlines()[0])
    prompt, answer = texts(fmt, row, tok)
    labels = chunks[0, 1]
    n = len(tok(prompt, add_special_tokens=False).input_ids)
    assert (labels[:n] == -100).all() and (labels[n:] != -100).any()
    learned = tok.decode(labels[labels != -100])
    assert learned == answer and FORMATS[fmt].target(row) in learned
    if FORMATS[fmt].chat:  # the chat template's assistant turn, as at evaluation
        assert prompt == tok.apply_chat_template([{"role": "user", "content": FORMATS[fmt].prompt(row)}],
                                                 tokenize=False, add_generation_prompt=True)
    # LoTA-QAF's source / target maxima cut each part on its own
    short = data.lm_chunks(SourceConfig(**{**src.__dict__, "max_source": 5, "max_target": 3}), tok, 320)
    assert (short[0, 1] != -100).sum() == 3 and (short[0, 1, :5] == -100).all()


def test_asdiv_trains_from_the_package(tok):
    chunks = data.lm_chunks(SourceConfig(kind="embedded", name="asdiv_train", format="asdiv"), tok, 128)
    assert chunks.shape == (1659, 2, 128)
    assert tok.decode(chunks[0, 1][chunks[0, 1] != -100]).startswith("A: The final answer is:")


def test_bad_generation_input_is_refused(tmp_path, tok):
    with pytest.raises(ConfigError, match=r"eval\.max_new_tokens=0"):
        validate(make_cfg("eval=asdiv", "eval.max_new_tokens=0"))
    with pytest.raises(ConfigError, match=r"data\.train\.format='gsm9k'.*gsm8k_cot"):
        validate(make_cfg("data=gsm8k", "data.train.format=gsm9k"))
    plain = copy.deepcopy(tok)
    plain.chat_template = None
    with pytest.raises(ConfigError, match=r"qexp_sql.*chat template.*instruct"):
        check_generation(plain, make_cfg("eval=sql").eval)
    with pytest.raises(ConfigError, match=r"data format viggo"):
        check_generation(plain, make_cfg().eval, ["viggo"])
    check_generation(plain, make_cfg("eval=gsm8k_cot").eval, ["gsm8k_cot", "asdiv"])  # QWHA: no template
    with pytest.raises(ConfigError, match=r"eval\.task_data\.qexp_viggo=.*does not exist"):
        task_spec("qexp_viggo", "~/.cache/qexp", make_cfg("eval=viggo", f"eval.task_data.qexp_viggo={tmp_path}/x").eval)
    with pytest.raises(ConfigError, match=r"qexp_asdiv needs asdiv_test\.jsonl.*qexp\.tasks\.build"):
        task_spec("qexp_asdiv", str(tmp_path))
    assert FILES["qexp_asdiv"] == ["asdiv_test.jsonl", "asdiv_train.jsonl"]


def test_hub_task_offline_names_the_local_option(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(ConfigError, match=r"openai/gsm8k.*eval\.task_data\.qexp_gsm8k"):
        task_spec("qexp_gsm8k", "~/.cache/qexp", make_cfg("eval=gsm8k").eval)


@pytest.mark.parametrize("task", ["gsm8k", "sql", "viggo"])
def test_task_finetune_then_exact_match_end_to_end(task, cfg_factory, tok):
    """``data=<task> eval=<task>`` on tiny_random with local files: fine-tune (LoRA) on the prompt
    format, merge, generate greedily and score; the generations are saved and rescored the same."""
    f = FIXTURES / f"{task}.jsonl"
    rec = run_cell(cfg_factory(f"data={task}", f"eval={task}", "method=lora", "data.train.kind=files",
                               f"data.train.files=[{f}]", f"eval.task_data.qexp_{task}={f}", "train.seqlen=320",
                               "eval.max_new_tokens=6", "eval.log_samples=true", "eval.accuracy_stages=[base,final]"))
    assert rec["status"] == "ok"
    for stage in ("base", "final"):
        assert 0.0 <= rec["metrics"][f"exact_match/qexp_{task}/{stage}"] <= 1.0
        assert rec["eval"]["lm_eval"][stage]["tasks"][f"qexp_{task}"]["items"] == 4
    assert f"exact_match qexp_{task}: base" in summary(rec) and "(4 items)" in summary(rec)
    items = rec["eval"]["lm_eval"]["final"]["items"][f"qexp_{task}"]["exact_match"]  # per item, in the record
    assert len(items) == 4 and items.count("1") / 4 == pytest.approx(rec["metrics"][f"exact_match/qexp_{task}/final"])
    samples = [json.loads(line) for line in (Path(rec["dir"]) / "samples_final" / f"qexp_{task}.jsonl").open()]
    score = getattr(g, f"score_{task}")
    for s in samples:
        assert s["arguments"][0][0] == texts(task, s["doc"], tok)[0]  # asked exactly the training prompt
        assert s["arguments"][0][1]["max_gen_toks"] == 6 and s["arguments"][0][1]["do_sample"] is False
        assert score(s["doc"], s["filtered_resps"]) == {"exact_match": s["exact_match"]}


def test_analysis_puts_exact_match_beside_the_papers_task_columns(tmp_path):
    """Records with exact_match/qexp_<task> fill LoTA-QAF Table 1's GSM8K / SQL / ViGGO columns and QWHA
    Table 3's GSM8K column, x100, beside the CSV's values for the same model, bits and method."""
    import pandas as pd

    from qexp import analysis

    fixture = Path(__file__).parent / "fixtures" / "records" / "fixture"
    base = json.loads(next(fixture.glob("smollm2_135m-lota-w3g64-*/result.json")).read_text())
    cells = [("lota_t1_tasks_paper", "llama3.1_8b_instruct", "lota", {"qexp_gsm8k": 0.8, "qexp_sql": 0.7,
                                                                       "qexp_viggo": 0.6}),
             ("qwha_t3_gsm8k_paper", "llama3.1_8b", "qwha", {"qexp_gsm8k_cot": 0.5})]
    for i, (sweep, model, method, em) in enumerate(cells):
        rec = json.loads(json.dumps(base))
        rec |= {"name": sweep, "cell_id": f"c{i}", "metrics": {f"exact_match/{t}/final": v for t, v in em.items()}}
        rec["config"] |= {"name": sweep, "bits": 4}
        rec["config"]["model"]["name"], rec["config"]["method"] = model, {"name": method}
        rec["config"]["quant"]["init"] = "gptq"
        (tmp_path / f"c{i}").mkdir()
        (tmp_path / f"c{i}" / "result.json").write_text(json.dumps(rec))
    df = analysis.load(tmp_path).df
    csv = pd.read_csv(Path(__file__).parents[1] / "qexp" / "analysis" / "paper_tables.csv", dtype=str)

    def paper(p: str, table: str, model: str, method: str, task: str) -> float:
        row = csv[(csv.paper == p) & (csv.table == table) & (csv.model == model) & (csv.bits == "4")
                  & (csv.method == method) & csv.dataset_or_task.str.startswith(task)]
        assert len(row) == 1
        return float(row.value.iloc[0])

    f = analysis.table(df, "lota_t1_tasks").frame()
    row = ("llama3.1_8b_instruct", 4, "Llama-3.1-8B-Instruct")  # ours, and the paper model beside it
    for col, ours in (("GSM8K", 80.0), ("SQL", 70.0), ("ViGGO", 60.0)):
        assert f.at[row, (col, "lota", "ours")] == pytest.approx(ours)
        want = paper("LoTA-QAF", "Table 1", "Llama-3.1-8B-Instruct", "LoTA-QAF", f"{col} (0-shot")
        assert f.at[row, (col, "lota", "paper")] == want
    f = analysis.table(df, "qwha_t3").frame()
    row = ("llama3.1_8b", 4, "LLaMA-3.1-8B")
    assert f.at[row, ("GSM8K", "qwha", "ours")] == pytest.approx(50.0)
    assert f.at[row, ("GSM8K", "qwha", "paper")] == paper("QWHA", "Table 3", "LLaMA-3.1-8B", "QWHA", "GSM8K test")


def test_paired_exact_match_differences(tmp_path, capsys):
    """Per-item scores of two cells on the same items: the difference, its interval, discordant counts."""
    from qexp.analysis.paired import item_scores, main, paired

    right = {"gptq": [1, 0, 0, 0] * 25, "lota": [1, 1, 0, 0] * 25}  # lota adds 25 items, loses none
    for method, scores in right.items():
        d = tmp_path / method / "samples_final"
        d.mkdir(parents=True)
        (d.parent / "result.json").write_text(json.dumps({"config": {"method": {"name": method}, "bits": 4}}))
        (d / "qexp_asdiv.jsonl").write_text("".join(json.dumps({"doc_id": i, "exact_match": float(s)}) + "\n"
                                                    for i, s in enumerate(scores)))
    t = paired(item_scores(tmp_path, "qexp_asdiv"), "gptq-w4-s0").set_index("cell")
    assert t.at["lota-w4-s0", "exact_match"] == 0.5 and t.at["lota-w4-s0", "diff"] == pytest.approx(0.25)
    half = 1.96 * pd.Series([1, 0, 0, 0] * 25).std(ddof=1) / 10
    assert t.at["lota-w4-s0", "ci_low"] == pytest.approx(0.25 - half) and t.at["lota-w4-s0", "verdict"] == "higher"
    assert (t.at["lota-w4-s0", "a_only"], t.at["lota-w4-s0", "b_only"]) == (25, 0)
    main([str(tmp_path)])
    assert "| lota-w4-s0 | 100 | 50.0 | +25.0" in capsys.readouterr().out
