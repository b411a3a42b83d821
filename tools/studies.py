"""The studies of the seed papers, each one command: arms x seeds of seg_unet3d trainings, a table and figures.

Every study builds a list of :class:`tools.study_runner.Job` (one per arm and seed) and runs them through
:func:`tools.study_runner.run_jobs`, so a study is resumable (a finished job is never run again) and can be sharded
over processes with ``torchrun --nproc_per_node=2 -m tools study <name> ...``. Each job trains and evaluates a
bundle through ``monai.bundle`` (:func:`tools.bundles.run_config`) with overrides only: the configs are the
bundles' own, and ``--scale`` only chooses data size, epochs and network widths (``paper`` keeps the bundles'
defaults, for a GPU). A study writes into ``<out>/<study>/``:

- ``settings.json``: the scale, the arms and every override, so a table can be traced to what produced it;
- ``jobs/<arm>/seed<k>/``: each job's data, checkpoints, evaluation CSVs and ``metrics.json``;
- ``results.csv`` (one row per job), ``table.md`` / ``table.csv`` (mean +- sample std over seeds per arm);
- PNG figures: bar charts with error bars (one dot per seed) and training-loss curves.

The studies (SPEC section 4):

(a) ``ratio``: seed 000 Table 1. Binary pancreas segmentation on pancreas crops, trained on real data only or on
    synthetic:real 100:0 / 50:50 / 25:75 mixes at a fixed training-set size, synthetic cases from vae_ct (3D
    crops), ldm_abdomen (ControlNet on the mask: image + label pairs) or both; every arm is evaluated on the same
    real test crops.
(b) ``tumor_size``: seed 001 Table 1. Tumor segmentation without synthesis vs with synthetic tumors of one size
    class (tiny / small / medium / large, size classes from the training set's own tumor quartiles, as seed 001)
    or ``mixed``, inserted online into healthy training cases by difftumor's ``TumorSynthesisd`` in seg_unet3d's
    ``online_augmentation`` slot. Tumor DSC and NSD on the real tumor test cases.
(c) ``label_noise``: seed 001 Tables 2-3. Static noisy copies of the training labels (difftumor's
    ``NoisyTumorLabeld``, levels low / moderate / high / extreme), training on them, evaluation on clean labels.
(d) ``crop_context``: seed 002. ldm_abdomen trained per crop mode (full / semi / pancreas), its samples evaluated by
    ``tools.evaluation.evaluate_synthetic`` (HU histogram distance, pancreas found by seg_unet3d, ...).
(e) ``tumor_families``: no synthesis vs DiffTumor vs hand-crafted vs cellular-automaton tumors (``TumorSynthesisd``
    family), detection sensitivity per tumor size bin from seg_unet3d's evaluation.

Studies report what they measure: the arms and seeds are fixed in advance and the table shows whatever came out.
"""

from __future__ import annotations

import csv
import difflib
import json
import math
import os
import shutil
import time
from copy import deepcopy
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from tools.io import write_json
from tools.study_runner import Job, aggregate, distributed_context, run_jobs, slug

STUDIES = ("ratio", "tumor_size", "label_noise", "crop_context", "tumor_families")
SCALES = ("demo", "small", "paper")
RATIOS = ("100:0", "50:50", "25:75")
TUMOR_SIZES = ("tiny", "small", "medium", "large", "mixed")
NOISE_LEVELS = ("low", "moderate", "high", "extreme")
CROP_MODES = ("full", "semi", "pancreas")
FAMILIES = ("difftumor", "handcrafted", "cellular")
SEG_CONFIGS = ["train.json"]
SEG_BINARY = ["train.json", "binary.json"]
#: the tumor studies' seg_unet3d configs: crops sampled by class, half of them on the tumor (issue 15's recipe)
TUMOR_SEG_CONFIGS = ["train.json", "tumor_crops.json"]

# ---------------------------------------------------------------------------------------------------------------
# scales: what changes between a CPU demo and a GPU user's run (never the configs themselves)

_TINY_SEG = {
    "network_def#channels": [8, 16, 32, 64],
    "network_def#strides": [2, 2, 2],
    "network_def#num_res_units": 1,
    "learning_rate": 0.003,
    "num_samples": 2,
    "cache_workers": 1,
    "sw_batch_size": 1,
}

