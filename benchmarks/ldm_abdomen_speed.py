"""Benchmark of the ldm_abdomen bundle: sampling time of DDPM-1000, DDIM-50 and rectified flow (ratios to DDPM),
and peak memory of decoding a 512x512x128 volume whole vs with a sliding window over latent patches (ratio).

    python benchmarks/ldm_abdomen_speed.py                  # the measured setting of the bundle's docs
    python benchmarks/ldm_abdomen_speed.py --smoke          # seconds: tiny sizes, checks that it runs
    python benchmarks/ldm_abdomen_speed.py --ae_channels 64,128,256 --unet_channels 256,256,512 \
        --head_channels 0,64,64 --latent 8,36,44,28          # the model-zoo widths (a GPU-class machine)

Sampling runs the bundle's own loop (``scripts.sampling.LatentSampler.sample_latents``) on a randomly initialised
``DiffusionModelUNet`` (speed does not depend on the weights) from the same seeded noise; every sampler evaluates the
network once per step, so the ratios follow the step counts plus the per-step scheduler cost. Decoding runs in a
fresh subprocess per mode (the bundle's ``decode_from_latent``: ``AutoencoderKL.decode`` at once, or MONAI's
``SlidingWindowInferer`` over latent patches with Gaussian blending, output accumulated on the CPU). The decoding's
peak memory is the process's resident high-water mark (``VmHWM``, reset just before decoding through Linux
``/proc/self/clear_refs``) minus its resident memory at that moment. Both outputs are compared (mean and maximum
absolute difference after mapping [0, 1] to the [-1000, 1000] HU window): GroupNorm statistics computed per patch
make sliding-window decoding an approximation of whole-volume decoding.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from smoke import parse_args_with_smoke

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "ldm_abdomen"
HU_RANGE = 2000.0  # the bundle's default window [-1000, 1000] HU
SMOKE = {
    "latent": "8,8,8,4",
    "unet_channels": "8,8,16",
    "head_channels": "0,8,8",
    "ddpm_steps": 20,
    "ddim_steps": 4,
    "rflow_steps": 3,
    "ae_channels": "8,8,8",
    "groups": 4,
    "volume": "64,64,32",
    "decode_roi": "8,8,8",
}


def _ints(text: str) -> list[int]:
    return [int(v) for v in str(text).split(",") if v.strip()]


def _bundle_scripts():
    sys.path.insert(0, str(BUNDLE))
    import scripts.latent  # noqa: F401  (the bundle's package, as a config imports it)
    import scripts.sampling

    return sys.modules["scripts.latent"], scripts.sampling


def _autoencoder(channels: list[int], latent_channels: int, groups: int):
    from monai.networks.nets import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        spatial_dims=3, in_channels=1, out_channels=1, latent_channels=latent_channels, channels=channels,
        num_res_blocks=2, norm_num_groups=groups, norm_eps=1e-6, attention_levels=[False] * len(channels),
        with_encoder_nonlocal_attn=False, with_decoder_nonlocal_attn=False, include_fc=False,
    ).eval()  # fmt: skip


def _status_mb(field: str) -> float | None:
    """``VmRSS`` (resident now) or ``VmHWM`` (resident peak) of this process in MB, from /proc (Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return float(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    """Reset the resident-memory high-water mark (Linux ``clear_refs`` 5), so the peak measured next belongs to
    the decoding alone and not to imports or model building."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_mb() -> float:
    hwm = _status_mb("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def decode_child(args: argparse.Namespace) -> None:
    """One decoding in this (fresh) process; prints a JSON line with its peak memory and time."""
    latent_mod, _ = _bundle_scripts()
    from monai.inferers import SlidingWindowInferer

    torch.set_num_threads(args.threads)
    autoencoder = _autoencoder(_ints(args.ae_channels), args.latent_channels, args.groups)
    factor = 2 ** (len(_ints(args.ae_channels)) - 1)
    latent_size = [s // factor for s in _ints(args.volume)]
    z = torch.randn([1, args.latent_channels] + latent_size, generator=torch.Generator().manual_seed(0))
    inferer = None
    if args.decode_child == "sliding":
        inferer = SlidingWindowInferer(
            roi_size=_ints(args.decode_roi), sw_batch_size=1, overlap=args.overlap, mode="gaussian",
            device=torch.device("cpu"), progress=False,
        )  # fmt: skip
    with torch.no_grad():  # warm-up on a small latent: one-time allocations do not count as decoding memory
        latent_mod.decode_from_latent(autoencoder, z[..., :8, :8, :8], 1.0, None)
    reset = _reset_peak()
    before = _status_mb("VmRSS") if reset else _peak_mb()
    start = time.perf_counter()
    with torch.no_grad():
        image = latent_mod.decode_from_latent(autoencoder, z, 1.0, inferer)
    seconds = time.perf_counter() - start
    peak = _peak_mb()
    out = Path(args.save)
    np.save(out, torch.as_tensor(image)[0, 0].float().numpy())
    print(json.dumps({"mode": args.decode_child, "seconds": seconds, "rss_before_mb": before, "peak_rss_mb": peak,
                      "decode_peak_mb": peak - before, "shape": list(image.shape)}))  # fmt: skip


def run_decode(mode: str, args: argparse.Namespace, folder: Path) -> dict:
    save = folder / f"{mode}.npy"
    command = [
        sys.executable, __file__, "--decode_child", mode, "--ae_channels", args.ae_channels, "--groups",
        str(args.groups), "--latent_channels", str(args.latent_channels), "--volume", args.volume, "--decode_roi",
        args.decode_roi, "--overlap", str(args.overlap), "--threads", str(args.threads), "--save", str(save),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if done.returncode != 0:
        return {"mode": mode, "error": (done.stderr or done.stdout).strip().splitlines()[-1:]}
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["file"] = str(save)
    return result


def count_parameters() -> dict[str, float]:
    """Parameters (millions) of the networks as the bundle's configs define them (the model-zoo widths), built on the
    ``meta`` device: no memory and no time spent on initialising weights."""
    from monai.bundle import ConfigParser

    _bundle_scripts()
    counts = {}
    for files, keys in (
        (["train.json", "train_autoencoder.json"], ("autoencoder_def", "discriminator_def", "diffusion_def")),
        (["train.json", "train_controlnet.json"], ("controlnet_def",)),
    ):
        parser = ConfigParser()
        parser.read_config([str(BUNDLE / "configs" / name) for name in files])
        parser["bundle_root"] = str(BUNDLE)
        for key in keys:
            with torch.device("meta"):
                network = parser.get_parsed_content(key)
            counts[key.replace("_def", "")] = sum(p.numel() for p in network.parameters()) / 1e6
            del network
    return counts


def time_samplers(args: argparse.Namespace) -> list[dict]:
    _, sampling = _bundle_scripts()
    from monai.networks.nets import DiffusionModelUNet

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    latent = _ints(args.latent)
    unet = DiffusionModelUNet(
        spatial_dims=3, in_channels=latent[0], out_channels=latent[0], channels=_ints(args.unet_channels),
        attention_levels=[False, True, True], num_head_channels=_ints(args.head_channels), num_res_blocks=2,
        norm_num_groups=args.groups, include_fc=False, use_combined_linear=False,
    ).eval()  # fmt: skip
    stub = SimpleNamespace(record=None)  # no stored statistics: the objective check is skipped
    noise = torch.randn([1] + latent, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # warm-up: one-time initialisation is not sampling time
        unet(noise, torch.zeros(1, dtype=torch.long))
    results = []
    for name, steps in (("ddpm", args.ddpm_steps), ("ddim", args.ddim_steps), ("rflow", args.rflow_steps)):
        sampler = sampling.LatentSampler(stub, sampling.make_scheduler(name), name, steps)
        start = time.perf_counter()
        out = sampler.sample_latents(noise.clone(), unet, torch.Generator().manual_seed(0))
        seconds = time.perf_counter() - start
        results.append({"sampler": name, "steps": steps, "seconds": seconds, "finite": bool(torch.isfinite(out).all())})
    return results


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latent", default="8,12,12,8", help="C,X,Y,Z of the sampled latent")
    parser.add_argument("--unet_channels", default="32,64,64")
    parser.add_argument("--head_channels", default="0,32,32")
    parser.add_argument("--ddpm_steps", type=int, default=1000)
    parser.add_argument("--ddim_steps", type=int, default=50)
    parser.add_argument("--rflow_steps", type=int, default=30)
    parser.add_argument("--ae_channels", default="8,16,32", help="AutoencoderKL channels for the decoding part")
    parser.add_argument("--groups", type=int, default=8, help="GroupNorm groups of both networks")
    parser.add_argument("--latent_channels", type=int, default=8)
    parser.add_argument("--volume", default="512,512,128", help="decoded volume size")
    parser.add_argument("--decode_roi", default="32,32,32", help="latent patch of the sliding window")
    parser.add_argument("--overlap", type=float, default=0.25)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: stable when the machine is shared)")
    parser.add_argument("--skip_decode", action="store_true")
    parser.add_argument("--skip_params", action="store_true", help="do not count the full-scale networks' parameters")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--decode_child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--save", default=None, help=argparse.SUPPRESS)
    args = parse_args_with_smoke(parser, SMOKE, argv)
    if args.decode_child:
        decode_child(args)
        return {}

    total = time.perf_counter()
    result: dict = {"settings": vars(args)}
    if not args.skip_params:
        result["parameters_millions"] = count_parameters()
        print("parameters of the configs' full-scale networks (millions): " + ", ".join(
            f"{name} {value:.2f}" for name, value in result["parameters_millions"].items()))  # fmt: skip
    samplers = time_samplers(args)
    ddpm = samplers[0]["seconds"]
    print(f"sampling a {args.latent} latent, DiffusionModelUNet channels {args.unet_channels}, "
          f"{args.threads} threads:")  # fmt: skip
    for row in samplers:
        row["ratio_to_ddpm"] = row["seconds"] / ddpm
        print(f"  {row['sampler']:5s} {row['steps']:5d} steps  {row['seconds']:8.2f} s  "
              f"{row['seconds'] / row['steps'] * 1000:7.1f} ms/step  time / DDPM = {row['ratio_to_ddpm']:.4f}  "
              f"(speed-up {1 / row['ratio_to_ddpm']:.1f}x)")  # fmt: skip
    result["sampling"] = samplers
    if not args.skip_decode:
        with tempfile.TemporaryDirectory(prefix="ldm_decode_") as tmp:
            full = run_decode("full", args, Path(tmp))
            sliding = run_decode("sliding", args, Path(tmp))
            print(f"decoding a {args.volume} volume, AutoencoderKL channels {args.ae_channels}, latent patch "
                  f"{args.decode_roi}, overlap {args.overlap}:")  # fmt: skip
            for row in (full, sliding):
                if "error" in row:
                    print(f"  {row['mode']:7s} failed: {row['error']}")
                else:
                    print(f"  {row['mode']:7s} peak {row['decode_peak_mb']:9.1f} MB above {row['rss_before_mb']:.0f} MB"
                          f" (process peak {row['peak_rss_mb']:.0f} MB), {row['seconds']:.1f} s")  # fmt: skip
            failed = [row for row in (full, sliding) if "error" in row]
            if args.smoke and failed:  # at tiny sizes a decoding cannot run out of memory: the pipeline is broken
                raise SystemExit(f"smoke run: decoding failed: {failed}")
            if "error" not in full and "error" not in sliding:
                ratio = full["decode_peak_mb"] / max(sliding["decode_peak_mb"], 1e-6)
                a, b = np.load(full["file"]), np.load(sliding["file"])
                diff = np.abs(np.clip(a, 0, 1) - np.clip(b, 0, 1)) * HU_RANGE
                result["decode_agreement_hu"] = {"mean": float(diff.mean()), "max": float(diff.max())}
                print(
                    f"  peak memory full / sliding window = {ratio:.2f}; outputs differ by "
                    f"{diff.mean():.2f} HU on average (max {diff.max():.1f} HU) in the [-1000, 1000] window"
                )
                result["decode_peak_ratio_full_to_sliding"] = ratio
            result["decoding"] = [{k: v for k, v in row.items() if k != "file"} for row in (full, sliding)]
    result["total_seconds"] = time.perf_counter() - total
    print(f"total {result['total_seconds']:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
