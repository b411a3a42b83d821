"""``make demo`` (``python -m tools demo``): the whole chain at a still smaller scale than the demo's.

phantom -> vae_ct and ldm_abdomen trained (tiny) -> synthesis -> ratio study -> synthetic-set evaluation ->
tumor-size study -> report, with the same code as ``make demo`` and a scale file that shrinks data, networks,
epochs and arms, in one process (the two-process path of the studies is tested in test_studies.py); then a second
run, which must reuse everything and give the same tables. The test checks what each stage made (files and
measured numbers), not only that the stage ran; the fast tests check that a failing stage stops the demo with its
error and the path of its log, and that ``python -m tools demo`` then exits non-zero.
"""

from __future__ import annotations

import csv
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_studies import TINY_SCALE
from tools.demo import DemoStageError, evaluate_generated, run_demo
from tools.errors import InputError

REPO = Path(__file__).resolve().parents[1]
TINY_SCALE_ONE_SEED = {**TINY_SCALE, "seeds": [0]}


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _sections(report_md: str) -> dict[str, str]:
    """``## heading`` -> the text under it."""
    parts = re.split(r"^## (.+)$", report_md, flags=re.MULTILINE)
    return {title.strip(): body for title, body in zip(parts[1::2], parts[2::2])}


def _table_numbers(text: str) -> list[str]:
    """The numeric cells of the Markdown table rows of a text (e.g. ``0.6829 +- 0.0064``, ``58.5``, ``4``)."""
    cells = [c.strip() for line in text.splitlines() if line.startswith("| ") for c in line.strip("|").split("|")]
    return [c for c in cells if re.fullmatch(r"-?\d+(\.\d+)?(e-?\d+)?( \+- \d+(\.\d+)?)?", c)]


