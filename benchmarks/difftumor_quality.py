"""Benchmark: issue 15's DiffTumor bars (point 2): DiffTumor trained on the phantom, its tumors against the real ones,
and the hand-crafted and cellular-automaton tumors measured by the same checks.

    python benchmarks/difftumor_quality.py [--scale benchmarks/tumor_recipes.json] [--out runs/difftumor_quality]
                                           [--tumor_model_dir runs/seg_unet3d_tumor/seed0]
    python benchmarks/difftumor_quality.py --smoke     # about a minute: tiny sizes in runs/difftumor_quality_smoke

``--scale`` is a scale of ``tools.studies`` or a JSON scale file, the same as point 1's benchmark
(``benchmarks/seg_unet3d_tumor.py``), so that point 1's trained model can be reused: the data are exactly point 1's.
The DiffTumor recipe is the scale's ``tumor_family_args["difftumor"]`` (networks, ``crop_size``, ``model_spacing``,
``latent_factor``, ``late_inference_steps``...: the arguments of the bundle's ``DiffTumorSynthesis``, which also size
the training) and its ``difftumor_train`` (the bundle's training keys: ``all`` for the three stages, ``autoencoder`` /
``early`` / ``medium_large`` for one; e.g. epochs, learning rates, crops per step). A scale without
``difftumor_train`` would train the reference's GPU recipe (80 x 1000 steps of 16 crops of 96^3): the benchmark
refuses to start. Steps:

1. data: the phantom (seed 0) and its pancreas crops with the patient split training / validation / test, as point 1
   makes them (``tools.studies.phantom_data`` and ``prepared_split``);
2. point 1's real-only tumor model: ``--tumor_model_dir`` (default ``runs/seg_unet3d_tumor/seed0``) must hold
   ``done.json`` (a finished training of this scale's recipe) and ``models/model.pt``; ``--smoke`` trains a tiny one
   by point 1's code path instead;
3. DiffTumor trained with ``tools.bundles.run_config``: stage 1 (VQ autoencoder, ``configs/train.json``) on the
   training crops, stage 2 (``train_diffusion.json``) early (T = 4) and medium / large (T = 200) on the training crops
   with a tumor; the validation patients validate. Each stage has its own folder under ``difftumor/models/``, a
   fingerprint of its settings and a ``done.json`` with its wall time: a rerun reuses finished stages of the same
   settings, resumes a killed one from its last checkpoint, and trains a stage again when its settings (or the
   autoencoder's) changed;
4. the autoencoder: reconstruction MAE (HU, inside the pancreas) of the held-out crops (validation + test) in the
   model's space (RAS, ``model_spacing``, the bundle's HU window), beside the phantom's noise floor: the same crops
   rendered again with another scanner-noise seed (``tools.phantom.twin``) and compared the same way;
5. insertion: ``INSERT_DRAWS`` tumors per family into every healthy test crop, each into its own copy
   (``TumorSynthesisd``, the same seeds for the three families), size classes from the training tumors' quartiles
   (``tools.studies.tumor_size_classes``), read as the label's equivalent radius (``SIZE_MEASURE``), drawn from
   ``INSERT_PROBS`` (difftumor, handcrafted), the cellular automaton grown ``CELLULAR_STEPS`` steps; the radius of
   each inserted tumor is measured from its label (``tools.tumor_stats``);
6. the checks per family: median HU inside the synthetic tumors against the training crops' real tumors; point 1's
   model (seg_unet3d ``evaluate.json`` with the scale's ``tumor_eval`` post-processing) on the inserted crops, lesion
   sensitivity for equivalent radius >= 10 mm beside its sensitivity on the real test tumors (evaluated again here,
   same post-processing); the largest change outside the tumor dilated by the family's own blend margin; a
   real-vs-synthetic classifier (logistic regression on intensity / texture features of 16^3 tumor-centred patches,
   stratified 5-fold cross-validation, AUC by the Mann-Whitney U statistic; 0.5 = indistinguishable);
7. ``result.json`` (every number, the settings, the command and the times), ``result.md`` (one table per family:
   bar / measured / required / pass) and ``montage.png`` (real | difftumor | handcrafted | cellular, axial slices
   through the tumor, W400 L40).

Exit code 0 when bars fail (this is a measurement), 1 when a step failed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import sys
import time
from copy import deepcopy
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from seg_unet3d_tumor import RADIUS_MM
from seg_unet3d_tumor import RECIPE_KEYS as SEG_RECIPE_KEYS
from seg_unet3d_tumor import benchmark_settings as tumor_benchmark_settings
from seg_unet3d_tumor import read_lesions
from smoke import parse_args_with_smoke

from tools.studies import SIZE_MEASURE

REPO = Path(__file__).resolve().parents[1]
FAMILIES = ("difftumor", "handcrafted", "cellular")
STAGES = ("autoencoder", "early", "medium_large")
#: per stage: the bundle's config files, its own keys, and the weights file it leaves in its ``ckpt_dir``
STAGE_CONFIGS = {"autoencoder": ["train.json"], "early": ["train.json", "train_diffusion.json"],
                 "medium_large": ["train.json", "train_diffusion.json"]}  # fmt: skip
STAGE_KEYS = {"autoencoder": {}, "early": {"tumor_stage": "early", "num_train_timesteps": 4},
              "medium_large": {"tumor_stage": "medium_large", "num_train_timesteps": 200}}  # fmt: skip
WEIGHTS = {"autoencoder": "autoencoder.pt", "early": "diffusion_early.pt", "medium_large": "diffusion_medium_large.pt"}
#: keys of the training overrides that name places, not settings (left out of a stage's fingerprint)
PATH_KEYS = ("dataset_dir", "data_list_file_path", "ckpt_dir", "output_dir", "autoencoder_path")
BAR = {"autoencoder_margin_hu": 15.0, "median_hu": 15.0, "sensitivity_10mm": 0.7, "outside_max_hu": 0.0,
       "train_minutes": 45.0}  # fmt: skip
#: size classes of the inserted tumors (the training tumors' quartile classes): mostly the upper half, so that enough
#: tumors of radius >= 10 mm meet the detection bar, and some small ones so that DiffTumor's early model (T = 4) runs
INSERT_PROBS = {"small": 0.2, "medium": 0.4, "large": 0.4}
#: the classes are quartiles of the training tumors' labels, so their radii are read as the label's equivalent radius
#: (``tools.studies.SIZE_MEASURE``), not as the reference's ellipsoid radii before the clipping to the organ (which
#: left 2 of 31 inserted tumors >= 10 mm in the first run, see the docs)
SIZE_MEASURE_TEXT = {"label": "the label's equivalent radius", "ellipsoid": "the ellipsoid's radii before clipping"}
#: insertions per healthy test crop and family (each its own case, seed ``INSERT_SEED + INSERT_DRAWS * index + draw``),
#: so that the detection bar has about 20 tumors >= 10 mm from the 27 healthy test crops
INSERT_DRAWS = 2
#: the cellular automaton has no size classes: its size comes from its growth steps (1 mm each); the upper part of
#: the reference's 5-80
CELLULAR_STEPS = (30, 80)
INSERT_SEED = 0
NOISE_SEED = 12345  # the scanner noise of the noise-floor twin (as benchmarks/generator_quality.py)
PATCH = 16  # voxels of the classifier's tumor-centred patches
CENTRE = 8  # voxels of the patch's central cube (the rest is its shell)
FOLDS = 5
AUC_MIN_RADIUS_MM = 5.0  # the classifier's tumors: components of at least this equivalent radius (no fragments)
MONTAGE_ROWS = 3
#: --smoke: point 1's tiny data and network (``seg_unet3d_tumor.SMOKE_SCALE``) and tiny DiffTumor networks, 2 steps
#: per stage
SMOKE_DIFFTUMOR = {
    "autoencoder": {"channels": [4, 8, 8], "num_res_channels": [4, 8, 8], "num_embeddings": 32},
    "diffusion_early": {"channels": [8, 8], "attention_levels": [False, True], "num_head_channels": 8,
                        "norm_num_groups": 4},
    "diffusion_late": {"channels": [8, 8], "attention_levels": [False, True], "num_head_channels": 8,
                       "norm_num_groups": 4},
    "crop_size": 16,
    "size_multiple": 16,
    "model_spacing": [4.0, 4.0, 4.0],
    "late_inference_steps": 2,
}  # fmt: skip
SMOKE_TRAIN = {
    "all": {"train_batch_size": 1, "num_crops": 1, "num_workers": 0, "epoch_length": 2, "max_epochs": 1,
            "discriminator_start": 1, "discriminator_2d_def#channels": 4, "discriminator_3d_def#channels": 4,
            "discriminator_2d_def#num_layers_d": 2, "discriminator_3d_def#num_layers_d": 2},
}  # fmt: skip

STARTED = time.time()


def log(message: str) -> None:
    print(f"[{time.time() - STARTED:5.0f} s] {message}", flush=True)


def to_json(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


# ---------------------------------------------------------------------------------------------------------------
# settings


def benchmark_settings(scale: str, smoke: bool) -> dict[str, Any]:
    """Point 1's settings of ``scale`` (its smoke sizes with ``--smoke``) and, for ``--smoke``, tiny DiffTumor networks
    and 2 training steps per stage."""
    settings = tumor_benchmark_settings(scale, smoke)
    settings.setdefault("difftumor_train", {})
    if smoke:
        settings["tumor_family_args"] = {**settings.get("tumor_family_args", {}),
                                         "difftumor": deepcopy(SMOKE_DIFFTUMOR)}  # fmt: skip
        settings["difftumor_train"] = deepcopy(SMOKE_TRAIN)
    return settings


def check_recipe(settings: Mapping[str, Any], scale: str) -> None:
    """``difftumor_train`` holds only stage dicts; an empty one (the bundle's GPU recipe) is refused."""
    train = settings["difftumor_train"]
    unknown = sorted(set(train) - {"all", *STAGES})
    if unknown or not all(isinstance(v, dict) for v in train.values()):
        raise SystemExit(f"{scale}: difftumor_train holds dicts of training keys under 'all', "
                         f"{', '.join(map(repr, STAGES))} only; got {sorted(train)}")  # fmt: skip
    if not train:
        raise SystemExit(f"{scale}: no CPU recipe for DiffTumor: 'difftumor_train' is empty, so the bundle's reference "
                         "recipe (80 x 1000 steps of 16 crops of 96^3 per stage, for a GPU) would train; give "
                         "'difftumor_train' (epochs, crops, learning rates) and 'tumor_family_args.difftumor' "
                         "(networks, crop_size, model_spacing) in the scale file")  # fmt: skip


def stage_overrides(stage: str, settings: Mapping[str, Any], data_dir: Path, datalist: Path, n_val: int,
                    models: Path, validation_has_tumor: bool) -> dict[str, Any]:  # fmt: skip
    """The bundle overrides of one training stage: the networks and geometry of ``tumor_family_args["difftumor"]``
    (the synthesis builds the same networks), the stage's keys, the scale's ``difftumor_train`` and the data
    (``datalist``: the validation records first, ``n_val`` of them; ``data_dir`` holds the crops)."""
    family = settings["tumor_family_args"].get("difftumor", {})
    over: dict[str, Any] = {f"autoencoder_def#{k}": v for k, v in family.get("autoencoder", {}).items()}
    if stage != "autoencoder":
        nets = family.get("diffusion_early" if stage == "early" else "diffusion_late", {})
        over.update({f"diffusion_def#{k}": v for k, v in nets.items()})
    if "model_spacing" in family:
        over["spacing"] = [float(v) for v in family["model_spacing"]]
    if "crop_size" in family:
        over["roi_size"] = [int(family["crop_size"])] * 3
    if "hu_window" in family:
        over["hu_window"] = [float(v) for v in family["hu_window"]]
    over.update(STAGE_KEYS[stage])
    train = settings["difftumor_train"]
    over.update({**train.get("all", {}), **train.get(stage, {})})
    over.update({"dataset_dir": str(data_dir), "data_list_file_path": str(datalist), "n_val": int(n_val),
                 "ckpt_dir": str(models / stage), "output_dir": str(models / stage / "eval")})  # fmt: skip
    if stage != "autoencoder":
        over["autoencoder_path"] = str(models / "autoencoder" / WEIGHTS["autoencoder"])
        if not validation_has_tumor:  # stage 2 validates on tumor crops: borrow one training crop (tiny splits only)
            over["validate#dataset#data"] = "$[d for d in @datalist[@n_val:] if d.get('has_tumor', True)][:1]"
    return over


def stage_fingerprint(stage: str, overrides: Mapping[str, Any], settings: Mapping[str, Any],
                      fingerprints: Mapping[str, Any]) -> dict[str, Any]:  # fmt: skip
    """What a stage's weights depend on: the data and its overrides (not where files go); a diffusion stage also on
    the autoencoder's."""
    out = {"phantom": settings["phantom"], "tumor_margin_mm": settings["tumor_margin_mm"],
           "overrides": {k: v for k, v in overrides.items() if k not in PATH_KEYS}}  # fmt: skip
    if stage != "autoencoder":
        out["autoencoder"] = fingerprints["autoencoder"]
    return to_json(out)


# ---------------------------------------------------------------------------------------------------------------
# steps 1-3: data, point 1's model, DiffTumor's training


def records(split: Path, section: str) -> list[dict[str, Any]]:
    return [dict(r) for r in json.loads(split.read_text()).get(section, [])]


def tumor_model(args: argparse.Namespace, settings: Mapping[str, Any], out: Path, split: Path) -> Path:
    """Point 1's real-only model: ``--tumor_model_dir`` checked against this scale's recipe, or (``--smoke`` without
    it) a tiny one trained here by point 1's code path."""
    from tools.io import write_json
    from tools.studies import train_and_evaluate_seg

    recipe = to_json({k: settings[k] for k in SEG_RECIPE_KEYS if k != "tumor_eval"})
    if args.tumor_model_dir is None:
        folder = out / "tumor_model"
        done = folder / "done.json"
        if not (done.is_file() and json.loads(done.read_text())["recipe"] == recipe):
            shutil.rmtree(folder, ignore_errors=True)
            log(f"training a tiny real-only tumor model (point 1's code path) -> {folder}")
            timing: dict[str, float] = {}
            train_and_evaluate_seg(folder, split, 0, settings["tumor_seg"], configs=list(settings["tumor_seg_configs"]),
                                   timing=timing, evaluate=False)  # fmt: skip
            write_json(done, {"recipe": recipe, "training_seconds": timing["training"]})
        return folder
    folder = Path(args.tumor_model_dir).resolve()
    done, weights = folder / "done.json", folder / "models" / "model.pt"
    if not done.is_file() or not weights.is_file():
        missing = [str(p) for p in (done, weights) if not p.is_file()]
        raise SystemExit(f"no trained real-only tumor model in {folder} (missing {', '.join(missing)}): make it first "
                         f"with `python benchmarks/seg_unet3d_tumor.py --scale {args.scale}` (its --out folder's "
                         "seed0), or give --tumor_model_dir")  # fmt: skip
    saved = json.loads(done.read_text()).get("recipe", {})
    changed = sorted(k for k in set(recipe) | set(saved) if saved.get(k) != recipe.get(k))
    if changed:
        raise SystemExit(f"{folder} was trained with another recipe ({', '.join(changed)} differ from {args.scale}): "
                         "its test patients may not be this benchmark's; train it again with "
                         f"`python benchmarks/seg_unet3d_tumor.py --scale {args.scale}`")  # fmt: skip
    return folder


def train_difftumor(out: Path, split: Path, settings: Mapping[str, Any]) -> dict[str, Any]:
    """The three stages, each reused when finished with the same settings; returns their wall seconds."""
    from tools.bundles import run_config
    from tools.io import write_json

    root = out / "difftumor"
    training, validation = records(split, "training"), records(split, "validation")
    datalist = root / "datalist.json"  # the validation patients first: the bundle validates on the first n_val
    write_json(datalist, {"training": validation + training})
    validation_has_tumor = any(r.get("has_tumor") for r in validation)
    if not validation_has_tumor:
        log("no validation patient has a tumor: stage 2 validates on one training crop (a tiny split)")
    models = root / "models"
    fingerprints: dict[str, Any] = {}
    seconds: dict[str, float] = {}
    resumed: dict[str, bool] = {}
    for stage in STAGES:
        over = stage_overrides(stage, settings, split.parent, datalist, len(validation), models, validation_has_tumor)
        fingerprints[stage] = stage_fingerprint(stage, over, settings, fingerprints)
        folder = models / stage
        saved = folder / "fingerprint.json"
        if folder.exists() and (not saved.is_file() or json.loads(saved.read_text()) != fingerprints[stage]):
            log(f"{folder}: made with other settings, trained again")
            shutil.rmtree(folder)
        done = folder / "done.json"
        if done.is_file() and (folder / WEIGHTS[stage]).is_file():
            seconds[stage] = json.loads(done.read_text())["seconds"]
            resumed[stage] = json.loads(done.read_text()).get("resumed", False)
            log(f"difftumor {stage}: trained before with these settings ({seconds[stage]:.0f} s), reused")
            continue
        resumed[stage] = folder.exists() and any(folder.glob("*checkpoint*"))
        folder.mkdir(parents=True, exist_ok=True)
        write_json(saved, fingerprints[stage])
        log(f"difftumor {stage}: training {STAGE_CONFIGS[stage]}" + (" (resuming)" if resumed[stage] else ""))
        started = time.perf_counter()
        run_config("difftumor", STAGE_CONFIGS[stage], over, workflow_type="train")
        seconds[stage] = time.perf_counter() - started
        if not (folder / WEIGHTS[stage]).is_file():
            raise RuntimeError(f"difftumor {stage}: the training left no {folder / WEIGHTS[stage]}")
        write_json(done, {"seconds": seconds[stage], "resumed": resumed[stage]})
        log(f"difftumor {stage}: {seconds[stage]:.0f} s")
    return {"seconds": seconds, "total_seconds": float(sum(seconds.values())), "resumed": resumed,
            "weights": {stage: str(models / stage / WEIGHTS[stage]) for stage in STAGES}}  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# step 4: the autoencoder against the phantom's noise floor


def to_model_space(hu: np.ndarray, label: np.ndarray, affine: np.ndarray,
                   spacing: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """A crop as the bundle's training sees it: RAS, resampled to ``spacing`` (bilinear; the label nearest)."""
    import torch
    from monai.data import MetaTensor
    from monai.transforms import Orientation, Spacing

    out = []
    for array, mode in ((hu, "bilinear"), (label, "nearest")):
        tensor = MetaTensor(torch.from_numpy(np.asarray(array, dtype=np.float32)[None].copy()),
                            affine=torch.as_tensor(affine, dtype=torch.float64))  # fmt: skip
        tensor = Spacing(pixdim=list(spacing), mode=mode)(Orientation(axcodes="RAS", labels=None)(tensor))
        out.append(tensor[0].numpy())
    return out[0], np.rint(out[1]).astype(np.int16)


def reconstruct(autoencoder, hu_model: np.ndarray, window: Sequence[float], multiple: int) -> np.ndarray:
    """The autoencoder's reconstruction (HU) of a model-space crop, padded (edge) to a multiple of its
    downsampling."""
    import torch

    from tools.bundles import import_bundle_scripts

    import_bundle_scripts("difftumor", "difftumor_scripts")
    from difftumor_scripts.synthesis import hu_to_model, model_to_hu

    shape = np.array(hu_model.shape)
    pad = [(0, int(p)) for p in (-shape) % multiple]
    x = np.pad(hu_to_model(hu_model, window).astype(np.float32), pad, mode="edge")
    with torch.no_grad():
        r = autoencoder(torch.from_numpy(x)[None, None])
    r = r[0, 0].float().numpy()[tuple(slice(0, int(n)) for n in shape)]
    return model_to_hu(r, window)


def source_image(phantom: Path, scan: str) -> Path:
    meta = json.loads((phantom / "dataset.json").read_text())
    entry = next(e for e in meta["training"] + meta["test"] if Path(e["image"]).name.split(".nii")[0] == scan)
    return phantom / entry["image"]


def twin_crop(phantom: Path, record: Mapping[str, Any], crop: np.ndarray) -> np.ndarray:
    """The crop of the same case rendered with another scanner noise (``NOISE_SEED``), cut by the crop's
    ``crop_box``; the crop must be a plain slice of its source scan (checked)."""
    from tools.io import load_nifti
    from tools.phantom.twin import render_with_other_noise

    scan = record.get("scan") or record["case"]
    box = tuple(slice(int(a), int(b)) for a, b in record["crop_box"])
    source = load_nifti(source_image(phantom, scan))[0]
    if source[box].shape != crop.shape or not np.array_equal(source[box].astype(np.float32), crop):
        raise RuntimeError(f"{record['image']}: the crop is not its scan's crop_box {record['crop_box']}; the noise "
                           "twin cannot be cut the same way")  # fmt: skip
    case, original_label = render_with_other_noise(phantom, scan, NOISE_SEED)
    if not np.array_equal(case.label, original_label):
        raise RuntimeError(f"{scan}: the re-rendered phantom case has another label (the anatomy moved)")
    return case.ct[box].astype(np.float32)


def autoencoder_measures(phantom: Path, heldout: Sequence[Mapping[str, Any]], synthesis) -> dict[str, Any]:
    """Reconstruction MAE (HU) inside the pancreas (label > 0) of each held-out crop, and the noise floor: the same
    crop against its noise twin, both in the model's space and HU window."""
    from tools.io import load_nifti

    autoencoder = synthesis.models()["autoencoder"]
    window, spacing = synthesis.hu_window, synthesis.model_spacing
    mae, floor = [], []
    for record in heldout:
        crop, affine = load_nifti(record["image"])
        label = load_nifti(record["label"])[0]
        hu_model, label_model = to_model_space(crop, label, affine, spacing)
        pancreas = label_model > 0
        if not pancreas.any():
            continue
        clipped = np.clip(hu_model, *window)
        mae.append(float(np.abs(reconstruct(autoencoder, hu_model, window, synthesis.latent_factor) - clipped)[
            pancreas].mean()))  # fmt: skip
        twin_model = to_model_space(twin_crop(phantom, record, crop.astype(np.float32)), label, affine, spacing)[0]
        floor.append(float(np.abs(np.clip(twin_model, *window) - clipped)[pancreas].mean()))
    return {"mae_hu": float(np.mean(mae)) if mae else math.nan,
            "noise_floor_hu": float(np.mean(floor)) if floor else math.nan,
            "n_cases": len(mae), "per_case_mae_hu": mae, "per_case_floor_hu": floor, "noise_seed": NOISE_SEED,
            "hu_window": list(window), "model_spacing": [float(s) for s in spacing]}  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# step 5: insertion


def family_args(family: str, settings: Mapping[str, Any], weights: Mapping[str, str],
                size_classes: Path | None) -> dict[str, Any]:  # fmt: skip
    """The scale's arguments of a family, with the trained weights (never random ones) for difftumor, the training
    tumors' size classes (difftumor, handcrafted) and the cellular automaton's steps."""
    args = deepcopy(dict(settings.get("tumor_family_args", {}).get(family, {})))
    if family == "difftumor":
        args.update({"autoencoder_path": weights["autoencoder"], "diffusion_early_path": weights["early"],
                     "diffusion_late_path": weights["medium_large"], "allow_random_weights": False})  # fmt: skip
    if family == "cellular":
        args.setdefault("steps", list(CELLULAR_STEPS))
    if size_classes is not None and family in ("difftumor", "handcrafted"):
        args.setdefault("mask_generator", {"classes": str(size_classes), "size_measure": SIZE_MEASURE})
    return args


def unchanged_margin_mm(synthesis, affine: np.ndarray) -> float:
    """The family's own blend margin around its tumor: voxels farther away may not change (``synthesis.py`` and
    ``baselines.py``: difftumor ``dilate_mm``, hand-crafted twice its largest blur, cellular twice the voxel)."""
    if synthesis.name == "difftumor":
        return float(synthesis.dilate_mm)
    if synthesis.name == "handcrafted":
        return 2.0 * float(synthesis.blur_sigma_mm[1])
    spacing = np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0)
    return 2.0 * float(np.max(spacing))


def insert_family(family: str, transform, healthy: Sequence[Mapping[str, Any]], folder: Path,
                  draws: int = INSERT_DRAWS) -> list[dict]:  # fmt: skip
    """``draws`` insertions into each healthy crop, each a case of its own (seed ``INSERT_SEED + draws x index +
    draw``), saved beside the originals' layout; per case the record for seg_unet3d, the inserted tumors' radii, the
    HU inside them and the largest change outside the dilated tumor (read back from the saved file)."""
    import torch
    from monai.data import MetaTensor

    from tools.bundles import import_bundle_scripts
    from tools.io import load_nifti, save_nifti
    from tools.tumor_stats import tumor_components

    import_bundle_scripts("difftumor", "difftumor_scripts")
    from difftumor_scripts.synthesis import dilate_mm

    rows = []
    for index, draw in ((i, d) for i in range(len(healthy)) for d in range(draws)):
        record = healthy[index]
        hu, affine = load_nifti(record["image"])
        label = load_nifti(record["label"])[0]
        meta_affine = torch.as_tensor(affine, dtype=torch.float64)
        item = {"image": MetaTensor(torch.from_numpy(hu.astype(np.float32)), affine=meta_affine),
                "label": MetaTensor(torch.from_numpy(label.astype(np.uint8)), affine=meta_affine)}  # fmt: skip
        transform.set_random_state(INSERT_SEED + draws * index + draw)
        result = transform(item)
        name = f"{Path(record['image']).name.split('.nii')[0]}_{family}_{draw}"
        image_path, label_path = folder / "images" / f"{name}.nii.gz", folder / "labels" / f"{name}.nii.gz"
        save_nifti(image_path, result["image"].numpy().astype(np.float32), affine,
                   descrip=f"SYNTHETIC {family} tumor, benchmarks/difftumor_quality.py")  # fmt: skip
        save_nifti(label_path, result["label"].numpy().astype(np.uint8), affine, intent_label=True)
        saved = load_nifti(image_path)[0].astype(np.float64)
        new_label = load_nifti(label_path)[0]
        tumor = new_label == 2
        margin = unchanged_margin_mm(transform.family, affine)
        outside = ~dilate_mm(tumor, affine, margin) if tumor.any() else np.ones(tumor.shape, dtype=bool)
        difference = np.abs(saved - hu.astype(np.float64))
        rows.append({
            "record": {"image": str(image_path), "label": str(label_path), "patient": record.get("patient"),
                       "case": name, "has_tumor": bool(tumor.any())},
            "source": record["image"],
            "tumors": [{"radius_mm": t["radius_mm"], "voxels": t["voxels"]}
                       for t in tumor_components(new_label, affine)],
            "tumor_hu": saved[tumor].astype(np.float32),
            "outside_max_hu": float(difference[outside].max()) if outside.any() else 0.0,
            "margin_mm": margin,
            "changed_voxels": int((difference > 0).sum()),
        })  # fmt: skip
    return rows


# ---------------------------------------------------------------------------------------------------------------
# step 6: the classifier (AUC)


def auc(positive: Sequence[float], negative: Sequence[float]) -> float:
    """Area under the ROC curve of scores ``positive`` (label 1) against ``negative`` (label 0): the Mann-Whitney U
    statistic of the positives divided by the number of pairs (ties count one half); NaN when a side is empty."""
    from scipy.stats import mannwhitneyu

    positive, negative = np.asarray(positive, dtype=np.float64), np.asarray(negative, dtype=np.float64)
    if not len(positive) or not len(negative):
        return math.nan
    statistic = mannwhitneyu(positive, negative, alternative="two-sided").statistic
    return float(statistic) / (len(positive) * len(negative))


def fit_logistic(features: np.ndarray, labels: np.ndarray, l2: float = 1.0, iterations: int = 100) -> np.ndarray:
    """L2-regularised logistic regression (Newton's method; the intercept is not penalised): weights, intercept
    last."""
    x = np.hstack([features, np.ones((len(features), 1))])
    penalty = np.full(x.shape[1], l2)
    penalty[-1] = 0.0
    w = np.zeros(x.shape[1])
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-np.clip(x @ w, -30, 30)))
        gradient = x.T @ (p - labels) + penalty * w
        hessian = x.T @ (x * (p * (1 - p))[:, None]) + np.diag(penalty) + 1e-9 * np.eye(x.shape[1])
        step = np.linalg.solve(hessian, gradient)
        w -= step
        if np.max(np.abs(step)) < 1e-8:
            break
    return w


