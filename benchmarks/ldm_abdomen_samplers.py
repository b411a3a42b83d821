"""Benchmark: issue 14 point 3, ldm_abdomen's samplers compared at equal quality on the trained CPU recipe.

    python benchmarks/ldm_abdomen_samplers.py [--scale demo] [--seed 0]
        [--quality_dir runs/generator_quality/ldm_abdomen] [--out runs/ldm_abdomen_samplers] [--threads 2]
    python benchmarks/ldm_abdomen_samplers.py --smoke    # seconds: tiny sizes, in runs/ldm_abdomen_samplers_smoke

Steps:

1. data and judge: those of ``benchmarks/generator_quality.py --generator ldm_abdomen`` (its functions, its folder
   ``--quality_dir``): made there when missing, reused when their settings match;
2. two trainings of the scale's ldm_abdomen recipe with the training seed ``--seed``: the noise-predicting one
   (``train_scheduler ddpm``, generator_quality's ``ldm`` variant, whose run of the same seed is reused when its
   settings match, else it is trained in ``--out/ddpm``), and the rectified-flow one (``train_scheduler rflow``) in
   ``--out/rflow``: the same autoencoder (its weights copied, so both samplers decode with the same one), its own
   diffusion model and ControlNet. The rectified-flow training time is printed beside the other's;
3. the samples: ``--samples_per_mask`` per held-out mask (validation + test patients: neither the judge nor the
   generators trained on them; default 1, because DDPM-1000 sampling dominates the run), with the same item seeds
   (so the same initial noise) for every sampler: DDPM 1000 steps, DDIM ``--ddim_steps`` (50 and fewer) of the
   noise-predicting model, rectified flow ``--rflow_steps`` (30 and fewer) of the other; each set is made by
   ``tools.studies.synthesize_set`` (``tools synthesize``) in this process with ``--threads`` torch threads;
4. per set: the judge's pancreas Dice to the conditioning mask (label consistency) and the HU histogram Wasserstein
   distance inside the body, both from ``tools.evaluation.evaluate_synthetic`` against the real held-out crops (as
   generator_quality measures them); the set's wall time (loading the networks, sampling, decoding and writing every
   case: what a user waits for) and its ratio to DDPM-1000's; the verdict: "equal" = Dice within 0.05 and
   Wasserstein within 10 HU of DDPM-1000 (issue 14's equal quality), "better" = worse on neither and better than
   that on one, else "worse";
5. ``result.json`` (every number, the settings, the command) and ``result.md`` (the table).

The table ranks samplers of this recipe's models; their quality itself is measured by generator_quality (whose bars
the recipe does not pass yet: see ldm_abdomen's docs). A rerun reuses the trainings and the finished sample sets.
Exit code 0 when samplers miss equal quality (this is a measurement), 1 when a step failed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from copy import deepcopy
from pathlib import Path
from typing import Any, Mapping, Sequence

import generator_quality as quality
from smoke import parse_args_with_smoke

REPO = Path(__file__).resolve().parents[1]
#: issue 14's "equal quality": label-consistency Dice and Wasserstein distance this close to DDPM-1000's
EQUAL = {"dice": 0.05, "wasserstein_hu": 10.0}
#: the autoencoder stage's files a second diffusion training reuses (weights and the stage's done marker)
AUTOENCODER_FILES = ("model_autoencoder.pt", "done_autoencoder.json")
SMOKE_DEFAULTS = {"ddim_steps": [3, 2], "rflow_steps": [3, 2], "ddpm_steps": 4, "samples_per_mask": 1}

log = quality.log  # one clock and format for the benchmarks built on generator_quality


# ---------------------------------------------------------------------------------------------------------------
# step 2: the two trainings


def ddpm_models(out: Path, quality_dir: Path, settings: Mapping[str, Any], data: Mapping[str, Any],
                seed: int) -> tuple[Path, dict[str, float]]:  # fmt: skip
    """The noise-predicting model's ``models`` folder (``settings``: generator_quality's ``ldm`` variant):
    generator_quality's run of ``seed`` when it was trained with these settings and finished every stage, else
    trained here."""
    from tools.studies import train_ldm

    fingerprint = quality.to_json(quality.generator_fingerprint(settings, "ldm_abdomen", "ldm"))
    reused = quality.run_folder(quality_dir, "ldm", seed)
    stages = ("autoencoder", "diffusion", "controlnet")
    if (reused / "fingerprint.json").is_file() and json.loads((reused / "fingerprint.json").read_text()) == fingerprint:
        if all((reused / "models" / f"done_{stage}.json").is_file() for stage in stages):
            log(f"ddpm: reusing generator_quality's training of seed {seed} ({reused / 'models'})")
            return reused / "models", stage_seconds(reused / "models")
    folder = quality.claim(out / "ddpm" / f"seed{seed}", fingerprint)
    log(f"ddpm: training the recipe (seed {seed}) in {folder}")
    ckpt = train_ldm(data["split"], folder / "models", settings, "pancreas", seed=seed)
    return ckpt, stage_seconds(ckpt)


def rflow_models(out: Path, settings: Mapping[str, Any], data: Mapping[str, Any], seed: int,
                 autoencoder_dir: Path) -> tuple[Path, dict[str, float]]:  # fmt: skip
    """The rectified-flow model (``settings``: generator_quality's ``ldm_rflow`` variant): ``autoencoder_dir``'s
    autoencoder, a diffusion model and ControlNet trained with ``train_scheduler rflow`` (``tools.studies.train_ldm``
    skips the autoencoder stage, whose done marker is copied)."""
    from tools.studies import train_ldm

    rflow = settings
    fingerprint = {**quality.generator_fingerprint(rflow, "ldm_abdomen", "ldm_rflow"),
                   "autoencoder_from": str(autoencoder_dir),
                   "autoencoder_bytes": (autoencoder_dir / AUTOENCODER_FILES[0]).stat().st_size}  # fmt: skip
    folder = quality.claim(out / "rflow" / f"seed{seed}", fingerprint)
    ckpt = folder / "models"
    ckpt.mkdir(exist_ok=True)
    for name in AUTOENCODER_FILES:
        if not (ckpt / name).is_file():
            shutil.copy2(autoencoder_dir / name, ckpt / name)
    if not (ckpt / "done_controlnet.json").is_file():
        log(f"rflow: training the diffusion model and ControlNet with train_scheduler rflow (seed {seed}) in {folder}")
    train_ldm(data["split"], ckpt, rflow, "pancreas", seed=seed)
    return ckpt, stage_seconds(ckpt)


def stage_seconds(ckpt: Path) -> dict[str, float]:
    return {m.stem.replace("done_", ""): json.loads(m.read_text())["seconds"] for m in sorted(ckpt.glob("done_*.json"))}


# ---------------------------------------------------------------------------------------------------------------
# steps 3-4: sample sets and their measures


def masks_subset(data: Mapping[str, Any], n: int) -> dict[str, Any]:
    """The first ``n`` held-out patients only (their masks for the samples, their crops for the measures), listed in
    ``heldout_<n>.json`` beside the crops' ``dataset.json`` (where ldm_abdomen looks for the prep record)."""
    from tools.io import write_json

    if n < 1:
        raise SystemExit(f"--max_masks must be at least 1, got {n}")
    records = list(data["heldout_records"])[:n]
    saved = json.loads(Path(data["heldout"]).read_text())
    heldout = Path(data["heldout"]).parent / f"heldout_{n}.json"  # beside dataset.json, as ldm_abdomen checks
    write_json(heldout, {"prep": saved.get("prep"), "heldout": records})
    log(f"the first {len(records)} of {len(data['heldout_records'])} held-out masks: {heldout}")
    return {**data, "heldout": heldout, "heldout_records": records}


def sample_set(samples: Path, name: str, ckpt: Path, settings: Mapping[str, Any], data: Mapping[str, Any], sampler: str,
               steps: int, seed: int, samples_per_mask: int) -> dict[str, Any]:  # fmt: skip
    """One sample set (``tools.studies.synthesize_set``, resumable) and its wall time from synthesize's marker."""
    from tools.studies import synthesize_set

    used = deepcopy(dict(settings))
    used["ldm_infer"] = {**used.get("ldm_infer", {}), "sampler": sampler, "num_inference_steps": int(steps)}
    folder = samples / name
    log(f"{name}: {sampler} {steps} steps, {samples_per_mask} sample(s) per held-out mask")
    datalist = synthesize_set("ldm_abdomen", data["heldout"], folder, ckpt, used, seed=seed,
                              samples_per_item=samples_per_mask, section="heldout")  # fmt: skip
    seconds = json.loads((folder / "done.json").read_text())["seconds"]
    return {"name": name, "sampler": sampler, "steps": int(steps), "datalist": datalist, "seconds": seconds,
            "load_average_after": round(os.getloadavg()[0], 2)}  # fmt: skip


def measure(row: Mapping[str, Any], data: Mapping[str, Any], judge: Mapping[str, Any], out: Path) -> dict[str, Any]:
    evaluation = quality.evaluate_set(row["datalist"], data, judge, Path(row["datalist"]).parent / "evaluation", False,
                                      False)  # fmt: skip
    if "error" in evaluation:
        raise RuntimeError(f"{row['name']}: the set could not be measured: {evaluation['error']}")
    return {**row, "dice": quality._num(evaluation.get("pancreas_dice_to_synthetic_label")),
            "wasserstein_hu": quality._num(evaluation.get("hist_wasserstein_hu")),
            "n_samples": evaluation.get("n_synthetic")}  # fmt: skip


def compare(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Time ratio and quality of every row against the DDPM-1000 row (the first): ``equal_quality`` is issue 14's
    (label Dice within 0.05 and Wasserstein within 10 HU), ``at_least_equal`` also admits a sampler better on either
    measure (Dice higher by more, Wasserstein lower by more) and worse on neither; ``verdict`` names which."""
    reference = rows[0]
    for row in rows:
        row["time_ratio"] = row["seconds"] / reference["seconds"]
        row["dice_gap"] = row["dice"] - reference["dice"]
        row["wasserstein_gap_hu"] = row["wasserstein_hu"] - reference["wasserstein_hu"]
        row["equal_quality"] = bool(abs(row["dice_gap"]) <= EQUAL["dice"]
                                    and abs(row["wasserstein_gap_hu"]) <= EQUAL["wasserstein_hu"])  # fmt: skip
        row["at_least_equal"] = bool(row["dice_gap"] >= -EQUAL["dice"]
                                     and row["wasserstein_gap_hu"] <= EQUAL["wasserstein_hu"])  # fmt: skip
        row["verdict"] = ("reference" if row is reference else "equal" if row["equal_quality"]
                          else "better" if row["at_least_equal"] else "worse")  # fmt: skip
    return list(rows)


def table_lines(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    reference = f"{rows[0]['sampler'].upper()}-{rows[0]['steps']}"
    lines = [
        f"| sampler | model | steps | set time | time / {reference} | label Dice (gap) | Wasserstein HU (gap) | "
        "quality vs the reference |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        model = "rectified flow" if r["sampler"] == "rflow" else "noise-predicting"
        lines.append(
            f"| {r['sampler']} | {model} | {r['steps']} | {r['seconds']:.1f} s | {r['time_ratio']:.3f} | "
            f"{r['dice']:.3f} ({r['dice_gap']:+.3f}) | {r['wasserstein_hu']:.1f} ({r['wasserstein_gap_hu']:+.1f}) | "
            f"{r['verdict']} |"
        )  # fmt: skip
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", default=quality.RECIPES,
                        help="a tools.studies scale or JSON scale file (default: the CPU recipes)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="training seed of both models and base seed of the samples")
    parser.add_argument("--quality_dir", default=None,
                        help="generator_quality's folder whose data, judge and training are reused "
                        "(default runs/generator_quality[_smoke]/ldm_abdomen)")  # fmt: skip
    parser.add_argument("--out", default=None, help="default runs/ldm_abdomen_samplers[_smoke]")
    parser.add_argument("--ddpm_steps", type=int, default=1000, help="the reference: DDPM with every training step")
    parser.add_argument("--ddim_steps", type=int, nargs="+", default=[50, 25, 10])
    parser.add_argument("--rflow_steps", type=int, nargs="+", default=[30, 15, 8])
    parser.add_argument("--samples_per_mask", type=int, default=1)
    parser.add_argument("--max_masks", type=int, default=None,
                        help="use the first N held-out masks only (default all): DDPM-1000 costs about 1000 network "
                        "evaluations a sample")  # fmt: skip
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the sampling, the same for every set")
    args = parse_args_with_smoke(parser, SMOKE_DEFAULTS, argv)
    suffix = "_smoke" if args.smoke else ""
    quality_dir = Path(args.quality_dir or REPO / "runs" / f"generator_quality{suffix}" / "ldm_abdomen").resolve()
    out = Path(args.out or REPO / "runs" / f"ldm_abdomen_samplers{suffix}").resolve()
    out.mkdir(parents=True, exist_ok=True)

    import torch

    from tools.io import write_json

    torch.set_num_threads(args.threads)
    settings = quality.benchmark_settings(args.scale, args.smoke)
    log(f"ldm_abdomen samplers, scale {args.scale}, seed {args.seed} -> {out}; {args.threads} torch thread(s); load "
        f"average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")  # fmt: skip
    data = quality.prepare_data(quality_dir, settings)
    judge = quality.train_judge(quality_dir, data, settings)
    if args.max_masks:
        data = masks_subset(data, args.max_masks)
    # both objectives explicitly (the scale's own recipe may be either): generator_quality's two ldm variants
    ddpm_settings = quality.variant_settings(settings, "ldm")
    rflow_settings = quality.variant_settings(settings, "ldm_rflow")
    ddpm_ckpt, ddpm_times = ddpm_models(out, quality_dir, ddpm_settings, data, args.seed)
    rflow_ckpt, rflow_times = rflow_models(out, rflow_settings, data, args.seed, ddpm_ckpt)
    log(f"training seconds: noise-predicting {ddpm_times}; rectified flow {rflow_times} (autoencoder shared)")

    plan = [("ddpm", args.ddpm_steps, ddpm_ckpt, ddpm_settings)]
    plan += [("ddim", steps, ddpm_ckpt, ddpm_settings) for steps in args.ddim_steps]
    plan += [("rflow", steps, rflow_ckpt, rflow_settings) for steps in args.rflow_steps]
    rows, samples = [], out / ("samples" if not args.max_masks else f"samples_first{args.max_masks}")
    for sampler, steps, ckpt, used in plan:
        made = sample_set(samples, f"{sampler}_{steps}", ckpt, used, data, sampler, steps, args.seed,
                          args.samples_per_mask)  # fmt: skip
        rows.append(measure(made, data, judge, out))
        log(f"{made['name']}: {made['seconds']:.1f} s, label Dice {rows[-1]['dice']:.3f}, Wasserstein "
            f"{rows[-1]['wasserstein_hu']:.1f} HU")  # fmt: skip
    rows = compare(rows)
    n_masks = len(data["heldout_records"])
    lines = [
        f"# ldm_abdomen samplers at equal quality (scale {args.scale}"
        f"{', SMOKE: not a measurement' if args.smoke else ''})",
        "",
        f"Training seed {args.seed}; {args.samples_per_mask} sample(s) per mask of {n_masks} held-out patients, "
        f"the same initial noise for every sampler; {args.threads} torch thread(s). Judge: seg_unet3d trained on the "
        f"real training crops (pancreas Dice {judge['metrics']['pancreas_dice']:.3f} on the real test crops). Equal "
        f"quality: label Dice within {EQUAL['dice']} and Wasserstein within {EQUAL['wasserstein_hu']:g} HU of "
        f"DDPM-{args.ddpm_steps}. Training seconds: noise-predicting {ddpm_times}, rectified flow {rflow_times} "
        f"(autoencoder shared). Command: `{' '.join(['python', *sys.argv])}`",
        "",
        *table_lines(rows),
        "",
    ]
    (out / "result.md").write_text("\n".join(lines))
    write_json(out / "result.json", quality.to_json({
        "command": " ".join(["python", *sys.argv]), "scale": args.scale, "smoke": args.smoke, "seed": args.seed,
        "settings": settings, "samples_per_mask": args.samples_per_mask, "max_masks": args.max_masks,
        "masks": [r.get("case") for r in data["heldout_records"]], "threads": args.threads, "equal": EQUAL,
        "judge": judge, "training_seconds": {"ddpm": ddpm_times, "rflow": rflow_times}, "rows": rows,
        "seconds": round(time.time() - quality.STARTED, 1)}))  # fmt: skip
    print("\n".join(lines), flush=True)
    log(f"written {out / 'result.md'} and {out / 'result.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
