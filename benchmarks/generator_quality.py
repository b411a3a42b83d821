"""Benchmark: issue 14's quality bars of one whole-image generator, over training seeds, printed as a table.

    python benchmarks/generator_quality.py --generator vae_ct [--variants vae,vaegan,gan] [--seeds 0 1] [--scale S]
    python benchmarks/generator_quality.py --generator ldm_abdomen [--variants ldm,ldm_rflow] [--seeds 0 1] [--scale S]
    python benchmarks/generator_quality.py --generator vae_ct --smoke   # seconds: tiny sizes, in runs/..._smoke

``--scale`` (default ``benchmarks/generator_recipes.json``: the demo scale with the generators' CPU recipes) is a
scale of ``tools.studies`` or a JSON scale file. Results go to ``--out`` (default
``runs/generator_quality/<generator>``). Steps:

1. data, as the demo makes them for ``--scale``: the phantom (the scale's ``phantom`` settings, seed 0), pancreas
   crops of ``crop_shape`` with the patient split training / validation / test (``tools.studies.prepared_split``);
   the held-out masks are those of the validation and test patients (``heldout.json`` beside ``split.json``);
2. the judge: seg_unet3d (binary pancreas, the scale's ``seg`` overrides, seed 0) trained on the real training crops
   (``tools.studies.train_and_evaluate_seg``, as the demo's ratio study trains its real-only arm; the validation
   patients only pick its best epoch); bar: its pancreas Dice on the real test crops >= 0.6;
3. the generator trained with the scale's recipe once per ``--seeds`` seed, the seeds in parallel as separate processes
   of one thread each, as the demo trains its two generators; vae_ct: one training per variant (VAE, VAE-GAN, GAN:
   ``train.json`` + the family's overlay + ``train_3d.json``); ldm_abdomen: autoencoder, diffusion model, ControlNet
   (``ldm``: the recipe's noise prediction, sampled by DDIM; ``ldm_rflow``: rectified flow, ``LDM_VARIANTS``).
   Bar: the training's wall time, all stages, <= 600 s;
4. each trained generator makes 2 samples (item seeds differ) per held-out mask; the untrained generator (the same
   configs trained for one epoch at learning rate 0: its initial random weights) makes the same set once per
   variant, for the Fréchet ceiling;
5. the bars per seed, each against the real held-out crops (``tools.evaluation.evaluate_synthetic`` gives the
   Wasserstein distance, the label medians, the judge's Dice to the mask, the Fréchet distance on the judge's
   features and the memorization NCC; this script adds the body medians, gradients, diversity and, for ldm_abdomen,
   the autoencoder's reconstruction error beside the phantom's own noise floor); see :func:`bars`;
6. a montage per variant: held-out cases in rows, real | one sample of each seed | the mask outlined on the first;
7. ``quality.json`` (every number, setting, time and command) and ``quality.md`` (the table).

A rerun with the same ``--out`` reuses the data, the judge and every trained generator whose settings did not change
(a folder made with other settings is removed and made again), and measures again. The exit code is 0 when bars fail
(this is a measurement) and 1 when a step failed (the table then says which).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import sys
import time
import traceback
from copy import deepcopy
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from smoke import parse_args_with_smoke

from tools.phantom.twin import phantom_label, render_with_other_noise  # the noise twin, shared with difftumor's

REPO = Path(__file__).resolve().parents[1]
#: issue 14's CPU recipes: the demo scale with the generators' training settings replaced (a tools.studies scale file)
RECIPES = REPO / "benchmarks" / "generator_recipes.json"
GENERATORS = {"vae_ct": ("vae", "vaegan", "gan"), "ldm_abdomen": ("ldm", "ldm_rflow")}
#: ldm_abdomen's variants on top of the scale's recipe: ``ldm_rflow`` trains the diffusion model and the ControlNet as
#: rectified flow and samples with it (30 steps, the bundle's default for rflow);
#: ``benchmarks/ldm_abdomen_samplers.py`` found its label consistency well above the noise-predicting model's
LDM_VARIANTS = {
    "ldm": {},
    "ldm_rflow": {
        "ldm_train": {"train_scheduler": "rflow"},
        "ldm_infer": {"sampler": "rflow", "num_inference_steps": 30},
    },
}
#: the command line's variant names -> vae_ct's generator families (``tools.studies.VAE_FAMILIES``)
VAE_FAMILY = {"vae": "vae", "vaegan": "vae_gan", "gan": "gan"}
LDM_RECIPE_KEYS = ("ldm_nets", "ldm_train", "ldm_stage", "ldm_epochs", "ldm_infer")
#: HU range of the voxel-wise measures (gradient, diversity, reconstruction): the generators' training window
HU_RANGE = (-1000.0, 1000.0)
SAMPLES_PER_MASK = 2
STAGE_ORDER = ("training", "autoencoder", "diffusion", "controlnet")
NOISE_SEED = 12345  # the phantom's scanner noise of the noise-floor twin
BAR = {"judge_dice": 0.6, "label_ratio": 0.9, "median_hu": 25.0, "wasserstein_hu": 40.0, "frechet_fraction": 0.3,
       "gradient_ratio": 0.7, "diversity_ratio": 0.25, "max_ncc": 0.95, "autoencoder_mae_hu": 30.0,
       "train_seconds": 600.0}  # fmt: skip
#: --smoke: tiny data, networks and epochs on top of the scale (its other keys, e.g. learning rates, stay)
SMOKE_SCALE = {
    "phantom": {"n_cases": 6, "shape": [48, 48, 24], "tumor_fraction": 0.5, "test_fraction": 0.34},
    "crop_shape": [16, 16, 16],
    "seg": {"network_def#channels": [4, 8, 16], "network_def#strides": [2, 2], "network_def#num_res_units": 1,
            "roi_size": [16, 16, 16], "num_samples": 1, "train#trainer#max_epochs": 1, "val_interval": 1},
    "vae": {"strides": [2, 2], "channels": [4, 8], "latent_size": 8, "max_epochs": 1, "val_interval": 1},
    "ldm_train": {"scale_factor_samples": 2},
    "ldm_stage": {"autoencoder": {"ae_patch_size": [16, 16, 16]}},
    "ldm_epochs": {"autoencoder": 1, "diffusion": 1, "controlnet": 1},
    "ldm_infer": {"num_inference_steps": 2},
    # a 16^3 crop has room for 2 discriminator layers; the one smoke epoch trains the adversarial term too
    "vae_variants": {"vaegan": {"disc_layers": 2, "adv_start_epoch": 1}, "gan": {"disc_layers": 2}},
}  # fmt: skip


STARTED = time.time()


def log(message: str) -> None:
    print(f"[{time.time() - STARTED:5.0f} s] {message}", flush=True)


def to_json(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def claim(folder: Path, fingerprint: Mapping[str, Any]) -> Path:
    """``folder`` for work made with ``fingerprint``; a folder made with other settings is removed first (a rerun
    after a recipe change retrains instead of measuring stale weights)."""
    from tools.io import write_json

    file = folder / "fingerprint.json"
    if file.is_file() and json.loads(file.read_text()) != to_json(fingerprint):
        log(f"{folder}: made with other settings, made again")
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_json(file, to_json(fingerprint))
    return folder


# ---------------------------------------------------------------------------------------------------------------
# settings


def benchmark_settings(scale: str, smoke: bool) -> dict[str, Any]:
    """The scale's settings (``tools.studies.scale_settings``), with the tiny sizes of ``SMOKE_SCALE`` for --smoke."""
    from tools.studies import scale_settings

    if not Path(scale).exists() and (REPO / scale).is_file():  # the default recipes file, from any folder
        scale = str(REPO / scale)
    settings = scale_settings(scale)
    if not smoke:
        return settings
    for key, value in SMOKE_SCALE.items():
        base = settings.get(key)
        if key in ("phantom", "crop_shape", "ldm_epochs") or not isinstance(base, dict):
            settings[key] = deepcopy(value)
        elif key in ("ldm_stage", "vae_variants"):  # one dict per stage / variant
            settings[key] = {
                name: {**base.get(name, {}), **value.get(name, {})} for name in dict.fromkeys([*base, *value])
            }
        else:
            settings[key] = {**base, **value}
    return settings