def stratified_folds(labels: np.ndarray, k: int, seed: int) -> np.ndarray:
    """A fold index per sample: each class shuffled (seeded) and dealt round-robin over ``k`` folds."""
    rng = np.random.RandomState(seed)
    folds = np.empty(len(labels), dtype=int)
    for value in np.unique(labels):
        members = np.flatnonzero(labels == value)
        folds[rng.permutation(members)] = np.arange(len(members)) % k
    return folds


def cross_validated_auc(real: np.ndarray, synthetic: np.ndarray, k: int = FOLDS, seed: int = 0) -> dict[str, Any]:
    """Real (0) vs synthetic (1) feature rows: logistic regression on standardised features, stratified ``k``-fold
    cross-validation (fewer folds when a class has fewer than ``k`` rows); the AUC of each test fold, their mean and
    standard deviation, and the AUC of all out-of-fold scores together."""
    real, synthetic = np.asarray(real, dtype=np.float64), np.asarray(synthetic, dtype=np.float64)
    k = min(k, len(real), len(synthetic))
    out = {"n_real": int(len(real)), "n_synthetic": int(len(synthetic)), "folds": int(k)}
    if k < 2:
        return {**out, "auc_mean": math.nan, "auc_sd": math.nan, "fold_aucs": [], "pooled_auc": math.nan}
    features = np.vstack([real, synthetic])
    labels = np.concatenate([np.zeros(len(real)), np.ones(len(synthetic))])
    folds = stratified_folds(labels, k, seed)
    scores = np.empty(len(labels))
    fold_aucs = []
    for fold in range(k):
        test = folds == fold
        train = ~test
        mean, sd = features[train].mean(0), features[train].std(0)
        sd[sd == 0] = 1.0
        w = fit_logistic((features[train] - mean) / sd, labels[train])
        scores[test] = np.hstack([(features[test] - mean) / sd, np.ones((int(test.sum()), 1))]) @ w
        fold_aucs.append(auc(scores[test & (labels == 1)], scores[test & (labels == 0)]))
    return {**out, "auc_mean": float(np.mean(fold_aucs)), "auc_sd": float(np.std(fold_aucs, ddof=1)),
            "fold_aucs": fold_aucs, "pooled_auc": auc(scores[labels == 1], scores[labels == 0])}  # fmt: skip


