"""``make demo``: the whole chain at demo scale on a CPU machine, with progress output, in well under 30 minutes.

1. the phantom data set (MSD layout) and a montage of its cases; the phantom beside the real CT when ``../shared``
   is present;
2. the generative bundles trained with their CPU recipes (the demo scale's settings, issue 14: vae_ct on 3D
   pancreas crops, ldm_abdomen autoencoder + rectified-flow diffusion + ControlNet on the same crops), two processes
   of one thread in parallel, then one synthetic image + label per real training mask from each
   (``tools.synthesize``), and the held-out sets the quality bars measure (two samples per held-out mask, and the
   untrained generators' for the Fréchet ceiling);
3. the ratio study (seed 000 Table 1: real only vs VAE / DM / VAE+DM at 100:0, 50:50, 25:75) with seg_unet3d,
   2 seeds per arm, 2 processes of one thread each (:mod:`tools.study_runner`);
4. the synthetic sets measured against the real crops (``tools.evaluation.evaluate_synthetic``: HU histograms,
   feature distance, the real-only model's pancreas against the synthetic labels, diversity, memorization against
   the generators' training set, montages), and issue 14's quality bars of both generators on the masks of the
   held-out patients, judged by the ratio study's real-only model (``tools.generator_quality.demo_quality``: the
   table with pass / fail and a real | synthetic | mask montage);
5. a tumor-size study (seed 001 Table 1: none vs tiny / small / medium / large / mixed hand-crafted tumors inserted
   online), 2 seeds per arm, 2 processes;
6. the report (``report.md`` / ``report.html``) from everything above.

Every stage reuses what an earlier run made (finished jobs, trained weights, synthetic cases), so a second run only
rewrites the tables and the report. Workers' logs go to ``<out>/logs/``; the console shows one line per finished
job. A stage that fails stops the demo with its error and the path of its log (:func:`run_demo`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Sequence

from tools.figures import outline_legend, save_figure, show_views, window_name
from tools.io import load_label, load_nifti

DEFAULT_SHARED = Path(__file__).resolve().parents[1].parent / "shared"
REPO_ROOT = Path(__file__).resolve().parents[1]


def phantom_montage(dataset_dir: str | os.PathLike, out_png: str | os.PathLike, max_cases: int = 12) -> Path:
    """PNG with one row per case: axial, coronal and sagittal views through the tumor's largest cross-section (the
    pancreas's in a healthy case), pancreas (yellow) and tumor (red) outlined, the case's name, phase and window,
    the patient's directions on the image edges."""
    import matplotlib.pyplot as plt

    dataset_dir = Path(dataset_dir)
    meta = json.loads((dataset_dir / "dataset.json").read_text())
    entries = (meta["training"] + meta["test"])[:max_cases]
    fig, axes = plt.subplots(len(entries), 3, figsize=(10, 2.9 * len(entries) + 0.6), squeeze=False,
                             layout="constrained")  # fmt: skip
    for row, entry in zip(axes, entries):
        ct, affine = load_nifti(dataset_dir / entry["image"])
        label, _ = load_label(dataset_dir / entry["label"])
        tumor = "tumor" if entry["has_tumor"] else "healthy"
        name = Path(entry["image"]).name.replace(".nii.gz", "")
        phase = {"portal_venous": "portal venous", "non_contrast": "non-contrast"}.get(entry["phase"], entry["phase"])
        show_views(row, ct, affine, focus=label, contour=label, title=f"{name}, {phase}, {tumor}")
    fig.suptitle(f"SYNTHETIC phantom cases (not patient data), window {window_name()}; views through the tumor's "
                 "largest cross-section, or the pancreas's in healthy cases", fontsize=10)  # fmt: skip
    outline_legend(fig, loc="outside lower center", ncol=2)
    return save_figure(fig, out_png, dpi=80)


# ---------------------------------------------------------------------------------------------------------------
# worker processes


def _worker_env(rank: int, world: int, threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": str(world),
                "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"})  # fmt: skip
    return env