def variant_settings(settings: Mapping[str, Any], variant: str) -> dict[str, Any]:
    """The settings a variant trains with. ldm_abdomen: the scale's recipe with ``LDM_VARIANTS[variant]`` merged into
    its groups. vae_ct: the scale's ``vae`` recipe plus, for the adversarial families, the scale's
    ``vae_variants[<variant>]`` overrides when it has them, else widths derived from the VAE's (the patch
    discriminator at the configs' ratio of 2x the encoder's first width; the GAN generator mirrors the VAE's
    decoder), as ``benchmarks/cpu_speed.py`` sizes them."""
    out = deepcopy(dict(settings))
    if variant in LDM_VARIANTS:
        for group, keys in LDM_VARIANTS[variant].items():
            out[group] = {**out.get(group, {}), **keys}
        return out
    vae = out["vae"]
    channels, strides = vae.get("channels"), vae.get("strides")
    derived: dict[str, Any] = {}
    if variant in ("vaegan", "gan") and channels:
        derived["disc_channels"] = 2 * int(channels[0])
    if variant == "gan" and channels and strides:
        derived.update({"gan_channels": list(reversed(channels)) + [channels[0]], "gan_strides": strides})
    vae.update({**derived, **out.get("vae_variants", {}).get(variant, {})})
    return out


def untrained_settings(settings: Mapping[str, Any], generator: str, variant: str) -> dict[str, Any]:
    """The recipe trained for one epoch at learning rate 0 (Adam then leaves every weight as initialised; MONAI's
    trainers refuse 0 epochs): the untrained networks, with the checkpoints and latent statistics the bundles'
    inference needs made by their own code."""
    out = deepcopy(dict(settings))
    if generator == "vae_ct":
        out["vae"].update({"max_epochs": 1, "learning_rate": 0.0})
        if variant != "vae":  # the discriminator's own rate is a key of the adversarial overlays only
            out["vae"]["d_learning_rate"] = 0.0
        return out
    out["ldm_epochs"] = {stage: 1 for stage in ("autoencoder", "diffusion", "controlnet")}
    out["ldm_train"]["learning_rate"] = 0.0
    for stage in out["ldm_stage"].values():
        stage.update({key: 0.0 for key in stage if key.endswith("learning_rate")})
    return out


def generator_fingerprint(settings: Mapping[str, Any], generator: str, variant: str) -> dict[str, Any]:
    keys = ("vae",) if generator == "vae_ct" else LDM_RECIPE_KEYS
    return {"phantom": settings["phantom"], "crop_shape": settings["crop_shape"], "variant": variant,
            **{k: settings.get(k) for k in keys}}  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# step 1: data