FEATURES = ("centre mean", "centre sd", "centre p10", "centre median", "centre p90", "shell mean",
            "centre - shell", "centre gradient", "centre Laplacian sd")  # fmt: skip


def patch_features(patch: np.ndarray) -> np.ndarray:
    """Intensity and texture of a tumor-centred patch (HU, ``PATCH``^3): statistics of its central ``CENTRE``^3 cube,
    the shell around it, the contrast between them, the gradient magnitude and the Laplacian's spread (noise and
    texture) in the centre."""
    from scipy import ndimage

    lo, hi = (PATCH - CENTRE) // 2, (PATCH + CENTRE) // 2
    centre = np.zeros(patch.shape, dtype=bool)
    centre[lo:hi, lo:hi, lo:hi] = True
    inner = patch[centre]
    gradient = np.sqrt(sum(g**2 for g in np.gradient(patch)))
    laplace = ndimage.laplace(patch)
    return np.array([inner.mean(), inner.std(), *np.percentile(inner, [10, 50, 90]), patch[~centre].mean(),
                     inner.mean() - patch[~centre].mean(), gradient[centre].mean(), laplace[centre].std()])  # fmt: skip


def tumor_patches(image: str, label: str, window: Sequence[float]) -> list[np.ndarray]:
    """``PATCH``^3 patches (HU clipped to ``window``, edge-padded) around the centroid of each tumor of at least
    ``AUC_MIN_RADIUS_MM`` in a case."""
    from tools.io import load_nifti
    from tools.tumor_stats import tumor_components

    hu, affine = load_nifti(image)
    tumors = tumor_components(load_nifti(label)[0], affine)
    hu = np.pad(np.clip(hu.astype(np.float64), *window), PATCH, mode="edge")
    inverse = np.linalg.inv(affine)
    patches = []
    for tumor in tumors:
        if tumor["radius_mm"] < AUC_MIN_RADIUS_MM:
            continue
        centre = np.rint(inverse[:3, :3] @ np.asarray(tumor["centroid_mm"]) + inverse[:3, 3]).astype(int) + PATCH
        start = centre - PATCH // 2
        patches.append(hu[tuple(slice(int(s), int(s) + PATCH) for s in start)])
    return patches