SCALE_SETTINGS: dict[str, dict[str, Any]] = {
    "demo": {
        "seeds": [0, 1],
        "phantom": {"n_cases": 20, "shape": [160, 160, 80], "tumor_fraction": 0.5, "test_fraction": 0.3},
        "crop_shape": [48, 32, 32],
        "tumor_margin_mm": 15.0,
        "seg": {
            **_TINY_SEG,
            "pixdim": [-1, -1, -1],
            "roi_size": [48, 48, 32],
            "train#trainer#max_epochs": 30,
            "val_interval": 10,
        },
        "tumor_seg": {
            **_TINY_SEG,
            "pixdim": [-1, -1, -1],
            "roi_size": [48, 48, 32],
            "train#trainer#max_epochs": 40,
            "val_interval": 10,
        },
        # the demo keeps uniform pancreas-or-not crops: its measured tables (README) were made so, and no recipe
        # learns the phantom's tumors within the demo's budget (benchmarks/seg_unet3d_tumor.py)
        "tumor_seg_configs": SEG_CONFIGS,
        # evaluate.json's post-processing of the tumor studies (fixed before any test scan is scored, every arm)
        "tumor_eval": {},
        # the generators' CPU recipes (issue 14; measured by benchmarks/generator_quality.py, which trains these
        # settings): small networks at learning rates that suit them, long enough to learn the crops
        "vae": {
            "strides": [2, 2, 2],
            "channels": [8, 16, 32],
            "latent_size": 32,
            "learning_rate": 0.001,
            "max_epochs": 200,
            "val_interval": 200,
            "save_interval": 20,
            "batch_size": 2,
            "num_workers": 0,
        },
        "ldm_nets": {
            # 2x downsampling (4 latent channels): the autoencoder's reconstruction limits everything after it
            "autoencoder_def#channels": [8, 16],
            "autoencoder_def#attention_levels": [False, False],
            "autoencoder_def#num_res_blocks": 1,
            "autoencoder_def#norm_num_groups": 4,
            "latent_channels": 4,
            "diffusion_def#channels": [16, 32, 32],
            "diffusion_def#num_head_channels": [0, 0, 32],
            "diffusion_def#attention_levels": [False, False, True],
            "diffusion_def#num_res_blocks": 1,
            "diffusion_def#norm_num_groups": 8,
        },
        # rectified flow: at equal training, its samples follow the mask far better than the noise-predicting
        # model's, and as well in 8-15 steps as in 30 (benchmarks/ldm_abdomen_samplers.py)
        "ldm_train": {
            "train_scheduler": "rflow",
            "train_batch_size": 2,
            "num_workers": 0,
            "val_interval": 1000,
            "scale_factor_samples": 4,
            "lr_milestones": [100000],
            "checkpoint_interval": 20,
        },
        "ldm_stage": {
            "autoencoder": {
                "ae_patch_size": [48, 32, 32],
                "learning_rate": 0.001,
                "kl_weight": 1e-6,
                "adversarial_weight": 0.0,
                "discriminator_def#channels": 4,
                "discriminator_def#num_layers_d": 2,
            },
            "diffusion": {"learning_rate": 0.0005},
            "controlnet": {"learning_rate": 0.0005, "conditioning_embedding_channels": [8, 16]},
        },
        "ldm_epochs": {"autoencoder": 60, "diffusion": 200, "controlnet": 60},
        "ldm_infer": {"sampler": "rflow", "num_inference_steps": 10},
        "tumor_family_args": {
            # random weights (nothing trained at this scale: the tumors have DiffTumor's geometry and blend, the
            # texture is decoder noise); small networks and crops so that a synthesis takes well under a second
            "difftumor": {
                "allow_random_weights": True,
                "crop_size": 32,
                "late_inference_steps": 5,
                "autoencoder": {"channels": [4, 8, 8], "num_res_channels": [4, 8, 8], "num_embeddings": 64},
                "diffusion_early": {"channels": [8, 8, 16, 16], "num_head_channels": 8, "norm_num_groups": 4},
                "diffusion_late": {"channels": [8, 8, 16, 16], "num_head_channels": 8, "norm_num_groups": 4},
            },
        },
        "default_family": "handcrafted",
        # vae_ct's adversarial families' own keys on top of "vae", by the generator-quality benchmark's variant
        # names ("vaegan", "gan"), e.g. the discriminator's learning rate or when the adversarial term starts
        "vae_variants": {"vaegan": {"adv_start_epoch": 100}},
        # difftumor's training overrides for its three stages (``benchmarks/difftumor_quality.py``): ``all`` for
        # every stage, ``autoencoder`` / ``early`` / ``medium_large`` for one (epochs, learning rate, crops...);
        # the networks, crop size and model spacing come from ``tumor_family_args["difftumor"]``; {}: the bundle's
        # configs (the reference's GPU recipe)
        "difftumor_train": {},
    },
    "small": {
        "seeds": [0, 1, 2],
        "phantom": {"n_cases": 40, "shape": [160, 160, 80], "tumor_fraction": 0.5, "test_fraction": 0.25},
        "crop_shape": [96, 64, 64],
        "tumor_margin_mm": 15.0,
        "seg": {
            "pixdim": [-1, -1, -1],
            "roi_size": [96, 64, 64],
            "network_def#channels": [16, 32, 64, 128, 256],
            "learning_rate": 0.001,
            "train#trainer#max_epochs": 100,
            "val_interval": 10,
        },
        "tumor_seg": {
            "pixdim": [-1, -1, -1],
            "roi_size": [64, 64, 64],
            "network_def#channels": [16, 32, 64, 128, 256],
            "learning_rate": 0.001,
            "train#trainer#max_epochs": 100,
            "val_interval": 10,
        },
        "tumor_seg_configs": TUMOR_SEG_CONFIGS,
        "tumor_eval": {},
        "vae": {
            "strides": [2, 2, 2, 2],
            "channels": [16, 32, 64, 128],
            "latent_size": 64,
            "max_epochs": 200,
            "val_interval": 50,
            "batch_size": 2,
        },
        "ldm_nets": {"autoencoder_def#channels": [32, 64, 64], "diffusion_def#channels": [64, 64, 128]},
        "ldm_train": {"train_batch_size": 2},
        "ldm_stage": {"autoencoder": {"ae_patch_size": [64, 64, 64]}},
        "ldm_epochs": {"autoencoder": 100, "diffusion": 300, "controlnet": 100},
        "ldm_infer": {"num_inference_steps": 50},
        "tumor_family_args": {},
        "default_family": "difftumor",
        "vae_variants": {},
        "difftumor_train": {},
    },
    "paper": {
        # the bundles' config defaults (GPU); only the data set and the number of seeds are chosen here
        "seeds": [0, 1, 2],
        "phantom": {"n_cases": 100, "shape": [256, 256, 128], "tumor_fraction": 0.5, "test_fraction": 0.2},
        "crop_shape": [96, 96, 96],
        "tumor_margin_mm": 30.0,
        "seg": {},
        "tumor_seg": {},
        "tumor_seg_configs": TUMOR_SEG_CONFIGS,
        "tumor_eval": {},
        "vae": {},
        "ldm_nets": {},
        "ldm_train": {},
        "ldm_stage": {},
        "ldm_epochs": {},
        "ldm_infer": {},
        "tumor_family_args": {},
        "default_family": "difftumor",
        "vae_variants": {},
        "difftumor_train": {},
    },
}


#: the names each study's arms may take (ratio: generators, ``VAE+DM`` for a mix of several) and its baseline arm,
#: which always runs; a scale file's ``arms`` and the command line's lists are checked against them
ARM_NAMES: dict[str, tuple[str, ...]] = {"ratio": ("VAE", "DM"), "tumor_size": TUMOR_SIZES, "label_noise": NOISE_LEVELS,
                                         "crop_context": CROP_MODES, "tumor_families": FAMILIES}  # fmt: skip
BASELINE_ARMS = {"ratio": "real only", "tumor_size": "none", "label_noise": "clean", "tumor_families": "none"}


def _near(name: str, known: Sequence[str]) -> str:
    found = difflib.get_close_matches(str(name), list(known), n=1)
    return f" (did you mean {found[0]!r}?)" if found else ""


def check_arm_names(study: str, names: Any, known: Sequence[str], source: str) -> None:
    """Refuse (ValueError naming ``source``: a scale file or a flag) arm names that ``study`` does not know; ratio's
    names are generators joined with ``+``."""
    if isinstance(names, str) or not isinstance(names, (list, tuple)) or not names:
        raise ValueError(f"{source}: expected a non-empty list of {study} arm names, got {names!r}")
    for name in names:
        parts = str(name).split("+") if study == "ratio" else [name]
        for part in parts:
            if part in known:
                continue
            what = {"ratio": "generator", "tumor_families": "family"}.get(study, "arm")
            baseline = BASELINE_ARMS.get(study)
            why = f" ({baseline!r} is the baseline arm, which always runs)" if name == baseline else _near(part, known)
            inside = f" in {name!r}" if part != name else ""
            raise ValueError(f"{source}: unknown {study} {what} {part!r}{inside}{why}; known: {', '.join(known)}")


def scale_settings(scale: str | os.PathLike) -> dict[str, Any]:
    """The settings of a scale: ``demo``, ``small``, ``paper``, or a JSON file ``{"base": "demo", <key>: <value>}``
    whose top-level keys replace the base scale's (e.g. fewer epochs, other seeds, a subset of ``arms``).

    A file with an unknown key, base scale, study or arm name is refused with an InputError naming the file, the
    bad name and the known ones, before anything is made."""
    if str(scale) in SCALE_SETTINGS:
        return deepcopy(SCALE_SETTINGS[str(scale)])
    path = Path(scale)
    if path.suffix == ".json" and path.is_file():
        from tools.errors import InputError

        try:
            custom = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise InputError(path, f"not a JSON scale file: {error}") from None
        if not isinstance(custom, dict):
            raise InputError(path, f"a scale file holds a JSON object of settings, got {type(custom).__name__}")
        base = custom.pop("base", "demo")
        if str(base) not in SCALE_SETTINGS and not (Path(base).suffix == ".json" and Path(base).is_file()):
            raise InputError(path, f"unknown base scale {base!r}; known: {', '.join(SCALES)} or a JSON scale file")
        settings = scale_settings(base)
        known = sorted(set().union(*SCALE_SETTINGS.values()) | {"base", "arms"})
        for key, value in custom.items():
            if key not in known:
                raise InputError(path, f"unknown setting {key!r}{_near(key, known)}; known: {', '.join(known)}")
            if isinstance(settings.get(key), dict) and not isinstance(value, dict):
                raise InputError(path, f"setting {key!r} must be a JSON object like the base scale's, got {value!r}")
        arms = custom.get("arms", {})
        if not isinstance(arms, dict):
            raise InputError(path, f"'arms' must map study names to lists of arm names, got {arms!r}")
        for study, names in arms.items():
            if study not in ARM_NAMES:
                raise InputError(path, f"arms: unknown study {study!r}{_near(study, STUDIES)}; known: "
                                       f"{', '.join(STUDIES)}")  # fmt: skip
            try:
                check_arm_names(study, names, ARM_NAMES[study], f"arms.{study}")
            except ValueError as error:
                raise InputError(path, str(error)) from None
        settings.update(custom)
        return settings
    raise ValueError(f"unknown scale {scale!r}; expected one of {SCALES} or a JSON file of settings")


