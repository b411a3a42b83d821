"""The ``--smoke`` flag of the benchmark scripts (benchmarks/smoke.py); the docs test runs the scripts themselves.

benchmarks/cpu_speed.py has its timing logic tested here too, and its smoke run (slow); so has
benchmarks/generator_quality.py its bars (at their limits) and its smoke run for each generator (slow).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

SMOKE_MODULE = Path(__file__).resolve().parents[1] / "benchmarks" / "smoke.py"


def load_smoke():
    spec = importlib.util.spec_from_file_location("benchmarks_smoke", SMOKE_MODULE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def benchmark_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bench")
    parser.add_argument("--out", default="runs/bench")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--shape", default="160,160,80")
    return parser


def test_smoke_replaces_defaults_and_prints_the_banner(capsys):
    smoke = load_smoke()
    settings = {"out": "runs/bench_smoke", "epochs": 1, "shape": "32,32,16"}
    args = smoke.parse_args_with_smoke(benchmark_parser(), settings, ["--smoke"])
    assert (args.smoke, args.out, args.epochs, args.shape) == (True, "runs/bench_smoke", 1, "32,32,16")
    assert capsys.readouterr().out.splitlines()[0] == smoke.SMOKE_BANNER


def test_explicit_flags_win_over_smoke_settings(capsys):
    smoke = load_smoke()
    settings = {"out": "runs/bench_smoke", "epochs": 1}
    args = smoke.parse_args_with_smoke(benchmark_parser(), settings, ["--epochs", "3", "--smoke"])
    assert (args.out, args.epochs) == ("runs/bench_smoke", 3)


def test_without_smoke_the_defaults_stay_and_no_banner(capsys):
    smoke = load_smoke()
    args = smoke.parse_args_with_smoke(benchmark_parser(), {"out": "runs/bench_smoke", "epochs": 1}, [])
    assert (args.smoke, args.out, args.epochs) == (False, "runs/bench", 40)
    assert smoke.SMOKE_BANNER not in capsys.readouterr().out


def test_a_misspelt_smoke_setting_is_refused():
    smoke = load_smoke()
    with pytest.raises(ValueError, match=r"\['epoch'\]"):
        smoke.parse_args_with_smoke(benchmark_parser(), {"epoch": 1}, ["--smoke"])


# ----------------------------------------------------------------------------------------------------------------
# benchmarks/cpu_speed.py (issue 16): interleaved timing, and its smoke run


def load_cpu_speed():
    benchmarks = str(SMOKE_MODULE.parent)
    sys.path.insert(0, benchmarks)  # the script imports its sibling ``smoke``
    try:
        spec = importlib.util.spec_from_file_location("benchmarks_cpu_speed", SMOKE_MODULE.parent / "cpu_speed.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # its dataclasses look their module up
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(benchmarks)
    return module


def test_interleaving_alternates_the_paths_and_stops_repeating_a_slow_one():
    cpu_speed = load_cpu_speed()
    calls = []
    fast = cpu_speed.TimedPath("fast", lambda: calls.append("fast"))
    slow = cpu_speed.TimedPath("slow", lambda: (calls.append("slow"), time.sleep(0.06)))
    cpu_speed.interleave([fast, slow], rounds=3, max_step_seconds=0.05, interrupt=False)
    # warm-ups, then A B A B ...; the slow path's warm-up is over the limit: one timed step only
    assert calls == ["fast", "slow", "fast", "slow", "fast", "fast"]
    assert len(fast.seconds) == 3 and len(slow.seconds) == 1 and slow.stopped
    assert cpu_speed.ratio(slow, fast) > 1


def test_a_step_past_the_limit_is_interrupted_and_bounds_the_ratio():
    cpu_speed = load_cpu_speed()
    fp32 = cpu_speed.TimedPath("fp32", lambda: time.sleep(0.01))
    bf16 = cpu_speed.TimedPath("bf16", lambda: time.sleep(5))
    started = time.perf_counter()
    cpu_speed.interleave([fp32, bf16], rounds=4, max_step_seconds=0.2, interrupt=True)
    assert time.perf_counter() - started < 2
    assert bf16.failed and bf16.median is None and len(fp32.seconds) == 1  # one round gives the bound
    assert cpu_speed.ratio(fp32, bf16) is None
    assert cpu_speed.ratio_bound(fp32, bf16) == pytest.approx(fp32.median / 0.2)
    assert "ratio fp32 / bf16 = < " in cpu_speed.describe_pair("step", fp32, bf16)


@pytest.mark.slow
def test_cpu_speed_smoke_run_prints_every_ratio_and_a_conclusion_per_bundle(tmp_path):
    script = SMOKE_MODULE.parent / "cpu_speed.py"
    done = subprocess.run(
        [sys.executable, str(script), "--smoke", "--out", str(tmp_path)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "cpu_speed.json").read_text())
    assert set(report["conclusions"]) == {"seg_unet3d", "vae_ct", "ldm_abdomen", "difftumor"}
    for pair in ("precision", "flush_denormal", "channels_last_3d"):
        assert report["seg"][pair]["ratio"] > 0
    assert report["seg"]["achieved"]["fp32"]["gflops"] > 0 and report["matmul_peak_gflops"]["fp32"] > 0
    rows = {(row["bundle"], row["step"]): row for row in report["generators"]}
    assert len(rows) == 7 and all(row["ratio"] > 0 for row in rows.values())
    assert f"resolve_precision('auto', 'cpu') = '{report['cpu']['auto_resolves_to']}'" in done.stdout
    assert done.stdout.count("bf16 helps (ratio >= 1.2): ") == 4


# ---------------------------------------------------------------------------------------------------------------
# benchmarks/generator_quality.py (issue 14's quality bars)

BENCHMARKS = SMOKE_MODULE.parent


def load_benchmark(monkeypatch, file: str):
    """A script of benchmarks/ as a module (the scripts import their siblings, e.g. smoke.py)."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(f"benchmarks_{Path(file).stem}", BENCHMARKS / file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_smoke(script: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """``benchmarks/<script> --smoke *args`` in a fresh process: it must succeed and print the smoke banner first."""
    command = [sys.executable, str(BENCHMARKS / script), "--smoke", *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert result.stdout.splitlines()[0] == load_smoke().SMOKE_BANNER
    return result


def load_generator_quality(monkeypatch):
    return load_benchmark(monkeypatch, "generator_quality.py")


def quality_inputs(**changes):
    """Numbers of one seed that meet every bar exactly at its limit (:func:`bars`' arguments); ``changes`` replace
    some."""
    judge = {"metrics": {"pancreas_dice": 0.5}}  # 0.9 x 0.5 = 0.45 exactly in floating point
    real = {"median_hu_body": 20.0, "gradient_hu_per_voxel": 100.0, "difference_between_patients_hu": 80.0}
    evaluation = {"pancreas_dice_to_synthetic_label": 0.45, "median_hu_pancreas_synthetic": 125.0,
                  "median_hu_pancreas_real": 100.0, "hist_wasserstein_hu": 40.0, "frechet_distance": 4.0,
                  "memorization_max_ncc": 0.9}  # fmt: skip
    measures = {"median_hu_body": -5.0, "gradient_hu_per_voxel": 70.0, "diversity_between_samples_hu": 20.0}
    values = {"judge": judge, "real": real, "floor": {"frechet_distance": 1.0}, "ceiling": {"frechet_distance": 11.0},
              "evaluation": evaluation, "measures": measures, "times": {"train_s": 600.0},
              "autoencoder": {"autoencoder_mae_hu": 30.0, "noise_floor_mae_hu": 12.0}}  # fmt: skip
    for key, value in changes.items():  # "group__name": one number of a group; "group": the whole group
        group, _, name = key.partition("__")
        values[group] = {**values[group], name: value} if name else value
    return values


def test_quality_bars_pass_at_their_limits_and_fail_beyond(monkeypatch):
    quality = load_generator_quality(monkeypatch)
    rows = quality.bars(0, **quality_inputs())
    assert len(rows) == 10 and all(row["pass"] for row in rows), [r for r in rows if not r["pass"]]
    # the Fréchet limit is floor + 0.3 x (ceiling - floor) = 1 + 0.3 x 10 = 4
    assert "<= 4 (floor 1" in next(r for r in rows if r["bar"].startswith("Fréchet"))["required"]
    misses = {
        "evaluation__pancreas_dice_to_synthetic_label": ("judge's pancreas Dice to the mask", 0.449),
        "evaluation__median_hu_pancreas_synthetic": ("median HU, pancreas label: synthetic vs real", 74.0),
        "measures__median_hu_body": ("median HU, body: synthetic vs real", 46.0),
        "evaluation__hist_wasserstein_hu": ("Wasserstein HU (body)", 40.5),
        "evaluation__frechet_distance": ("Fréchet distance (judge's features)", 4.1),
        "measures__gradient_hu_per_voxel": ("gradient magnitude inside the body (HU/voxel)", 69.0),
        "measures__diversity_between_samples_hu": (
            "diversity: mean difference of 2 samples of a mask, body (HU)",
            19.9,
        ),
        "evaluation__memorization_max_ncc": ("max NCC to a training image", 0.95),
        "autoencoder__autoencoder_mae_hu": ("autoencoder reconstruction MAE, held out, body (HU)", 30.5),
        "times__train_s": ("training wall time, all stages (s)", 601.0),
    }
    for key, (bar, value) in misses.items():
        failed = [r["bar"] for r in quality.bars(0, **quality_inputs(**{key: value})) if not r["pass"]]
        assert failed == [bar], key
    # a number that could not be measured (a set without body, no judge) fails its bar
    failed = [
        r["bar"] for r in quality.bars(0, **quality_inputs(evaluation__hist_wasserstein_hu=None)) if not r["pass"]
    ]
    assert failed == ["Wasserstein HU (body)"]
    assert len(quality.bars(0, **quality_inputs(autoencoder=None))) == 9  # vae_ct: no autoencoder bar


def test_untrained_settings_zero_every_learning_rate(monkeypatch):
    quality = load_generator_quality(monkeypatch)
    settings = {"vae": {"max_epochs": 40, "learning_rate": 1e-3}, "ldm_train": {"learning_rate": 1e-3},
                "ldm_stage": {"autoencoder": {"learning_rate": 1e-3, "ae_patch_size": [16] * 3}},
                "ldm_epochs": {"autoencoder": 50, "diffusion": 100, "controlnet": 30}}  # fmt: skip
    vae = quality.untrained_settings(settings, "vae_ct", "vae")["vae"]
    assert vae == {"max_epochs": 1, "learning_rate": 0.0}  # no d_learning_rate: configs/train.json has no such key
    assert quality.untrained_settings(settings, "vae_ct", "gan")["vae"]["d_learning_rate"] == 0.0
    ldm = quality.untrained_settings(settings, "ldm_abdomen", "ldm")
    assert ldm["ldm_train"]["learning_rate"] == ldm["ldm_stage"]["autoencoder"]["learning_rate"] == 0.0
    assert set(ldm["ldm_epochs"].values()) == {1} and settings["vae"]["max_epochs"] == 40  # a copy


def test_ldm_variants_name_their_objective_and_sampler_whatever_the_scale(monkeypatch):
    """The demo's recipe is rectified flow; the ``ldm`` variant must still train and sample the noise-predicting
    model (and ``ldm_rflow`` the rectified-flow one), since the sampler benchmark compares the two."""
    from tools.studies import scale_settings

    quality = load_generator_quality(monkeypatch)
    demo = scale_settings("demo")
    assert demo["ldm_train"]["train_scheduler"] == "rflow" and demo["ldm_infer"]["sampler"] == "rflow"
    for scale in (demo, {**demo, "ldm_train": {}, "ldm_infer": {}}):
        ldm, rflow = quality.variant_settings(scale, "ldm"), quality.variant_settings(scale, "ldm_rflow")
        assert (ldm["ldm_train"]["train_scheduler"], ldm["ldm_infer"]["sampler"]) == ("ddpm", "ddim")
        assert (rflow["ldm_train"]["train_scheduler"], rflow["ldm_infer"]["sampler"]) == ("rflow", "rflow")
    assert quality.variant_settings(demo, "ldm_rflow")["ldm_infer"]["num_inference_steps"] == 10  # the scale's


def test_phantom_twin_keeps_the_anatomy_and_changes_only_the_noise(monkeypatch, tmp_path):
    import numpy as np

    from tools.io import load_nifti
    from tools.phantom import make_dataset
    from tools.phantom.appearance import noise_sigma

    quality = load_generator_quality(monkeypatch)
    make_dataset(tmp_path, n_cases=2, seed=3, shape=(40, 40, 20), test_fraction=0.5, progress=False)
    meta = json.loads((tmp_path / "dataset.json").read_text())
    entry = meta["test"][0]
    scan = Path(entry["image"]).name.split(".nii")[0]
    twin, label = quality.render_with_other_noise(tmp_path, scan, 7)
    original, affine = load_nifti(tmp_path / entry["image"])
    assert np.array_equal(twin.label, label) and np.allclose(twin.affine, affine)
    difference = twin.ct.astype(np.float64) - original
    body = original > -500
    sigma = noise_sigma(np.abs(np.diag(affine)[:3]))
    # two independent draws of the phantom's noise: mean 0, standard deviation sqrt(2) sigma inside the body
    assert abs(difference[body].mean()) < 0.2 * sigma
    assert difference[body].std() == pytest.approx(np.sqrt(2) * sigma, rel=0.2)
    again, _ = quality.render_with_other_noise(tmp_path, scan, 7)
    assert np.array_equal(again.ct, twin.ct)  # seeded
    import tools.phantom.case

    assert tools.phantom.case.render is tools.phantom.appearance.render  # the phantom is left as it was


@pytest.mark.slow
@pytest.mark.parametrize("generator", ["vae_ct", "ldm_abdomen"])
def test_generator_quality_smoke_runs_every_step(generator, tmp_path):
    """The documented command with --smoke: data, judge, both seeds in parallel processes, untrained ceiling, every
    bar of every variant, montage, quality.md / .json; exit 0 (bars missed at smoke size are no error)."""
    out = tmp_path / generator
    run_smoke("generator_quality.py", "--generator", generator, "--out", str(out), timeout=900)
    report = json.loads((out / "quality.json").read_text())
    variants = {"vae_ct": ["vae", "vaegan", "gan"], "ldm_abdomen": ["ldm", "ldm_rflow"]}[generator]
    assert list(report["results"]) == variants
    per_seed = 10 if generator == "ldm_abdomen" else 9
    for variant, outcome in report["results"].items():
        assert outcome["error"] is None
        assert [row["seed"] for row in outcome["rows"]] == ["-"] + [0] * per_seed + [1] * per_seed
        assert Path(outcome["montage"]).is_file() and (out / f"montage_{variant}.png").is_file()
        assert outcome["per_seed"]["0"]["times"]["torch_threads"] == 1
    assert "| bar | seed | measured | required | pass |" in (out / "quality.md").read_text()


# ----------------------------------------------------------------------------------------------------------------
# benchmarks/ldm_abdomen_samplers.py (issue 14 point 3): equal quality, and its smoke run


def load_sampler_benchmark(monkeypatch):
    return load_benchmark(monkeypatch, "ldm_abdomen_samplers.py")


def test_samplers_are_of_equal_quality_at_the_limits_and_not_beyond(monkeypatch):
    bench = load_sampler_benchmark(monkeypatch)
    reference = {"sampler": "ddpm", "steps": 1000, "seconds": 100.0, "dice": 0.25, "wasserstein_hu": 30.0}
    cases = [({"dice": 0.2, "wasserstein_hu": 40.0}, True), ({"dice": 0.3, "wasserstein_hu": 20.0}, True),
             ({"dice": 0.19, "wasserstein_hu": 30.0}, False), ({"dice": 0.25, "wasserstein_hu": 40.5}, False),
             ({"dice": float("nan"), "wasserstein_hu": 30.0}, False)]  # fmt: skip
    rows = bench.compare([dict(reference)] + [{**reference, "sampler": "ddim", "steps": 50, "seconds": 5.0, **change}
                                              for change, _ in cases])  # fmt: skip
    assert rows[0]["equal_quality"] and rows[0]["time_ratio"] == 1.0
    assert [row["equal_quality"] for row in rows[1:]] == [expected for _, expected in cases]
    assert [row["verdict"] for row in rows] == ["reference", "equal", "equal", "worse", "worse", "worse"]
    assert rows[1]["time_ratio"] == 0.05
    better = bench.compare([dict(reference), {**reference, "dice": 0.5, "wasserstein_hu": 12.0},
                            {**reference, "dice": 0.5, "wasserstein_hu": 41.0}])  # fmt: skip
    assert [row["verdict"] for row in better] == ["reference", "better", "worse"]
    lines = bench.table_lines(rows)
    assert "time / DDPM-1000" in lines[0] and lines[2].endswith("| reference |") and lines[3].endswith("| equal |")


@pytest.mark.slow
def test_ldm_abdomen_samplers_smoke_runs_every_step(tmp_path):
    """The documented command with --smoke: data and judge of generator_quality, a noise-predicting and a
    rectified-flow training sharing one autoencoder, every sampler's set measured, the table."""
    run_smoke("ldm_abdomen_samplers.py", "--out", str(tmp_path / "s"), "--quality_dir", str(tmp_path / "q"))
    report = json.loads((tmp_path / "s" / "result.json").read_text())
    assert [(row["sampler"], row["steps"]) for row in report["rows"]] == [("ddpm", 4), ("ddim", 3), ("ddim", 2),
                                                                          ("rflow", 3), ("rflow", 2)]  # fmt: skip
    rflow_ckpt = tmp_path / "s" / "rflow" / "seed0" / "models"
    assert json.loads((rflow_ckpt / "latent_stats.json").read_text())["objective"] == "rflow"
    ddpm_ckpt = tmp_path / "s" / "ddpm" / "seed0" / "models"  # trained here: the quality folder had no training
    assert (rflow_ckpt / "model_autoencoder.pt").read_bytes() == (ddpm_ckpt / "model_autoencoder.pt").read_bytes()
    assert "| sampler | model | steps |" in (tmp_path / "s" / "result.md").read_text()


# ----------------------------------------------------------------------------------------------------------------
# benchmarks/seg_unet3d_tumor.py (issue 15): its bars, and its smoke run


def load_tumor_benchmark(monkeypatch):
    return load_benchmark(monkeypatch, "seg_unet3d_tumor.py")


def tumor_figures(**changes):
    figures = {"tumor_dice": 0.5, "tumor_dice_cases": 40, "sensitivity_10mm": 0.8, "sensitivity_10mm_ci": [0.6, 0.9],
               "detected_10mm": 16, "lesions_10mm": 20, "specificity": 0.8, "specificity_ci": [0.6, 0.9],
               "healthy_scans": 20}  # fmt: skip
    return {**figures, **changes}


def test_tumor_bars_pass_at_their_limits_and_fail_beyond(monkeypatch):
    bench = load_tumor_benchmark(monkeypatch)
    rows = bench.bar_rows(tumor_figures(), 20.0)
    assert [row["pass"] for row in rows] == [True] * 4
    assert "16/20" in rows[1]["measured"] and "95 % CI 0.60-0.90" in rows[1]["measured"]
    for change, minutes, failed in [({"tumor_dice": 0.499}, 20.0, 0), ({"sensitivity_10mm": 0.75}, 20.0, 1),
                                    ({"specificity": 0.79}, 20.0, 2), ({}, 20.1, 3),
                                    ({"tumor_dice": float("nan")}, 20.0, 0)]:  # fmt: skip
        passes = [row["pass"] for row in bench.bar_rows(tumor_figures(**change), minutes)]
        assert passes == [index != failed for index in range(4)], (change, minutes)


@pytest.mark.slow
def test_seg_unet3d_tumor_smoke_runs_every_step(tmp_path):
    """The documented command with --smoke: phantom, crops, training with the tumor recipe's configs, evaluation,
    the bars, the per-bin table with intervals and the curve figure."""
    out = tmp_path / "tumor"
    run_smoke("seg_unet3d_tumor.py", "--out", str(out))
    report = json.loads((out / "result.json").read_text())
    assert [row["bar"] for row in report["bars"]][-1] == "training wall time (min)"
    assert report["settings"]["tumor_seg_configs"] == ["train.json", "tumor_crops.json"]
    assert {row["bin"] for row in report["figures"]["bins"]} >= {"[10,15)", "all"}
    assert (out / "curve.png").is_file() and "| radius bin (mm) |" in (out / "result.md").read_text()
    # the post-processing choice on the validation patients reuses the trained model
    run_smoke("seg_unet3d_tumor.py", "--out", str(out), "--choose_postprocessing", "0", "--confidences", "0", "0.5")
    rows = json.loads((out / "postprocessing_validation.json").read_text())["rows"]
    assert [row["min_tumor_confidence"] for row in rows] == [0.0, 0.5]
    assert {"sensitivity_10mm", "specificity", "youden", "tumor_dice"} <= set(rows[0])


def test_tumor_postprocessing_choice_needs_every_bar_on_validation(monkeypatch):
    bench = load_tumor_benchmark(monkeypatch)
    row = {"tumor_dice": 0.5, "sensitivity_10mm": 0.8, "specificity": 0.8}
    assert bench.meets_bars(row)
    for key in row:
        assert not bench.meets_bars({**row, key: 0.49 if key == "tumor_dice" else 0.79})
        assert not bench.meets_bars({**row, key: float("nan")})


# ----------------------------------------------------------------------------------------------------------------
# benchmarks/difftumor_quality.py (issue 15, point 2): its bars, the classifier's AUC, its recipe, its smoke run


def load_difftumor_benchmark(monkeypatch):
    return load_benchmark(monkeypatch, "difftumor_quality.py")


def difftumor_inputs(**changes):
    """:func:`family_bars`' arguments with every bar exactly at its limit; ``changes`` ("group__name") replace one."""
    auc = {"auc_mean": 0.9, "auc_sd": 0.05, "fold_aucs": [0.85, 0.95], "pooled_auc": 0.9, "folds": 2, "n_real": 4,
           "n_synthetic": 4}  # fmt: skip
    detected = {"sensitivity_10mm": 0.7, "detected_10mm": 7, "lesions_10mm": 10, "sensitivity_10mm_ci": [0.4, 0.9]}
    values = {
        "measures": {
            "median_hu": 71.0,
            **detected,
            "outside_max_hu": 0.0,
            "cases": 10,
            "margin_mm": [3.0, 3.0],
            "auc": auc,
        },
        "real": {"median_hu": 56.0, **detected, "sensitivity_10mm": 0.9, "detected_10mm": 9},
        "autoencoder": {"mae_hu": 27.0, "noise_floor_hu": 12.0, "n_cases": 10},
        "training": {
            "total_seconds": 45 * 60.0,
            "seconds": {"autoencoder": 1200.0, "early": 700.0, "medium_large": 800.0},
        },
    }
    for key, value in changes.items():
        group, _, name = key.partition("__")
        values[group] = {**values[group], name: value}
    return values


def test_difftumor_bars_pass_at_their_limits_and_fail_beyond(monkeypatch):
    bench = load_difftumor_benchmark(monkeypatch)
    rows = bench.family_bars("difftumor", **difftumor_inputs())
    assert [row["pass"] for row in rows] == [True, True, True, True, True, None]  # the AUC is reported, no bar
    assert "<= noise floor 12.0 + 15 = 27.0" in rows[0]["required"] and "real test tumors 0.90" in rows[2]["measured"]
    misses = {"autoencoder__mae_hu": 27.1, "measures__median_hu": 71.1, "measures__sensitivity_10mm": 0.69,
              "measures__outside_max_hu": 0.5, "training__total_seconds": 45 * 60.0 + 6}  # fmt: skip
    for index, (key, value) in enumerate(misses.items()):
        passes = [row["pass"] for row in bench.family_bars("difftumor", **difftumor_inputs(**{key: value}))]
        assert passes == [i != index for i in range(5)] + [None], key
    below = bench.family_bars("difftumor", **difftumor_inputs(measures__median_hu=41.0))  # 15 below is within too
    assert below[1]["pass"]
    unmeasured = bench.family_bars("difftumor", **difftumor_inputs(measures__sensitivity_10mm=float("nan")))
    assert [row["pass"] for row in unmeasured][2] is False  # no tumor of 10 mm: the bar fails
    # the modeling-based families: no autoencoder and no training rows
    inputs = difftumor_inputs()
    rows = bench.family_bars("cellular", inputs["measures"], inputs["real"])
    assert len(rows) == 4 and [row["pass"] for row in rows] == [True, True, True, None]


def test_difftumor_auc_of_separable_and_of_identical_classes(monkeypatch):
    import numpy as np

    bench = load_difftumor_benchmark(monkeypatch)
    assert bench.auc([2.0, 3.0], [0.0, 1.0]) == 1.0 and bench.auc([0.0], [1.0]) == 0.0
    assert bench.auc([1.0], [1.0]) == 0.5 and np.isnan(bench.auc([], [1.0]))
    rng = np.random.RandomState(0)
    real = rng.normal(0.0, 1.0, size=(40, 3))
    separable = bench.cross_validated_auc(real, real + 10.0)
    assert separable["folds"] == 5 and separable["auc_mean"] == 1.0 and separable["pooled_auc"] == 1.0
    same = bench.cross_validated_auc(rng.normal(size=(300, 3)), rng.normal(size=(300, 3)))
    assert abs(same["auc_mean"] - 0.5) < 0.1 and len(same["fold_aucs"]) == 5 and same["auc_sd"] > 0
    assert bench.cross_validated_auc(real, real) == bench.cross_validated_auc(real, real)  # seeded folds
    few = bench.cross_validated_auc(real[:1], real[:3])
    assert few["folds"] == 1 and np.isnan(few["auc_mean"])
    folds = bench.stratified_folds(np.array([0] * 7 + [1] * 5), 5, seed=0)
    assert sorted(np.bincount(folds[:7])) == [1, 1, 1, 2, 2] and sorted(np.bincount(folds[7:])) == [1] * 5


def test_difftumor_stage_overrides_take_the_networks_of_the_synthesis(monkeypatch, tmp_path):
    bench = load_difftumor_benchmark(monkeypatch)
    settings = {"tumor_family_args": {"difftumor": {
        "autoencoder": {"channels": [8, 16]}, "diffusion_early": {"channels": [8, 8]},
        "diffusion_late": {"channels": [16, 16]}, "crop_size": 32, "model_spacing": [2.5, 2.5, 2.5]}},
        "difftumor_train": {"all": {"max_epochs": 3, "num_crops": 2}, "early": {"max_epochs": 5}}}  # fmt: skip
    over = {stage: bench.stage_overrides(stage, settings, tmp_path, tmp_path / "d.json", 4, tmp_path / "models", True)
            for stage in bench.STAGES}  # fmt: skip
    assert over["autoencoder"]["autoencoder_def#channels"] == [8, 16] and "diffusion_def#channels" not in over[
        "autoencoder"]  # fmt: skip
    assert over["early"]["diffusion_def#channels"] == [8, 8] and over["medium_large"]["diffusion_def#channels"] == [
        16,
        16,
    ]
    assert over["early"]["num_train_timesteps"] == 4 and over["medium_large"]["num_train_timesteps"] == 200
    assert [over[s]["max_epochs"] for s in bench.STAGES] == [3, 5, 3] and over["early"]["num_crops"] == 2
    assert over["autoencoder"]["roi_size"] == [32] * 3 and over["early"]["spacing"] == [2.5] * 3
    assert over["early"]["autoencoder_path"] == str(tmp_path / "models" / "autoencoder" / "autoencoder.pt")
    # a stage's fingerprint follows the autoencoder's, not the folders
    prints = {"autoencoder": bench.stage_fingerprint("autoencoder", over["autoencoder"], {"phantom": 1,
                                                     "tumor_margin_mm": 15}, {})}  # fmt: skip
    elsewhere = bench.stage_overrides("early", settings, tmp_path / "x", tmp_path / "e.json", 4, tmp_path / "m", True)
    base = {"phantom": 1, "tumor_margin_mm": 15}
    assert bench.stage_fingerprint("early", elsewhere, base, prints) == bench.stage_fingerprint(
        "early", over["early"], base, prints)  # fmt: skip
    other = {"autoencoder": {**prints["autoencoder"], "overrides": {}}}
    assert bench.stage_fingerprint("early", over["early"], base, other) != bench.stage_fingerprint(
        "early", over["early"], base, prints)  # fmt: skip


def test_difftumor_benchmark_refuses_a_missing_or_foreign_tumor_model_and_an_empty_recipe(monkeypatch, tmp_path):
    import argparse

    bench = load_difftumor_benchmark(monkeypatch)
    settings = {"phantom": {"n_cases": 6}, "tumor_margin_mm": 15.0, "tumor_seg": {"a": 1},
                "tumor_seg_configs": ["train.json"], "tumor_eval": {}}  # fmt: skip
    args = argparse.Namespace(tumor_model_dir=str(tmp_path), scale="my_scale.json")
    with pytest.raises(SystemExit, match=r"python benchmarks/seg_unet3d_tumor.py --scale my_scale.json"):
        bench.tumor_model(args, settings, tmp_path, tmp_path / "split.json")
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "model.pt").write_bytes(b"")
    recipe = {k: settings[k] for k in ("phantom", "tumor_margin_mm", "tumor_seg", "tumor_seg_configs")}
    (tmp_path / "done.json").write_text(json.dumps({"recipe": {**recipe, "phantom": {"n_cases": 150}}}))
    with pytest.raises(SystemExit, match=r"another recipe \(phantom differ"):
        bench.tumor_model(args, settings, tmp_path, tmp_path / "split.json")
    (tmp_path / "done.json").write_text(json.dumps({"recipe": recipe}))
    assert bench.tumor_model(args, settings, tmp_path, tmp_path / "split.json") == tmp_path.resolve()
    with pytest.raises(SystemExit, match="no CPU recipe for DiffTumor"):
        bench.check_recipe({"difftumor_train": {}}, "my_scale.json")
    with pytest.raises(SystemExit, match="'all', 'autoencoder', 'early', 'medium_large' only"):
        bench.check_recipe({"difftumor_train": {"max_epochs": 3}}, "my_scale.json")


