"""Benchmark: train the vae_ct conditional VAE on the phantom on CPU, then measure what it learned.

    python benchmarks/vae_ct_quality.py [--out runs/vae_ct_quality] [--epochs 100] [--seed 0] [--kl_weight W]
    python benchmarks/vae_ct_quality.py --smoke    # seconds: tiny sizes in runs/vae_ct_quality_smoke

Steps (all through the bundle's own configs, run with ``tools.bundle_check.run_workflow`` like ``python -m
monai.bundle run``):

1. phantom: ``--n_cases`` patients (``--shape`` 128x128x48, portal venous, half with a tumour, a quarter held out by
   patient), cut into seed-000 sub-volumes of 4 axial slices resized to ``--image_size`` 64x64 in-plane, in HU
   (``tools.prep``);
2. train ``configs/train.json`` with CPU overrides (printed): in-plane 64x64 instead of 256x256, 4 stride-2 stages
   instead of 5, encoder widths ``--channels`` 8-64 instead of 32-512, ``--epochs`` epochs; everything else (loss
   weights, latent size, learning rate, batch size) is the config's default;
3. reconstruction MAE in HU (``configs/evaluate.json``, the [-1000, 1000] HU window the VAE is trained in) on the
   held-out patients' sub-volumes, and on the training sub-volumes; for scale, the MAE of the mean training image;
4. diversity: ``configs/inference.json`` draws ``--samples`` samples (z ~ N(0, I)) for every held-out mask; the
   mean pairwise absolute difference in HU between the samples of one mask (the first held-out mask, and the mean
   over all held-out masks), against the same measure between the real held-out images;
   a montage of 4 held-out masks with 4 samples each is written to ``samples_montage.png``;
5. memorization: one sample per training mask, each compared with every training image (``scripts.memorization``:
   NCC inside the body in a W400/L40 window); for calibration, the real held-out images against the training set.

Prints every number with the time each step took. The seed and sizes are this script's defaults (one run, no other
seeds tried); ``--kl_weight`` overrides the config's KL weight (the bundle docs report 1e-3, the default, and 1e-4).
A second run with the same ``--out`` reuses the trained ``models/model.pt`` and measures it again.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
from smoke import parse_args_with_smoke

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "vae_ct"
HU_WINDOW = (-1000.0, 1000.0)
SMOKE = {
    "out": str(REPO / "runs" / "vae_ct_quality_smoke"),
    "n_cases": 4,
    "shape": "32,32,16",
    "image_size": "32,32",
    "channels": "4,4,4,4",
    "epochs": 1,
    "samples": 2,
}


def bundle_module(name: str):
    spec = importlib.util.spec_from_file_location(f"vae_ct_{name}", BUNDLE / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def load_hu(path: str | Path) -> np.ndarray:
    import nibabel as nib

    return np.clip(np.asarray(nib.load(str(path)).dataobj, dtype=np.float32), *HU_WINDOW)


def mean_pairwise_difference(volumes: list[np.ndarray]) -> float:
    pairs = list(itertools.combinations(range(len(volumes)), 2))
    return float(np.mean([np.abs(volumes[i] - volumes[j]).mean() for i, j in pairs]))


def save_montage(path: Path, rows: list[tuple[Path, list[Path]]]) -> None:
    """One row per held-out mask: the real image, the mask, then samples (middle slice 1 of 4, W400/L40)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import nibabel as nib

    columns = 2 + max(len(samples) for _, samples in rows)
    figure, axes = plt.subplots(len(rows), columns, figsize=(2 * columns, 2 * len(rows)), squeeze=False)
    for row, (mask, samples) in enumerate(rows):
        real = Path(str(mask).replace("labelsTs", "imagesTs"))
        views = [(real, (-160, 240)), (mask, (0, 2))] + [(sample, (-160, 240)) for sample in samples]
        for column, (file, (low, high)) in enumerate(views):
            data = np.asarray(nib.load(str(file)).dataobj, dtype=np.float32)[:, :, 1].T
            axes[row, column].imshow(data, origin="lower", cmap="gray", vmin=low, vmax=high)
        titles = ["real (held out)", "mask"] + [f"sample {k}" for k in range(len(samples))]
        for column in range(columns):
            axes[row, column].axis("off")
            if row == 0 and column < len(titles):
                axes[row, column].set_title(titles[column], fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)


