"""Issue 14's quality bars of a whole-image generator's synthetic set, shared by ``benchmarks/generator_quality.py``
(two training seeds per variant, its own judge) and ``make demo`` (the demo's one training, its ratio study's
real-only model as the judge).

The measures MONAI and :func:`tools.evaluation.evaluate_synthetic` do not give (the body's median HU and gradient, the
diversity between two samples of one mask, ldm_abdomen's autoencoder error beside the phantom's own noise floor), the
bars as ``measured / required / pass`` rows (:func:`bars`), the montage of held-out masks (real | synthetic | mask) and
the table. ``data`` arguments are mappings with the real crops' records: ``heldout_records`` (validation + test
patients, whose masks condition the synthetic sets), ``training`` (the generators' and the judge's training crops),
``split`` (the crops' datalist) and ``phantom`` (the phantom data set, for the noise floor).
"""

from __future__ import annotations

import itertools
import json
from copy import deepcopy
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from tools.phantom.twin import phantom_label, render_with_other_noise  # the noise twin, shared with difftumor's

#: HU range of the voxel-wise measures (gradient, diversity, reconstruction): the generators' training window
HU_RANGE = (-1000.0, 1000.0)
#: samples per held-out mask (two, for the diversity bar)
SAMPLES_PER_MASK = 2
NOISE_SEED = 12345  # the phantom's scanner noise of the noise-floor twin
STAGE_ORDER = ("training", "autoencoder", "diffusion", "controlnet")
BAR = {"judge_dice": 0.6, "label_ratio": 0.9, "median_hu": 25.0, "wasserstein_hu": 40.0, "frechet_fraction": 0.3,
       "gradient_ratio": 0.7, "diversity_ratio": 0.25, "max_ncc": 0.95, "autoencoder_mae_hu": 30.0,
       "train_seconds": 600.0}  # fmt: skip


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


def judge_overrides(settings: Mapping[str, Any]) -> dict[str, Any]:
    """What the judge's weights need at inference (as ``tools.demo.evaluate_generated`` passes them): its network
    size, pixdim, patch size and the binary model's two output channels."""
    seg = settings["seg"]
    over = {k: v for k, v in seg.items() if k.startswith("network_def") or k == "pixdim"}
    over["num_classes"] = 2
    if seg.get("roi_size") is not None:
        over["roi_size"] = seg["roi_size"]
    return over


def heldout_data(crops_split: Path, phantom: Path) -> dict[str, Any]:
    """The ``data`` of the bars for a prepared crops split (``tools.studies.prepared_split``), and ``heldout.json``
    beside its ``dataset.json``: the validation and test records with the crops' prep record (ldm_abdomen checks that
    its masks were prepared like its training crops)."""
    from tools.io import write_json
    from tools.splits import load_records

    crops_split = Path(crops_split)
    loaded = load_records(crops_split)
    heldout_records = loaded.records("validation") + loaded.records("test")
    heldout = crops_split.parent / "heldout.json"
    prep = json.loads(crops_split.read_text()).get("prep")
    if not heldout.is_file() or json.loads(heldout.read_text()) != json.loads(
        json.dumps({"prep": prep, "heldout": heldout_records})
    ):
        write_json(heldout, {"prep": prep, "heldout": heldout_records})
    return {"phantom": Path(phantom), "split": crops_split, "heldout": heldout, "training": loaded.records("training"),
            "heldout_records": heldout_records, "test_records": loaded.records("test"),
            "n_validation": len(loaded.records("validation"))}  # fmt: skip


def training_times(ckpt_dir: Path) -> dict[str, Any]:
    """The seconds of a generator's training, all stages, from the finished-stage markers that
    ``tools.studies.train_vae`` (``done.json``) and ``train_ldm`` (``done_<stage>.json``) write (a reused training
    keeps the time it took when it ran)."""
    markers = [m for m in [Path(ckpt_dir) / "done.json", *sorted(Path(ckpt_dir).glob("done_*.json"))] if m.is_file()]
    stages = {m.stem.replace("done_", "") if m.stem != "done" else "training": json.loads(m.read_text())["seconds"]
              for m in markers}  # fmt: skip
    stages = {k: stages[k] for k in sorted(stages, key=lambda k: STAGE_ORDER.index(k))}
    return {"train_s": round(sum(stages.values()), 1), "stages_s": stages}


def synthesize_heldout(generator: str, data: Mapping[str, Any], ckpt_dir: Path, out: Path,
                       settings: Mapping[str, Any], seed: int = 0, family: str = "vae") -> Path:  # fmt: skip
    """``SAMPLES_PER_MASK`` samples of a trained generator per held-out mask (``tools.studies.synthesize_set``;
    reused when finished); returns the set's datalist."""
    from tools.studies import synthesize_set

    return synthesize_set(generator, data["heldout"], out, ckpt_dir, settings, seed=seed,
                          samples_per_item=SAMPLES_PER_MASK, section="heldout", family=family)  # fmt: skip


