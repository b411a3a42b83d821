"""Benchmark: issue 14 point 5, the quality gate of ``tools synthesize``, graded by a second judge.

    python benchmarks/quality_gate.py     # about 10 min here: the generators trained by generator_quality.py
    python benchmarks/quality_gate.py --smoke    # tiny sizes, every step, in runs/quality_gate/smoke

Inputs, read only: ``--quality_dir`` (default ``runs/generator_quality``), what ``benchmarks/generator_quality.py``
left there for each generator: ``<generator>/settings.json``, the data (phantom pancreas crops, ``split.json``,
``heldout.json``), the judge (seg_unet3d, binary, seed 0, in ``judge/models``) and the trained generator of seed 0
(``--generators``, default vae_ct's VAE-GAN and GAN ``vae_ct:vaegan vae_ct:gan`` and ``ldm_abdomen:ldm``; each
generator's ``fingerprint.json`` must match what ``settings.json`` gives). With ``--smoke`` they are made at tiny sizes
under ``--out/source`` by generator_quality's own functions (its ``SMOKE_SCALE``). Steps:

1. the second judge: seg_unet3d with the first judge's recipe and data but seed 1
   (``tools.studies.train_and_evaluate_seg``, as generator_quality's ``train_judge``), in ``--out/judge_seed1``
   (reused when its recipe and data match; the generators' data folders hold the same phantom);
2. per generator, ``--samples_per_mask`` samples (one number per generator) from every held-out mask (``heldout.json``,
   section ``heldout``: validation and test patients, seen by neither judge nor generator), seed 0: once without the
   gate, once with it (``tools synthesize --quality_gate``: the first judge and its overrides, ``--gate_reference``
   = the split's ``training`` section, ``--gate_tries``, ``--gate_min_dice``), each timed;
3. both sets graded with the gate's own checks (``tools.quality_gate.QualityGate.judge``: the judge's pancreas Dice
   to the mask >= ``--gate_min_dice`` and the median HU inside the pancreas within the same reference range) by the
   second judge; the ungated set also by the first judge (the gated set's first-judge verdicts are its datalist
   marks). The gate's first try of a case is the ungated case (same seed), so the two sets differ only where the
   gate made a case again;
4. ``result.json`` (every number, setting, time and the command) and ``result.md`` (the table).

Reruns reuse the second judge and every finished synthetic set. The exit code is 0 when the gate does not help (this
is a measurement) and 1 when a step failed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import generator_quality as quality
from smoke import parse_args_with_smoke

REPO = Path(__file__).resolve().parents[1]
SMOKE_DEFAULTS = {"out": str(REPO / "runs" / "quality_gate" / "smoke"), "samples_per_mask": [1, 1, 1], "gate_tries": 2}
#: what generator_quality leaves when a generator's training finished (every stage)
DONE = {"vae_ct": ("done.json",), "ldm_abdomen": ("done_autoencoder.json", "done_diffusion.json",
                                                  "done_controlnet.json")}  # fmt: skip
log = quality.log  # one clock and format for the benchmarks built on generator_quality


def parse_generators(values: Sequence[str]) -> list[tuple[str, str]]:
    pairs = []
    for value in values:
        generator, _, variant = value.partition(":")
        if generator not in quality.GENERATORS or variant not in quality.GENERATORS[generator]:
            known = ", ".join(f"{g}:{v}" for g, vs in quality.GENERATORS.items() for v in vs)
            raise SystemExit(f"--generators: unknown {value!r}; known: {known}")
        pairs.append((generator, variant))
    return pairs


# ---------------------------------------------------------------------------------------------------------------
# inputs: generator_quality's folders (read only), or made here at smoke size


def smoke_inputs(out: Path, generator: str, variant: str, scale: str) -> dict[str, Any]:
    """Tiny data, first judge and generator made with generator_quality's functions under ``out/source``."""
    from tools.studies import train_ldm, train_vae

    source = out / "source"
    settings = quality.benchmark_settings(scale, smoke=True)
    data = quality.prepare_data(source, settings)
    judge = quality.train_judge(source, data, settings)
    if generator == "vae_ct":
        settings = quality.variant_settings(settings, variant)
        ckpt = train_vae(data["split"], source / variant / "seed0" / "models", settings, seed=0,
                         family=quality.VAE_FAMILY[variant])  # fmt: skip
    else:
        ckpt = train_ldm(data["split"], source / variant / "seed0" / "models", settings, "pancreas", seed=0)
    return {"settings": settings, "split": data["split"], "heldout": data["heldout"], "ckpt": ckpt,
            "judge": judge["ckpt"], "judge_overrides": judge["overrides"],
            "judge_metrics": judge["metrics"]}  # fmt: skip


