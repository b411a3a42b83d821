"""Benchmark: issue 14's quality bars of one whole-image generator, over training seeds, printed as a table.

    python benchmarks/generator_quality.py --generator vae_ct [--variants vae,vaegan,gan] [--seeds 0 1] [--scale S]
    python benchmarks/generator_quality.py --generator ldm_abdomen [--variants ldm,ldm_rflow] [--seeds 0 1] [--scale S]
    python benchmarks/generator_quality.py --generator vae_ct --smoke   # seconds: tiny sizes, in runs/..._smoke

``--scale`` (default ``demo``: the demo scale, whose generator settings are issue 14's CPU recipes) is a scale of
``tools.studies`` or a JSON scale file. Results go to ``--out`` (default
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
import json
import os
import shutil
import sys
import time
import traceback
from copy import deepcopy
from pathlib import Path
from typing import Any, Mapping, Sequence

from smoke import parse_args_with_smoke

from tools.generator_quality import (  # noqa: F401 (bars, _num...: used by the benchmarks built on this one)
    BAR,
    SAMPLES_PER_MASK,
    _num,
    bars,
    evaluate_set,
    heldout_data,
    judge_overrides,
    judge_row,
    measure_generator,
    montage,
    phantom_noise_floor,
    real_reference,
    render_with_other_noise,
    synthesize_heldout,
    table_lines,
    training_times,
    untrained_settings,
    verdict,
)

REPO = Path(__file__).resolve().parents[1]
#: issue 14's CPU recipes are the demo scale's generator settings (``tools.studies.SCALE_SETTINGS["demo"]``): the demo
#: trains what this benchmark measures
RECIPES = "demo"
GENERATORS = {"vae_ct": ("vae", "vaegan", "gan"), "ldm_abdomen": ("ldm", "ldm_rflow")}
#: ldm_abdomen's variants, each on top of the scale's recipe: ``ldm`` trains the diffusion model and the ControlNet to
#: predict the noise and samples with DDIM (50 steps); ``ldm_rflow`` trains them as rectified flow and samples with it
#: in the scale's number of steps (the demo's recipe: ``benchmarks/ldm_abdomen_samplers.py`` found its label
#: consistency well above the noise-predicting model's, and equal at 8, 15 and 30 steps)
LDM_VARIANTS = {
    "ldm": {
        "ldm_train": {"train_scheduler": "ddpm"},
        "ldm_infer": {"sampler": "ddim", "num_inference_steps": 50},
    },
    "ldm_rflow": {"ldm_train": {"train_scheduler": "rflow"}, "ldm_infer": {"sampler": "rflow"}},
}
#: the command line's variant names -> vae_ct's generator families (``tools.studies.VAE_FAMILIES``)
VAE_FAMILY = {"vae": "vae", "vaegan": "vae_gan", "gan": "gan"}
LDM_RECIPE_KEYS = ("ldm_nets", "ldm_train", "ldm_stage", "ldm_epochs", "ldm_infer")
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

    if not Path(scale).exists() and (REPO / scale).is_file():  # a scale file relative to the repository
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


def generator_fingerprint(settings: Mapping[str, Any], generator: str, variant: str) -> dict[str, Any]:
    keys = ("vae",) if generator == "vae_ct" else LDM_RECIPE_KEYS
    return {"phantom": settings["phantom"], "crop_shape": settings["crop_shape"], "variant": variant,
            **{k: settings.get(k) for k in keys}}  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# step 1: data


def prepare_data(out: Path, settings: Mapping[str, Any]) -> dict[str, Any]:
    """Phantom and pancreas crops as the demo makes them, and the held-out datalist (validation + test masks)."""
    from tools.studies import phantom_data, prepared_split

    folder = claim(out / "data", {"phantom": settings["phantom"], "crop_shape": settings["crop_shape"]})
    phantom = phantom_data(folder / "phantom", settings, seed=0)
    split = prepared_split(phantom, folder / "crops_pancreas", "pancreas", settings["crop_shape"])
    data = heldout_data(split, phantom)
    log(f"data: phantom {settings['phantom']['n_cases']} patients {tuple(settings['phantom']['shape'])}, crops "
        f"{tuple(settings['crop_shape'])}: {len(data['training'])} training, {data['n_validation']} validation, "
        f"{len(data['test_records'])} test crops ({split.parent})")  # fmt: skip
    return data


# ---------------------------------------------------------------------------------------------------------------
# step 2: the judge


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
    from tools.studies import train_ldm, train_vae

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
    else:
        family = "vae"
        ckpt = train_ldm(split, folder / "models", settings, "pancreas", seed=train_seed)
    synthetic = synthesize_heldout(generator, {"heldout": heldout}, ckpt, folder / "synthetic", settings,
                                   seed=train_seed, family=family)  # fmt: skip
    import torch

    times = {**training_times(ckpt), "torch_threads": torch.get_num_threads(),
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
# steps 5-7: the bars, the montage and the table (tools.generator_quality), one section per variant


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
        measured = measure_generator(generator, seed, data, judge, real, floor, ceiling, synthetic[seed],
                                     folder / "models", settings, folder, noise, times)  # fmt: skip
        rows += measured.pop("rows")
        per_seed[seed] = measured
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
        default=RECIPES,
        help="a scale of tools.studies (demo, small, paper) or a JSON scale file (default: demo, whose generator "
        "settings are the CPU recipes)",
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
        results[variant] = {**result, "rows": [judge_row(judge)] + result["rows"], "recipe": recipe}
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