def _arm_subset(study: Study, given: Sequence[str] | None, known: Sequence[str], option: str) -> Sequence[str] | None:
    """Arms chosen on the command line (``--<option>``), else by the scale's ``arms`` (None: all); names the study
    does not know are refused, naming where they came from."""
    chosen = given or study.settings.get("arms", {}).get(study.name)
    if chosen:
        check_arm_names(study.name, chosen, known, f"--{option}" if given else f"{study.scale}: arms.{study.name}")
    return chosen


def _log(message: str) -> None:
    rank, world = distributed_context()
    prefix = f"[rank {rank}] " if world > 1 else ""
    print(f"{prefix}{message}", flush=True)


# ---------------------------------------------------------------------------------------------------------------
# data


def phantom_data(data_dir: str | os.PathLike, settings: Mapping[str, Any], seed: int = 0) -> Path:
    """The phantom data set of a scale (made once, reused). ``settings["phantom"]``: ``n_cases``, ``shape``,
    ``tumor_fraction``, ``test_fraction`` and optionally ``spacing`` (mm; by default the field of view covers the body,
    see ``tools.phantom.make_dataset``)."""
    from tools.phantom import make_dataset

    data_dir = Path(data_dir)
    p = settings["phantom"]
    if (data_dir / "dataset.json").is_file():
        meta = json.loads((data_dir / "dataset.json").read_text())
        patients = {r.get("patient") for section in ("training", "test") for r in meta.get(section, [])}
        if len(patients) != p["n_cases"]:
            raise ValueError(f"{data_dir} holds a phantom of {len(patients)} patients, this scale makes "
                             f"{p['n_cases']}: use another --out or delete that folder")  # fmt: skip
        made = meta.get("generator", {}).get("params", {})
        wanted = {"shape": [int(v) for v in p["shape"]], "seed": int(seed),
                  "spacing": None if p.get("spacing") is None else [float(v) for v in p["spacing"]],
                  "tumor_fraction": float(p["tumor_fraction"]), "test_fraction": float(p["test_fraction"])}  # fmt: skip
        differ = {k: (made[k], v) for k, v in wanted.items() if k in made and made[k] != v}
        if differ:
            raise ValueError(f"{data_dir} holds a phantom made with other settings (made, this scale): {differ}; use "
                             f"another --out or delete that folder")  # fmt: skip
    else:
        spacing = "" if p.get("spacing") is None else f" at {tuple(p['spacing'])} mm"
        _log(f"phantom data set: {p['n_cases']} patients {tuple(p['shape'])}{spacing}, seed {seed} -> {data_dir}")
        make_dataset(data_dir, n_cases=p["n_cases"], seed=seed, shape=tuple(p["shape"]), spacing=p.get("spacing"),
                     tumor_fraction=p["tumor_fraction"], test_fraction=p["test_fraction"], progress=False)  # fmt: skip
    return data_dir


def prepared_split(
    source: str | os.PathLike,
    out_dir: str | os.PathLike,
    mode: str,
    out_shape: Sequence[int] | None = None,
    margin_mm: float = 10.0,
    val_fraction: float = 0.2,
    seed: int = 0,
) -> Path:
    """Crop ``source`` (``tools.prep``, HU kept) and write ``split.json``: training / validation (by patient,
    stratified by ``has_tumor`` when present) / test (the source's). Made once; returns the datalist path."""
    from tools.prep import prepare_dataset
    from tools.splits import load_records, split_by_patient, write_datalist

    out_dir = Path(out_dir)
    split_json = out_dir / "split.json"
    if split_json.is_file():
        return split_json
    prepare_dataset(source, out_dir, mode=mode, out_shape=None if out_shape is None else tuple(out_shape),
                    margin_mm=margin_mm, hu_window=None)  # fmt: skip
    loaded = load_records(out_dir / "dataset.json")
    training = loaded.records("training")
    stratify = "has_tumor" if all("has_tumor" in r for r in training) else None
    split = split_by_patient(training, (1.0 - val_fraction, val_fraction, 0.0), seed=seed, stratify_key=stratify)
    prep = json.loads((out_dir / "dataset.json").read_text()).get("prep")
    datalist = {"prep": prep, "training": split["training"], "validation": split["validation"],
                "test": loaded.records("test") if "test" in loaded.sections else []}  # fmt: skip
    write_datalist(datalist, split_json, base_dir=None)
    return split_json


def check_given_sets(real: Path, synthetic: Mapping[str, Path]) -> None:
    """Check the ratio study's given sets before any job runs (a bad file would otherwise stop a job half-way and
    leave its folder behind): every real file as CT with labels 0/1/2, every synthetic file readable with a valid
    label (not required to look like CT: a poor generator is what the study measures), and a validation section
    in the real datalist (the 100:0 arms have no real training case to take one from)."""
    from tools.datasets import LABEL_SET, validate_records
    from tools.errors import InputError
    from tools.splits import load_records

    loaded = load_records(real)
    if not loaded.sections.get("validation"):
        raise InputError(
            real,
            "has no 'validation' section: the 100:0 arms train on synthetic cases only and need "
            "real validation cases (`tools data split` writes training / validation / test)",
        )
    validate_records(loaded.records(None), allowed_labels=LABEL_SET)
    for name, path in synthetic.items():
        validate_records(load_records(path).records(None), check_ct=False, allowed_labels=LABEL_SET)


def _records(datalist: str | os.PathLike, section: str) -> list[dict]:
    from tools.splits import load_records

    loaded = load_records(datalist)
    return loaded.records(section) if section in loaded.sections else []


def tumor_size_classes(split_json: str | os.PathLike, out_json: str | os.PathLike) -> Path | None:
    """seed 001's size classes: quartiles of the equivalent radius of the training set's tumors (None if no
    tumors, then difftumor's reference classes are used)."""
    from tools.tumor_stats import write_tumor_stats

    out_json = Path(out_json)
    stats = json.loads(out_json.read_text()) if out_json.is_file() else None
    if stats is None:
        stats = write_tumor_stats(split_json, out_json, section="training")
    if not stats["n_tumors"]:
        _log("no tumor in the training set, so no size quartiles; using difftumor's reference size classes")
        return None
    return out_json


# ---------------------------------------------------------------------------------------------------------------
# one seg_unet3d training + evaluation


def train_and_evaluate_seg(
    folder: str | os.PathLike,
    datalist: str | os.PathLike,
    seed: int,
    overrides: Mapping[str, Any],
    configs: Sequence[str] = SEG_CONFIGS,
    online_augmentation: Any = None,
    timing: dict[str, float] | None = None,
    eval_overrides: Mapping[str, Any] | None = None,
    train: bool = True,
    evaluate: bool = True,
) -> dict[str, Any] | None:
    """Train seg_unet3d on ``datalist`` (its training/validation sections) and evaluate ``model.pt`` on its test
    section; returns flat metrics (pancreas / tumor Dice, NSD, HD95, detection) and writes ``curve.json``.
    ``timing``, when given, receives the wall seconds of ``training`` and ``evaluation``; ``eval_overrides`` are keys
    of ``evaluate.json`` only (its post-processing, e.g. ``min_tumor_mm3``); ``train=False`` evaluates the
    ``model.pt`` a finished training left in ``folder``; ``evaluate=False`` trains only (returns None)."""
    from tools.bundles import run_config

    folder = Path(folder)
    datalist = Path(datalist).resolve()
    base = {
        "dataset_dir": str(datalist.parent),
        "datalist": str(datalist),
        "ckpt_dir": str((folder / "models").resolve()),
        "output_dir": str((folder / "train").resolve()),
        "seed": int(seed),
        **dict(overrides),
    }
    train_over = dict(base)
    if online_augmentation is not None:
        train_over["online_augmentation"] = online_augmentation
    started = time.perf_counter()
    if train:
        run_config("seg_unet3d", list(configs), train_over, workflow_type="train")
    trained = time.perf_counter()
    if not evaluate:
        if timing is not None:
            timing["training"] = trained - started
        return None
    eval_over = {**base, **dict(eval_overrides or {}), "output_dir": str((folder / "eval").resolve())}
    run_config("seg_unet3d", [*configs, "evaluate.json"], eval_over, workflow_type="train")
    if timing is not None:
        timing.update({"training": trained - started, "evaluation": time.perf_counter() - trained})
    summary = json.loads((folder / "eval" / "summary.json").read_text())
    curves = read_training_curves(folder / "train" / "tensorboard")
    write_json(folder / "curve.json", curves)
    return flatten_seg_summary(summary)