def trained_inputs(quality_dir: Path, generator: str, variant: str) -> dict[str, Any]:
    """generator_quality's settings, data, judge and seed-0 generator of ``generator``, read in place."""
    folder = quality_dir / generator
    ckpt = quality.run_folder(folder, variant, 0) / "models"
    missing = [str(p) for p in [folder / "settings.json", folder / "judge" / "models" / "model.pt",
                                folder / "judge" / "metrics.json", *(ckpt / d for d in DONE[generator])]
               if not p.is_file()]  # fmt: skip
    if missing:
        raise SystemExit(f"{folder}: no finished generator_quality run of {generator}:{variant} seed 0 (missing "
                         f"{', '.join(missing)}); run `python benchmarks/generator_quality.py --generator {generator}` "
                         "first, or use --smoke")  # fmt: skip
    saved = json.loads((folder / "settings.json").read_text())
    settings = saved["settings"]
    if generator == "vae_ct":
        settings = quality.variant_settings(settings, variant)
    trained_with = json.loads((ckpt.parent / "fingerprint.json").read_text())
    if trained_with != quality.to_json(quality.generator_fingerprint(settings, generator, variant)):
        raise SystemExit(f"{ckpt.parent}: trained with other settings than {folder / 'settings.json'} gives now (its "
                         "fingerprint.json differs): rerun generator_quality for it")  # fmt: skip
    return {"settings": settings, "split": Path(saved["split"]), "heldout": Path(saved["heldout"]), "ckpt": ckpt,
            "judge": folder / "judge" / "models", "judge_overrides": quality.judge_overrides(settings),
            "judge_metrics": json.loads((folder / "judge" / "metrics.json").read_text())["metrics"],
            "scale": saved.get("scale")}  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# step 1: the second judge


def second_judge(out: Path, inputs: Mapping[str, Any], seed: int) -> dict[str, Any]:
    """seg_unet3d with the first judge's recipe and data, another seed (reused when recipe and data match)."""
    from tools.io import write_json
    from tools.studies import SEG_BINARY, train_and_evaluate_seg

    settings = inputs["settings"]
    fingerprint = {"phantom": settings["phantom"], "crop_shape": settings["crop_shape"], "seg": settings["seg"],
                   "seed": seed}  # fmt: skip
    folder = quality.claim(out / f"judge_seed{seed}", fingerprint)
    result = folder / "metrics.json"
    if not result.is_file():
        log(f"second judge: training seg_unet3d (seed {seed}) on {inputs['split']}")
        started = time.time()
        metrics = train_and_evaluate_seg(folder, inputs["split"], seed, settings["seg"], SEG_BINARY)
        write_json(result, {"metrics": metrics, "seconds": round(time.time() - started, 1),
                            "split": str(inputs["split"])})  # fmt: skip
    saved = json.loads(result.read_text())
    log(f"second judge (seed {seed}): pancreas Dice {saved['metrics']['pancreas_dice']:.3f} on the real test crops "
        f"({saved['seconds']} s to train and evaluate)")  # fmt: skip
    return {"ckpt": folder / "models", "overrides": quality.judge_overrides(settings), **saved}


# ---------------------------------------------------------------------------------------------------------------
# steps 2-3: the two sets and their grades


def make_set(out: Path, generator: str, variant: str, inputs: Mapping[str, Any], samples: int,
             gate: Mapping[str, Any] | None) -> dict[str, Any]:  # fmt: skip
    from tools.studies import synthesize_set

    folder = out / f"{generator}_{variant}" / ("gated" if gate else "ungated")
    family = quality.VAE_FAMILY.get(variant, "vae")
    started = time.time()
    datalist = synthesize_set(generator, inputs["heldout"], folder, inputs["ckpt"], inputs["settings"], seed=0,
                              samples_per_item=samples, section="heldout", family=family, gate=gate)  # fmt: skip
    seconds = json.loads((folder / "done.json").read_text())["seconds"]  # the first run's time (a rerun reuses)
    log(f"{generator}:{variant} {'gated' if gate else 'ungated'}: {seconds:.1f} s to make "
        f"({time.time() - started:.1f} s now)")  # fmt: skip
    return {"datalist": datalist, "seconds": seconds}