def launch(
    commands: Sequence[Sequence[str]],
    logs: Sequence[Path],
    envs: Sequence[dict[str, str]],
    progress=None,
    poll_s: float = 5.0,
) -> None:
    """Run commands in parallel (their output to ``logs``), calling ``progress()`` every ``poll_s``; raise with the
    log's tail when one fails (the others are then stopped)."""
    procs = []
    for command, log, env in zip(commands, logs, envs):
        log.parent.mkdir(parents=True, exist_ok=True)
        handle = open(log, "w")
        procs.append((subprocess.Popen(list(command), stdout=handle, stderr=subprocess.STDOUT, env=env,
                                       cwd=str(REPO_ROOT)), handle, log))  # fmt: skip
    try:
        while True:
            codes = [p.poll() for p, _, _ in procs]
            if progress is not None:
                progress()
            failed = [(p, log) for (p, _, log), code in zip(procs, codes) if code not in (None, 0)]
            if failed:
                tail = "\n".join(failed[0][1].read_text().splitlines()[-25:])
                raise RuntimeError(f"worker failed (exit {failed[0][0].returncode}); log {failed[0][1]}:\n{tail}")
            if all(code == 0 for code in codes):
                return
            time.sleep(poll_s)
    finally:
        for proc, handle, _ in procs:
            if proc.poll() is None:
                proc.terminate()
                proc.wait()
            handle.close()


class _JobProgress:
    """Prints one line each time a study job finishes."""

    def __init__(self, study_dir: Path, total: int, started: float):
        self.study_dir, self.total, self.started = study_dir, total, started
        self.seen: set[str] = set()

    def __call__(self) -> None:
        for path in sorted(self.study_dir.glob("jobs/*/seed*/metrics.json")):
            key = f"{path.parent.parent.name}/{path.parent.name}"
            if key in self.seen:
                continue
            self.seen.add(key)
            saved = json.loads(path.read_text())
            main = {k: v for k, v in saved["metrics"].items() if k in ("pancreas_dice", "tumor_dice")}
            shown = ", ".join(f"{k} {v:.3f}" for k, v in main.items())
            print(f"    {len(self.seen):>2}/{self.total} {saved['arm']:<14} seed {saved['seed']}: {shown} "
                  f"({saved.get('seconds')} s; {time.time() - self.started:.0f} s elapsed)", flush=True)  # fmt: skip


def run_study_processes(name: str, out: Path, scale: str, nproc: int, extra: Sequence[str] = ()) -> None:
    """``python -m tools study <name>`` in ``nproc`` processes of one thread (what torchrun would start); with
    ``nproc`` 1 in this process."""
    from tools.studies import STUDY_CLASSES, run_study

    if nproc == 1:
        run_study(name, out, scale=scale, threads=1, progress=False)
        _JobProgress(out / name, len(STUDY_CLASSES[name](out, scale).jobs()), time.time())()
        return
    study = STUDY_CLASSES[name](out, scale)
    total = len(study.jobs())
    command = [sys.executable, "-m", "tools", "study", name, "--out", str(out), "--scale", scale, *extra]
    logs = [out / "logs" / f"study_{name}_rank{rank}.log" for rank in range(nproc)]
    launch([command] * nproc, logs, [_worker_env(r, nproc, 1) for r in range(nproc)],
           progress=_JobProgress(out / name, total, time.time()))  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# the chain


class DemoStageError(RuntimeError):
    """A stage of the demo failed; the message names the stage, the error and the log with the details."""

    def __init__(self, stage: str, error: BaseException, log: Path):
        self.stage, self.error, self.log = stage, error, log
        super().__init__(f"demo stage {stage!r} failed: {type(error).__name__}: {error}\n  log: {log}")