def prepare_data(out: Path, settings: Mapping[str, Any]) -> dict[str, Any]:
    """Phantom and pancreas crops as the demo makes them, and the held-out datalist (validation + test masks)."""
    from tools.io import write_json
    from tools.splits import load_records
    from tools.studies import phantom_data, prepared_split

    folder = claim(out / "data", {"phantom": settings["phantom"], "crop_shape": settings["crop_shape"]})
    phantom = phantom_data(folder / "phantom", settings, seed=0)
    split = prepared_split(phantom, folder / "crops_pancreas", "pancreas", settings["crop_shape"])
    loaded = load_records(split)
    heldout_records = loaded.records("validation") + loaded.records("test")
    heldout = split.parent / "heldout.json"  # beside dataset.json, with its prep record, as ldm_abdomen checks
    write_json(heldout, {"prep": json.loads(split.read_text()).get("prep"), "heldout": heldout_records})
    data = {"phantom": phantom, "split": split, "heldout": heldout, "training": loaded.records("training"),
            "heldout_records": heldout_records, "test_records": loaded.records("test")}  # fmt: skip
    log(f"data: phantom {settings['phantom']['n_cases']} patients {tuple(settings['phantom']['shape'])}, crops "
        f"{tuple(settings['crop_shape'])}: {len(data['training'])} training, {len(loaded.records('validation'))} "
        f"validation, {len(data['test_records'])} test crops ({split.parent})")  # fmt: skip
    return data


# ---------------------------------------------------------------------------------------------------------------
# step 2: the judge


def judge_overrides(settings: Mapping[str, Any]) -> dict[str, Any]:
    """What the judge's weights need at inference (as ``tools.demo.evaluate_generated`` passes them): its network
    size, pixdim, patch size and the binary model's two output channels."""
    seg = settings["seg"]
    over = {k: v for k, v in seg.items() if k.startswith("network_def") or k == "pixdim"}
    over["num_classes"] = 2
    if seg.get("roi_size") is not None:
        over["roi_size"] = seg["roi_size"]
    return over


def train_judge(out: Path, data: Mapping[str, Any], settings: Mapping[str, Any]) -> dict[str, Any]:
    """seg_unet3d (binary, seed 0) on the real training crops; its metrics on the real test crops (reused)."""
    from tools.io import write_json
    from tools.studies import SEG_BINARY, train_and_evaluate_seg

    folder = claim(out / "judge", {"phantom": settings["phantom"], "crop_shape": settings["crop_shape"],
                                   "seg": settings["seg"]})  # fmt: skip
    result = folder / "metrics.json"
    if not result.is_file():
        started = time.time()
        metrics = train_and_evaluate_seg(folder, data["split"], 0, settings["seg"], SEG_BINARY)
        write_json(result, {"metrics": metrics, "seconds": round(time.time() - started, 1)})
    saved = json.loads(result.read_text())
    log(f"judge: seg_unet3d pancreas Dice {saved['metrics']['pancreas_dice']:.3f} on the real test crops "
        f"({saved['seconds']} s to train and evaluate)")  # fmt: skip
    return {"ckpt": folder / "models", "overrides": judge_overrides(settings), **saved}


# ---------------------------------------------------------------------------------------------------------------
# steps 3-4: training and synthesis (one process per seed)


def run_folder(out: Path, variant: str, seed: int | None) -> Path:
    return out / variant / ("untrained" if seed is None else f"seed{seed}")


def train_and_synthesize(out: Path, generator: str, variant: str, seed: int | None) -> dict[str, Any]:
    """Train one generator (``seed`` None: the untrained networks, :func:`untrained_settings`) and make
    ``SAMPLES_PER_MASK`` samples per held-out mask; returns the seconds of each part (from the bundles' markers, so
    a reused run keeps its times)."""
    from tools.io import write_json
    from tools.studies import synthesize_set, train_ldm, train_vae

    saved = json.loads((out / "settings.json").read_text())
    settings = saved["settings"]
    split, heldout = Path(saved["split"]), Path(saved["heldout"])
    settings = variant_settings(settings, variant)
    if seed is None:
        settings = untrained_settings(settings, generator, variant)
    folder = claim(run_folder(out, variant, seed), generator_fingerprint(settings, generator, variant))
    train_seed = 0 if seed is None else seed
    if generator == "vae_ct":
        family = VAE_FAMILY[variant]
        ckpt = train_vae(split, folder / "models", settings, seed=train_seed, family=family)
        markers = [ckpt / "done.json"]
    else:
        family = "vae"
        ckpt = train_ldm(split, folder / "models", settings, "pancreas", seed=train_seed)
        markers = list(ckpt.glob("done_*.json"))
    stages = {m.stem.replace("done_", "") if m.stem != "done" else "training": json.loads(m.read_text())["seconds"]
              for m in markers}  # fmt: skip
    stages = {k: stages[k] for k in sorted(stages, key=lambda k: STAGE_ORDER.index(k))}
    synthetic = synthesize_set(generator, heldout, folder / "synthetic", ckpt, settings, seed=train_seed,
                               samples_per_item=SAMPLES_PER_MASK, section="heldout", family=family)  # fmt: skip
    import torch

    times = {"train_s": round(sum(stages.values()), 1), "stages_s": stages, "torch_threads": torch.get_num_threads(),
             "synthesis_s": json.loads((folder / "synthetic" / "done.json").read_text()).get("seconds")}  # fmt: skip
    write_json(folder / "times.json", times)
    return {"folder": folder, "ckpt": ckpt, "synthetic": synthetic, **times}


