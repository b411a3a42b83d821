"""Benchmark: seconds per early tumor of DiffTumor synthesis against one seg_unet3d training step, same run.

    python benchmarks/difftumor_speed.py [--repeats 5] [--threads 0] [--crop 96]
    python benchmarks/difftumor_speed.py --smoke      # seconds: tiny sizes, checks that it runs

Synthesis runs at the full reference architecture of ``bundles/difftumor/configs/inference.json`` (VQVAE 16-32-64 with
the 16384 x 8 codebook, DiffusionModelUNet 24-48-96-96, DDPM T = 4), random weights (the speed does not depend on the
values), on a 96^3 crop at 1 mm (the config's ``crop_size``, or ``--crop``): encode the masked crop, 4 diffusion
steps, decode (the latent window the blend needs), feathered blend. The scan is
``../shared/data/real_ct/example_ct_sm.nii.gz`` resampled to 1 mm around the pancreas (label 7 of
``example_seg.nii.gz``), or a synthetic ellipsoid organ in noise when ``../shared`` is absent.
Each draw is an early tumor (tiny or small, 1-3 tumors in one crop, one synthesis call).

The reference step is one seg_unet3d training step: its network and loss built from
``bundles/seg_unet3d/configs/train.json`` with ``monai.bundle.ConfigParser`` when that file exists (else monai
``UNet(3, 1, 3, channels=[28, 56, 112, 224, 448], strides=[2, 2, 2, 2], num_res_units=2)`` + DiceCE), Adam, on
``batch_size x num_samples`` crops of the same size (its config: 1 x 2), forward + backward + step. Synthesis and steps
alternate, so machine load hits both alike. Prints medians, the per-stage split of synthesis, and the ratio
synthesis / step: <= 1 meets the target (online synthesis never slows training).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from smoke import parse_args_with_smoke

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "difftumor"
SEG_TRAIN = REPO / "bundles" / "seg_unet3d" / "configs" / "train.json"
SHARED = REPO.parent / "shared" / "data" / "real_ct"
SMOKE = {"repeats": 1, "crop": 32}
# a smoke run shrinks the networks of both configs too (overrides of their keys): its times are not measurements
SMOKE_SYNTHESIS_CONFIG = {
    "autoencoder_def#channels": [8, 8, 8],
    "autoencoder_def#num_res_channels": [8, 8, 8],
    "autoencoder_def#num_embeddings": 64,
    "diffusion_def#channels": [8, 8, 16, 16],
    "diffusion_def#num_head_channels": 8,
}
SMOKE_SEG_CONFIG = {"network_def#channels": [4, 8, 16, 32, 64]}


def load_synthesizer(crop: int | None = None, overrides: dict | None = None):
    """The ``difftumor`` family of the bundle's inference config (full scale unless ``overrides`` change it, random
    weights allowed) and its crop size (the config's ``crop_size`` unless ``crop`` is given)."""
    from monai.bundle import ConfigParser

    sys.path.insert(0, str(BUNDLE))
    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "configs" / "inference.json"))
    parser["bundle_root"] = str(BUNDLE)
    parser["ckpt_dir"] = "/nonexistent"  # no weights: random initialisation, same cost
    parser["allow_random_weights"] = True
    parser["device"] = "$torch.device('cpu')"
    if crop:
        parser["crop_size"] = crop
    for key, value in (overrides or {}).items():
        parser[key] = value
    return parser.get_parsed_content("families#difftumor"), int(parser.get_parsed_content("crop_size"))


def scan_and_organ() -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """A 1 mm scan (HU) around a pancreas, its organ mask and affine, and where it came from."""
    from scipy import ndimage

    ct, seg = SHARED / "example_ct_sm.nii.gz", SHARED / "example_seg.nii.gz"
    if ct.is_file() and seg.is_file():
        import nibabel as nib

        image = nib.load(str(ct))
        hu = np.asarray(image.dataobj, dtype=np.float32)
        organ = np.asarray(nib.load(str(seg)).dataobj) == 7
        zooms = np.asarray(image.header.get_zooms()[:3], dtype=np.float64)
        centre = np.round(np.argwhere(organ).mean(0)).astype(int)
        half = np.ceil(72 / zooms).astype(int)  # a 144 mm box, resampled to 1 mm
        box = tuple(slice(max(c - h, 0), c + h) for c, h in zip(centre, half))
        hu = ndimage.zoom(hu[box], zooms, order=1)
        organ = ndimage.zoom(organ[box].astype(np.float32), zooms, order=0) > 0.5
        return hu, organ, np.eye(4), "example_ct_sm.nii.gz resampled to 1 mm"
    rng = np.random.RandomState(0)
    grid = np.indices((128, 128, 128)).astype(np.float64)
    organ = ((grid[0] - 64) / 45) ** 2 + ((grid[1] - 64) / 14) ** 2 + ((grid[2] - 64) / 12) ** 2 <= 1
    hu = (rng.normal(40, 15, organ.shape) + 60 * organ).astype(np.float32)
    return hu, organ, np.eye(4), "synthetic ellipsoid organ (../shared absent)"


