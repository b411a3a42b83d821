"""tools.studies: tables, figures and report from study jobs; scales; a real (tiny) study in one and two processes.

The fast tests use a stand-in study whose jobs return numbers computed from their seed, so the runner, the
aggregation, the CSV / Markdown tables, the figures and the report are checked without training. The slow test
runs the tumor-size study for real (seg_unet3d + difftumor's TumorSynthesisd, tiny settings) once in one process
and once with torchrun in two, and requires the same table.
"""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tools import studies
from tools.study_runner import Job

REPO = Path(__file__).resolve().parents[1]

#: A scale smaller than demo for tests: 6 small phantom patients, 2-epoch trainings of tiny networks.
TINY_SEG = {
    "network_def#channels": [4, 8, 16],
    "network_def#strides": [2, 2],
    "network_def#num_res_units": 1,
    "pixdim": [-1, -1, -1],
    "roi_size": [32, 32, 16],
    "num_samples": 1,
    "cache_workers": 1,
    "sw_batch_size": 1,
    "learning_rate": 0.003,
    "train#trainer#max_epochs": 2,
    "val_interval": 2,
}
TINY_SCALE = {
    "base": "demo",
    "seeds": [0, 1],
    "phantom": {"n_cases": 6, "shape": [64, 64, 32], "tumor_fraction": 0.67, "test_fraction": 0.34},
    "crop_shape": [32, 32, 16],
    "tumor_margin_mm": 10.0,
    "seg": TINY_SEG,
    "tumor_seg": TINY_SEG,
    "vae": {"strides": [2, 2], "channels": [4, 8], "latent_size": 8, "max_epochs": 2, "val_interval": 2,
            "batch_size": 2, "num_workers": 0},
    "ldm_epochs": {"autoencoder": 1, "diffusion": 1, "controlnet": 1},
    "ldm_stage": {**studies.SCALE_SETTINGS["demo"]["ldm_stage"],
                  "autoencoder": {**studies.SCALE_SETTINGS["demo"]["ldm_stage"]["autoencoder"],
                                  "ae_patch_size": [16, 16, 16]}},
    "ldm_infer": {"sampler": "rflow", "num_inference_steps": 2},
    "arms": {"ratio": ["VAE"], "tumor_size": ["large"]},
}  # fmt: skip


def tiny_scale_file(folder: Path, **changes) -> Path:
    path = folder / "tiny_scale.json"
    path.write_text(json.dumps({**TINY_SCALE, **changes}))
    return path


class FakeStudy(studies.Study):
    """Two arms whose "metrics" are known functions of the seed; counts its runs."""

    name = "ratio"
    title = "fake study"
    uses = ("seg",)
    metrics = ("pancreas_dice",)
    figure_metrics = ("pancreas_dice",)
    calls: list[str] = []

    def arms(self):
        return [("real only", {"offset": 0.5}), ("VAE 25:75", {"offset": 0.6})]

    def run_job(self, job: Job, folder: Path):
        FakeStudy.calls.append(job.key)
        curve = {"train_loss": [[float(i), 1.0 / (i + 1 + job.seed)] for i in range(30)]}
        (folder / "curve.json").write_text(json.dumps(curve))
        return {"pancreas_dice": job.params["offset"] + 0.01 * job.seed}


@pytest.fixture()
def fake_study(monkeypatch):
    FakeStudy.calls = []
    monkeypatch.setitem(studies.STUDY_CLASSES, "ratio", FakeStudy)
    return FakeStudy