def train_seeds_in_parallel(out: Path, generator: str, variant: str, seeds: Sequence[int]) -> dict[str, Any]:
    """One worker process per seed, all at once, one thread each (``tools.demo.launch``); the commands and the wall
    time of them all (processes' start, training and synthesis)."""
    from tools.demo import launch

    commands = [[sys.executable, str(Path(__file__).resolve()), "--generator", generator, "--out", str(out),
                 "--worker", f"{variant}:{seed}"] for seed in seeds]  # fmt: skip
    logs = [run_folder(out, variant, seed).parent / f"worker_seed{seed}.log" for seed in seeds]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    log(f"{variant}: training seeds {', '.join(map(str, seeds))} in parallel, one process of one thread each "
        f"(logs {logs[0].parent}/worker_seed*.log)")  # fmt: skip
    started = time.time()
    launch(commands, logs, [env] * len(seeds))
    seconds = round(time.time() - started, 1)
    log(f"{variant}: trained and synthesized in {seconds:.0f} s wall clock")
    return {"worker_commands": [" ".join(c) for c in commands], "workers_wall_s": seconds}


def worker_main(out: Path, generator: str, job: str) -> int:
    """``--worker VARIANT:SEED``: one training + synthesis in this process, one torch thread."""
    import torch

    torch.set_num_threads(1)
    from tools.bundle_scripts.config_check import root_cause

    variant, seed = job.split(":")
    try:
        result = train_and_synthesize(out, generator, variant, int(seed))
    except RuntimeError as error:  # MONAI wraps the real error: print it last, where the main process reads it
        traceback.print_exc()
        cause = root_cause(error)
        print(f"ERROR: {type(cause).__name__}: {cause}", flush=True)
        return 1
    log(f"{variant} seed {seed}: trained in {result['train_s']} s ({result['stages_s']}), synthesized in "
        f"{result['synthesis_s']} s")  # fmt: skip
    return 0


# ---------------------------------------------------------------------------------------------------------------
# step 5: measures


def load_case(record: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image in HU clipped to ``HU_RANGE``, body mask (empty when the image holds no body), label)."""
    from tools.datasets import load_image_hu
    from tools.errors import InputError
    from tools.io import load_nifti
    from tools.prep import body_mask

    ct, affine = load_image_hu(dict(record))
    try:
        body = body_mask(ct, affine)
    except InputError:  # nothing above the body threshold: the measures of this image are NaN
        body = np.zeros(ct.shape, dtype=bool)
    label = load_nifti(record["label"])[0].astype(np.int16)
    return np.clip(ct, *HU_RANGE), body, label


def mean_or_nan(values: Sequence[float]) -> float:
    values = [v for v in values if np.isfinite(v)]
    return float(np.mean(values)) if values else float("nan")


def gradient_inside(ct: np.ndarray, body: np.ndarray) -> float:
    """Mean gradient magnitude (HU per voxel, central differences) over the body's voxels."""
    if not body.any():
        return float("nan")
    magnitude = np.sqrt(sum(g.astype(np.float64) ** 2 for g in np.gradient(ct)))
    return float(magnitude[body].mean())


def difference_inside(a: tuple, b: tuple) -> float:
    """Mean absolute difference (HU) of two cases over the union of their bodies."""
    union = a[1] | b[1]
    if a[0].shape != b[0].shape or not union.any():
        return float("nan")
    return float(np.abs(a[0] - b[0])[union].mean())


def image_measures(cases: Sequence[tuple]) -> dict[str, float]:
    """Median HU inside the body (pooled voxels) and the mean gradient magnitude inside the body."""
    bodies = [ct[body] for ct, body, _ in cases if body.any()]
    return {"median_hu_body": float(np.median(np.concatenate(bodies))) if bodies else float("nan"),
            "gradient_hu_per_voxel": mean_or_nan([gradient_inside(ct, body) for ct, body, _ in cases])}  # fmt: skip


def real_reference(data: Mapping[str, Any]) -> dict[str, Any]:
    """The real held-out crops' body median, gradient, and mean difference between two crops of different patients."""
    records = data["heldout_records"]
    cases = [load_case(r) for r in records]
    pairs = [(i, j) for i, j in itertools.combinations(range(len(records)), 2)
             if records[i].get("patient") != records[j].get("patient")]  # fmt: skip
    return {
        **image_measures(cases),
        "n_cases": len(cases),
        "n_pairs": len(pairs),
        "difference_between_patients_hu": mean_or_nan([difference_inside(cases[i], cases[j]) for i, j in pairs]),
    }


def synthetic_measures(synthetic: Path) -> dict[str, Any]:
    """Body median and gradient of a synthetic set, and the mean difference between the samples of one mask."""
    from tools.splits import load_records

    records = load_records(synthetic).records("training")
    cases = [load_case(r) for r in records]
    by_mask: dict[int, list[tuple]] = {}
    for record, case in zip(records, cases):
        by_mask.setdefault(int(record["source_index"]), []).append(case)
    diffs = [difference_inside(a, b) for group in by_mask.values() for a, b in itertools.combinations(group, 2)]
    return {**image_measures(cases), "diversity_between_samples_hu": mean_or_nan(diffs), "diversity_pairs": len(diffs)}


def evaluate_set(synthetic: Path | Sequence[Mapping], data: Mapping[str, Any], judge: Mapping[str, Any], out: Path,
                 memorization: bool, figures: bool) -> dict[str, Any]:  # fmt: skip
    """``tools.evaluation.evaluate_synthetic`` against the real held-out crops, judged by the judge (a set it cannot
    measure gives ``{"error": ...}``, whose bars then fail)."""
    from tools.errors import InputError
    from tools.evaluation import evaluate_synthetic

    try:
        return evaluate_synthetic(synthetic, data["heldout_records"], out, seg_ckpt=judge["ckpt"],
                                  seg_overrides=judge["overrides"], figures=figures,
                                  training=data["training"] if memorization else None)  # fmt: skip
    except InputError as error:  # e.g. an image without any voxel of body: the set's bars fail, the others go on
        log(f"{out}: not measurable: {error}")
        return {"error": str(error)}