@pytest.mark.slow
def test_difftumor_quality_smoke_runs_every_step(tmp_path):
    """The documented command with --smoke: phantom, crops, a tiny real-only model, the three DiffTumor stages, the
    autoencoder against the noise floor, insertion of the three families, detection, AUC, tables and montage; a
    rerun reuses the trained stages."""
    out = tmp_path / "difftumor"
    run_smoke("difftumor_quality.py", "--out", str(out))
    report = json.loads((out / "result.json").read_text())
    assert set(report["training"]["seconds"]) == {"autoencoder", "early", "medium_large"}
    assert report["autoencoder"]["n_cases"] > 0 and report["autoencoder"]["noise_floor_hu"] > 0
    for family in ("difftumor", "handcrafted", "cellular"):
        bars = {row["bar"]: row for row in report["families"][family]["bars"]}
        assert bars["largest change outside the dilated tumor (HU)"]["pass"]  # holds at any size
        assert any(bar.startswith("real-vs-synthetic classifier AUC") for bar in bars)
    assert len(report["families"]["difftumor"]["bars"]) == 6 and len(report["families"]["cellular"]["bars"]) == 4
    insertion, healthy = report["insertion"], report["data"]["healthy_test"]
    assert (insertion["draws"], insertion["size_measure"]) == (2, "label")
    assert all(report["families"][f]["measures"]["cases"] == 2 * healthy for f in ("difftumor", "cellular"))
    assert (out / "montage.png").is_file() and (out / "result.md").read_text().count("| bar | measured |") == 3
    again = run_smoke("difftumor_quality.py", "--out", str(out))
    assert again.returncode == 0 and again.stdout.count("trained before with these settings") == 3