def grade(datalist: Path, gate, work: Path) -> dict[str, Any]:
    """Every case of a set through ``gate``'s checks (its judge); pass fractions and counts."""
    from tools.splits import load_records

    records = load_records(datalist).records("training")
    checks = gate.judge([{"image": r["image"], "label": r["label"]} for r in records], work)
    n = len(checks)
    return {
        "n": n,
        "passed": sum(c["passed"] for c in checks),
        "pass_fraction": sum(c["passed"] for c in checks) / n,
        "label_pass_fraction": sum(c["label_consistency"]["passed"] for c in checks) / n,
        "hu_pass_fraction": sum(c["hu_median"]["passed"] for c in checks) / n,
        "mean_dice": sum(c["judge_dice"] for c in checks) / n,
        "per_case": {r["case"]: c for r, c in zip(records, checks)},
    }


def gate_marks(datalist: Path) -> dict[str, Any]:
    """The first judge's verdicts the gate recorded on a gated set's cases."""
    content = json.loads(Path(datalist).read_text())
    marks = [e["quality_gate"] for e in content["training"]]
    n = len(marks)
    return {"n": n, "passed": sum(m["passed"] for m in marks), "pass_fraction": sum(m["passed"] for m in marks) / n,
            "mean_tries": sum(m["tries"] for m in marks) / n, "never_passed": sum(not m["passed"] for m in marks),
            "tries": [m["tries"] for m in marks]}  # fmt: skip


def measure(out: Path, generator: str, variant: str, inputs: Mapping[str, Any], judge1: Mapping[str, Any],
            samples: int, args: argparse.Namespace) -> dict[str, Any]:  # fmt: skip
    from tools.quality_gate import QualityGate, hu_reference

    reference = hu_reference(inputs["split"], "training")
    gate_args = {"quality_gate": str(inputs["judge"]), "gate_overrides": inputs["judge_overrides"],
                 "gate_reference": str(inputs["split"]), "gate_reference_section": "training",
                 "gate_tries": args.gate_tries, "gate_min_dice": args.gate_min_dice}  # fmt: skip
    ungated = make_set(out, generator, variant, inputs, samples, None)
    gated = make_set(out, generator, variant, inputs, samples, gate_args)
    first = QualityGate(inputs["judge"], reference, inputs["judge_overrides"], args.gate_tries, args.gate_min_dice)
    second = QualityGate(judge1["ckpt"], reference, judge1["overrides"], args.gate_tries, args.gate_min_dice)
    work = out / f"{generator}_{variant}" / "grades"
    result = {
        "generator": f"{generator}:{variant}",
        "samples_per_mask": samples,
        "reference": {k: v for k, v in reference.items() if k != "per_case"},
        "ungated": {"seconds": ungated["seconds"], "first_judge": grade(ungated["datalist"], first, work / "u1"),
                    "second_judge": grade(ungated["datalist"], second, work / "u2")},
        "gated": {"seconds": gated["seconds"], "first_judge": gate_marks(gated["datalist"]),
                  "second_judge": grade(gated["datalist"], second, work / "g2")},
    }  # fmt: skip
    u, g = result["ungated"], result["gated"]
    log(f"{generator}:{variant}: second judge passes {u['second_judge']['passed']}/{u['second_judge']['n']} without "
        f"the gate, {g['second_judge']['passed']}/{g['second_judge']['n']} with it; first judge "
        f"{u['first_judge']['passed']}/{u['first_judge']['n']} -> {g['first_judge']['passed']}/{g['first_judge']['n']}"
        f"; mean tries {g['first_judge']['mean_tries']:.2f}")  # fmt: skip
    return result


# ---------------------------------------------------------------------------------------------------------------
# step 4: the table


def fraction(grade_: Mapping[str, Any]) -> str:
    return f"{grade_['passed']}/{grade_['n']} = {grade_['pass_fraction']:.2f}"