def autoencoder_reconstruction(ckpt_dir: Path, data: Mapping[str, Any], settings: Mapping[str, Any]) -> dict[str, Any]:
    """ldm_abdomen's autoencoder on the held-out crops: the bundle's own preprocessing and network (its ``train.json``
    + ``train_autoencoder.json`` with the scale's overrides), reconstruction = decoded posterior mean; mean absolute
    error in HU inside the body of each input, averaged over the crops."""
    import importlib

    import torch
    from monai.bundle import ConfigParser

    from tools.bundles import bundle_dir, bundle_on_path, import_bundle_scripts
    from tools.errors import InputError
    from tools.prep import body_mask
    from tools.studies import ldm_image_size

    root = bundle_dir("ldm_abdomen")
    parser = ConfigParser()
    parser.read_config([str(root / "configs" / f) for f in ("train.json", "train_autoencoder.json")])
    prep = json.loads((data["split"].parent / "dataset.json").read_text()).get("prep") or {}
    overrides = {
        "bundle_root": str(root),
        "dataset_dir": str(data["split"].parent),
        "crop_mode": "pancreas",
        "prep_out_shape": prep.get("out_shape"),
        **ldm_image_size(settings),
        **settings["ldm_nets"],
        **{k: v for k, v in settings["ldm_stage"].get("autoencoder", {}).items() if "autoencoder_def" in k},
    }
    for key, value in overrides.items():
        parser[key] = value
    latent = importlib.import_module(f"{import_bundle_scripts('ldm_abdomen').__name__}.latent")
    with bundle_on_path(root):
        autoencoder = parser.get_parsed_content("autoencoder_def").eval()
        preprocessing = parser.get_parsed_content("validate#preprocessing")
        low, high = (float(v) for v in parser.get_parsed_content("hu_window"))
    latent.load_autoencoder_weights(autoencoder, ckpt_dir / "model_autoencoder.pt")
    errors = []
    for record in data["heldout_records"]:
        item = preprocessing({"image": record["image"], "label": record["label"]})
        image = item["image"]
        with torch.no_grad():
            reconstruction = autoencoder.reconstruct(image[None].float())[0]
        to_hu = high - low
        x_hu = image[0].numpy() * to_hu + low
        r_hu = reconstruction[0].clamp(0, 1).numpy() * to_hu + low
        try:
            body = body_mask(x_hu, np.asarray(image.affine))
        except InputError:
            continue
        errors.append(float(np.abs(r_hu - x_hu)[body].mean()))
    return {"autoencoder_mae_hu": mean_or_nan(errors), "n_cases": len(errors), "hu_window": [low, high]}


def phantom_noise_floor(out: Path, data: Mapping[str, Any], crop_shape: Sequence[int]) -> dict[str, Any]:
    """The phantom's own noise floor for a reconstruction error: each held-out case rendered again with other scanner
    noise (same anatomy, tissue values and texture; :func:`render_with_other_noise`), cropped like the original,
    and the mean absolute difference (HU, in ``HU_RANGE``, inside the original crop's body) between the two crops."""
    from tools.io import save_nifti, write_json
    from tools.prep import prepare_dataset

    folder = out / "data" / "noise_twin"
    result = folder / "noise_floor.json"
    if result.is_file():
        return json.loads(result.read_text())
    sources = []
    for record in data["heldout_records"]:
        scan = record.get("scan") or record["case"]
        case, original_label = render_with_other_noise(data["phantom"], scan, NOISE_SEED)
        if not np.array_equal(case.label, original_label):
            raise RuntimeError(f"{scan}: the re-rendered phantom case has another label (the anatomy moved)")
        image = folder / "scans" / f"{scan}.nii.gz"
        save_nifti(image, case.ct, case.affine, descrip=f"SYNTHETIC tools.phantom {scan}, noise seed {NOISE_SEED}")
        sources.append({"image": str(image), "label": str(phantom_label(data["phantom"], scan)), "patient": scan})
    prepared = prepare_dataset(sources, folder / "crops", mode="pancreas", out_shape=crop_shape,
                               hu_window=None)  # fmt: skip
    twins = json.loads(Path(prepared["datalist"]).read_text())["training"]
    diffs = []
    for record, twin in zip(data["heldout_records"], twins):
        original = load_case(record)
        again = np.clip(load_case({"image": str(folder / "crops" / twin["image"]), "label": record["label"]})[0],
                        *HU_RANGE)  # fmt: skip
        diffs.append(float(np.abs(original[0] - again)[original[1]].mean()) if original[1].any() else float("nan"))
    floor = {"noise_floor_mae_hu": mean_or_nan(diffs), "n_cases": len(diffs), "noise_seed": NOISE_SEED,
             "per_case": dict(zip([r.get("case") for r in data["heldout_records"]], diffs))}  # fmt: skip
    write_json(result, floor)
    return floor


# ---------------------------------------------------------------------------------------------------------------
# step 5: bars


def bar_row(name: str, seed: Any, measured: float, required: str, passed: bool, shown: str | None = None) -> dict:
    return {"bar": name, "seed": seed, "measured": measured, "shown": shown or f"{measured:.3g}",
            "required": required, "pass": bool(passed) and bool(np.isfinite(measured))}  # fmt: skip