def check_demo_results(out: Path, summary: dict) -> None:
    """Everything a demo run must have made, with measured numbers (no error, no empty section, no missing file)."""
    assert "error" not in summary, summary.get("error")
    saved = json.loads((out / "demo_summary.json").read_text())
    assert "error" not in saved and saved["report"] == str(out / "report.md")
    stages = (
        "phantom",
        "generative",
        "ratio_study",
        "synthetic_evaluation",
        "generator_quality",
        "tumor_size_study",
        "report",
    )
    assert set(summary["stages"]) == set(stages)

    # 1: the phantom and its montage
    assert (out / "phantom_montage.png").stat().st_size > 10_000
    assert summary["n_training"] + summary["n_test"] == TINY_SCALE["phantom"]["n_cases"]

    # 2: one synthetic image + label per real training mask and generator, on disk, marked synthetic
    crops = json.loads((out / "data" / "crops_pancreas" / "split.json").read_text())
    for generator in ("VAE", "DM"):
        datalist_file = Path(summary["generative"][generator])
        records = json.loads(datalist_file.read_text())["training"]
        assert len(records) == len(crops["training"]) and all(r["synthetic"] for r in records)
        for record in records:
            for key in ("image", "label"):
                assert (datalist_file.parent / record[key]).is_file(), record[key]

    # 3 and 5: each study's table with measured numbers, its per-job results and its figures
    for study, arms in (
        ("ratio", ["real only", "VAE 100:0", "VAE 50:50", "VAE 25:75"]),
        ("tumor_size", ["none", "large"]),
    ):
        rows = list(csv.DictReader(open(out / study / "table.csv", newline="")))
        assert [r["arm"] for r in rows] == arms
        assert all(math.isfinite(float(r["pancreas_dice_mean"])) for r in rows), "measured, not placeholders"
        results = list(csv.DictReader(open(out / study / "results.csv", newline="")))
        assert len(results) == len(arms) * len(TINY_SCALE_ONE_SEED["seeds"])
        figures = json.loads((out / study / "figures.json").read_text())
        assert figures and all((out / study / name).is_file() for name in figures)

    # 4: the synthetic-set evaluation of each set, with the real-only model as the judge
    for generator in ("VAE", "DM"):
        folder = out / "generative" / f"evaluation_{generator}"
        for name in ("metrics.json", "metrics.csv", "montage.png", "histogram.png", "memorization.json"):
            assert (folder / name).is_file(), folder / name
        metrics = json.loads((folder / "metrics.json").read_text())
        assert metrics == summary["synthetic_evaluation"][generator]
        for key in ("hist_wasserstein_hu", "hist_jensen_shannon", "frechet_distance", "memorization_max_ncc",
                    "pancreas_dice_to_synthetic_label", "pancreas_found_fraction"):  # fmt: skip
            assert _finite(metrics[key]), (generator, key, metrics[key])
        assert metrics["n_synthetic"] == len(crops["training"])
        assert metrics["feature_network"].startswith("seg_unet3d bottleneck")

    # 4b: issue 14's bars of both generators on the held-out patients' masks, judged by the real-only model
    quality = json.loads((out / "generative" / "quality.json").read_text())
    heldout = len(crops["validation"]) + len(crops["test"])
    for generator, n_bars in (("vae_ct", 10), ("ldm_abdomen", 11)):
        result = quality["results"][generator]
        assert summary["generator_quality"][generator] == result["verdict"]
        assert len(result["rows"]) == n_bars and result["rows"][0]["bar"].startswith("judge (seg_unet3d")
        measured = {row["bar"]: row["measured"] for row in result["rows"]}
        assert all(_finite(v) for v in measured.values()), measured
        assert result["evaluation"]["n_synthetic"] == 2 * heldout, "two samples per held-out mask"
        assert Path(result["montage"]).stat().st_size > 10_000
    assert quality["judge"]["ckpt"] == str(out / "ratio" / "jobs" / "real_only" / "seed0" / "models")

    # 6: every section of the report shows measured numbers, and every figure it shows exists
    report = (out / "report.md").read_text()
    sections = _sections(report)
    assert {"Data", "Synthetic sets", "Generator quality: issue 14's bars"} <= set(sections), list(sections)
    assert len(sections) == 5, list(sections)
    for generator in ("vae_ct", "ldm_abdomen"):
        assert f"quality_montage_{generator}.png" in sections["Generator quality: issue 14's bars"]
    assert re.search(r"\| judge's pancreas Dice to the mask \| \d\.\d+ \| >= 0\.9 x", report)
    assert "phantom_montage.png" in sections["Data"]
    for title, body in sections.items():
        if title != "Data":
            assert _table_numbers(body), f"report section {title!r} has no numbers"
    synthetic_rows = [line for line in sections["Synthetic sets"].splitlines() if line.startswith("| VAE |")]
    assert synthetic_rows and len(_table_numbers(synthetic_rows[0])) >= 5, synthetic_rows
    assert "pancreas_dice_to_synthetic_label" in sections["Synthetic sets"]
    assert re.search(r"\| real only \| 1 \| \d\.\d{4} \+- 0\.0000 \|", report)
    for link in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report):
        assert (out / link).is_file(), link
    assert (out / "report.html").is_file() and "(ratio/pancreas_dice.png)" in report


@pytest.mark.slow
def test_demo_chain_writes_a_report_with_measured_numbers_and_reruns_from_cache(tmp_path):
    scale = tmp_path / "scale.json"
    scale.write_text(json.dumps(TINY_SCALE_ONE_SEED))
    out = tmp_path / "demo"
    summary = run_demo(out, scale=str(scale), nproc=1, shared_dir=tmp_path / "no_shared")
    check_demo_results(out, summary)
    tables = {study: (out / study / "table.csv").read_text() for study in ("ratio", "tumor_size")}
    # a second run reuses the trained models, the synthetic sets, their evaluations and the finished jobs
    again = run_demo(out, scale=str(scale), nproc=1, shared_dir=tmp_path / "no_shared")
    check_demo_results(out, again)
    assert again["stages"]["generative"] < summary["stages"]["generative"]
    assert again["first_run"]["stages"] == summary["stages"]
    for study, text in tables.items():
        assert (out / study / "table.csv").read_text() == text