# ---------------------------------------------------------------------------------------------------------------
# step 6: detection by point 1's model


def detection(folder: Path, split: Path, test_records: Sequence[Mapping[str, Any]] | None, model_dir: Path,
              settings: Mapping[str, Any]) -> dict[str, Any]:  # fmt: skip
    """Point 1's model evaluated (``evaluate.json``, the scale's ``tumor_eval``) on ``test_records`` (None: the split's
    own test crops); lesion sensitivity for equivalent radius >= 10 mm with its Wilson interval."""
    import importlib

    from tools.bundles import import_bundle_scripts
    from tools.io import write_json
    from tools.studies import train_and_evaluate_seg

    import_bundle_scripts("seg_unet3d")
    seg_metrics = importlib.import_module("seg_unet3d_scripts.seg_metrics")
    datalist = split
    if test_records is not None:
        datalist = folder / "datalist.json"
        write_json(datalist, {"training": records(split, "training"), "validation": records(split, "validation"),
                              "test": list(test_records)})  # fmt: skip
    shutil.rmtree(folder / "eval", ignore_errors=True)
    overrides = {**settings["tumor_eval"], "ckpt_dir": str(model_dir / "models")}
    train_and_evaluate_seg(folder, datalist, 0, settings["tumor_seg"], configs=list(settings["tumor_seg_configs"]),
                           eval_overrides=overrides, train=False)  # fmt: skip
    lesions = read_lesions(folder / "eval")
    large = [lesion for lesion in lesions if lesion["radius_mm"] >= RADIUS_MM]
    hits = sum(lesion["hit"] for lesion in large)
    return {"sensitivity_10mm": hits / len(large) if large else math.nan, "detected_10mm": int(hits),
            "lesions_10mm": len(large), "sensitivity_10mm_ci": list(seg_metrics.wilson_interval(hits, len(large))),
            "lesions": len(lesions), "detected": int(sum(lesion["hit"] for lesion in lesions))}  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# bars