def bars(seed: int, judge: Mapping, real: Mapping, floor: Mapping, ceiling: Mapping, evaluation: Mapping,
         measures: Mapping, times: Mapping, autoencoder: Mapping | None) -> list[dict]:  # fmt: skip
    """The bars of issue 14 for one trained generator (one seed):

    - the judge's pancreas Dice to the conditioning mask (``pancreas_dice_to_synthetic_label``) >= 0.9 x its Dice on
      the real test crops;
    - median HU inside the pancreas label (``evaluate_synthetic``'s label-1 medians) and inside the body (pooled body
      voxels) within 25 HU of the real held-out crops';
    - HU histogram Wasserstein distance inside the body (``hist_wasserstein_hu``) <= 40 HU;
    - Fréchet distance on the judge's bottleneck features <= floor + 0.3 x (ceiling - floor); floor: real training
      crops vs the real held-out crops; ceiling: the untrained generator's samples vs the same; all three through
      ``evaluate_synthetic`` with the same judge;
    - mean gradient magnitude inside the body >= 0.7 x the real held-out crops';
    - diversity: mean absolute difference inside the bodies between the two samples of a mask >= 0.25 x the mean
      difference between two real held-out crops of different patients;
    - the nearest training image's NCC (vae_ct's memorization check) of every sample < 0.95;
    - ldm_abdomen: the autoencoder's held-out reconstruction error inside the body <= 30 HU (the phantom's noise floor
      printed beside it);
    - the training's wall time, all stages, <= 600 s.
    """
    rows = []
    dice, judge_dice = evaluation.get("pancreas_dice_to_synthetic_label"), judge["metrics"]["pancreas_dice"]
    rows.append(bar_row("judge's pancreas Dice to the mask", seed, _num(dice),
                        f">= {BAR['label_ratio']} x {judge_dice:.3f} = {BAR['label_ratio'] * judge_dice:.3f}",
                        _num(dice) >= BAR["label_ratio"] * judge_dice))  # fmt: skip
    for region, syn, ref in (("pancreas label", evaluation.get("median_hu_pancreas_synthetic"),
                              evaluation.get("median_hu_pancreas_real")),
                             ("body", measures["median_hu_body"], real["median_hu_body"])):  # fmt: skip
        gap = abs(_num(syn) - _num(ref))
        rows.append(bar_row(f"median HU, {region}: synthetic vs real", seed, gap, f"<= {BAR['median_hu']:g} HU",
                            gap <= BAR["median_hu"],
                            f"{gap:.1f} apart ({_num(syn):.0f} vs {_num(ref):.0f})"))  # fmt: skip
    wasserstein = _num(evaluation.get("hist_wasserstein_hu"))
    rows.append(bar_row("Wasserstein HU (body)", seed, wasserstein, f"<= {BAR['wasserstein_hu']:g}",
                        wasserstein <= BAR["wasserstein_hu"], f"{wasserstein:.1f}"))  # fmt: skip
    low, high = _num(floor.get("frechet_distance")), _num(ceiling.get("frechet_distance"))
    limit = low + BAR["frechet_fraction"] * (high - low)
    frechet = _num(evaluation.get("frechet_distance"))
    rows.append(bar_row("Fréchet distance (judge's features)", seed, frechet,
                        f"<= {limit:.3g} (floor {low:.3g} + {BAR['frechet_fraction']} x (ceiling {high:.3g} - floor))",
                        frechet <= limit))  # fmt: skip
    gradient, real_gradient = measures["gradient_hu_per_voxel"], real["gradient_hu_per_voxel"]
    rows.append(bar_row("gradient magnitude inside the body (HU/voxel)", seed, gradient,
                        f">= {BAR['gradient_ratio']} x {real_gradient:.1f} = "
                        f"{BAR['gradient_ratio'] * real_gradient:.1f}",
                        gradient >= BAR["gradient_ratio"] * real_gradient, f"{gradient:.1f}"))  # fmt: skip
    diversity, spread = measures["diversity_between_samples_hu"], real["difference_between_patients_hu"]
    rows.append(bar_row("diversity: mean difference of 2 samples of a mask, body (HU)", seed, diversity,
                        f">= {BAR['diversity_ratio']} x {spread:.1f} = {BAR['diversity_ratio'] * spread:.1f}",
                        diversity >= BAR["diversity_ratio"] * spread, f"{diversity:.1f}"))  # fmt: skip
    ncc = _num(evaluation.get("memorization_max_ncc"))
    rows.append(bar_row("max NCC to a training image", seed, ncc, f"< {BAR['max_ncc']}", ncc < BAR["max_ncc"]))
    if autoencoder is not None:
        mae, noise = autoencoder["autoencoder_mae_hu"], autoencoder.get("noise_floor_mae_hu", float("nan"))
        rows.append(bar_row("autoencoder reconstruction MAE, held out, body (HU)", seed, mae,
                            f"<= {BAR['autoencoder_mae_hu']:g} (phantom noise floor {noise:.1f})",
                            mae <= BAR["autoencoder_mae_hu"], f"{mae:.1f}"))  # fmt: skip
    seconds = _num(times.get("train_s"))
    stages = times.get("stages_s") or {}
    shown = f"{seconds:.0f}" + (f" ({', '.join(f'{k} {v:.0f}' for k, v in stages.items())})" if len(stages) > 1 else "")
    rows.append(bar_row("training wall time, all stages (s)", seed, seconds, f"<= {BAR['train_seconds']:g}",
                        seconds <= BAR["train_seconds"], shown))  # fmt: skip
    return rows