# ----------------------------------------------------------------------------------------------------------------
# benchmarks/quality_gate.py (issue 14 point 5): the quality gate graded by a second judge, its smoke run


@pytest.mark.slow
def test_quality_gate_smoke_runs_every_step(tmp_path):
    """The documented command with --smoke: tiny data, first judge and the three generators (generator_quality's
    functions), the second judge (seed 1), each generator's set without and with the gate, both graded, the table."""
    out = tmp_path / "gate"
    run_smoke("quality_gate.py", "--out", str(out))
    report = json.loads((out / "result.json").read_text())
    generators = ["vae_ct:vaegan", "vae_ct:gan", "ldm_abdomen:ldm"]
    assert [r["generator"] for r in report["results"]] == generators and not report["errors"]
    for row in report["results"]:
        ungated, gated = row["ungated"], row["gated"]
        assert ungated["second_judge"]["n"] == gated["second_judge"]["n"] == gated["first_judge"]["n"] > 0
        assert 1.0 <= gated["first_judge"]["mean_tries"] <= 2.0  # the smoke's --gate_tries 2
        for grade in (ungated["second_judge"], gated["second_judge"], ungated["first_judge"]):
            assert 0.0 <= grade["pass_fraction"] <= 1.0 and set(grade["per_case"]) == set(
                ungated["second_judge"]["per_case"])  # fmt: skip
        # a case the gate kept at its first try is the ungated case (same seed): the second judge grades it alike
        folder = out / row["generator"].replace(":", "_")
        gated_list = json.loads((folder / "gated" / "datalist.json").read_text())["training"]
        assert all("quality_gate" in entry for entry in gated_list)
        for entry in gated_list:
            if entry["quality_gate"]["kept_try"] == 1:
                case = entry["case"]
                assert gated["second_judge"]["per_case"][case] == ungated["second_judge"]["per_case"][case], case
                assert (folder / "gated" / entry["image"]).read_bytes() == (folder / "ungated" /
                                                                            entry["image"]).read_bytes()  # fmt: skip
    assert (out / "judge_seed1" / "models" / "model.pt").is_file()
    assert "| generator | set | cases | passes judge 2 (seed 1) |" in (out / "result.md").read_text()