def test_study_writes_results_table_figures_and_is_resumable(fake_study, tmp_path):
    table = studies.run_study("ratio", tmp_path, scale="demo", seeds=[0, 1, 2], progress=False)
    assert len(fake_study.calls) == 6
    by_arm = {row["arm"]: row for row in table}
    assert by_arm["real only"]["pancreas_dice_mean"] == pytest.approx(0.51)
    assert by_arm["real only"]["pancreas_dice_std"] == pytest.approx(0.01)  # sample std of 0.50, 0.51, 0.52
    assert by_arm["VAE 25:75"]["pancreas_dice"] == "0.6100 +- 0.0100"
    out = tmp_path / "ratio"
    with open(out / "results.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["arm"], int(r["seed"])) for r in rows] == [(a, s) for a in ("real only", "VAE 25:75") for s in (0, 1, 2)]
    assert "| VAE 25:75 | 3 | 0.6100 +- 0.0100 |" in (out / "table.md").read_text()
    assert (out / "pancreas_dice.png").stat().st_size > 1000 and (out / "loss_curves.png").stat().st_size > 1000
    settings = json.loads((out / "settings.json").read_text())
    assert settings["seeds"] == [0, 1, 2] and settings["scale"] == "demo" and "seg" in settings["settings"]
    # a second run reuses every finished job
    studies.run_study("ratio", tmp_path, scale="demo", seeds=[0, 1, 2], progress=False)
    assert len(fake_study.calls) == 6


def test_rerun_with_other_settings_into_the_same_folder_is_refused(fake_study, tmp_path):
    studies.run_study("ratio", tmp_path, scale="demo", seeds=[0], progress=False)
    studies.run_study("ratio", tmp_path, scale="demo", seeds=[0, 1], progress=False)  # more seeds: fine
    assert len(fake_study.calls) == 4
    with pytest.raises(ValueError, match="other settings"):
        studies.run_study("ratio", tmp_path, scale="small", seeds=[0, 1], progress=False)  # other networks
    assert len(fake_study.calls) == 4


def test_report_collects_the_study_folders(fake_study, tmp_path):
    studies.run_study("ratio", tmp_path, scale="demo", seeds=[0, 1], progress=False)
    md, page = studies.write_report(tmp_path, title="test report")
    text = md.read_text()
    assert "fake study" in text and "0.6050 +- 0.0071" in text  # mean +- std of 0.60 and 0.61
    assert "](ratio/pancreas_dice.png)" in text and "](ratio/loss_curves.png)" in text
    assert "<table>" in page.read_text() and "ratio/pancreas_dice.png" in page.read_text()


def test_flatten_seg_summary_reads_regions_detection_and_patient_level():
    summary = {
        "regions": [
            {"region": "tumor", "metric": "dice", "mean": 0.25},
            {"region": "pancreas", "metric": "nsd", "mean": float("nan")},
        ],
        "detection": [{"bin": "[5,10)", "lesions": 2, "detected": 1, "sensitivity": 0.5},
                      {"bin": "all", "lesions": 0, "detected": 0, "sensitivity": "nan"}],
        "patient": {"specificity": 1.0, "healthy_cases": 2},
    }  # fmt: skip
    flat = studies.flatten_seg_summary(summary)
    assert flat["tumor_dice"] == 0.25 and math.isnan(flat["pancreas_nsd"])
    assert flat["sens_[5,10)"] == 0.5 and flat["lesions_[5,10)"] == 2 and math.isnan(flat["sens_all"])
    assert flat["specificity"] == 1.0 and "healthy_cases" not in flat


def test_scales_and_custom_scale_file(tmp_path):
    assert studies.scale_settings("paper")["seg"] == {}  # the bundles' own defaults
    demo = studies.scale_settings("demo")
    assert len(demo["seeds"]) >= 2 and demo["seg"]["train#trainer#max_epochs"] > 0
    custom = studies.scale_settings(tiny_scale_file(tmp_path))
    assert custom["seg"] == TINY_SEG and custom["ldm_nets"] == demo["ldm_nets"]  # unset keys from the base
    with pytest.raises(ValueError, match="unknown scale"):
        studies.scale_settings("huge")
    arms = studies.TumorSizeStudy(tmp_path, str(tiny_scale_file(tmp_path))).arms()
    assert [a for a, _ in arms] == ["none", "large"]
    all_arms = [a for a, _ in studies.RatioStudy(tmp_path, "demo").arms()]
    assert all_arms[0] == "real only" and "VAE+DM 25:75" in all_arms and len(all_arms) == 10


def test_phantom_data_takes_the_scales_spacing_and_refuses_a_folder_made_otherwise(tmp_path):
    settings = {"phantom": {"n_cases": 2, "shape": [48, 48, 24], "spacing": [3.0, 3.0, 4.0], "tumor_fraction": 0.5,
                            "test_fraction": 0.5}}  # fmt: skip
    data = studies.phantom_data(tmp_path / "phantom", settings)
    meta = json.loads((data / "dataset.json").read_text())
    assert meta["generator"]["params"]["spacing"] == [3.0, 3.0, 4.0]
    assert studies.phantom_data(tmp_path / "phantom", settings) == data  # reused
    other = {"phantom": {**settings["phantom"], "spacing": None}}
    with pytest.raises(ValueError, match="other settings.*spacing"):
        studies.phantom_data(tmp_path / "phantom", other)


def test_cli_has_help_for_study_report_demo():
    for args in (["study", "ratio"], ["study", "tumor_families"], ["report"], ["demo"]):
        done = subprocess.run([sys.executable, "-m", "tools", *args, "--help"], capture_output=True, text=True,
                              env={**os.environ, "PAGER": "cat"}, cwd=REPO, timeout=60)  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert "--out" in done.stdout + done.stderr  # fire writes the help to stdout or stderr


@pytest.mark.slow
def test_two_processes_give_the_same_table_as_one(tmp_path):
    scale = tiny_scale_file(tmp_path)
    one = tmp_path / "one"
    studies.run_study("tumor_size", one, scale=str(scale), threads=1, progress=False)
    two = tmp_path / "two"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "tools",
               "study", "tumor_size", "--out", str(two), "--scale", str(scale)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    table_one = (one / "tumor_size" / "table.csv").read_text()
    assert table_one == (two / "tumor_size" / "table.csv").read_text()
    rows = list(csv.DictReader(open(one / "tumor_size" / "table.csv", newline="")))
    assert [r["arm"] for r in rows] == ["none", "large"] and all(r["n_seeds"] == "2" for r in rows)
    assert all(math.isfinite(float(r["pancreas_dice_mean"])) for r in rows)  # measured on the real test cases
    # every job trained and evaluated seg_unet3d (process 0 took seed 0 of each arm, process 1 seed 1)
    assert len(list((two / "tumor_size" / "jobs").glob("*/seed*/eval/summary.json"))) == 4


def test_ldm_synthesis_gets_the_controlnet_network_keys_of_the_stage_but_not_its_training_keys():
    """A recipe may give the ControlNet stage its own learning rate; inference must get the network keys only (the
    inference configs define no learning rate and refuse unknown overrides)."""
    from tools.bundle_scripts.config_check import check_overrides

    settings = {"ldm_stage": {"controlnet": {"learning_rate": 5e-4, "conditioning_embedding_channels": [8, 16]}}}
    keys = studies.ldm_controlnet_net(settings)
    assert keys == {"conditioning_embedding_channels": [8, 16]}
    configs = Path(__file__).resolve().parents[1] / "bundles" / "ldm_abdomen" / "configs"
    check_overrides([str(configs / "inference.json"), str(configs / "inference_controlnet.json")], list(keys))