def run_demo(
    out: str | os.PathLike = "runs/demo",
    seed: int = 0,
    scale: str = "demo",
    shared_dir: str | os.PathLike | None = None,
    nproc: int = 2,
    studies: Sequence[str] = ("ratio", "tumor_size"),
) -> dict:
    """Run the demo chain into ``out`` and return a summary of what was made (also ``<out>/demo_summary.json``).

    A failing stage stops the demo: its traceback goes to ``<out>/logs/stage_<name>.log`` (a failing worker's own
    log is named in it), the error and that path are printed, ``demo_summary.json`` records them under ``error``,
    and :class:`DemoStageError` is raised (``python -m tools demo`` exits non-zero).
    """
    from tools.io import write_json
    from tools.studies import phantom_data, prepared_split, scale_settings, write_report

    out = Path(out).resolve()
    settings = scale_settings(scale)
    shared = Path(shared_dir) if shared_dir else DEFAULT_SHARED
    summary: dict = {"scale": scale, "stages": {}}
    previous = out / "demo_summary.json"
    if previous.is_file():  # keep the times of the run that made the results (a failed run made none)
        earlier = json.loads(previous.read_text())
        first = earlier.get("first_run") or (
            None if "error" in earlier else {k: earlier.get(k) for k in ("stages", "seconds")}
        )
        if first:
            summary["first_run"] = first
    t0 = time.time()
    names = ["phantom", *(["generative", "ratio_study", "synthetic_evaluation", "generator_quality"]
                          if "ratio" in studies else []),
             *(["tumor_size_study"] if "tumor_size" in studies else []), "report"]  # fmt: skip

    def stage(name: str, message: str, function, *args):
        number = f"[{names.index(name) + 1}/{len(names)}]"
        print(f"{number} {message}", flush=True)
        started = time.time()
        try:
            result = function(*args)
        except Exception as error:  # recorded, printed and raised again: the demo stops here
            log = out / "logs" / f"stage_{name}.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            log.write_text(f"demo stage {name} failed after {time.time() - started:.1f} s\n"
                           + "".join(traceback.format_exception(error)))  # fmt: skip
            summary["error"] = {"stage": name, "error": f"{type(error).__name__}: {error}", "log": str(log)}
            summary["seconds"] = round(time.time() - t0, 1)
            write_json(out / "demo_summary.json", summary)
            print(f"{number} {name} FAILED: {type(error).__name__}: {error}\n      log: {log}", file=sys.stderr,
                  flush=True)  # fmt: skip
            raise DemoStageError(name, error, log) from error
        summary["stages"][name] = round(time.time() - started, 1)
        return result

    def make_phantom() -> Path:
        data = phantom_data(out / "data" / "phantom", settings, seed=seed)
        meta = json.loads((data / "dataset.json").read_text())
        summary["n_training"], summary["n_test"] = meta["numTraining"], meta["numTest"]
        if not (out / "phantom_montage.png").is_file():
            phantom_montage(data, out / "phantom_montage.png")
        real_dir = shared / "data" / "real_ct"
        if real_dir.is_dir() and not (out / "realism.json").is_file():
            from tools.realism import run_realism

            print(f"      realism against {real_dir}", flush=True)
            run_realism(real_dir, out, n_cases=5, seed=seed)
        elif not real_dir.is_dir():
            print(
                f"      realism skipped: {real_dir} is absent (it needs the real CT samples of ../shared)", flush=True
            )
        return data

    def make_generative(data: Path) -> dict:
        prepared_split(data, out / "data" / "crops_pancreas", "pancreas", settings["crop_shape"])
        if not (out / "generative" / "generative.json").is_file() and nproc > 1:
            commands = [[sys.executable, "-m", "tools.demo", "--stage", g, "--out", str(out), "--scale", scale]
                        for g in ("vae", "ldm")]  # fmt: skip
            logs = [out / "logs" / f"generative_{g}.log" for g in ("vae", "ldm")]
            launch(commands, logs, [_worker_env(0, 1, 1)] * 2)
        from tools.studies import generative_sets

        gen = generative_sets(out, settings, data)
        summary["generative"] = {k: str(v) for k, v in gen["synthetic"].items()}
        return gen

    p = settings["phantom"]
    data = stage("phantom", f"phantom data set: {p['n_cases']} patients, seed {seed} -> {out / 'data' / 'phantom'}",
                 make_phantom)  # fmt: skip
    if "ratio" in studies:
        gen = stage("generative", "generative bundles: vae_ct and ldm_abdomen trained with their CPU recipes in "
                    "parallel (the longest stage, about 5 min on a 2-core AVX512 machine), then synthesis (logs in "
                    "logs/)", make_generative, data)  # fmt: skip
        stage("ratio_study", f"ratio study (seed 000 Table 1) with seg_unet3d, {nproc} processes",
              run_study_processes, "ratio", out, scale, nproc)  # fmt: skip
        summary["synthetic_evaluation"] = stage(
            "synthetic_evaluation", "synthetic sets against the real crops (histograms, features, memorization)",
            evaluate_generated, out, settings, gen,
        )  # fmt: skip
        summary["generator_quality"] = stage(
            "generator_quality", "quality bars of both generators on the held-out patients' masks (issue 14)",
            measure_generators, out, settings, gen,
        )  # fmt: skip
    if "tumor_size" in studies:
        stage("tumor_size_study", f"tumor-size study (seed 001 Table 1) with seg_unet3d, {nproc} processes",
              run_study_processes, "tumor_size", out, scale, nproc)  # fmt: skip

    def make_report() -> Path:
        summary["seconds"] = round(time.time() - t0, 1)
        write_json(out / "demo_summary.json", summary)  # the report reads the stage times from it
        md, page = write_report(out, title="Pancreas CT synthesis: demo report")
        return md

    md = stage("report", "report", make_report)
    summary["report"] = str(md)
    summary["seconds"] = round(time.time() - t0, 1)
    write_json(out / "demo_summary.json", summary)
    print(f"demo done in {summary['seconds']} s; report: {md} and {md.with_suffix('.html')}", flush=True)
    return summary


