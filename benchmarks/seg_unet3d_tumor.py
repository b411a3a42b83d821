"""Benchmark: issue 15's tumor-learning bars of seg_unet3d, the real-only model trained on the phantom's own tumors.

    python benchmarks/seg_unet3d_tumor.py [--scale benchmarks/tumor_recipes.json] [--seed 0] [--out DIR]
    python benchmarks/seg_unet3d_tumor.py --smoke     # seconds: tiny sizes in runs/seg_unet3d_tumor_smoke

``--scale`` (default ``benchmarks/tumor_recipes.json``: the demo scale with a tumor-bearing phantom and the tumor
recipe) is a scale of ``tools.studies`` or a JSON scale file; the benchmark uses its ``phantom``,
``tumor_margin_mm``, ``tumor_seg``, ``tumor_seg_configs`` and ``tumor_eval`` settings, the same ones the demo's
tumor studies use. Steps:

1. the phantom (seed 0) and its pancreas crops with a patient split training / validation / test, as the tumor
   studies make them (``tools.studies.phantom_data`` and ``prepared_split``); the test set is the phantom's test
   patients, and must hold at least 20 tumors of equivalent radius >= 10 mm and 20 healthy scans (else the run
   stops before training: a smaller test set cannot tell 0.8 from 0.6);
2. seg_unet3d trained on the training crops (3 classes: background, pancreas, tumor) with the scale's configs and
   overrides; the validation patients only pick the best epoch (``tools.studies.train_and_evaluate_seg``);
3. the best checkpoint evaluated by ``configs/evaluate.json`` on the test crops: its post-processing (predicted
   tumor components under ``min_tumor_mm3`` removed) is the config's, fixed before any test scan was scored and the
   same for every arm of the studies;
4. the bars, as ``measured / required / pass``: tumor Dice (mean over the tumor-bearing test scans) >= 0.5, lesion
   sensitivity for equivalent radius >= 10 mm >= 0.8, patient-level specificity on the healthy scans >= 0.8, and
   the training's wall time <= 20 min; beside them false-positive lesions per scan, the per-bin lesion counts with
   their Wilson 95 % intervals, the validation curve, and what limits the Dice: the tumor-bearing scans grouped by
   their largest tumor's radius and its contrast to the scan's pancreas, with their mean Dice and how much of the
   labelled tumor the model predicts;
5. ``result.json`` (every number, the settings and the command), ``result.md`` (the tables) and ``curve.png``.

A rerun with the same ``--out`` reuses the data; a killed training resumes from its last checkpoint, and a finished
one (``done.json`` with the same recipe) is evaluated and measured again without training. Exit code 0 when bars
fail (this is a measurement), 1 when a step failed.

``--choose_postprocessing [MM3 ...] [--confidences C ...]`` trains (or reuses the training), then scores each
minimum tumor confidence (``min_tumor_confidence`` of ``evaluate.json``) with each minimum predicted-tumor size on
the validation patients only, prints its choice and stops before the test set: the recipe's ``tumor_eval`` is
chosen from that table.
"""

from __future__ import annotations

import argparse
import csv
import importlib
import json
import math
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from smoke import parse_args_with_smoke

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "benchmarks" / "tumor_recipes.json"
BAR = {"tumor_dice": 0.5, "sensitivity_10mm": 0.8, "specificity": 0.8, "train_minutes": 20.0}
RECIPE_KEYS = ("phantom", "tumor_margin_mm", "tumor_seg", "tumor_seg_configs", "tumor_eval")
REQUIRED_TEST = {"tumors_10mm": 20, "healthy": 20}
RADIUS_MM = 10.0
#: --choose_postprocessing's default minimum tumor confidences (0: the argmax's components as they are)
CONFIDENCES = (0.0, 0.7, 0.8, 0.85, 0.9)
#: --smoke: tiny data and network on top of the scale (its sampling, loss and post-processing stay)
SMOKE_SCALE = {
    "phantom": {"n_cases": 6, "shape": [48, 48, 24], "tumor_fraction": 0.5, "test_fraction": 0.34},
    "tumor_seg": {"network_def#channels": [4, 8, 16], "network_def#strides": [2, 2], "network_def#num_res_units": 1,
                  "roi_size": [16, 16, 16], "num_samples": 1, "train#trainer#max_epochs": 1, "val_interval": 1},
}  # fmt: skip