def bar_row(bar: str, value: float, measured: str, required: str, passed: bool | None) -> dict[str, Any]:
    """One table row; ``passed`` None = reported, no bar; a value that is not finite fails its bar."""
    if passed is not None:
        passed = bool(passed) and finite(value)
    return {"bar": bar, "value": value, "measured": measured, "required": required, "pass": passed}


def sensitivity_text(figures: Mapping[str, Any]) -> str:
    low, high = figures["sensitivity_10mm_ci"]
    return (f"{figures['sensitivity_10mm']:.2f} ({figures['detected_10mm']}/{figures['lesions_10mm']}, 95 % CI "
            f"{low:.2f}-{high:.2f})")  # fmt: skip


def family_bars(family: str, measures: Mapping[str, Any], real: Mapping[str, Any],
                autoencoder: Mapping[str, Any] | None = None,
                training: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:  # fmt: skip
    """The rows of one family: (difftumor: the autoencoder against the noise floor), median HU inside the tumors,
    detection of tumors >= 10 mm beside the real ones, nothing changed outside the dilated tumor, (difftumor: the
    training time), and the classifier's AUC (reported, no bar)."""
    rows = []
    if autoencoder is not None:
        limit = autoencoder["noise_floor_hu"] + BAR["autoencoder_margin_hu"]
        rows.append(bar_row(
            "autoencoder reconstruction MAE inside the pancreas, held-out crops (HU)", autoencoder["mae_hu"],
            f"{autoencoder['mae_hu']:.1f} over {autoencoder['n_cases']} crops",
            f"<= noise floor {autoencoder['noise_floor_hu']:.1f} + {BAR['autoencoder_margin_hu']:g} = {limit:.1f}",
            autoencoder["mae_hu"] <= limit))  # fmt: skip
    difference = abs(measures["median_hu"] - real["median_hu"])
    rows.append(bar_row(
        "median HU inside the tumors: synthetic vs real (training crops)", difference,
        f"{measures['median_hu']:.1f} vs {real['median_hu']:.1f} (difference {difference:.1f})",
        f"within {BAR['median_hu']:g}", difference <= BAR["median_hu"]))  # fmt: skip
    rows.append(bar_row(
        "point 1's model: lesion sensitivity, synthetic tumors >= 10 mm in healthy test crops",
        measures["sensitivity_10mm"], f"{sensitivity_text(measures)}; real test tumors {sensitivity_text(real)}",
        f">= {BAR['sensitivity_10mm']:g}", measures["sensitivity_10mm"] >= BAR["sensitivity_10mm"]))  # fmt: skip
    low, high = measures["margin_mm"]
    margin = f"{low:.1f}" if low == high else f"{low:.1f}-{high:.1f}"
    rows.append(bar_row(
        "largest change outside the dilated tumor (HU)", measures["outside_max_hu"],
        f"{measures['outside_max_hu']:g} over {measures['cases']} crops (margin {margin} mm)",
        f"== {BAR['outside_max_hu']:g}", measures["outside_max_hu"] <= BAR["outside_max_hu"]))  # fmt: skip
    if training is not None:
        minutes = training["total_seconds"] / 60.0
        parts = ", ".join(f"{stage} {s / 60.0:.1f}" for stage, s in training["seconds"].items())
        rows.append(bar_row("training wall time, all stages (min)", minutes, f"{minutes:.1f} ({parts})",
                            f"<= {BAR['train_minutes']:g}", minutes <= BAR["train_minutes"]))  # fmt: skip
    a = measures["auc"]
    spread = f"{min(a['fold_aucs']):.2f}-{max(a['fold_aucs']):.2f}" if a["fold_aucs"] else "-"
    rows.append(bar_row(
        f"real-vs-synthetic classifier AUC ({a['folds']}-fold, logistic regression on patch features)", a["auc_mean"],
        f"{a['auc_mean']:.2f} +- {a['auc_sd']:.2f} (folds {spread}; pooled {a['pooled_auc']:.2f}; {a['n_real']} real, "
        f"{a['n_synthetic']} synthetic)", "reported (0.5 = indistinguishable)", None))  # fmt: skip
    return rows


# ---------------------------------------------------------------------------------------------------------------
# step 7: montage and tables


def montage(path: Path, real: Sequence[Mapping[str, Any]], inserted: Mapping[str, Sequence[Mapping[str, Any]]]) -> Path:
    """Rows: a real training tumor, then one healthy test crop with each family's tumor; axial slice through the
    tumor's largest cross-section, W400 L40, pancreas and tumor outlined."""
    import matplotlib.pyplot as plt

    from tools.figures import ABDOMEN_WINDOW, focus_slices, outline_legend, save_figure, show_slice, to_ras, window_name
    from tools.io import load_nifti, voxel_spacing

    # one row per healthy crop (its first insertion): the rows of ``inserted`` hold INSERT_DRAWS insertions per crop
    rows = min(MONTAGE_ROWS, len(real), *(len(v) // INSERT_DRAWS for v in inserted.values()))
    columns = ["real (training)", *inserted]
    fig, axes = plt.subplots(max(rows, 1), len(columns), squeeze=False, layout="constrained",
                             figsize=(2.6 * len(columns), 2.9 * max(rows, 1) + 0.6))  # fmt: skip
    for row in range(rows):
        cases = [real[row]] + [inserted[family][row * INSERT_DRAWS] for family in inserted]
        for ax, name, case in zip(axes[row], columns, cases):
            volume, affine = load_nifti(case["image"])
            label = to_ras(load_nifti(case["label"])[0], affine)[0]
            volume, ras_affine = to_ras(volume, affine)
            k = focus_slices(label, volume.shape)[2]
            radius = max((t["radius_mm"] for t in case.get("tumors", [])), default=math.nan)
            show_slice(ax, volume, voxel_spacing(ras_affine), "axial", k, label, ABDOMEN_WINDOW,
                       f"{name}: {case['name']}\nr {radius:.1f} mm, axial {k + 1}/{volume.shape[2]}",
                       fontsize=7)  # fmt: skip
    fig.suptitle(f"Real tumors (training crops) and synthetic ones in healthy test crops, window {window_name()}",
                 fontsize=9)  # fmt: skip
    outline_legend(fig, loc="outside lower center", ncol=2)
    return save_figure(fig, path, dpi=90)


def markdown(result: Mapping[str, Any]) -> str:
    data = result["data"]
    lines = [f"# DiffTumor and the modeling-based tumors on the phantom (scale {result['scale']})", "",
             f"Command: `{result['command']}`", "",
             f"Data: {data['training']} training / {data['validation']} validation / {data['test']} test crops; "
             f"{data['real_tumors']} real training tumors (median HU {result['real']['median_hu']:.1f}); "
             f"{data['healthy_test']} healthy test crops receive {result['insertion']['draws']} tumors per family, "
             f"each into its own copy (size classes: {SIZE_MEASURE_TEXT[result['insertion']['size_measure']]}). "
             f"Point 1's model: "
             f"`{result['tumor_model_dir']}`.", ""]  # fmt: skip
    for family in FAMILIES:
        outcome = result["families"][family]
        lines += [f"## {family}", "", "| bar | measured | required | pass |", "| --- | --- | --- | --- |"]
        for row in outcome["bars"]:
            verdict = "-" if row["pass"] is None else ("yes" if row["pass"] else "NO")
            lines.append(f"| {row['bar']} | {row['measured']} | {row['required']} | {verdict} |")
        radii = outcome["radii_mm"]
        lines += ["", f"{len(outcome['cases'])} insertions ({data['healthy_test']} healthy test crops x "
                  f"{result['insertion']['draws']}): {len(radii)} tumors (connected "
                  f"components), {sum(r >= RADIUS_MM for r in radii)} of equivalent radius >= {RADIUS_MM:g} mm.",
                  ""]  # fmt: skip
    seconds = result["seconds"]
    lines += [f"Time: {', '.join(f'{k} {v:.0f} s' for k, v in seconds.items())}. Montage: `montage.png`.", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", default="benchmarks/tumor_recipes.json")
    parser.add_argument("--out", default="runs/difftumor_quality")
    parser.add_argument("--tumor_model_dir", default="runs/seg_unet3d_tumor/seed0",
                        help="point 1's training folder (done.json, models/model.pt); with --smoke, when not given, a "
                             "tiny one is trained")  # fmt: skip
    args = parse_args_with_smoke(parser, {"out": "runs/difftumor_quality_smoke", "tumor_model_dir": None})

    import torch

    from tools.bundles import import_bundle_scripts
    from tools.io import write_json
    from tools.studies import phantom_data, prepared_split, tumor_size_classes

    settings = benchmark_settings(args.scale, args.smoke)
    check_recipe(settings, args.scale)
    out = Path(args.out).resolve()
    command = " ".join(["python benchmarks/difftumor_quality.py", *(shlex.quote(a) for a in sys.argv[1:])])
    threads = os.environ.get("OMP_NUM_THREADS", "all")
    log(f"DiffTumor quality, scale {args.scale} -> {out}; threads {threads} (torch {torch.get_num_threads()}), load "
        f"average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")  # fmt: skip
    seconds: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        seconds[name] = now - clock
        clock = now

    # 1-2: data and point 1's model
    phantom = phantom_data(out / "data" / "phantom", settings)
    split = prepared_split(
        phantom, out / "data" / "crops_tumor", "pancreas", margin_mm=settings["tumor_margin_mm"]
    ).resolve()  # a symlinked data folder too
    training, validation, test = (records(split, s) for s in ("training", "validation", "test"))
    healthy = [r for r in test if not r.get("has_tumor")]
    if not healthy:
        raise SystemExit(
            "the test set has no healthy crop to insert tumors into; give the scale's phantom more patients"
        )
    model_dir = tumor_model(args, settings, out, split)
    log(f"data: {len(training)} training, {len(validation)} validation, {len(test)} test crops ({len(healthy)} "
        f"healthy); point 1's model {model_dir}")  # fmt: skip
    lap("data_and_tumor_model")

    # 3: DiffTumor's stages
    trained = train_difftumor(out, split, settings)
    log(f"difftumor trained: {trained['total_seconds'] / 60.0:.1f} min in all")
    lap("difftumor_training")

    # 5: insertion (the transforms first: difftumor's also gives the autoencoder of step 4)
    import_bundle_scripts("difftumor", "difftumor_scripts")
    from difftumor_scripts.transforms import TumorSynthesisd

    classes = tumor_size_classes(split, out / "data" / "tumor_sizes.json")
    transforms = {family: TumorSynthesisd(keys=["image", "label"], family=family, prob=1.0, tumor_probs=INSERT_PROBS,
                                          family_args=family_args(family, settings, trained["weights"], classes),
                                          image_scale="hu")
                  for family in FAMILIES}  # fmt: skip

    # 4: the autoencoder against the noise floor
    autoencoder = autoencoder_measures(phantom, validation + test, transforms["difftumor"].family)
    log(f"autoencoder: reconstruction MAE {autoencoder['mae_hu']:.1f} HU inside the pancreas of "
        f"{autoencoder['n_cases']} held-out crops; noise floor {autoencoder['noise_floor_hu']:.1f} HU")  # fmt: skip
    lap("autoencoder")

    inserted = {}
    for family in FAMILIES:
        folder = out / "inserted" / family
        shutil.rmtree(folder, ignore_errors=True)
        inserted[family] = insert_family(family, transforms[family], healthy, folder)
        radii = [t["radius_mm"] for row in inserted[family] for t in row["tumors"]]
        log(f"{family}: {len(radii)} tumors inserted into {len(healthy)} healthy test crops, "
            f"{sum(r >= RADIUS_MM for r in radii)} of radius >= {RADIUS_MM:g} mm")  # fmt: skip
    lap("insertion")

    # 6: real tumors, detection, AUC
    window = transforms["difftumor"].family.hu_window
    from tools.io import load_nifti
    from tools.tumor_stats import tumor_components

    real_cases, real_hu, real_patches = [], [], []
    for record in (r for r in training if r.get("has_tumor")):
        ct, affine = load_nifti(record["image"])
        label = load_nifti(record["label"])[0]
        real_hu.append(ct[label == 2].astype(np.float32))
        real_patches += tumor_patches(record["image"], record["label"], window)
        real_cases.append({"image": record["image"], "label": record["label"], "name": record.get("case"),
                           "tumors": tumor_components(label, affine)})  # fmt: skip
    real_pool = np.concatenate(real_hu) if real_hu else np.zeros(0)
    real_features = np.array([patch_features(p) for p in real_patches]).reshape(-1, len(FEATURES))
    real = {"median_hu": float(np.median(real_pool)) if real_pool.size else math.nan, "voxels": int(real_pool.size),
            **detection(out / "detection" / "real", split, None, model_dir, settings)}  # fmt: skip
    log(f"real tumors: median HU {real['median_hu']:.1f} over {len(real_cases)} training crops; point 1's model "
        f"detects {sensitivity_text(real)} of the real test tumors >= {RADIUS_MM:g} mm")  # fmt: skip

    families = {}
    for family in FAMILIES:
        rows = inserted[family]
        pool = np.concatenate([row["tumor_hu"] for row in rows]) if rows else np.zeros(0)
        patches = [p for row in rows for p in tumor_patches(row["record"]["image"], row["record"]["label"], window)]
        features = np.array([patch_features(p) for p in patches]).reshape(-1, len(FEATURES))
        records_with_tumor = [row["record"] for row in rows if row["record"]["has_tumor"]]
        measures = {
            "median_hu": float(np.median(pool)) if pool.size else math.nan,
            "voxels": int(pool.size),
            **detection(out / "detection" / family, split, records_with_tumor, model_dir, settings),
            "outside_max_hu": max((row["outside_max_hu"] for row in rows), default=math.nan),
            "margin_mm": [
                min((row["margin_mm"] for row in rows), default=math.nan),
                max((row["margin_mm"] for row in rows), default=math.nan),
            ],
            "cases": len(rows),
            "auc": cross_validated_auc(real_features, features),
        }
        is_difftumor = family == "difftumor"
        bars = family_bars(family, measures, real, autoencoder if is_difftumor else None,
                           trained if is_difftumor else None)  # fmt: skip
        families[family] = {
            "measures": measures,
            "bars": bars,
            "radii_mm": [t["radius_mm"] for row in rows for t in row["tumors"]],
            "cases": [{k: v for k, v in row.items() if k != "tumor_hu"} for row in rows],
        }
        log(
            f"{family}: median HU {measures['median_hu']:.1f}; detected {sensitivity_text(measures)}; outside the "
            f"dilated tumor at most {measures['outside_max_hu']:g} HU changed; AUC {measures['auc']['auc_mean']:.2f}"
        )
    lap("measures")

    examples = [c for c in real_cases if any(t["radius_mm"] >= RADIUS_MM for t in c["tumors"])] or real_cases
    montage_path = montage(out / "montage.png", examples, {
        family: [{**row["record"], "name": row["record"]["case"], "tumors": row["tumors"]} for row in inserted[family]]
        for family in FAMILIES})  # fmt: skip
    lap("montage")

    result = {
        "command": command,
        "scale": args.scale,
        "smoke": bool(args.smoke),
        "settings": to_json({k: settings.get(k) for k in (*SEG_RECIPE_KEYS, "tumor_family_args", "difftumor_train")}),
        "insertion": {"tumor_probs": INSERT_PROBS, "cellular_steps": list(CELLULAR_STEPS), "seed": INSERT_SEED,
                      "size_classes": str(classes) if classes else None, "size_measure": SIZE_MEASURE,
                      "draws": INSERT_DRAWS},  # fmt: skip
        "tumor_model_dir": str(model_dir),
        "data": {"training": len(training), "validation": len(validation), "test": len(test),
                 "healthy_test": len(healthy), "real_tumors": sum(len(c["tumors"]) for c in real_cases)},  # fmt: skip
        "training": trained,
        "autoencoder": autoencoder,
        "real": real,
        "families": families,
        "features": list(FEATURES),
        "seconds": seconds,
        "threads": threads,
        "montage": str(montage_path),
    }
    write_json(out / "result.json", to_json(result))
    text = markdown(result)
    (out / "result.md").write_text(text)
    print(text)
    failed = [f"{family}: {row['bar']}" for family in FAMILIES for row in families[family]["bars"]
              if row["pass"] is False]  # fmt: skip
    log(("FAIL: " + "; ".join(failed)) if failed else "every bar passes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