def flatten_seg_summary(summary: Mapping[str, Any]) -> dict[str, float]:
    """seg_unet3d's ``summary.json`` -> ``{pancreas_dice, pancreas_nsd, pancreas_hd95, tumor_*, sens_<bin>,
    lesions_<bin>, specificity, patient_sensitivity}`` (means over the test cases whose ground truth has the
    region)."""
    out: dict[str, float] = {}
    for row in summary.get("regions", []):
        out[f"{row['region']}_{row['metric']}"] = _number(row.get("mean"))
    for row in summary.get("detection", []):
        out[f"sens_{row['bin']}"] = _number(row.get("sensitivity"))
        out[f"lesions_{row['bin']}"] = _number(row.get("lesions"))
    for key in ("specificity", "patient_sensitivity"):
        if key in summary.get("patient", {}):
            out[key] = _number(summary["patient"][key])
    return out


def _number(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def read_training_curves(log_dir: str | os.PathLike) -> dict[str, list[list[float]]]:
    """Scalars of the TensorBoard logs a bundle wrote (``train_loss`` per iteration, validation metrics per
    epoch) as ``{tag: [[step, value], ...]}``; empty when no log exists."""
    log_dir = Path(log_dir)
    if not log_dir.is_dir():
        return {}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    curves: dict[str, list[list[float]]] = {}
    for events in sorted(log_dir.rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags().get("scalars", []):
            curves.setdefault(tag, []).extend([[float(e.step), float(e.value)] for e in acc.Scalars(tag)])
    return {tag: sorted(values) for tag, values in curves.items()}


#: the size classes are quartiles of the labels' equivalent radii (``tumor_size_classes``), so difftumor's mask
#: generator reads them as such (its default, the reference's ``"ellipsoid"``, reads them as radii before the
#: clipping to the organ, which gives smaller tumors than the classes)
SIZE_MEASURE = "label"


def tumor_synthesis_transform(family: str, tumor_probs: Any, settings: Mapping[str, Any], size_classes=None):
    """difftumor's ``TumorSynthesisd`` (loaded under the alias ``difftumor_scripts``) for seg_unet3d's
    ``online_augmentation`` slot."""
    from tools.bundles import import_bundle_scripts

    scripts = import_bundle_scripts("difftumor", "difftumor_scripts")
    import importlib

    transforms = importlib.import_module("difftumor_scripts.transforms")
    family_args = dict(settings.get("tumor_family_args", {}).get(family, {}))
    if size_classes is not None and family in ("difftumor", "handcrafted"):
        family_args.setdefault("mask_generator", {"classes": str(size_classes), "size_measure": SIZE_MEASURE})
    del scripts
    return transforms.TumorSynthesisd(keys=["image", "label"], family=family, family_args=family_args, prob=0.5,
                                      tumor_probs=tumor_probs)  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# generative bundles: brief training and synthesis (the inputs of the ratio and crop-context studies)


#: vae_ct's generator families: the overlay of ``train.json`` and the one of ``inference.json`` (the bundle's docs)
VAE_FAMILIES: dict[str, tuple[list[str], list[str]]] = {
    "vae": ([], []),
    "vae_gan": (["train_vaegan.json"], ["inference_vaegan.json"]),
    "gan": (["train_gan.json"], ["inference_gan.json"]),
}


def train_vae(crops_split: Path, ckpt_dir: Path, settings: Mapping[str, Any], seed: int = 0,
              family: str = "vae") -> Path:  # fmt: skip
    """vae_ct on 3D crops (``train_3d.json``, after the ``family`` overlay as the bundle's docs ask); reuses a
    finished ``model.pt``. ``settings["vae"]`` gives the overrides (network, epochs, and a family's own keys)."""
    from tools.bundles import run_config

    if (ckpt_dir / "model.pt").is_file() and (ckpt_dir / "done.json").is_file():
        return ckpt_dir
    over = {
        "dataset_dir": str(crops_split.parent),
        "datalist_file": str(crops_split),
        "val_key": "validation",
        "ckpt_dir": str(ckpt_dir),
        "output_dir": str(ckpt_dir / "eval"),
        "seed": seed,
        **vae_net_overrides(settings),
        **{k: v for k, v in settings["vae"].items() if k not in _VAE_NET_KEYS},
    }
    started = time.time()
    run_config("vae_ct", ["train.json", *VAE_FAMILIES[family][0], "train_3d.json"], over, workflow_type="train")
    write_json(ckpt_dir / "done.json", {"seconds": round(time.time() - started, 1)})
    return ckpt_dir


_VAE_NET_KEYS = ("strides", "channels", "latent_size", "gan_channels", "gan_strides", "gan_convs_per_stage")


def vae_net_overrides(settings: Mapping[str, Any]) -> dict[str, Any]:
    net = {k: v for k, v in settings["vae"].items() if k in _VAE_NET_KEYS}
    if settings.get("crop_shape") and net:
        net["roi_size"] = list(settings["crop_shape"])
    return net


def train_ldm(crops_split: Path, ckpt_dir: Path, settings: Mapping[str, Any], crop_mode: str, seed: int = 0,
              controlnet: bool = True) -> Path:  # fmt: skip
    """ldm_abdomen: autoencoder, diffusion model, and (for image + label pairs) the ControlNet on the mask."""
    from tools.bundles import run_config

    base = {"dataset_dir": str(crops_split.parent), "ckpt_dir": str(ckpt_dir), "output_dir": str(ckpt_dir / "eval"),
            "crop_mode": crop_mode, "prep_out_shape": _prep_shape(crops_split), "seed": seed,
            **ldm_image_size(settings), **settings["ldm_nets"],
            **settings["ldm_train"]}  # fmt: skip
    # train on the split's training patients only: the bundle's default datalist is the folder's dataset.json, whose
    # training section also holds the patients the studies keep for validation
    for key, sections in (("train_datalist", "'training'"), ("val_datalist", "['validation', 'test']")):
        base[key] = f"$scripts.data.load_datalist(@dataset_dir, {sections}, datalist_file={str(crops_split)!r})"
    stages = [("autoencoder", ["train.json", "train_autoencoder.json"]), ("diffusion", ["train.json"])]
    if controlnet:
        stages.append(("controlnet", ["train.json", "train_controlnet.json"]))
    for stage, configs in stages:
        marker = ckpt_dir / f"done_{stage}.json"
        if marker.is_file():
            continue
        over = {**base, **settings["ldm_stage"].get(stage, {})}
        if stage in settings["ldm_epochs"]:
            over["train#trainer#max_epochs"] = settings["ldm_epochs"][stage]
        _log(f"ldm_abdomen {crop_mode}: training the {stage}")
        started = time.time()
        run_config("ldm_abdomen", configs, over, workflow_type="train")
        write_json(marker, {"seconds": round(time.time() - started, 1)})
    return ckpt_dir


def _prep_shape(split_json: Path) -> list[int] | None:
    """The ``out_shape`` the crops next to ``split_json`` were resized to (ldm_abdomen checks it)."""
    prep = json.loads((Path(split_json).parent / "dataset.json").read_text()).get("prep") or {}
    return prep.get("out_shape")


def _prep_mode(split_json: Path) -> str:
    prep = json.loads((Path(split_json).parent / "dataset.json").read_text()).get("prep") or {}
    return prep.get("mode", "none")


def ldm_controlnet_net(settings: Mapping[str, Any]) -> dict[str, Any]:
    """The ControlNet's network keys of the scale's ``ldm_stage.controlnet`` (inference needs the same network; the
    stage's training keys, e.g. its learning rate, are no keys of the inference configs)."""
    stage = settings["ldm_stage"].get("controlnet", {})
    return {k: v for k, v in stage.items() if k == "conditioning_embedding_channels" or k.startswith("controlnet_def")}


def ldm_image_size(settings: Mapping[str, Any]) -> dict[str, Any]:
    return {"image_size": list(settings["crop_shape"])} if settings.get("ldm_nets") else {}


def synthesize_set(bundle: str, source: Path, out: Path, ckpt_dir: Path, settings: Mapping[str, Any],
                   seed: int = 0, samples_per_item: int = 1, section: str = "training",
                   family: str = "vae", gate: Mapping[str, Any] | None = None) -> Path:  # fmt: skip
    """H1's ``tools.synthesize.synthesize`` with the scale's network overrides (vae_ct: of the generator
    ``family``), ``samples_per_item`` per mask of ``section``; returns the datalist JSON. ``gate``: synthesize's
    quality-gate arguments (``quality_gate``, ``gate_reference``, ``gate_overrides``...)."""
    from tools.synthesize import GENERATORS, synthesize

    if bundle == "vae_ct":
        overrides = vae_net_overrides(settings)
        base, three_d = GENERATORS["vae_ct"].configs
        configs = None if family == "vae" else [base, *VAE_FAMILIES[family][1], three_d]
    else:
        overrides = {
            **ldm_image_size(settings),
            **settings["ldm_nets"],
            **settings["ldm_infer"],
            **ldm_controlnet_net(settings),
            "prep_out_shape": _prep_shape(source),
            "crop_mode": _prep_mode(source),
        }
        configs = None
    started = time.time()
    existed = (Path(out) / "datalist.json").is_file()
    path = synthesize(bundle, source, out, ckpt_dir=ckpt_dir, configs=configs, overrides=overrides or None,
                      samples_per_item=samples_per_item, seed=seed, section=section, progress=False,
                      **dict(gate or {}))  # fmt: skip
    if not existed and not (Path(out) / "done.json").is_file():
        write_json(Path(out) / "done.json", {"seconds": round(time.time() - started, 1)})
    path = Path(path)
    return path if path.suffix == ".json" else path / "datalist.json"


def _marker_seconds(*markers: Path) -> float | None:
    """Sum of the ``seconds`` recorded in finished-step markers (the time the work took when it was done); None
    when no marker exists (made by an older run that did not record it)."""
    found = [m for m in markers if m.is_file()]
    if not found:
        return None
    return round(sum(json.loads(m.read_text()).get("seconds", 0.0) for m in found), 1)


def generative_sets(out: Path, settings: Mapping[str, Any], data_dir: Path | None = None) -> dict[str, Any]:
    """The ratio study's inputs, made once under ``out/generative``: phantom -> pancreas crops + split -> vae_ct and
    ldm_abdomen (ControlNet) trained briefly -> one synthetic image + label per real training mask and generator."""
    root = out / "generative"
    data_dir = data_dir or phantom_data(out / "data" / "phantom", settings)
    crops = prepared_split(data_dir, out / "data" / "crops_pancreas", "pancreas", settings["crop_shape"])
    _log("vae_ct: training (3D crops)")
    vae_ckpt = train_vae(crops, root / "vae_ct" / "models", settings)
    ldm_ckpt = train_ldm(crops, root / "ldm_abdomen" / "models", settings, "pancreas")
    _log("vae_ct: synthesizing one case per training mask")
    vae_set = synthesize_set("vae_ct", crops, root / "vae_ct" / "synthetic", vae_ckpt, settings)
    _log("ldm_abdomen: synthesizing one image + label pair per training mask")
    ldm_set = synthesize_set("ldm_abdomen", crops, root / "ldm_abdomen" / "synthetic", ldm_ckpt, settings)
    times = {
        "vae_train_s": _marker_seconds(vae_ckpt / "done.json"),
        "vae_synthesis_s": _marker_seconds(root / "vae_ct" / "synthetic" / "done.json"),
        "ldm_train_s": _marker_seconds(*sorted(ldm_ckpt.glob("done_*.json"))),
        "ldm_synthesis_s": _marker_seconds(root / "ldm_abdomen" / "synthetic" / "done.json"),
    }
    write_json(root / "generative.json", {"crops": str(crops), "vae": str(vae_set), "dm": str(ldm_set), **times})
    return {"crops": crops, "synthetic": {"VAE": vae_set, "DM": ldm_set}, "times": times, "data_dir": data_dir,
            "ckpts": {"vae_ct": vae_ckpt, "ldm_abdomen": ldm_ckpt}}  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# study definitions


class Study:
    """One study: its arms, how one job runs, which metrics go in the table and the figures."""

    name = ""
    title = ""
    #: the scale settings this study's results depend on (a rerun into the same folder must not change them)
    uses: Sequence[str] = ()
    metrics: Sequence[str] = ()
    figure_metrics: Sequence[str] = ()

    def __init__(self, out: Path, scale: str, seeds: Sequence[int] | None = None, **options: Any):
        self.root = Path(out)
        self.out = self.root / self.name
        self.scale = scale
        self.settings = scale_settings(scale)
        self.seeds = list(seeds) if seeds is not None else list(self.settings["seeds"])
        self.options = options
        self.arms()  # unknown arm names (scale file, --generators, --sizes, --families) are refused here, at start

    def prepare(self) -> dict[str, Any]:
        """Shared inputs (data, synthetic sets), made by process 0 before the jobs (others wait for them)."""
        return {}

    def arms(self) -> list[tuple[str, dict[str, Any]]]:
        raise NotImplementedError

    def run_job(self, job: Job, folder: Path) -> Mapping[str, Any]:
        raise NotImplementedError

    def jobs(self) -> list[Job]:
        return [Job(arm, seed, params) for arm, params in self.arms() for seed in self.seeds]

    def fingerprint(self) -> dict[str, Any]:
        """What the finished jobs of a folder were made with: seeds, arms and the settings the study uses."""
        used = {k: self.settings.get(k) for k in self.uses}
        return json.loads(json.dumps({"seeds": self.seeds, "arms": dict(self.arms()), "settings": used}))

    def check_reuse(self) -> None:
        """Refuse to mix results of other settings: finished jobs in ``out`` are reused only when the saved
        fingerprint equals this run's (new seeds or arms may be added)."""
        saved_file = self.out / "settings.json"
        if not saved_file.is_file():
            return
        saved = json.loads(saved_file.read_text()).get("fingerprint")
        if saved is None:
            return
        now = self.fingerprint()
        changed = [k for k in self.uses if saved["settings"].get(k) != now["settings"].get(k)]
        changed += [a for a, p in now["arms"].items() if a in saved["arms"] and saved["arms"][a] != p]
        if changed:
            raise ValueError(f"{self.out} holds results made with other settings ({', '.join(changed)}); use another "
                             "--out or delete that folder")  # fmt: skip

    def describe(self) -> dict[str, Any]:
        return {"study": self.name, "title": self.title, "scale": self.scale, "seeds": self.seeds,
                "arms": {arm: params for arm, params in self.arms()}, "settings": self.settings,
                "options": {k: str(v) for k, v in self.options.items()},
                "fingerprint": self.fingerprint()}  # fmt: skip


class RatioStudy(Study):
    uses = ("phantom", "crop_shape", "seg", "vae", "ldm_nets", "ldm_train", "ldm_stage", "ldm_epochs", "ldm_infer")
    name = "ratio"
    title = "Synthetic:real ratios (seed 000 Table 1): binary pancreas Dice on real test crops"
    metrics = ("pancreas_dice", "pancreas_nsd", "pancreas_hd95")
    figure_metrics = ("pancreas_dice",)

    def prepare(self) -> dict[str, Any]:
        synthetic = self.options.get("synthetic")
        if synthetic:
            crops = Path(self.options["real"]) if self.options.get("real") else None
            if crops is None:
                raise ValueError("--synthetic needs --real (the real datalist the synthetic sets were made from)")
            sets = {k: Path(v) for k, v in synthetic.items()}
            check_given_sets(crops, sets)
            return {"crops": crops, "synthetic": sets}
        return generative_sets(self.root, self.settings, self.options.get("data"))

    def arms(self):
        synthetic = self.options.get("synthetic")
        known = tuple(synthetic) if synthetic else ARM_NAMES["ratio"]
        generators = _arm_subset(self, self.options.get("generators"), known, "generators")
        if generators is None:
            generators = ["VAE", "DM", "VAE+DM"]
            if synthetic:  # the default arms need sets named VAE and DM
                check_arm_names("ratio", generators, known, "--synthetic without --generators (default VAE,DM,VAE+DM)")
        arms = [("real only", {"generators": [], "ratio": "0:100"})]
        for gen in generators:
            for ratio in RATIOS:
                arms.append((f"{gen} {ratio}", {"generators": gen.split("+"), "ratio": ratio}))
        return arms

    def run_job(self, job: Job, folder: Path):
        from tools.mix import write_mix

        inputs = self.inputs
        mix_json = folder / "mix.json"
        synthetic = {g: str(inputs["synthetic"][g]) for g in job.params["generators"]}
        if not mix_json.is_file():
            write_mix(inputs["crops"], synthetic, job.params["ratio"], mix_json, seed=job.seed, replace=True)
        return train_and_evaluate_seg(folder, mix_json, job.seed, self.settings["seg"], SEG_BINARY)


class _TumorStudy(Study):
    """Shared data of the tumor studies: tumor-bearing crops around the pancreas, with a validation split."""

    uses = (
        "phantom",
        "tumor_margin_mm",
        "tumor_seg",
        "tumor_seg_configs",
        "tumor_eval",
        "tumor_family_args",
        "default_family",
    )

    metrics = ("tumor_dice", "tumor_nsd", "pancreas_dice")
    figure_metrics = ("tumor_dice", "tumor_nsd")

    def prepare(self):
        data = self.options.get("data") or phantom_data(self.root / "data" / "phantom", self.settings)
        split = prepared_split(data, self.root / "data" / "crops_tumor", "pancreas",
                               margin_mm=self.settings["tumor_margin_mm"])  # fmt: skip
        classes = tumor_size_classes(split, self.root / "data" / "tumor_sizes.json")
        return {"split": split, "size_classes": classes}

    def family(self) -> str:
        return self.options.get("family") or self.settings["default_family"]


class TumorSizeStudy(_TumorStudy):
    name = "tumor_size"
    title = "Synthetic tumor sizes (seed 001 Table 1): tumor DSC and NSD on real tumor test cases"

    def arms(self):
        sizes = _arm_subset(self, self.options.get("sizes"), TUMOR_SIZES, "sizes") or list(TUMOR_SIZES)
        family = self.options.get("family")
        check_arm_names("tumor_families", [self.family()], FAMILIES,
                        "--family" if family else f"{self.scale}: default_family")  # fmt: skip
        return [("none", {"size": None})] + [(size, {"size": size}) for size in sizes]

    def run_job(self, job, folder):
        size = job.params["size"]
        transform = None
        if size is not None:
            transform = tumor_synthesis_transform(self.family(), size, self.settings, self.inputs["size_classes"])
        return train_and_evaluate_seg(folder, self.inputs["split"], job.seed, self.settings["tumor_seg"],
                                      self.settings["tumor_seg_configs"], online_augmentation=transform,
                                      eval_overrides=self.settings["tumor_eval"])  # fmt: skip

    def describe(self):
        return {**super().describe(), "family": self.family()}


class LabelNoiseStudy(_TumorStudy):
    name = "label_noise"
    title = "Noisy tumor labels (seed 001 Tables 2-3): tumor DSC and NSD on clean real test labels"

    def arms(self):
        levels = _arm_subset(self, self.options.get("levels"), NOISE_LEVELS, "levels") or list(NOISE_LEVELS)
        return [("clean", {"level": None})] + [(level, {"level": level}) for level in levels]

    def run_job(self, job, folder):
        datalist = self.inputs["split"]
        if job.params["level"] is not None:
            datalist = noisy_copy(datalist, folder / "noisy", job.params["level"], job.seed)
        return train_and_evaluate_seg(folder, datalist, job.seed, self.settings["tumor_seg"],
                                      self.settings["tumor_seg_configs"],
                                      eval_overrides=self.settings["tumor_eval"])  # fmt: skip


def noisy_copy(datalist: Path, out_dir: Path, level: str, seed: int) -> Path:
    """A datalist whose training labels are copies with difftumor's ``NoisyTumorLabeld`` noise (seeded per case);
    validation and test keep the clean labels. The measured Dice of each noisy label vs its clean one is saved."""
    import importlib

    import nibabel as nib

    from tools.bundles import import_bundle_scripts
    from tools.io import save_nifti
    from tools.splits import load_records, write_datalist

    out_json = out_dir / "datalist.json"
    if out_json.is_file():
        return out_json
    import_bundle_scripts("difftumor", "difftumor_scripts")
    noise = importlib.import_module("difftumor_scripts.label_noise")
    loaded = load_records(datalist)
    training, dices = [], []
    for k, record in enumerate(loaded.records("training")):
        image = nib.load(record["label"])
        label = np.asarray(image.dataobj).astype(np.uint8)
        rng = np.random.RandomState(seed * 100003 + k)
        noisy = noise.noisy_tumor_label(label, noise._sigma_mm(level), rng, image.affine)
        if (label == 2).any():
            dices.append(float(noise.dice(label == 2, noisy == 2)))
        target = out_dir / Path(record["label"]).name
        save_nifti(
            target, noisy.astype(np.uint8), image.affine, descrip=f"noisy tumor label level={level}", intent_label=True
        )
        training.append({**record, "label": str(target)})
    sections = {s: recs for s, recs in loaded.sections.items() if s != "training"}
    write_datalist({"training": training, **sections}, out_json, base_dir=None)
    write_json(out_dir / "noise.json", {"level": level, "seed": seed, "tumor_dice_vs_clean": dices,
                                        "mean_dice": float(np.mean(dices)) if dices else None})  # fmt: skip
    return out_json


class TumorFamiliesStudy(_TumorStudy):
    name = "tumor_families"
    title = "Tumor synthesis families: detection sensitivity per tumor size bin (real tumor test cases)"
    metrics = ("sens_all", "sens_[0,5)", "sens_[5,10)", "sens_[10,15)", "sens_[15,20)", "sens_>=20", "tumor_dice",
               "specificity")  # fmt: skip
    figure_metrics = ("sens_all", "tumor_dice")

    def arms(self):
        families = _arm_subset(self, self.options.get("families"), FAMILIES, "families") or list(FAMILIES)
        return [("none", {"family": None})] + [(f, {"family": f}) for f in families]

    def run_job(self, job, folder):
        family = job.params["family"]
        transform = None
        if family is not None:
            transform = tumor_synthesis_transform(family, "mixed", self.settings, self.inputs["size_classes"])
        return train_and_evaluate_seg(folder, self.inputs["split"], job.seed, self.settings["tumor_seg"],
                                      self.settings["tumor_seg_configs"], online_augmentation=transform,
                                      eval_overrides=self.settings["tumor_eval"])  # fmt: skip


class CropContextStudy(Study):
    uses = ("phantom", "crop_shape", "ldm_nets", "ldm_train", "ldm_stage", "ldm_epochs", "ldm_infer")
    name = "crop_context"
    title = "Crop context (seed 002): ldm_abdomen per crop mode, synthetic-image metrics"
    metrics = ()  # every numeric metric evaluate_synthetic returns
    figure_metrics = ()

    def prepare(self):
        data = self.options.get("data") or phantom_data(self.root / "data" / "phantom", self.settings)
        splits = {}
        for mode, _ in self.arms():
            splits[mode] = prepared_split(data, self.root / "data" / f"crops_{mode}", mode, self.settings["crop_shape"])
        return {"splits": splits}

    def arms(self):
        modes = _arm_subset(self, self.options.get("modes"), CROP_MODES, "modes") or list(CROP_MODES)
        return [(mode, {"mode": mode}) for mode in modes]

    def run_job(self, job, folder):
        from tools.evaluation import evaluate_synthetic

        split = self.inputs["splits"][job.params["mode"]]
        ckpt = train_ldm(split, folder / "models", self.settings, job.params["mode"], seed=job.seed)
        synthetic = synthesize_set("ldm_abdomen", split, folder / "synthetic", ckpt, self.settings, seed=job.seed)
        result = evaluate_synthetic(synthetic, split, folder / "evaluation",
                                    seg_ckpt=self.options.get("seg_ckpt"))  # fmt: skip
        return flatten_numbers(result)


def flatten_numbers(obj: Any, prefix: str = "") -> dict[str, float]:
    """Numeric leaves of a nested dict as ``a.b.c`` keys (lists and strings are left out)."""
    out: dict[str, float] = {}
    if isinstance(obj, Mapping):
        for key, value in obj.items():
            out.update(flatten_numbers(value, f"{prefix}{key}."))
    elif isinstance(obj, (bool, np.bool_)):
        out[prefix[:-1]] = float(obj)
    elif isinstance(obj, (int, float, np.integer, np.floating)):
        out[prefix[:-1]] = float(obj)
    return out


STUDY_CLASSES: dict[str, type[Study]] = {
    cls.name: cls for cls in (RatioStudy, TumorSizeStudy, LabelNoiseStudy, CropContextStudy, TumorFamiliesStudy)
}


# ---------------------------------------------------------------------------------------------------------------
# running a study and writing its table and figures


def run_study(
    name: str,
    out: str | os.PathLike = "runs/studies",
    scale: str = "demo",
    seeds: Sequence[int] | None = None,
    threads: int = 1,
    progress: bool = True,
    **options: Any,
) -> list[dict] | None:
    """Run one study (all arms x seeds), resumably; under torchrun the jobs are shared between the processes.
    Returns the aggregated table on process 0 (None elsewhere)."""
    if name not in STUDY_CLASSES:
        raise ValueError(f"unknown study {name!r}; expected one of {sorted(STUDY_CLASSES)}")
    import torch

    previous_threads = torch.get_num_threads()
    try:
        return _run_study(name, out, scale, seeds, threads, progress, **options)
    finally:
        torch.set_num_threads(previous_threads)


def _run_study(name, out, scale, seeds, threads, progress, **options) -> list[dict] | None:
    import torch

    study = STUDY_CLASSES[name](Path(out), scale, seeds, **options)
    rank, world = distributed_context()
    study.out.mkdir(parents=True, exist_ok=True)
    ready = study.out / "inputs.json"
    started = time.time()
    if rank == 0:
        ready.unlink(missing_ok=True)
        study.check_reuse()
        torch.set_num_threads(max(1, threads * world))
        study.inputs = study.prepare()
        write_json(ready, {k: _jsonable(v) for k, v in study.inputs.items()})
        write_json(study.out / "settings.json", study.describe())
    else:
        while not ready.is_file():
            time.sleep(2.0)
        study.inputs = _from_json(json.loads(ready.read_text()))
    jobs = study.jobs()
    _log(f"study {name} ({scale}): {len(jobs)} jobs ({len(study.arms())} arms x {len(study.seeds)} seeds) "
         f"-> {study.out}")  # fmt: skip
    rows = run_jobs(jobs, study.out, study.run_job, threads_per_job=threads, progress=progress)
    if rows is None:
        return None
    table = write_study_outputs(study, rows)
    _log(f"study {name} done in {time.time() - started:.0f} s: {study.out / 'table.md'}")
    return table


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return {"__path__": str(value)}
    if isinstance(value, Mapping):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


def _from_json(value: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == {"__path__"}:
            return Path(value["__path__"])
        return {k: _from_json(v) for k, v in value.items()}
    return value


def _metric_names(study: Study, rows: Sequence[Mapping[str, Any]]) -> list[str]:
    if study.metrics:
        return list(study.metrics)
    skip = {"arm", "seed", "seconds"}
    return [k for k in dict.fromkeys(k for r in rows for k in r) if k not in skip]


def write_study_outputs(study: Study, rows: Sequence[Mapping[str, Any]]) -> list[dict]:
    """results.csv (per job), table.csv / table.md (mean +- std per arm), bar charts, loss curves."""
    from tools.report import bar_chart, line_chart

    out = study.out
    metrics = _metric_names(study, rows)
    arms = [arm for arm, _ in study.arms()]
    _write_csv(out / "results.csv", rows)
    table = aggregate(rows, metrics, arms)
    _write_csv(out / "table.csv", table)
    columns = ["arm", "n_seeds", *metrics]
    lines = [f"# {study.title}", "", f"scale `{study.scale}`, seeds {study.seeds}; mean +- sample std over seeds", "",
             "| " + " | ".join(columns) + " |", "| " + " | ".join("---" for _ in columns) + " |"]  # fmt: skip
    for entry in table:
        lines.append("| " + " | ".join(str(entry.get(c, "")) for c in columns) + " |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    figures = []
    for metric in study.figure_metrics or metrics[:1]:
        values = [[float(r[metric]) for r in rows if r["arm"] == arm and _finite(r.get(metric))] for arm in arms]
        reference = None
        baseline = [v for v in values[0]] if values else []
        if baseline:
            reference = (f"{arms[0]} (mean)", float(np.mean(baseline)))
        groups = [arm.replace(" ", "\n") for arm in arms]  # readable tick labels for many arms
        figures.append(bar_chart(groups, {metric: values}, out / f"{slug(metric)}.png", ylabel=metric,
                                 title=f"{study.name}: {metric} (mean +- std, dots = seeds)",
                                 reference=reference))  # fmt: skip
    curves = {}
    for arm in arms:
        per_seed = []
        for seed in study.seeds:
            curve_file = out / "jobs" / slug(arm) / f"seed{seed}" / "curve.json"
            if curve_file.is_file():
                loss = json.loads(curve_file.read_text()).get("train_loss")
                if loss:
                    per_seed.append(loss)
        if per_seed:
            n = min(len(c) for c in per_seed)
            steps = [c[0] for c in per_seed[0][:n]]
            mean = np.mean([[c[1] for c in curve[:n]] for curve in per_seed], axis=0)
            curves[arm] = (steps, _smooth(mean))
    if curves:
        ylabel = "training loss (smoothed, mean of seeds)"
        figures.append(line_chart(curves, out / "loss_curves.png", "iteration", ylabel,
                                  title=f"{study.name}: training loss"))  # fmt: skip
    write_json(out / "figures.json", [str(Path(f).name) for f in figures])
    return table


def _smooth(values: np.ndarray, window: int = 10) -> list[float]:
    values = np.asarray(values, dtype=float)
    if values.size < window:
        return values.tolist()
    kernel = np.ones(window) / window
    padded = np.concatenate([np.full(window - 1, values[0]), values])
    return np.convolve(padded, kernel, mode="valid").tolist()


def _finite(value: Any) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def _write_csv(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    columns = list(dict.fromkeys(k for r in rows for k in r))
    tmp = path.with_name(f".{path.name}.part")
    with open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _csv_cell(row.get(k)) for k in columns})
    os.replace(tmp, path)


def _csv_cell(value: Any) -> Any:
    if isinstance(value, float):
        return f"{value:.6g}"
    return "" if value is None else value


def read_table(study_dir: str | os.PathLike) -> list[dict[str, str]]:
    """The ``table.csv`` of a finished study folder."""
    with open(Path(study_dir) / "table.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def clean_study(out: str | os.PathLike, name: str) -> None:
    """Remove a study's folder (its jobs included)."""
    shutil.rmtree(Path(out) / name, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------------
# the report of a folder of studies


def write_report(out: str | os.PathLike, title: str = "Pancreas CT synthesis: study report") -> tuple[Path, Path]:
    """``report.md`` + ``report.html`` in ``out`` from what is there: the demo's summary and phantom figures, the
    synthetic sets' evaluation (montages, HU histograms, memorization), and every study folder (table, bar charts
    with error bars, loss curves, settings)."""
    from tools.report import Report

    out = Path(out)
    report = Report(title)
    summary_file = out / "demo_summary.json"
    if summary_file.is_file():
        summary = json.loads(summary_file.read_text())

        def stages(run: Mapping[str, Any]) -> str:
            return ", ".join(f"{k} {v:.0f} s" for k, v in run.get("stages", {}).items())

        first = summary.get("first_run") or summary
        text = (
            f"Scale `{summary.get('scale')}` on this machine: {summary.get('n_training')} training and "
            f"{summary.get('n_test')} test patients of the procedural phantom (synthetic data, not patient CT). "
            f"Stage times of the run that made the results: {stages(first)} ({first.get('seconds')} s in all)."
        )
        if summary.get("first_run"):
            text += f" This report was rewritten by a later run that reused them: {stages(summary)}."
        report.paragraph(text)  # fmt: skip
    report.paragraph("Every number below was measured by the commands of this repository on the data named in each "
                     "section; mean +- sample standard deviation over the seeds of each arm, one dot per seed in "
                     "the bar charts. Nothing was tuned to reproduce the papers' conclusions.")  # fmt: skip
    if (out / "phantom_montage.png").is_file():
        report.heading("Data")
        report.figure(out / "phantom_montage.png", "Phantom cases (pancreas yellow, tumor red), W400 L40")
        if (out / "realism.png").is_file():
            report.figure(out / "realism.png", "Phantom beside the real CT of ../shared: slices and HU histograms")
    _report_generative(report, out)
    _report_generator_quality(report, out)
    for name in STUDIES:
        study_dir = out / name
        if (study_dir / "table.csv").is_file():
            _report_study(report, study_dir)
    return report.write(out)


def _report_generative(report, out: Path) -> None:
    evaluations = sorted((out / "generative").glob("evaluation_*/metrics.json"))
    info = out / "generative" / "generative.json"
    if not evaluations and not info.is_file():
        return
    report.heading("Synthetic sets")
    if info.is_file():
        gen = json.loads(info.read_text())
        times = ", ".join(f"{k} {'n/a' if v is None else v}" for k, v in gen.items() if k.endswith("_s"))
        report.paragraph(f"vae_ct (3D crops) and ldm_abdomen (autoencoder + diffusion + ControlNet on the mask) were "
                         f"trained on the real training crops, then made one image + label per training mask. "
                         f"Times: {times} (each step when it ran; `make demo` trains the two bundles in "
                         "parallel).")  # fmt: skip
    rows = []
    keys = (  # the Dice to the synthetic label first: does the real-data judge see the pancreas where it should?
        "pancreas_dice_to_synthetic_label",
        "pancreas_found_fraction",
        "n_synthetic",
        "hist_wasserstein_hu",
        "hist_jensen_shannon",
        "frechet_distance",
        "diversity_mean_ssim",
        "memorization_max_ncc",
        "memorization_n_near_copies",
    )
    for path in evaluations:
        name = path.parent.name.replace("evaluation_", "")
        metrics = json.loads(path.read_text())
        flat = flatten_numbers(metrics)
        row = {"generator": name}
        chosen = [k for k in keys if k in flat] or list(flat)[:8]
        for key in chosen:
            row[key] = flat[key]
        rows.append(row)
        for figure, caption in (("montage.png", "synthetic (top row) and real crops, through the tumor or pancreas"),
                                ("histogram.png", "HU histograms, synthetic vs real")):  # fmt: skip
            if (path.parent / figure).is_file():
                report.figure(path.parent / figure, f"{name}: {caption}")
    if rows:
        columns = list(dict.fromkeys(k for r in rows for k in r))
        report.table(
            rows,
            columns,
            caption="tools.evaluation.evaluate_synthetic of each synthetic set against the real crops; read "
            "pancreas_dice_to_synthetic_label first (the real-only model's pancreas against the synthetic label; "
            "found = that Dice >= 0.5); memorization = nearest real training case per sample",
        )


def _report_generator_quality(report, out: Path) -> None:
    """Issue 14's bars of the demo's generators (``tools.generator_quality.demo_quality``): one table per generator
    with measured / required / pass, its verdict and its montage."""
    path = out / "generative" / "quality.json"
    if not path.is_file():
        return
    quality = json.loads(path.read_text())
    report.heading("Generator quality: issue 14's bars")
    report.paragraph(
        "Each generator's samples from the masks of the held-out (validation + test) patients, which neither the "
        "judge nor the generator saw, against those patients' real crops; the judge is the ratio study's real-only "
        f"seg_unet3d (seed 0), training seed {quality['seed']}, two samples per mask. The Fréchet ceiling is the "
        "same generator untrained; the floor is the real training crops. benchmarks/generator_quality.py measures "
        "the same bars over two training seeds, and VAE-GAN and GAN beside the VAE."
    )
    for generator, result in quality["results"].items():
        rows = [{"bar": r["bar"], "measured": r["shown"], "required": r["required"], "pass": "yes" if r["pass"]
                 else "NO"} for r in result["rows"]]  # fmt: skip
        report.table(rows, ["bar", "measured", "required", "pass"], caption=result["verdict"])
        if result.get("montage") and Path(result["montage"]).is_file():
            report.figure(result["montage"], f"{generator}: real | synthetic | mask outlined on the synthetic, "
                          "held-out patients")  # fmt: skip


def _report_study(report, study_dir: Path) -> None:
    settings = json.loads((study_dir / "settings.json").read_text()) if (study_dir / "settings.json").is_file() else {}
    report.heading(settings.get("title") or study_dir.name)
    table = read_table(study_dir)
    metrics = [
        c for c in (table[0] if table else {}) if c not in ("arm", "n_seeds") and not c.endswith(("_mean", "_std"))
    ]
    report.table(
        table,
        ["arm", "n_seeds", *metrics],
        caption=f"scale {settings.get('scale')}, seeds {settings.get('seeds')}; mean +- std over seeds",
    )
    extra = []
    if settings.get("family"):
        extra.append(f"synthesis family: {settings['family']}")
    results = study_dir / "results.csv"
    if results.is_file():
        with open(results, newline="") as handle:
            seconds = [float(r["seconds"]) for r in csv.DictReader(handle) if r.get("seconds")]
        if seconds:
            extra.append(f"{len(seconds)} jobs, {np.mean(seconds):.0f} s each on average (one thread)")
    if extra:
        report.bullets(extra)
    figures = json.loads((study_dir / "figures.json").read_text()) if (study_dir / "figures.json").is_file() else []
    for name in figures:
        report.figure(study_dir / name, f"{study_dir.name}: {Path(name).stem}")
    report.paragraph(f"Per-job results: `{study_dir.name}/results.csv`; settings and overrides: "
                     f"`{study_dir.name}/settings.json`.")  # fmt: skip