STARTED = time.time()


def log(message: str) -> None:
    print(f"[{time.time() - STARTED:5.0f} s] {message}", flush=True)


def benchmark_settings(scale: str, smoke: bool) -> dict[str, Any]:
    from tools.studies import scale_settings

    if not Path(scale).exists() and (REPO / scale).is_file():  # the default recipe file, from any folder
        scale = str(REPO / scale)
    settings = scale_settings(scale)
    if smoke:
        settings["phantom"] = dict(SMOKE_SCALE["phantom"])
        settings["tumor_seg"] = {**settings["tumor_seg"], **SMOKE_SCALE["tumor_seg"]}
    return settings


def test_set_size(split: Path) -> dict[str, Any]:
    """Tumors (equivalent radius from the label, as ``tools.tumor_stats`` measures it) and healthy scans of the test
    section."""
    from tools.tumor_stats import dataset_tumor_stats

    stats = dataset_tumor_stats(split, section="test")
    radii = [t["radius_mm"] for t in stats["tumors"]]
    return {
        "scans": stats["n_cases"],
        "tumor_scans": stats["n_cases_with_tumor"],
        "healthy": stats["n_cases"] - stats["n_cases_with_tumor"],
        "tumors": len(radii),
        "tumors_10mm": sum(r >= RADIUS_MM for r in radii),
    }


def read_lesions(eval_dir: Path) -> list[dict[str, Any]]:
    with open(eval_dir / "lesions.csv", newline="") as handle:
        return [
            {**row, "radius_mm": float(row["radius_mm"]), "hit": row["hit"] == "True"} for row in csv.DictReader(handle)
        ]


def measure(folder: Path) -> dict[str, Any]:
    """The figures of point 1 from seg_unet3d's evaluation tables (``summary.json``, ``lesions.csv``)."""
    from tools.bundles import import_bundle_scripts

    import_bundle_scripts("seg_unet3d")
    seg_metrics = importlib.import_module("seg_unet3d_scripts.seg_metrics")
    summary = json.loads((folder / "eval" / "summary.json").read_text())
    regions = {(row["region"], row["metric"]): row for row in summary["regions"]}
    for key in (("tumor", "dice"), ("tumor", "nsd"), ("pancreas", "dice")):  # absent: no test scan has the region
        regions.setdefault(key, {"mean": math.nan, "n": 0})
    lesions = read_lesions(folder / "eval")
    large = [lesion for lesion in lesions if lesion["radius_mm"] >= RADIUS_MM]
    hits = sum(lesion["hit"] for lesion in large)
    patient = summary["patient"]
    return {
        "tumor_dice": regions[("tumor", "dice")]["mean"],
        "tumor_dice_cases": regions[("tumor", "dice")]["n"],
        "tumor_nsd": regions[("tumor", "nsd")]["mean"],
        "pancreas_dice": regions[("pancreas", "dice")]["mean"],
        "sensitivity_10mm": hits / len(large) if large else math.nan,
        "sensitivity_10mm_ci": list(seg_metrics.wilson_interval(hits, len(large))),
        "lesions_10mm": len(large),
        "detected_10mm": hits,
        "specificity": patient["specificity"],
        "specificity_ci": patient["specificity_ci"],
        "healthy_scans": patient["healthy_cases"],
        "patient_sensitivity": patient["patient_sensitivity"],
        "false_positive_lesions_per_scan": patient["false_positive_lesions_per_scan"],
        "false_positive_lesions_per_healthy_scan": patient["false_positive_lesions_per_healthy_scan"],
        "bins": summary["detection"],
        "min_tumor_mm3": summary["settings"]["min_tumor_mm3"],
        "dice_by_case_kind": dice_by_case_kind(folder / "eval", lesions),
    }


#: tumor-to-pancreas contrast bins (HU) of the Dice breakdown: isodense, faint, visible
CONTRAST_BINS_HU = (10.0, 20.0)