def evaluate_generated(out: Path, settings: dict, gen: dict) -> dict:
    """``tools.evaluation.evaluate_synthetic`` for each synthetic set against the real crops, with memorization
    against the generators' training masks' images; the pancreas check uses the ratio study's real-only model.
    An evaluation that fails stops the demo (its error propagates)."""
    from tools.evaluation import evaluate_synthetic
    from tools.generator_quality import judge_overrides
    from tools.splits import load_records

    crops = Path(gen["crops"])
    training = load_records(crops).records("training")
    seg_ckpt = real_only_model(out)
    seg_overrides = judge_overrides(settings)  # the ratio study's models are binary: two output channels
    results = {}
    for name, syn in gen["synthetic"].items():
        target = out / "generative" / f"evaluation_{name}"
        if (target / "metrics.json").is_file() and (target / "montage.png").is_file():
            results[name] = json.loads((target / "metrics.json").read_text())
            continue
        results[name] = evaluate_synthetic(
            syn, crops, target, seg_ckpt=seg_ckpt if (seg_ckpt / "model.pt").is_file() else None,
            training=training, seg_overrides=seg_overrides,
        )  # fmt: skip
    return results


def real_only_model(out: Path) -> Path:
    """The ratio study's real-only seg_unet3d of seed 0: the judge of the synthetic sets."""
    return out / "ratio" / "jobs" / "real_only" / "seed0" / "models"


def measure_generators(out: Path, settings: dict, gen: dict) -> dict:
    """Issue 14's quality bars of the demo's two generators (``tools.generator_quality.demo_quality``), judged by the
    ratio study's real-only model (seed 0), into ``<out>/generative/quality.md`` / ``.json`` and a montage per
    generator; returns each generator's verdict line. A generator that fails its bars is reported, not an error."""
    from tools.generator_quality import demo_quality, heldout_data, judge_overrides

    models = real_only_model(out)
    judge = {"ckpt": models, "overrides": judge_overrides(settings),
             "metrics": json.loads((models.parent / "metrics.json").read_text())["metrics"]}  # fmt: skip
    data = heldout_data(Path(gen["crops"]), Path(gen["data_dir"]))
    quality = demo_quality(out / "generative", settings, data, judge, gen["ckpts"])
    for result in quality["results"].values():
        print(f"      {result['verdict']}", flush=True)
    return {name: result["verdict"] for name, result in quality["results"].items()}


def _stage_main(argv: Sequence[str] | None = None) -> int:
    """``python -m tools.demo --stage vae|ldm --out DIR``: one generative bundle's training + synthesis, then the
    held-out sets of the quality bars: ``vae`` makes vae_ct's trained and untrained sets and ldm_abdomen's untrained
    one (it finishes first), ``ldm`` ldm_abdomen's trained set."""
    import torch

    from tools.generator_quality import heldout_data, synthesize_heldout, untrained_heldout
    from tools.studies import prepared_split, scale_settings, synthesize_set, train_ldm, train_vae

    parser = argparse.ArgumentParser(description=_stage_main.__doc__)
    parser.add_argument("--stage", choices=("vae", "ldm"), required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--scale", default="demo")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    out = Path(args.out)
    settings = scale_settings(args.scale)
    crops = prepared_split(
        out / "data" / "phantom", out / "data" / "crops_pancreas", "pancreas", settings["crop_shape"]
    )
    root = out / "generative"
    data = heldout_data(crops, out / "data" / "phantom")
    started = time.time()
    if args.stage == "vae":
        ckpt = train_vae(crops, root / "vae_ct" / "models", settings)
        synthesize_set("vae_ct", crops, root / "vae_ct" / "synthetic", ckpt, settings)
        print(f"vae: trained and synthesized in {time.time() - started:.0f} s", flush=True)
        synthesize_heldout("vae_ct", data, ckpt, root / "vae_ct" / "heldout", settings)
        untrained_heldout("vae_ct", data, root / "vae_ct" / "untrained", settings)
        untrained_heldout("ldm_abdomen", data, root / "ldm_abdomen" / "untrained", settings)
    else:
        ckpt = train_ldm(crops, root / "ldm_abdomen" / "models", settings, "pancreas")
        synthesize_set("ldm_abdomen", crops, root / "ldm_abdomen" / "synthetic", ckpt, settings)
        print(f"ldm: trained and synthesized in {time.time() - started:.0f} s", flush=True)
        synthesize_heldout("ldm_abdomen", data, ckpt, root / "ldm_abdomen" / "heldout", settings)
    print(f"{args.stage}: held-out sets made, {time.time() - started:.0f} s in all", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_stage_main())
