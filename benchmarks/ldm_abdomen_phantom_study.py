"""Phantom study of ldm_abdomen: seed 002's crop-context experiment at CPU scale, end to end, with its numbers.

    python benchmarks/ldm_abdomen_phantom_study.py [--out runs/ldm_abdomen_study] [--diffusion_epochs 300]
    python benchmarks/ldm_abdomen_phantom_study.py --smoke    # seconds: tiny sizes in runs/ldm_abdomen_study_smoke

1. a phantom data set (``tools.phantom``; ``--cases`` patients, 25 % in the test split), prepared in HU for the
   crop modes ``full``, ``semi`` and ``pancreas`` (``tools.prep.prepare_dataset(..., hu_window=None)``);
2. stage 1: one autoencoder (``configs/train.json`` + ``configs/train_autoencoder.json``) trained on the full crops,
   then frozen for every crop mode, as seed 002 froze one pretrained autoencoder;
3. stage 2 per crop mode: the diffusion model (``configs/train.json``) on the frozen latents;
4. ``--samples`` samples per mode with DDIM-50 (``--ddim_steps``; ``configs/inference.json``);
5. ``configs/evaluate_synthetic.json`` over the three modes: HU histogram distances to the real crops of the test
   split, medians, seg_unet3d detection when its bundle has weights, montages.

The networks are the bundle's with smaller widths (CPU budget; the overrides are printed and saved) and the
learning rate is 1e-4 instead of 1e-5 (few epochs); the autoencoder learns to reconstruct for a third of its
epochs before the adversarial terms start. Results go to ``--out`` (``study.json``, the evaluation's
``report.md`` and PNGs). Everything is seeded; times depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from smoke import parse_args_with_smoke

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "ldm_abdomen"
SMOKE = {
    "out": "runs/ldm_abdomen_study_smoke",
    "cases": 4,
    "shape": "32,32,16",
    "image_size": "32,32,32",
    "ae_epochs": 1,
    "diffusion_epochs": 1,
    "val_interval": 1,
    "samples": 1,
    "ddim_steps": 2,
    "decode_size": "32,32,32",
    "decode_patch": 4,
}


def sliding_window_agreement(weights: Path, nets: dict, phantom: Path, size: str, patch: int) -> dict:
    """Encode a phantom test scan (resized to ``size``, the bundle's HU window) with the trained autoencoder, decode
    it whole and with the sliding window of configs/inference.json, and compare both in HU."""
    import nibabel as nib
    from monai.inferers import SlidingWindowInferer
    from monai.networks.nets import AutoencoderKL

    sys.path.insert(0, str(BUNDLE))
    from scripts.latent import decode_from_latent, encode_to_latent, load_autoencoder_weights

    autoencoder = AutoencoderKL(
        spatial_dims=3, in_channels=1, out_channels=1, latent_channels=8, channels=nets["autoencoder_def#channels"],
        num_res_blocks=nets["autoencoder_def#num_res_blocks"], norm_num_groups=nets["autoencoder_def#norm_num_groups"],
        norm_eps=1e-6, attention_levels=[False] * 3, with_encoder_nonlocal_attn=False, with_decoder_nonlocal_attn=False,
        include_fc=False,
    ).eval()  # fmt: skip
    load_autoencoder_weights(autoencoder, weights)
    datalist = json.loads((phantom / "dataset.json").read_text())
    case = phantom / datalist["test"][0]["image"]
    ct = torch.as_tensor(nib.load(str(case)).get_fdata(), dtype=torch.float32)
    image = ((ct.clamp(-1000, 1000) + 1000) / 2000)[None, None]
    shape = [int(s) for s in size.split(",")]
    image = torch.nn.functional.interpolate(image, size=shape, mode="trilinear", align_corners=False)
    inferer = SlidingWindowInferer(roi_size=[patch] * 3, sw_batch_size=1, overlap=0.25, mode="gaussian")
    with torch.no_grad():
        latent = encode_to_latent(autoencoder, image, 1.0, sample=False)
        whole = decode_from_latent(autoencoder, latent, 1.0).clamp(0, 1)
        sliding = decode_from_latent(autoencoder, latent, 1.0, inferer).clamp(0, 1)
    to_hu = 2000.0
    return {
        "volume": shape,
        "latent": list(latent.shape[1:]),
        "latent_patch": [patch] * 3,
        "overlap": 0.25,
        "sliding_vs_whole_mean_abs_hu": float((sliding - whole).abs().mean() * to_hu),
        "sliding_vs_whole_p99_abs_hu": float(torch.quantile((sliding - whole).abs().flatten()[::7], 0.99) * to_hu),
        "whole_vs_input_mean_abs_hu": float((whole - image).abs().mean() * to_hu),
        "sliding_vs_input_mean_abs_hu": float((sliding - image).abs().mean() * to_hu),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/ldm_abdomen_study")
    parser.add_argument("--cases", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shape", default="96,96,48", help="phantom volume size")
    parser.add_argument("--image_size", default="64,64,32")
    parser.add_argument("--ae_epochs", type=int, default=150)
    parser.add_argument("--diffusion_epochs", type=int, default=300)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--modes", default="full,semi,pancreas")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--decode_size", default="256,256,128", help="volume for the decoding comparison")
    parser.add_argument("--decode_patch", type=int, default=32, help="latent patch of the sliding-window decoding")
    parser.add_argument("--val_interval", type=int, default=50, help="epochs between validations")
    parser.add_argument("--ddim_steps", type=int, default=50, help="DDIM steps of the sampling")
    args = parse_args_with_smoke(parser, SMOKE, argv)

    sys.path.insert(0, str(REPO))
    from tools.bundle_check import run_workflow
    from tools.phantom import make_dataset
    from tools.prep import prepare_dataset

    torch.set_num_threads(args.threads)
    out = Path(args.out).resolve()
    start = time.perf_counter()
    times: dict[str, float] = {}

    def lap(name: str, since: float) -> float:
        times[name] = round(time.perf_counter() - since, 1)
        print(f"[{time.perf_counter() - start:7.0f} s] {name}: {times[name]} s", flush=True)
        return time.perf_counter()

    tick = time.perf_counter()
    shape = tuple(int(s) for s in args.shape.split(","))
    phantom = out / "data" / "phantom"
    if not (phantom / "dataset.json").is_file():
        make_dataset(phantom, n_cases=args.cases, seed=args.seed, shape=shape, tumor_fraction=0.5, test_fraction=0.25,
                     progress=False)  # fmt: skip
    modes = args.modes.split(",")
    prepared = {mode: out / "data" / mode for mode in modes}
    for mode in modes:
        prepare_dataset(phantom, prepared[mode], mode=mode, hu_window=None)
    tick = lap("data", tick)

    image_size = [int(s) for s in args.image_size.split(",")]
    nets = {
        "image_size": image_size,
        "autoencoder_def#channels": [16, 32, 32], "autoencoder_def#num_res_blocks": 1,
        "autoencoder_def#norm_num_groups": 8,
        "diffusion_def#channels": [32, 64, 64], "diffusion_def#num_head_channels": [0, 32, 32],
        "diffusion_def#num_res_blocks": 1, "diffusion_def#norm_num_groups": 8,
    }  # fmt: skip
    train = {**nets, "train_batch_size": 4, "num_workers": 0, "learning_rate": 1e-4, "val_interval": args.val_interval,
             "scale_factor_samples": 8, "checkpoint_interval": 25}  # fmt: skip
    autoencoder = {
        "ae_patch_size": [32, 32, 32], "discriminator_def#channels": 16, "train_batch_size": 2,
        "adversarial_start_epoch": args.ae_epochs // 3, "train#trainer#max_epochs": args.ae_epochs,
    }  # fmt: skip
    ae_dir = out / "autoencoder"
    base = {**train, "dataset_dir": str(prepared[modes[0]]), "crop_mode": modes[0], "ckpt_dir": str(ae_dir),
            "output_dir": str(out / "logs" / "autoencoder")}  # fmt: skip
    if not (ae_dir / "model_autoencoder.pt").is_file():
        run_workflow(BUNDLE, ["configs/train.json", "configs/train_autoencoder.json"], "train",
                     overrides={**base, **autoencoder})  # fmt: skip
    tick = lap("stage 1 autoencoder", tick)

    runs = {}
    for mode in modes:
        ckpt = out / "diffusion" / mode
        ckpt.mkdir(parents=True, exist_ok=True)
        overrides = {
            **train, "dataset_dir": str(prepared[mode]), "crop_mode": mode, "ckpt_dir": str(ckpt),
            "output_dir": str(out / "logs" / mode), "autoencoder_path": str(ae_dir / "model_autoencoder.pt"),
            "lr_milestones": [10 * args.diffusion_epochs], "train#trainer#max_epochs": args.diffusion_epochs,
        }  # fmt: skip
        if not (ckpt / "model.pt").is_file():
            run_workflow(BUNDLE, "configs/train.json", "train", overrides=overrides)
        tick = lap(f"stage 2 diffusion ({mode})", tick)
        samples = out / "samples" / mode
        run_workflow(
            BUNDLE, "configs/inference.json", "inference",
            overrides={**nets, "ckpt_dir": str(ckpt), "autoencoder_path": str(ae_dir / "model_autoencoder.pt"),
                       "output_dir": str(samples), "num_samples": args.samples, "sampler": "ddim",
                       "num_inference_steps": args.ddim_steps},
        )  # fmt: skip
        tick = lap(f"sampling DDIM-{args.ddim_steps} x {args.samples} ({mode})", tick)
        runs[mode] = {"synthetic": str(samples), "real": str(prepared[mode])}

    decoding = sliding_window_agreement(
        ae_dir / "model_autoencoder.pt", nets, phantom, args.decode_size, args.decode_patch
    )
    tick = lap("sliding-window vs whole decoding", tick)
    print(json.dumps(decoding, indent=2))

    workflow = run_workflow(
        BUNDLE, "configs/evaluate_synthetic.json", "inference",
        overrides={"runs": runs, "output_dir": str(out / "evaluation"), "max_real": args.cases},
    )  # fmt: skip
    report = workflow.parser.get_parsed_content("report")
    lap("evaluation", tick)
    study = {
        "settings": vars(args), "overrides": {"nets": nets, "train": train, "autoencoder": autoencoder},
        "sliding_window_decoding": decoding, "times_s": times, "total_s": round(time.perf_counter() - start, 1),
        "evaluation": report,
    }  # fmt: skip
    (out / "study.json").write_text(json.dumps(study, indent=2) + "\n")
    print((out / "evaluation" / "report.md").read_text())
    print(f"total {study['total_s']} s; results in {out}")
    return study


if __name__ == "__main__":
    main()