def _num(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


# ---------------------------------------------------------------------------------------------------------------
# step 6: montage


def montage(path: Path, data: Mapping[str, Any], synthetic: Mapping[int, Path], title: str, max_rows: int = 6) -> Path:
    """Held-out cases in rows; columns: the real crop, sample 0 of each seed's generator, and the mask outlined on the
    first seed's sample; the axial slice through the pancreas (the tumor's largest cross-section when it has one)."""
    import matplotlib.pyplot as plt

    from tools.figures import ABDOMEN_WINDOW, focus_slices, outline_legend, save_figure, show_slice, to_ras, window_name
    from tools.io import load_nifti, voxel_spacing
    from tools.splits import load_records

    samples = {seed: {int(r["source_index"]): r for r in load_records(path_).records("training") if r["sample"] == 0}
               for seed, path_ in synthetic.items()}  # fmt: skip
    seeds = list(synthetic)
    records = data["heldout_records"][:max_rows]
    columns = ["real"] + [f"synthetic, seed {s}" for s in seeds] + [f"mask on synthetic, seed {seeds[0]}"]
    first, first_affine = to_ras(*load_nifti(records[0]["image"]))
    spacing = voxel_spacing(first_affine)  # panel height from the displayed extent (anterior-posterior / left-right)
    ratio = first.shape[1] * spacing[1] / (first.shape[0] * spacing[0])
    width = 2.6
    fig, axes = plt.subplots(len(records), len(columns), squeeze=False, layout="constrained",
                             figsize=(width * len(columns), len(records) * (width * ratio + 0.45) + 0.9))  # fmt: skip
    for row, (index, record) in zip(axes, enumerate(records)):
        label, affine = load_nifti(record["label"])
        label_ras = to_ras(label, affine)[0]
        files = [record["image"]] + [samples[s][index]["image"] for s in seeds] + [samples[seeds[0]][index]["image"]]
        for column, (ax, name, file) in enumerate(zip(row, columns, files)):
            volume, volume_affine = load_nifti(file)
            volume_ras, ras_affine = to_ras(volume, volume_affine)
            k = focus_slices(label_ras, volume_ras.shape)[2]
            outline = label_ras if column == len(columns) - 1 else None
            show_slice(ax, volume_ras, voxel_spacing(ras_affine), "axial", k, outline, ABDOMEN_WINDOW,
                       f"{record.get('case')}: {name}\naxial {k + 1}/{volume_ras.shape[2]}", fontsize=7)  # fmt: skip
    fig.suptitle(f"{title}: masks of held-out patients (neither the judge nor the generator trained on them), "
                 f"axial slices, window {window_name()}", fontsize=9)  # fmt: skip
    outline_legend(fig, loc="outside lower center", ncol=2)
    return save_figure(fig, path, dpi=90)


# ---------------------------------------------------------------------------------------------------------------
# step 7: the table


def table_lines(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    lines = ["| bar | seed | measured | required | pass |", "| --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['bar']} | {r['seed']} | {r['shown']} | {r['required']} | {'yes' if r['pass'] else 'NO'} |")
    return lines


def verdict(variant: str, rows: Sequence[Mapping[str, Any]], error: str | None) -> str:
    if error:
        return f"{variant}: FAIL (error: {error})"
    failed = [r["bar"] + (f" (seed {r['seed']})" if r["seed"] != "-" else "") for r in rows if not r["pass"]]
    if failed:
        return f"{variant}: FAIL, {len(failed)} of {len(rows)} bars missed: {'; '.join(failed)}"
    return f"{variant}: PASS, all {len(rows)} bars"


def variant_section(variant: str, result: Mapping[str, Any]) -> list[str]:
    lines = [
        f"## {variant}",
        "",
        *table_lines(result["rows"]),
        "",
        verdict(variant, result["rows"], result["error"]),
        "",
    ]
    if result.get("montage"):
        lines += [f"![{variant}]({Path(result['montage']).name})", ""]
    return lines


# ---------------------------------------------------------------------------------------------------------------


def measure_variant(out: Path, generator: str, variant: str, seeds: Sequence[int], data: Mapping, judge: Mapping,
                    real: Mapping, floor: Mapping, settings: Mapping,
                    noise: Mapping | None) -> dict[str, Any]:  # fmt: skip
    """Steps 3-6 for one variant: train the seeds in parallel, the untrained set, the bars per seed, the montage."""
    workers = train_seeds_in_parallel(out, generator, variant, seeds)
    log(f"{variant}: the untrained generator (one epoch at learning rate 0) for the Fréchet ceiling")
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # like the workers: small convolutions on a shared machine run faster on one thread
    try:
        untrained = train_and_synthesize(out, generator, variant, None)
    finally:
        torch.set_num_threads(threads)
    ceiling = evaluate_set(untrained["synthetic"], data, judge, untrained["folder"] / "evaluation", False, False)
    rows, per_seed, synthetic = [], {}, {}
    for seed in seeds:
        folder = run_folder(out, variant, seed)
        times = json.loads((folder / "times.json").read_text())
        synthetic[seed] = folder / "synthetic" / "datalist.json"
        log(f"{variant} seed {seed}: measuring {synthetic[seed]}")
        evaluation = evaluate_set(synthetic[seed], data, judge, folder / "evaluation", True, True)
        measures = synthetic_measures(synthetic[seed])
        autoencoder = None
        if generator == "ldm_abdomen":
            autoencoder = {**autoencoder_reconstruction(folder / "models", data, settings), **(noise or {})}
        seed_rows = bars(seed, judge, real, floor, ceiling, evaluation, measures, times, autoencoder)
        rows += seed_rows
        per_seed[seed] = {"evaluation": evaluation, "measures": measures, "times": times, "autoencoder": autoencoder}
    figure = montage(out / f"montage_{variant}.png", data, synthetic, f"{generator} {variant}")
    return {
        "rows": rows,
        "per_seed": per_seed,
        "ceiling": ceiling,
        "untrained_times": {k: untrained[k] for k in ("train_s", "synthesis_s")},
        **workers,
        "montage": str(figure),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--generator", choices=sorted(GENERATORS), required=True)
    parser.add_argument("--variants", default=None, help="comma-separated (vae_ct: vae,vaegan,gan; the default: all)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="training seeds (trained in parallel)")
    parser.add_argument(
        "--scale",
        default=str(RECIPES.relative_to(REPO)),
        help="a scale of tools.studies (demo, small, paper) or a JSON scale file (default: the CPU recipes, "
        "benchmarks/generator_recipes.json: the demo scale with the generators' recipes)",
    )
    parser.add_argument("--out", default=None, help="default runs/generator_quality[_smoke]/<generator>")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # VARIANT:SEED, run by the main process
    args = parse_args_with_smoke(parser, {}, argv)
    out = Path(args.out or REPO / "runs" / f"generator_quality{'_smoke' if args.smoke else ''}" / args.generator)
    out = out.resolve()
    if args.worker:
        return worker_main(out, args.generator, args.worker)
    variants = args.variants.split(",") if args.variants else list(GENERATORS[args.generator])
    unknown = [v for v in variants if v not in GENERATORS[args.generator]]
    if unknown:
        parser.error(f"unknown variants {unknown} of {args.generator}; known: {', '.join(GENERATORS[args.generator])}")
    if len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--seeds must differ, got {args.seeds}")

    from tools.bundle_scripts.config_check import root_cause
    from tools.io import write_json

    settings = benchmark_settings(args.scale, args.smoke)
    out.mkdir(parents=True, exist_ok=True)
    log(f"generator_quality {args.generator} ({', '.join(variants)}), scale {args.scale}, seeds {args.seeds} -> {out}; "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")  # fmt: skip
    data = prepare_data(out, settings)
    write_json(out / "settings.json", to_json({"scale": args.scale, "smoke": args.smoke, "settings": settings,
                                               "split": data["split"], "heldout": data["heldout"]}))  # fmt: skip
    judge = train_judge(out, data, settings)
    dice = judge["metrics"]["pancreas_dice"]
    judge_row = bar_row("judge (seg_unet3d, seed 0): pancreas Dice on the real test crops", "-", dice,
                        f">= {BAR['judge_dice']}", dice >= BAR["judge_dice"])  # fmt: skip
    real = real_reference(data)
    log("floor: the real training crops against the real held-out crops")
    floor = evaluate_set(data["training"], data, judge, out / "floor", False, False)
    noise = phantom_noise_floor(out, data, settings["crop_shape"]) if args.generator == "ldm_abdomen" else None
    if noise:
        log(f"phantom noise floor: {noise['noise_floor_mae_hu']:.1f} HU between a held-out crop and the same case "
            f"rendered with other scanner noise ({noise['n_cases']} cases)")  # fmt: skip

    results = {}
    for variant in variants:
        used = variant_settings(settings, variant)
        recipe = used["vae"] if args.generator == "vae_ct" else {k: used[k] for k in LDM_RECIPE_KEYS}
        log(f"{variant}: recipe {json.dumps(to_json(recipe))}")
        try:
            result = {**measure_variant(out, args.generator, variant, args.seeds, data, judge, real, floor, used,
                                        noise), "error": None}  # fmt: skip
        except RuntimeError as error:  # a failed worker (its log's tail is in the message) or bundle run
            cause = root_cause(error)
            summary = str(error).strip().splitlines()[-1] if cause is error else f"{type(cause).__name__}: {cause}"
            log(f"{variant}: FAILED: {error}")
            result = {"rows": [], "error": summary}
        results[variant] = {**result, "rows": [judge_row] + result["rows"], "recipe": recipe}
        print("\n".join(variant_section(variant, results[variant])), flush=True)

    title = f"# {args.generator} quality bars (scale {args.scale}{', SMOKE: not a measurement' if args.smoke else ''})"
    lines = [
        title,
        "",
        f"Seeds {args.seeds}. Judge: seg_unet3d trained on the {len(data['training'])} real training "
        f"crops. Synthetic and real sets: the masks and crops of the {len(data['heldout_records'])} held-out "
        f"(validation + test) patients, {SAMPLES_PER_MASK} samples per mask. Command: `{command_line()}`",
        "",
    ]
    for variant, result in results.items():
        lines += variant_section(variant, result)
    (out / "quality.md").write_text("\n".join(lines))
    write_json(out / "quality.json", to_json({
        "generator": args.generator, "variants": variants, "seeds": args.seeds, "scale": args.scale,
        "smoke": args.smoke, "command": command_line(), "settings": settings, "bars": BAR, "judge": judge,
        "real_heldout": real, "floor": floor, "noise_floor": noise, "results": results,
        "seconds": round(time.time() - STARTED, 1), "load_average_at_end": os.getloadavg()}))  # fmt: skip
    for variant, result in results.items():
        log(verdict(variant, result["rows"], result["error"]))
    log(f"written {out / 'quality.md'} and {out / 'quality.json'}")
    return 1 if any(result["error"] for result in results.values()) else 0


def command_line() -> str:
    return " ".join(["python", *sys.argv])


if __name__ == "__main__":
    sys.exit(main())