def test_a_failing_stage_stops_the_demo_with_its_error_and_log(tmp_path, monkeypatch, capsys):
    import tools.studies

    def broken_phantom(*args, **kwargs):
        raise InputError(tmp_path / "phantom" / "dataset.json", "a broken stage")

    monkeypatch.setattr(tools.studies, "phantom_data", broken_phantom)
    scale = tmp_path / "scale.json"
    scale.write_text(json.dumps(TINY_SCALE_ONE_SEED))
    out = tmp_path / "demo"
    with pytest.raises(DemoStageError) as error:
        run_demo(out, scale=str(scale), nproc=1, shared_dir=tmp_path / "no_shared")
    log = out / "logs" / "stage_phantom.log"
    assert error.value.stage == "phantom" and error.value.log == log
    assert isinstance(error.value.__cause__, InputError)
    assert "a broken stage" in str(error.value) and str(log) in str(error.value)
    assert "broken_phantom" in log.read_text() and "a broken stage" in log.read_text(), "the traceback is kept"
    printed = capsys.readouterr().err
    assert "phantom FAILED" in printed and "a broken stage" in printed and str(log) in printed
    saved = json.loads((out / "demo_summary.json").read_text())
    assert saved["error"] == {"stage": "phantom", "error": f"InputError: {error.value.error}", "log": str(log)}
    assert not (out / "report.md").exists(), "no report from a failed demo"


def test_a_failing_synthetic_set_evaluation_is_not_swallowed(tmp_path, monkeypatch):
    """Stage 4 used to turn an evaluation error into an ``error`` entry and a report without that section."""
    import tools.evaluation
    import tools.splits
    from tools.studies import scale_settings

    class NoRecords:
        def records(self, section):
            return []

    def broken_evaluation(*args, **kwargs):
        raise InputError(tmp_path / "crops" / "organsTr" / "case.nii.gz", "all-foreground label")

    monkeypatch.setattr(tools.splits, "load_records", lambda source: NoRecords())
    monkeypatch.setattr(tools.evaluation, "evaluate_synthetic", broken_evaluation)
    gen = {"crops": tmp_path / "crops", "synthetic": {"VAE": tmp_path / "syn" / "datalist.json"}}
    with pytest.raises(InputError, match="all-foreground label"):
        evaluate_generated(tmp_path, scale_settings("demo"), gen)
    assert not (tmp_path / "generative" / "evaluation_VAE" / "metrics.json").exists()


@pytest.mark.slow  # a subprocess that imports torch and MONAI: about 10 s
def test_the_demo_command_exits_non_zero_naming_the_stage_and_its_log(tmp_path):
    out = tmp_path / "demo"
    # a phantom folder of another size than the scale's: stage 1 refuses to mix them
    (out / "data" / "phantom").mkdir(parents=True)
    (out / "data" / "phantom" / "dataset.json").write_text(json.dumps({"training": [], "test": []}))
    scale = tmp_path / "scale.json"
    scale.write_text(json.dumps(TINY_SCALE_ONE_SEED))
    result = subprocess.run(
        [sys.executable, "-m", "tools", "demo", "--out", str(out), "--scale", str(scale), "--nproc", "1"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode != 0
    log = out.resolve() / "logs" / "stage_phantom.log"
    assert log.is_file() and "holds a phantom of 0 patients" in log.read_text()
    assert f"phantom FAILED: ValueError: {out.resolve() / 'data' / 'phantom'} holds a phantom of 0" in result.stderr
    assert f"log: {log}" in result.stderr.splitlines()[-1], "the last line printed names the log"
