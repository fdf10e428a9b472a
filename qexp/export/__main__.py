"""``python -m qexp.export <cell dir> [--formats gptq compressed gguf fp16]``: export a finished cell.

Cells do not keep model weights, so this re-creates the merged model by rerunning the cell's
recorded config (same seed, deterministic; into a temporary results dir, nothing of the
original cell is touched) with export switched on, writing to ``<cell dir>/export``. It then
checks that the rerun reproduced the recorded final metrics and says so in ``report.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path

from omegaconf import OmegaConf, open_dict

from ..config import Config, ExportConfig, register
from ..results import read
from . import DTYPES, FORMATS, ZERO_ROUNDING, ExportError

log = logging.getLogger("qexp")


def export_cell(cell_dir: str | Path, formats: tuple[str, ...] = ("gptq",), dtype: str = "float16",
                zero_rounding: str = "report", out: str | Path | None = None) -> dict:
    """Rerun the cell recorded in ``cell_dir`` with export on; return the export report."""
    from ..run import run_cell  # late: run imports this package

    cell_dir = Path(cell_dir)
    if not (cell_dir / "result.json").exists():
        raise ExportError(f"{cell_dir} has no result.json: not a qexp cell directory")
    rec = read(cell_dir / "result.json")
    if rec["status"] != "ok":
        raise ExportError(f"cell {cell_dir} has status={rec['status']!r} ({rec.get('error')}): there is no merged "
                          "model to export; rerun the cell first")
    register()
    cfg = OmegaConf.merge(OmegaConf.structured(Config), rec["config"])
    out = Path(out) if out else cell_dir / "export"
    with tempfile.TemporaryDirectory(prefix="qexp-export-") as tmp, open_dict(cfg):
        cfg.results_dir, cfg.force, cfg.tracking.mode = tmp, True, "disabled"
        cfg.export = ExportConfig(list(formats), dtype, zero_rounding, str(out), True)
        rerun = run_cell(cfg)
    if rerun["status"] != "ok":
        raise ExportError(f"rerun of {cell_dir} failed: {rerun.get('error')}")
    final = {k: v for k, v in rec["metrics"].items() if k.endswith("/final")}
    same = all(rerun["metrics"].get(k) == v for k, v in final.items())
    report = rerun["export"]
    report["rerun"] = {"matches_record": same, "record_final": final,
                       "rerun_final": {k: rerun["metrics"].get(k) for k in final},
                       "record_git_sha": rec.get("env", {}).get("git_sha"),
                       "rerun_git_sha": rerun.get("env", {}).get("git_sha")}
    if not same:
        log.warning("the rerun of %s did not reproduce the recorded final metrics %s (got %s)", cell_dir, final,
                    report["rerun"]["rerun_final"])
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    return report


def summary(report: dict) -> str:
    """Sizes and verification, one line per format."""
    lines = [f"export: {report['dir']}  (fp16 model: {report['fp16_model_bytes'] / 2**20:.2f} MiB)"]
    for fmt, r in report["formats"].items():
        s, v = r["size"], r.get("verify", {})
        ok = v.get("logits_equal", v.get("exact", {}).get("logits_equal"))
        check = (f"reload logits equal: {ok}" if ok is not None else
                 f"{v['loader']} max |Δlogit| vs merged: {v['max_abs_logit_diff_vs_merged']:.3g}" if v else "")
        lines.append(f"  {fmt:<10} {s['weights_bytes'] / 2**20:8.2f} MiB  {s['vs_fp16']:.3f}× fp16  "
                     f"linears {s['linear_bits_per_weight']:.2f} bits/weight  {check}")
    lines += [f"  {fmt:<10} skipped: {why}" for fmt, why in report["skipped"].items()]
    lines += [f"  note: {n}" for n in report["notes"]]
    if "rerun" in report:
        lines.append(f"  rerun reproduces the recorded final metrics: {report['rerun']['matches_record']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m qexp.export", description=__doc__.splitlines()[0])
    p.add_argument("cell_dir")
    p.add_argument("--formats", nargs="+", default=["gptq"], choices=[*FORMATS, "all"])
    p.add_argument("--dtype", default="float16", choices=list(DTYPES))
    p.add_argument("--zero-rounding", default="report", choices=list(ZERO_ROUNDING))
    p.add_argument("--out", default=None, help="default: <cell dir>/export")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        report = export_cell(a.cell_dir, a.formats, a.dtype, a.zero_rounding, a.out)
    except (ExportError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(summary(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