def seg_step_factory(crop: int, overrides: dict | None = None):
    """One seg_unet3d training step on ``crop``^3 crops as a callable, and a description of it; ``overrides`` change
    keys of its train.json."""
    from monai.losses import DiceCELoss
    from monai.networks.nets import UNet

    batch, source = 2, "defaults (UNet 28..448, DiceCE, 1 x 2 crops)"
    if SEG_TRAIN.is_file():
        from monai.bundle import ConfigParser

        parser = ConfigParser()
        parser.read_config(str(SEG_TRAIN))
        for key, value in (overrides or {}).items():
            parser[key] = value
        network = parser.get_parsed_content("network_def")
        loss = parser.get_parsed_content("loss")
        batch = int(parser.get("batch_size", 1)) * int(parser.get("num_samples", 1))
        lr = float(parser.get("learning_rate", 1e-4))
        source = f"{SEG_TRAIN.relative_to(REPO)} (network_def, loss; {batch} crops a step)"
    else:
        network = UNet(3, 1, 3, channels=[28, 56, 112, 224, 448], strides=[2, 2, 2, 2], num_res_units=2)
        loss, lr = DiceCELoss(to_onehot_y=True, softmax=True), 1e-4
    optimizer = torch.optim.Adam(network.parameters(), lr=lr)
    out_channels = int(getattr(network, "out_channels", 3))
    images = torch.rand(batch, 1, crop, crop, crop)
    labels = torch.randint(0, out_channels, (batch, 1, crop, crop, crop))
    network.train()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss(network(images), labels).backward()
        optimizer.step()

    params = sum(p.numel() for p in network.parameters())
    return step, f"{source}, {params / 1e6:.1f} M parameters"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument(
        "--crop", type=int, default=None, help="crop size of synthesis and of the training step (default: the config's)"
    )
    args = parse_args_with_smoke(parser, SMOKE)
    if args.threads:
        torch.set_num_threads(args.threads)
    synthesizer, crop = load_synthesizer(args.crop, SMOKE_SYNTHESIS_CONFIG if args.smoke else None)
    hu, organ, affine, source = scan_and_organ()
    step, step_source = seg_step_factory(crop, SMOKE_SEG_CONFIG if args.smoke else None)
    models = synthesizer.models()
    sizes = {name: sum(p.numel() for p in m.parameters()) / 1e6 for name, m in models.items()}

    rng = np.random.RandomState(0)
    synthesizer(hu, organ, affine, rng, "early")  # warm-up
    step()
    synth_times, step_times, per_tumor, stages, windows = [], [], [], [], []
    for _ in range(args.repeats):
        start = time.perf_counter()
        result = synthesizer(hu, organ, affine, rng, "early")
        elapsed = time.perf_counter() - start
        synth_times.append(elapsed)
        per_tumor.append(elapsed / max(len(result.info["tumors"]), 1))
        stages.append(dict(synthesizer.last_timings))
        windows.append(result.info["decoded_latent_voxels"])
        start = time.perf_counter()
        step()
        step_times.append(time.perf_counter() - start)

    synth, seg = float(np.median(synth_times)), float(np.median(step_times))
    split = {name: float(np.median([s.get(name, 0.0) for s in stages])) for name in stages[0]}
    print(f"scan: {source}; torch threads: {torch.get_num_threads()}")
    print(
        "difftumor models (M parameters): "
        + ", ".join(f"{name} {size:.2f}" for name, size in sizes.items())
        + f"; crop {result.info['crop_size']}"
    )
    print(f"seg_unet3d step: {step_source}")
    print(
        f"early-tumor synthesis (1-3 tumors, one call): median {synth:.2f} s over {args.repeats} "
        f"(min {min(synth_times):.2f}, max {max(synth_times):.2f}); per tumor {float(np.median(per_tumor)):.2f} s"
    )
    print("  split: " + ", ".join(f"{name} {value:.2f} s" for name, value in split.items()))
    latent = int(np.prod(np.array(result.info["crop_size"]) // synthesizer.latent_factor))
    print(f"  decoded latent voxels: median {float(np.median(windows)):.0f} of {latent}")
    print(f"seg_unet3d training step: median {seg:.2f} s (min {min(step_times):.2f}, max {max(step_times):.2f})")
    verdict = "meets" if synth <= seg else "misses"
    print(f"ratio synthesis / training step = {synth / seg:.2f} ({verdict} the target <= 1)")


if __name__ == "__main__":
    main()