def parameter_counts(cpu_overrides: dict | None = None) -> dict[str, float]:
    """Millions of parameters of the full-scale configs (built on the meta device: no memory is used)."""
    import torch
    from monai.bundle import ConfigParser
    from monai.networks.nets import PatchDiscriminator

    networks = bundle_module("networks")

    def arguments(files, overrides=None):
        parser = ConfigParser()
        parser.read_config([str(BUNDLE / "configs" / f) for f in files])
        for key, value in (overrides or {}).items():
            parser[key] = value
        return {k: parser.get_parsed_content(f"network_def#{k}") for k in parser["network_def"] if k != "_target_"}

    def discriminator(files):
        parser = ConfigParser()
        parser.read_config([str(BUNDLE / "configs" / f) for f in files])
        names = [k for k in parser["discriminator_def"] if k != "_target_"]
        return PatchDiscriminator(**{k: parser.get_parsed_content(f"discriminator_def#{k}") for k in names})

    seed_scale = {"gan_channels": [2560, 2560, 2048, 1536, 1024, 512, 256, 128, 64]}
    with torch.device("meta"):
        counts = {
            "VAE 4x256x256 (train.json)": networks.ConditionalVAE(**arguments(["train.json"])),
            "VAE 96^3 (+ train_3d.json)": networks.ConditionalVAE(**arguments(["train.json", "train_3d.json"])),
            "GAN generator (+ train_gan.json)": networks.MaskConditionedGenerator(
                **arguments(["train.json", "train_gan.json"])
            ),
            "GAN generator at seed 000's scale (gan_channels override in the docs)": networks.MaskConditionedGenerator(
                **arguments(["train.json", "train_gan.json"], seed_scale)
            ),
            "GAN generator 96^3 (+ train_gan.json + train_3d.json)": networks.MaskConditionedGenerator(
                **arguments(["train.json", "train_gan.json", "train_3d.json"])
            ),
            "patch discriminator (train_vaegan.json / train_gan.json)": discriminator(["train.json", "train_gan.json"]),
        }
        if cpu_overrides:
            overrides = {k: v for k, v in cpu_overrides.items() if k in ("roi_size", "strides", "channels")}
            counts["VAE with this benchmark's CPU overrides"] = networks.ConditionalVAE(
                **arguments(["train.json"], overrides)
            )
    return {name: networks.count_parameters(net) / 1e6 for name, net in counts.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "runs" / "vae_ct_quality"))
    parser.add_argument("--n_cases", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kl_weight", type=float, default=None, help="override of kl_weight (default: the config's)")
    parser.add_argument("--shape", default="128,128,48", help="voxels of each phantom scan")
    parser.add_argument("--image_size", default="64,64", help="in-plane size of the sub-volumes")
    parser.add_argument("--channels", default="8,16,32,64", help="encoder widths, one stride-2 stage each")
    args = parse_args_with_smoke(parser, SMOKE)
    logging.basicConfig(level=logging.WARNING)

    import torch

    from tools.bundle_check import run_workflow
    from tools.phantom import make_dataset
    from tools.prep import prepare_dataset

    torch.set_num_threads(max(1, torch.get_num_threads()))
    out = Path(args.out)
    memorization = bundle_module("memorization")
    print(f"torch threads: {torch.get_num_threads()}")

    start = time.perf_counter()
    shape = tuple(int(v) for v in args.shape.split(","))
    image_size = [int(v) for v in args.image_size.split(",")]
    channels = [int(v) for v in args.channels.split(",")]
    make_dataset(out / "phantom", n_cases=args.n_cases, seed=args.seed, shape=shape, tumor_fraction=0.5,
                 test_fraction=0.25, progress=False)  # fmt: skip
    prepare_dataset(out / "phantom", out / "sub64", mode="subvolumes", size=image_size, hu_window=None)
    datalist = json.loads((out / "sub64" / "dataset.json").read_text())
    train_images = [out / "sub64" / e["image"] for e in datalist["training"]]
    test_images = [out / "sub64" / e["image"] for e in datalist["test"]]
    print(
        f"data: {args.n_cases} phantom patients (seed {args.seed}), {len(train_images)} training and "
        f"{len(test_images)} held-out sub-volumes of 4x{image_size[0]}x{image_size[1]} "
        f"({time.perf_counter() - start:.1f} s)"
    )

    cpu = {
        "roi_size": [*image_size, 4],
        "strides": [[2, 2, 1]] * len(channels),
        "channels": channels,
        "train#handlers#4#iteration_log": False,
        "num_workers": 0,
        "max_epochs": args.epochs,
        "val_interval": args.epochs,
        "seed": args.seed,
    }
    if args.kl_weight is not None:
        cpu["kl_weight"] = args.kl_weight
    for name, millions in parameter_counts(cpu).items():
        print(f"parameters, {name}: {millions:.2f} M")
    print("overrides of configs/train.json and configs/inference.json: " + json.dumps(cpu))
    common = {**cpu, "dataset_dir": str(out / "sub64"), "ckpt_dir": str(out / "models"), "output_dir": str(out)}
    if (out / "models" / "model.pt").is_file():
        print(f"reusing the trained model {out / 'models' / 'model.pt'} (delete it to train again)")
    else:
        start, cpu_start = time.perf_counter(), time.process_time()
        run_workflow(BUNDLE, "configs/train.json", "train", overrides=common, logging_file=False)
        print(
            f"training: {args.epochs} epochs in {time.perf_counter() - start:.0f} s wall clock, "
            f"{time.process_time() - cpu_start:.0f} s CPU time of this process"
        )

    for key in ("test", "training"):
        start = time.perf_counter()
        evaluation = run_workflow(
            BUNDLE, ["configs/train.json", "configs/evaluate.json"], "train",
            overrides={**common, "val_key": key, "output_dir": str(out / f"eval_{key}")}, logging_file=False,
        )  # fmt: skip
        mae = evaluation.parser.get_parsed_content("validate#evaluator").state.metrics["val_mae_hu"]
        what = "held-out patients" if key == "test" else "training sub-volumes"
        print(f"reconstruction MAE, {what}: {mae:.1f} HU ({time.perf_counter() - start:.1f} s)")
    mean_image = np.mean([load_hu(p) for p in train_images], axis=0)
    baseline = np.mean([np.abs(load_hu(p) - mean_image).mean() for p in test_images])
    print(f"for scale: MAE of the mean training image on the held-out sub-volumes: {baseline:.1f} HU")

    infer = {k: v for k, v in common.items() if k not in ("max_epochs", "val_interval", "ckpt_dir") and "#" not in k}
    infer["ckpt_path"] = str(out / "models" / "model.pt")
    start = time.perf_counter()
    test_samples = {"datalist_key": "test", "num_samples": args.samples, "output_dir": str(out / "samples_test")}
    run_workflow(BUNDLE, "configs/inference.json", "infer", logging_file=False, overrides={**infer, **test_samples})
    generated = json.loads((out / "samples_test" / "datalist.json").read_text())["training"]
    by_mask: dict[str, list[np.ndarray]] = {}
    for entry in generated:
        by_mask.setdefault(entry["source_mask"], []).append(load_hu(out / "samples_test" / entry["image"]))
    first_mask = next(iter(by_mask))
    diversity_first = mean_pairwise_difference(by_mask[first_mask])
    diversity_all = float(np.mean([mean_pairwise_difference(v) for v in by_mask.values()]))
    real_spread = mean_pairwise_difference([load_hu(p) for p in test_images])
    print(
        f"diversity: mean pairwise |difference| of {args.samples} samples of one mask ({Path(first_mask).name}): "
        f"{diversity_first:.1f} HU; mean over the {len(by_mask)} held-out masks: {diversity_all:.1f} HU; between the "
        f"real held-out images (different patients and levels): {real_spread:.1f} HU "
        f"({time.perf_counter() - start:.1f} s for {len(generated)} samples)"
    )

    montage_rows = [(Path(mask), [out / "samples_test" / e["image"] for e in generated if e["source_mask"] == mask][:4])
                    for mask in list(by_mask)[:4]]  # fmt: skip
    save_montage(out / "samples_montage.png", montage_rows)
    print(f"montage of 4 held-out masks with 4 samples each: {out / 'samples_montage.png'}")

    start = time.perf_counter()
    train_samples = {"datalist_key": "training", "num_samples": 1, "output_dir": str(out / "samples_train")}
    run_workflow(BUNDLE, "configs/inference.json", "infer", logging_file=False, overrides={**infer, **train_samples})
    print("memorization: one sample per training mask against every training image")
    report = memorization.check_memorization(
        out / "samples_train" / "datalist.json", out / "sub64" / "dataset.json", verbose=False,
        report_file=out / "memorization_samples.json",
    )  # fmt: skip
    nccs = np.array([r["ncc"] for r in report["results"]])
    own = np.mean([Path(r["nearest"]).name == Path(r["sample"]).name.rsplit("_s", 1)[0] + ".nii.gz"
                   for r in report["results"]])  # fmt: skip
    print(
        f"  samples: NCC to the nearest training image median {np.median(nccs):.3f} (range {nccs.min():.3f}.."
        f"{nccs.max():.3f}); {report['n_near_copies']} of {len(nccs)} flagged as near-copies (NCC >= "
        f"{report['threshold']}); nearest is the training image of the sample's own mask for {own:.0%}"
    )
    reference = memorization.check_memorization(
        [str(p) for p in test_images], out / "sub64" / "dataset.json", verbose=False,
        report_file=out / "memorization_real_heldout.json",
    )  # fmt: skip
    real = np.array([r["ncc"] for r in reference["results"]])
    print(
        f"  real held-out images (other patients, not copies): NCC to the nearest training image median "
        f"{np.median(real):.3f} (range {real.min():.3f}..{real.max():.3f}); {reference['n_near_copies']} flagged "
        f"({time.perf_counter() - start:.1f} s)"
    )


if __name__ == "__main__":
    main()