def untrained_heldout(generator: str, data: Mapping[str, Any], folder: Path, settings: Mapping[str, Any]) -> Path:
    """The Fréchet ceiling's set: the generator's networks as initialised (:func:`untrained_settings`, seed 0)
    trained into ``folder/models`` and sampled like :func:`synthesize_heldout` into ``folder/synthetic``."""
    from tools.studies import train_ldm, train_vae

    untrained = untrained_settings(settings, generator, "vae")
    if generator == "vae_ct":
        ckpt = train_vae(data["split"], folder / "models", untrained)
    else:
        ckpt = train_ldm(data["split"], folder / "models", untrained, "pancreas")
    return synthesize_heldout(generator, data, ckpt, folder / "synthetic", untrained)


def judge_row(judge: Mapping[str, Any]) -> dict:
    """The judge's own bar: its pancreas Dice on the real test crops."""
    dice = judge["metrics"]["pancreas_dice"]
    return bar_row("judge (seg_unet3d, seed 0): pancreas Dice on the real test crops", "-", dice,
                   f">= {BAR['judge_dice']}", dice >= BAR["judge_dice"])  # fmt: skip


def measure_generator(generator: str, seed: int, data: Mapping[str, Any], judge: Mapping[str, Any],
                      real: Mapping[str, Any], floor: Mapping[str, Any], ceiling: Mapping[str, Any],
                      synthetic: Path, ckpt_dir: Path, settings: Mapping[str, Any], folder: Path,
                      noise: Mapping[str, Any] | None = None,
                      times: Mapping[str, Any] | None = None) -> dict:  # fmt: skip
    """The bars of one trained generator (:func:`bars`) on its held-out set ``synthetic``; ``evaluate_synthetic``'s
    files go to ``folder/evaluation``; ``times`` default to the training's markers (:func:`training_times`)."""
    evaluation = evaluate_set(synthetic, data, judge, Path(folder) / "evaluation", True, True)
    measures = synthetic_measures(synthetic)
    times = dict(times or training_times(ckpt_dir))
    autoencoder = None
    if generator == "ldm_abdomen":
        autoencoder = {**autoencoder_reconstruction(ckpt_dir, data, settings), **(noise or {})}
    rows = bars(seed, judge, real, floor, ceiling, evaluation, measures, times, autoencoder)
    return {"rows": rows, "evaluation": evaluation, "measures": measures, "times": times, "autoencoder": autoencoder}


def demo_quality(root: Path, settings: Mapping[str, Any], data: Mapping[str, Any], judge: Mapping[str, Any],
                 ckpts: Mapping[str, Path], seed: int = 0) -> dict[str, Any]:  # fmt: skip
    """Issue 14's bars of ``make demo``'s generators (one training each, ``seed``), judged by ``judge`` (the ratio
    study's real-only model): each generator's held-out set (``root/<generator>/heldout``) and untrained set
    (``root/<generator>/untrained``) are made unless the demo's workers made them, then measured like
    ``benchmarks/generator_quality.py`` measures one seed. Writes ``root/quality.json``, ``root/quality.md`` and
    ``root/quality_montage_<generator>.png``; returns what ``quality.json`` holds."""
    from tools.io import write_json

    root = Path(root)
    real = real_reference(data)
    floor = evaluate_set(data["training"], data, judge, root / "quality_floor", False, False)
    results: dict[str, Any] = {}
    for generator, ckpt in ckpts.items():
        folder = root / generator
        synthetic = synthesize_heldout(generator, data, ckpt, folder / "heldout", settings, seed=seed)
        untrained = untrained_heldout(generator, data, folder / "untrained", settings)
        ceiling = evaluate_set(untrained, data, judge, folder / "untrained" / "evaluation", False, False)
        noise = phantom_noise_floor(root, data, settings["crop_shape"]) if generator == "ldm_abdomen" else None
        measured = measure_generator(generator, seed, data, judge, real, floor, ceiling, synthetic, ckpt, settings,
                                     folder / "heldout", noise)  # fmt: skip
        figure = montage(root / f"quality_montage_{generator}.png", data, {seed: synthetic}, f"{generator} (demo)")
        rows = [judge_row(judge)] + measured["rows"]
        results[generator] = {**measured, "rows": rows, "ceiling": ceiling, "montage": str(figure),
                              "verdict": verdict(generator, rows, None)}  # fmt: skip
    lines = [f"Judge: seg_unet3d trained on the {len(data['training'])} real training crops (the ratio study's "
             f"real-only model, seed 0). Synthetic and real sets: the masks and crops of the "
             f"{len(data['heldout_records'])} held-out (validation + test) patients, {SAMPLES_PER_MASK} samples per "
             f"mask, training seed {seed}.", ""]  # fmt: skip
    for generator, result in results.items():
        lines += [f"## {generator}", "", *table_lines(result["rows"]), "", result["verdict"], ""]
    (root / "quality.md").write_text("\n".join(lines))
    quality = {"seed": seed, "bars": BAR, "judge": judge, "real_heldout": real, "floor": floor, "results": results}
    write_json(root / "quality.json", json.loads(json.dumps(quality, default=str)))
    return quality


# ---------------------------------------------------------------------------------------------------------------
# measures


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
        print(f"{out}: not measurable: {error}", flush=True)
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
# bars


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
# montage and table


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