def table_lines(results: Sequence[Mapping[str, Any]]) -> list[str]:
    lines = [
        "| generator | set | cases | passes judge 2 (seed 1) | judge 2: Dice >= bar | judge 2: HU in range | "
        "judge 2 mean Dice | passes judge 1 (the gate's, seed 0) | mean tries | never passed | time (s) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        for name in ("ungated", "gated"):
            s, one = r[name]["second_judge"], r[name]["first_judge"]
            tries = f"{one['mean_tries']:.2f}" if name == "gated" else "1"
            never = str(one["never_passed"]) if name == "gated" else "-"
            kind = "with the gate" if name == "gated" else "without"
            lines.append(
                f"| {r['generator']} | {kind} | {s['n']} | {fraction(s)} | {s['label_pass_fraction']:.2f} | "
                f"{s['hu_pass_fraction']:.2f} | {s['mean_dice']:.3f} | {fraction(one)} | {tries} | {never} | "
                f"{r[name]['seconds']:.1f} |"
            )
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quality_dir", default=str(REPO / "runs" / "generator_quality"),
                        help="generator_quality's output folder (read only; not used with --smoke)")  # fmt: skip
    parser.add_argument("--out", default=str(REPO / "runs" / "quality_gate"))
    parser.add_argument("--generators", nargs="+", default=["vae_ct:vaegan", "vae_ct:gan", "ldm_abdomen:ldm"])
    parser.add_argument(
        "--samples_per_mask",
        type=int,
        nargs="+",
        default=[2, 2, 1],
        help="samples per held-out mask, one number per generator (ldm_abdomen: about 17 s each)",
    )
    parser.add_argument("--gate_tries", type=int, default=3)
    parser.add_argument("--gate_min_dice", type=float, default=0.5)
    parser.add_argument("--judge_seed", type=int, default=1, help="seed of the second judge")
    parser.add_argument("--scale", default=quality.RECIPES,
                        help="--smoke only: the scale whose tiny version makes the inputs")  # fmt: skip
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parse_args_with_smoke(parser, SMOKE_DEFAULTS, argv)
    generators = parse_generators(args.generators)
    if len(args.samples_per_mask) != len(generators):
        raise SystemExit(f"--samples_per_mask: one number per generator ({len(generators)}), got "
                         f"{args.samples_per_mask}")  # fmt: skip
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)

    import torch

    from tools.io import write_json

    torch.set_num_threads(args.threads)
    command = " ".join(["python", *(sys.argv if argv is None else ["benchmarks/quality_gate.py", *argv])])
    log(f"quality gate -> {out}; {args.threads} torch thread(s); load average {os.getloadavg()[0]:.1f} on "
        f"{os.cpu_count()} CPUs")  # fmt: skip
    results, errors, judge1 = [], {}, None
    for (generator, variant), samples in zip(generators, args.samples_per_mask):
        try:
            if args.smoke:
                inputs = smoke_inputs(out, generator, variant, args.scale)
            else:
                inputs = trained_inputs(Path(args.quality_dir).resolve(), generator, variant)
            judge1 = second_judge(out, inputs, args.judge_seed)
            result = measure(out, generator, variant, inputs, judge1, samples, args)
            result["first_judge_test_dice"] = inputs["judge_metrics"]["pancreas_dice"]
            result["second_judge_test_dice"] = judge1["metrics"]["pancreas_dice"]
            results.append(result)
        except (RuntimeError, ValueError, OSError) as error:  # one generator's failure: the other is still measured
            import traceback

            traceback.print_exc()
            errors[f"{generator}:{variant}"] = f"{type(error).__name__}: {error}"
            log(f"{generator}:{variant}: FAILED: {errors[f'{generator}:{variant}']}")
    first = results[0] if results else None
    lines = [
        f"# Quality gate of `tools synthesize`, graded by a second judge{' (SMOKE: not a measurement)' * args.smoke}",
        "",
        f"Command: `{command}`. Held-out masks of `heldout.json` (validation + test patients), seed 0. Gate: judge 1 = "
        f"seg_unet3d seed 0 (generator_quality's judge), pass = its pancreas Dice to the mask >= {args.gate_min_dice} "
        "and the median HU inside the pancreas label within mean +- 3 sd of the real training crops' per-case "
        f"medians, up to {args.gate_tries} tries (next seeds); a case that never passed keeps its best try. Judge 2 "
        f"= the same recipe and data, seed {args.judge_seed}, with the same checks. Time: making the set (one torch "
        f"thread{'s' if args.threads > 1 else ''}, the gated one with its judge runs).",
        "",
        *table_lines(results),
        "",
    ]
    if first is not None:
        ref = first["reference"]
        lines.append(
            f"Judges' pancreas Dice on the real test crops: judge 1 {first['first_judge_test_dice']:.3f}, judge 2 "
            f"{first['second_judge_test_dice']:.3f}. HU pass range {ref['low']:.1f} .. {ref['high']:.1f} (mean "
            f"{ref['mean']:.1f}, sd {ref['sd']:.1f} over {ref['n_cases']} real training crops)."
        )
    for name, error in errors.items():
        lines.append(f"{name}: FAILED: {error}")
    (out / "result.md").write_text("\n".join(lines) + "\n")
    write_json(out / "result.json", quality.to_json({
        "command": command, "smoke": args.smoke, "settings": vars(args), "results": results, "errors": errors,
        "second_judge": judge1, "seconds": round(time.time() - quality.STARTED, 1)}))  # fmt: skip
    print("\n".join(lines), flush=True)
    log(f"written {out / 'result.md'} and {out / 'result.json'}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