def dice_by_case_kind(eval_dir: Path, lesions: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """What limits the tumor Dice: the tumor-bearing test scans grouped by their largest tumor (radius < or >= 10 mm)
    and by its contrast (median HU of the scan's pancreas label minus that of its tumor label, in the bins of
    ``CONTRAST_BINS_HU``); per group the scans, the mean tumor Dice and the median ratio predicted / labelled tumor
    voxels (under 1: the model segments less tumor than the label holds)."""
    from tools.io import load_nifti

    largest: dict[str, float] = {}
    for lesion in lesions:
        largest[lesion["case"]] = max(largest.get(lesion["case"], 0.0), lesion["radius_mm"])
    scans = []
    with open(eval_dir / "metrics_per_case.csv", newline="") as handle:
        for row in csv.DictReader(handle):
            if row["has_tumor"] != "True":
                continue
            ct = load_nifti(row["image"])[0]
            label = load_nifti(row["label"])[0]
            pancreas, tumor = ct[label == 1], ct[label == 2]
            contrast = float(np.median(pancreas) - np.median(tumor)) if pancreas.size and tumor.size else math.nan
            scans.append(
                {
                    "large": largest.get(row["case"], 0.0) >= RADIUS_MM,
                    "contrast_hu": contrast,
                    "dice": float(row["tumor_dice"]),
                    "volume_ratio": float(row["tumor_pred_voxels"]) / max(float(row["tumor_gt_voxels"]), 1.0),
                }
            )
    low, high = CONTRAST_BINS_HU
    kinds = {"radius >= 10 mm": lambda s: s["large"], "radius < 10 mm": lambda s: not s["large"],
             f"contrast < {low:g} HU": lambda s: s["contrast_hu"] < low,
             f"contrast {low:g}-{high:g} HU": lambda s: low <= s["contrast_hu"] < high,
             f"contrast >= {high:g} HU": lambda s: s["contrast_hu"] >= high,
             f"radius >= 10 mm and contrast >= {high:g} HU": lambda s: s["large"] and s["contrast_hu"] >= high,
             "all": lambda s: True}  # fmt: skip
    out = []
    for kind, chosen in kinds.items():
        group = [scan for scan in scans if chosen(scan)]
        out.append(
            {
                "kind": kind,
                "scans": len(group),
                "mean_dice": float(np.mean([g["dice"] for g in group])) if group else math.nan,
                "median_volume_ratio": float(np.median([g["volume_ratio"] for g in group])) if group else math.nan,
                "median_contrast_hu": float(np.median([g["contrast_hu"] for g in group])) if group else math.nan,
            }
        )
    return out


def postprocessing_on_validation(folder: Path, split: Path, settings: Mapping[str, Any], candidates_mm3: list[float],
                                 confidences: list[float]) -> list[dict[str, Any]]:  # fmt: skip
    """How the post-processing of ``evaluate.json`` would score on the **validation** patients (never the test set):
    for each minimum tumor confidence (``min_tumor_confidence``: tumor components whose mean tumor probability is
    below it are removed, ``scripts/postprocess.py``) the trained model's validation predictions (``evaluate.json``
    with ``eval_section validation`` and no size filter), re-scored for each minimum predicted-tumor size. Youden's
    J = lesion sensitivity (all sizes) + patient specificity - 1; the tumor Dice (mean over the validation scans with
    a tumor; the size filter does not change it, as in ``evaluate.json``) and the sensitivity for radius >= 10 mm
    beside it. Prints the table and its choice: among the settings that meet the three quality bars on the
    validation patients the best J (the best J of all when none does; J alone can buy specificity with Dice).
    Choosing is the recipe author's step, done once, before the test set is scored with it, and the values then go
    into the recipe's ``tumor_eval`` for every arm."""
    from monai.transforms import LoadImage

    from tools.bundles import import_bundle_scripts
    from tools.studies import train_and_evaluate_seg

    import_bundle_scripts("seg_unet3d")
    seg_metrics = importlib.import_module("seg_unet3d_scripts.seg_metrics")
    load = LoadImage(image_only=True)
    rows = []
    for confidence in confidences:
        val = folder / f"validation_eval_confidence{confidence:g}"
        overrides = {**settings["tumor_eval"], "eval_section": "validation", "min_tumor_mm3": 0.0,
                     "min_tumor_confidence": confidence, "ckpt_dir": str(folder / "models")}  # fmt: skip
        train_and_evaluate_seg(val, split, 0, settings["tumor_seg"], configs=list(settings["tumor_seg_configs"]),
                               eval_overrides=overrides, train=False)  # fmt: skip
        cases = []
        for record in json.loads(split.read_text())["validation"]:
            gt = load(record["label"])
            name = Path(record["label"]).name.split(".nii")[0]
            pred = load(str(val / "eval" / "predictions" / f"{name}_seg.nii.gz"))
            spacing = seg_metrics.spacing_from_affine(gt.affine)
            cases.append((seg_metrics.region_mask(pred, [2]), seg_metrics.region_mask(gt, [2]), spacing))
        for size in candidates_mm3:
            lesions, healthy, negatives, false_positives, dices = [], 0, 0, 0, []
            for pred, gt, spacing in cases:
                lesions += seg_metrics.detect_lesions(pred, gt, spacing, size)
                false_positives += seg_metrics.false_positive_lesions(pred, gt, spacing, size)
                if gt.any():
                    dices.append(seg_metrics.dice(pred, gt))  # as evaluate.json's: the size filter is for detection
                else:
                    healthy += 1
                    negatives += not seg_metrics.predicts_tumor(pred, spacing, size)
            sensitivity = sum(lesion["hit"] for lesion in lesions) / max(len(lesions), 1)
            large = [lesion["hit"] for lesion in lesions if lesion["radius_mm"] >= RADIUS_MM]
            specificity = negatives / healthy if healthy else math.nan
            rows.append({"min_tumor_confidence": confidence, "min_tumor_mm3": size, "lesions": len(lesions),
                         "sensitivity": sensitivity, "healthy": healthy, "specificity": specificity,
                         "sensitivity_10mm": sum(large) / len(large) if large else math.nan,
                         "youden": sensitivity + specificity - 1, "tumor_dice": float(np.mean(dices)),
                         "false_positives_per_scan": false_positives / len(cases)})  # fmt: skip
            log("validation, min confidence {min_tumor_confidence:g}, min tumor {min_tumor_mm3:g} mm3: lesion "
                "sensitivity {sensitivity:.2f} of {lesions} ({sensitivity_10mm:.2f} at >= 10 mm), specificity "
                "{specificity:.2f} of {healthy}, Youden {youden:.2f}, tumor Dice {tumor_dice:.3f}, false positives "
                "per scan {false_positives_per_scan:.2f}".format(**rows[-1]))  # fmt: skip
    meeting = [row for row in rows if meets_bars(row)]
    best = max(meeting or rows, key=lambda row: (row["youden"], row["tumor_dice"]))
    log(("the best Youden among the settings that meet the three bars on the validation patients" if meeting else
         "no setting meets the three bars on the validation patients; the best Youden") + ": min_tumor_confidence "
        "{min_tumor_confidence:g}, min_tumor_mm3 {min_tumor_mm3:g} (J {youden:.2f}, tumor Dice {tumor_dice:.3f}, "
        "sensitivity >= 10 mm {sensitivity_10mm:.2f}, specificity {specificity:.2f})".format(**best))  # fmt: skip
    return rows


def meets_bars(row: Mapping[str, Any]) -> bool:
    """Whether a validation row of ``postprocessing_on_validation`` meets the tumor Dice, sensitivity >= 10 mm and
    specificity bars (NaN fails)."""
    return all(row[key] >= BAR[key] for key in ("tumor_dice", "sensitivity_10mm", "specificity"))


def bar_rows(figures: Mapping[str, Any], train_minutes: float) -> list[dict[str, Any]]:
    def ci(key: str) -> str:
        low, high = figures[f"{key}_ci"]
        return f" (95 % CI {low:.2f}-{high:.2f})"

    rows = [
        ("tumor Dice, mean over the tumor-bearing test scans", figures["tumor_dice"],
         f"{figures['tumor_dice']:.3f} over {figures['tumor_dice_cases']} scans", BAR["tumor_dice"], ">="),
        ("lesion sensitivity, equivalent radius >= 10 mm", figures["sensitivity_10mm"],
         f"{figures['sensitivity_10mm']:.3f} ({figures['detected_10mm']}/{figures['lesions_10mm']})"
         + ci("sensitivity_10mm"), BAR["sensitivity_10mm"], ">="),
        ("patient-level specificity, healthy test scans", figures["specificity"],
         f"{figures['specificity']:.3f} of {figures['healthy_scans']}" + ci("specificity"), BAR["specificity"], ">="),
        ("training wall time (min)", train_minutes, f"{train_minutes:.1f}", BAR["train_minutes"], "<="),
    ]  # fmt: skip
    out = []
    for name, value, shown, required, op in rows:
        ok = (value >= required) if op == ">=" else (value <= required)
        out.append(
            {
                "bar": name,
                "measured": shown,
                "required": f"{op} {required:g}",
                "pass": bool(ok and math.isfinite(value)),
            }
        )
    return out


def curve_figure(curve: Mapping[str, list], path: Path) -> Path | None:
    """Training loss and the validation Dice (pancreas, tumor) against the epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tools.figures import save_figure

    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.2))
    loss = curve.get("train_loss", [])
    if loss:
        left.plot([s for s, _ in loss], [v for _, v in loss], lw=0.6)
    left.set(xlabel="iteration", ylabel="training loss (DiceCE)", title="training loss")
    for tag in ("val_pancreas_dice", "val_tumor_dice"):
        values = curve.get(tag, [])
        if values:
            right.plot([s for s, _ in values], [v for _, v in values], marker="o", ms=3, label=tag)
    right.set(xlabel="epoch", ylabel="Dice", ylim=(0, 1), title="validation (picks the checkpoint)")
    right.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def markdown(result: Mapping[str, Any]) -> str:
    lines = [f"# seg_unet3d tumor learning (scale {result['scale']}, seed {result['seed']})", "",
             f"Command: `{result['command']}`", "",
             "Test set: {scans} scans, {tumor_scans} with a tumor ({tumors} tumors, {tumors_10mm} of radius >= 10 mm), "
             "{healthy} healthy.".format(**result["test_set"]), "",
             "| bar | measured | required | pass |", "| --- | --- | --- | --- |"]  # fmt: skip
    for row in result["bars"]:
        lines.append(f"| {row['bar']} | {row['measured']} | {row['required']} | {'yes' if row['pass'] else 'NO'} |")
    f = result["figures"]
    confidence = result["settings"]["tumor_eval"].get("min_tumor_confidence", 0.0)
    lines += ["", f"False-positive tumor lesions per scan: {f['false_positive_lesions_per_scan']:.2f} "
              f"({f['false_positive_lesions_per_healthy_scan']:.2f} per healthy scan); post-processing: predicted "
              f"tumor components with a mean tumor probability under {confidence:g} (min_tumor_confidence) lose the "
              f"tumor class, those under {f['min_tumor_mm3']:g} mm3 are not counted as detections. Pancreas Dice "
              f"{f['pancreas_dice']:.3f}, tumor NSD (2 mm) {f['tumor_nsd']:.3f}.", "",
              "| radius bin (mm) | lesions | detected | sensitivity | Wilson 95 % CI |",
              "| --- | --- | --- | --- | --- |"]  # fmt: skip
    for row in f["bins"]:
        sens = "-" if not row["lesions"] else f"{row['sensitivity']:.2f}"
        ci = "-" if not row["lesions"] else f"{row['ci_low']:.2f}-{row['ci_high']:.2f}"
        lines.append(f"| {row['bin']} | {row['lesions']} | {row['detected']} | {sens} | {ci} |")
    lines += ["", "What limits the Dice: the tumor-bearing test scans by their largest tumor and its contrast "
              "(median HU of the scan's pancreas label minus its tumor label's):", "",
              "| scans | n | mean tumor Dice | median predicted / labelled tumor voxels | median contrast (HU) |",
              "| --- | --- | --- | --- | --- |"]  # fmt: skip
    for row in f.get("dice_by_case_kind", []):
        lines.append(f"| {row['kind']} | {row['scans']} | {row['mean_dice']:.3f} | {row['median_volume_ratio']:.2f} | "
                     f"{row['median_contrast_hu']:.1f} |")  # fmt: skip
    seconds = result["seconds"]
    lines += ["", f"Time: data {seconds['data']:.0f} s, training {seconds['training']:.0f} s, evaluation "
              f"{seconds['evaluation']:.0f} s. Curve: `curve.png`.", ""]  # fmt: skip
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", default="benchmarks/tumor_recipes.json")
    parser.add_argument("--seed", type=int, default=0, help="training seed (the phantom is always seed 0)")
    parser.add_argument("--out", default="runs/seg_unet3d_tumor")
    parser.add_argument("--choose_postprocessing", nargs="*", type=float, metavar="MM3", default=None,
                        help="after training, score these minimum tumor sizes (mm3) on the validation patients "
                             "(default list when given without values) and stop before the test set")  # fmt: skip
    parser.add_argument("--confidences", nargs="+", type=float, default=list(CONFIDENCES),
                        help="with --choose_postprocessing: the minimum tumor confidences (mean tumor probability "
                             "of a component) scored with each size")  # fmt: skip
    args = parse_args_with_smoke(parser, {"out": "runs/seg_unet3d_tumor_smoke"})

    from tools.io import write_json
    from tools.studies import phantom_data, prepared_split, train_and_evaluate_seg

    settings = benchmark_settings(args.scale, args.smoke)
    out = Path(args.out).resolve()
    command = " ".join(["python benchmarks/seg_unet3d_tumor.py", *(shlex.quote(a) for a in sys.argv[1:])])
    threads = os.environ.get("OMP_NUM_THREADS", "all")
    log(f"seg_unet3d tumor learning, scale {args.scale}, seed {args.seed} -> {out}; threads {threads}, load average "
        f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")  # fmt: skip
    started = time.perf_counter()
    data = phantom_data(out / "data" / "phantom", settings)
    split = prepared_split(data, out / "data" / "crops_tumor", "pancreas", margin_mm=settings["tumor_margin_mm"])
    test_set = test_set_size(split)
    log("test set: {scans} scans, {tumor_scans} with a tumor ({tumors} tumors, {tumors_10mm} of radius >= 10 mm), "
        "{healthy} healthy".format(**test_set))  # fmt: skip
    short = {k: v for k, v in REQUIRED_TEST.items() if test_set[k] < v}
    if short and not args.smoke:
        raise SystemExit(f"the test set is too small for the bars: {short} below {REQUIRED_TEST}; give the scale's "
                         f"phantom more patients")  # fmt: skip
    data_s = time.perf_counter() - started

    folder = out / f"seed{args.seed}"
    configs = list(settings["tumor_seg_configs"])
    recipe = {k: settings[k] for k in RECIPE_KEYS if k != "tumor_eval"}  # what the weights depend on
    done = folder / "done.json"
    trained = done.is_file() and json.loads(done.read_text())["recipe"] == json.loads(json.dumps(recipe))
    if not trained and (folder / "models").exists():
        if done.is_file():  # a finished training of another recipe: never measure stale weights
            raise SystemExit(f"{folder} holds a training of another recipe ({done}); remove it or pick another --out")
        log(f"{folder / 'models'} exists: the killed training resumes from its last checkpoint")
    timing: dict[str, float] = {}
    if trained:
        log(f"training done before with this recipe ({done}): evaluating its model.pt again")
    else:
        log(f"training seg_unet3d {configs} with {json.dumps(settings['tumor_seg'])} (log: {folder / 'train'})")
    choosing = args.choose_postprocessing is not None
    train_and_evaluate_seg(folder, split, args.seed, settings["tumor_seg"], configs=configs, timing=timing,
                           eval_overrides=settings["tumor_eval"], train=not trained,
                           evaluate=not choosing)  # fmt: skip
    if not trained:
        write_json(done, {"recipe": recipe, "training_seconds": timing["training"]})
    if choosing:  # the validation patients only; the test set is not scored
        candidates = args.choose_postprocessing or [0.0, 50.0, 100.0, 200.0, 400.0, 800.0]
        rows = postprocessing_on_validation(folder, split, settings, candidates, args.confidences)
        write_json(out / "postprocessing_validation.json", {"command": command, "rows": rows})
        return 0
    if trained:
        timing["training"] = json.loads(done.read_text())["training_seconds"]
    figures = measure(folder)
    curve = json.loads((folder / "curve.json").read_text())
    curve_figure(curve, out / "curve.png")
    result = {
        "command": command,
        "scale": args.scale,
        "seed": args.seed,
        "settings": {k: settings[k] for k in RECIPE_KEYS},
        "test_set": test_set,
        "figures": figures,
        "seconds": {"data": data_s, **timing},
        "threads": threads,
        "validation_curve": {k: v for k, v in curve.items() if k.startswith("val_")},
    }
    result["bars"] = bar_rows(figures, timing["training"] / 60.0)
    write_json(out / "result.json", result)
    text = markdown(result)
    (out / "result.md").write_text(text)
    print(text)
    failed = [row["bar"] for row in result["bars"] if not row["pass"]]
    log(("FAIL: " + "; ".join(failed)) if failed else "every bar passes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
