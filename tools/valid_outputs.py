"""The valid-outputs suite: the project's own outputs through every reader, each accepted.

``python -m tools.valid_outputs`` (or :func:`run_suite` from the tests) is the counterpart of
:mod:`tools.bad_inputs`: there every broken input must be refused; here every data set the project writes must be
accepted by every ``tools`` command and every bundle data pipeline that reads it. It makes, in a temporary folder:

* the phantom (``data phantom``), every ``data prepare`` mode (``full``, ``semi``, ``pancreas``, ``subvolumes``,
  ``none``) with and without a HU window (the windowed ones carry ``"intensity": "windowed [...] HU -> [...]"``),
  ``data split`` outputs of the phantom and of the crops;
* synthetic sets of every generator (``synthesize`` vae_ct and ldm_abdomen with random tiny networks, difftumor),
* ``mix`` datalists of real crops (in HU and windowed) with synthetic cases;

and feeds each to its readers: ``data list --validate``, ``data prepare``, ``data split``, ``data quartiles``,
``mix``, ``synthesize`` (each generator), ``evaluate seg``, ``evaluate synthetic``, ``reader_study build``, the input
checks of ``study ratio --real/--synthetic`` and ``study tumor_size --data``, and the bundles' data pipelines (built by
``monai.bundle`` from their own configs with the tiny overrides of :mod:`tools.bad_inputs`; seg_unet3d inference
runs whole). Making a set is a case too. A case passes when it raises nothing; the suite prints one line per case and
``N cases, 0 refused``. Each pair of set and reader that is left out is left out for a reason given in
:func:`cases` (e.g. ``prepare`` needs scans in HU and refuses a windowed set by design).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from tools.bad_inputs import (
    TINY_DT,
    TINY_LDM,
    TINY_LDM_NET,
    TINY_SEG,
    TINY_SEG_NET,
    TINY_VAE,
    TINY_VAE_NET,
    _bundle_dataset,
    _input_errors,
    _ldm_weights,
    _seg_inference,
    _seg_inference_weights,
    _seg_weights,
    _vae_weights,
)
from tools.bundle_scripts.config_check import root_cause
from tools.prep import PREPARE_MODES

PHANTOM = {"n_cases": 4, "shape": "48,48,24"}  # the README's worked example: voxels of about 8.5 mm
#: ``data prepare`` options of every mode (a new mode fails here until it is added): the body-wide crops need 32
#: voxels across to stay under the readers' 20 mm
PREPARE_OPTIONS = {
    "full": {"out_shape": "32,32,16"},
    "semi": {"out_shape": "32,32,16"},
    "pancreas": {"out_shape": "16,16,16"},
    "subvolumes": {"size": "32,32"},
    "none": {},
}
KEEP_SPACING = [-1, -1, -1]  # resampling the phantom to the bundles' 1 mm would make 400^3 volumes
SEG = {**TINY_SEG, "pixdim": KEEP_SPACING}
DT = {**TINY_DT, "spacing": KEEP_SPACING}
#: ldm_abdomen reads the full crops at their own shape (a smaller image_size would write voxels over 20 mm)
LDM_FULL = {"crop_mode": "full", "prep_out_shape": [32, 32, 16], "image_size": [32, 32, 16]}
LDM_DOWNSAMPLE = 4  # of the tiny autoencoder (two strided levels)
WINDOWS = {"hu": None, "windowed": "-175,250"}  # `data prepare`'s default window is -175,250
SPLIT_FRACTIONS = "0.5,0.25,0.25"


@dataclass
class Case:
    """One reader on one output (``reads``: the sets it needs); ``makes`` names the set it writes, if any."""

    name: str
    reads: tuple[str, ...]
    run: Callable[[dict[str, Path], Path], Path | None]  # (sets made so far, its output folder) -> the set it made
    makes: str | None = None
    context: Callable[[], Any] = contextlib.nullcontext  # e.g. a bundle's ``scripts`` on the import path


@dataclass
class Result:
    case: str
    accepted: bool
    seconds: float
    error: str = ""
    detail: str = ""


@dataclass
class Report:
    results: list[Result] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def refused(self) -> list[Result]:
        return [r for r in self.results if not r.accepted]

    def line(self) -> str:
        return f"{len(self.results)} cases, {len(self.refused)} refused"


# ---------------------------------------------------------------------------------------------------------------
# makers: the project's outputs, made as a user makes them (through tools.cli)


def _phantom(sets: dict[str, Path], out: Path) -> Path:
    from tools.cli import Data

    Data().phantom(out=str(out / "phantom"), **PHANTOM)
    return out / "phantom"


def _prepare_set(mode: str, window: str | None, source: str = "phantom") -> Callable:
    options = PREPARE_OPTIONS[mode]

    def run(sets: dict[str, Path], out: Path) -> Path:
        from tools.cli import Data

        Data().prepare(str(sets[source]), str(out / "prepared"), mode=mode, hu_window=window, **options)
        return out / "prepared"

    return run


def _split(source: str) -> Callable:
    def run(sets: dict[str, Path], out: Path) -> Path:
        from tools.cli import Data

        Data().split(str(sets[source]), str(out / "split.json"), fractions=SPLIT_FRACTIONS)
        return out / "split.json"

    return run


def _weights(sets: dict[str, Path], out: Path) -> Path:
    """Random-weight tiny networks of seg_unet3d, vae_ct and ldm_abdomen (tools.bad_inputs' controls use them),
    ldm_abdomen's latent statistics set to the full crops' shape."""
    for make in (_seg_weights, _seg_inference_weights, _vae_weights, _ldm_weights):
        make(out)
    stats_file = out / "ldm" / "latent_stats.json"
    stats = json.loads(stats_file.read_text())
    stats["image_size"] = LDM_FULL["image_size"]
    stats["latent_shape"] = [stats["latent_shape"][0], *[size // LDM_DOWNSAMPLE for size in LDM_FULL["image_size"]]]
    stats_file.write_text(json.dumps(stats))
    return out


def _synthesized(bundle: str, source: str, max_items: int | None = None) -> Callable:
    """``tools synthesize <bundle>`` on a set: tiny random networks, one sample per record (difftumor: the
    handcrafted family at the scans' own spacing)."""
    weights, overrides = {
        "vae_ct": ("vae", TINY_VAE_NET),
        "ldm_abdomen": ("ldm", {**TINY_LDM_NET, **LDM_FULL}),
        "difftumor": (None, {"family_name": "handcrafted", "model_spacing": KEEP_SPACING}),
    }[bundle]

    def run(sets: dict[str, Path], out: Path) -> Path:
        from tools.cli import Cli

        Cli().synthesize(bundle, str(sets[source]), str(out / "synthetic"),
                         ckpt_dir=None if weights is None else str(sets["weights"] / weights),
                         overrides=json.dumps(overrides), max_items=max_items, progress=False)  # fmt: skip
        return out / "synthetic"

    return run


def _datalist_of(path: Path) -> Path:
    """The datalist file of a set: its ``dataset.json`` (MSD / prepared folder), ``datalist.json`` (synthetic
    folder) or the JSON itself (split, mix)."""
    if path.is_file():
        return path
    return path / "dataset.json" if (path / "dataset.json").is_file() else path / "datalist.json"


def _mix(real: str, synthetic: str) -> Callable:
    def run(sets: dict[str, Path], out: Path) -> Path:
        from tools.cli import Cli

        Cli().mix(str(sets[real]), str(out / "mix.json"), ratio="50:50",
                  synthetic=f"VAE={_datalist_of(sets[synthetic])}")  # fmt: skip
        return out / "mix.json"

    return run


# ---------------------------------------------------------------------------------------------------------------
# readers


def _list_validate(name: str) -> Callable:
    def run(sets: dict[str, Path], out: Path) -> None:
        from tools.cli import Data

        Data().list(str(sets[name]), validate=True)

    return run


def _quartiles(name: str) -> Callable:
    def run(sets: dict[str, Path], out: Path) -> None:
        from tools.cli import Data

        Data().quartiles(str(sets[name]))

    return run


def _evaluate_synthetic(synthetic: str, real: str, training: str | None) -> Callable:
    def run(sets: dict[str, Path], out: Path) -> None:
        from tools.cli import Evaluate

        Evaluate().synthetic(str(sets[synthetic]), str(sets[real]), str(out / "eval"),
                             training=None if training is None else str(sets[training]))  # fmt: skip

    return run


def _evaluate_seg(name: str) -> Callable:
    def run(sets: dict[str, Path], out: Path) -> None:
        from tools.cli import Evaluate

        Evaluate().seg(str(sets[name]), str(sets["weights"] / "seg"), str(out / "eval"),
                       overrides=json.dumps(TINY_SEG_NET))  # fmt: skip

    return run


def _reader_study(real: str, synthetic: str) -> Callable:
    def run(sets: dict[str, Path], out: Path) -> None:
        from tools.cli import ReaderStudy

        ReaderStudy().build(str(sets[real]), str(sets[synthetic]), str(out / "reader_study"), n=2)

    return run


def _study_given_sets(real: str, synthetic: str) -> Callable:
    """What ``study ratio --real R --synthetic VAE=S`` reads before its first job (the jobs then train on ``mix``
    datalists of them, read by the seg_unet3d pipeline cases)."""

    def run(sets: dict[str, Path], out: Path) -> None:
        from tools.studies import check_given_sets

        check_given_sets(_datalist_of(sets[real]), {"VAE": _datalist_of(sets[synthetic])})

    return run


def _study_data(name: str) -> Callable:
    """What ``study tumor_size --data D`` makes of D before its first job: the tumor crops, their split and the
    tumor size classes (the jobs then train seg_unet3d on that split)."""

    def run(sets: dict[str, Path], out: Path) -> None:
        from tools.studies import TumorSizeStudy

        TumorSizeStudy(out, "demo", data=str(sets[name])).prepare()

    return run


def _bundle(bundle: str, configs: Sequence[str], dataset_id: str | Sequence[str], overrides: dict, name: str,
            datalist_key: str | None = None) -> Callable:  # fmt: skip
    """A bundle's dataset component(s) on a set (tools.bad_inputs' builder). A datalist JSON that is not the
    folder's ``dataset.json`` (split, mix, synthetic ``datalist.json``) is given through ``datalist_key``."""

    def run(sets: dict[str, Path], out: Path) -> None:
        path = sets[name]
        settings = dict(overrides)
        if datalist_key is not None and _datalist_of(path) != path / "dataset.json":
            settings[datalist_key] = str(_datalist_of(path))
        data = path.parent if path.is_file() else path
        _bundle_dataset(bundle, configs, dataset_id, settings)(data, out)

    return run


def _seg_inference_on(name: str) -> Callable:
    def run(sets: dict[str, Path], out: Path) -> None:
        _seg_inference(sets[name], out, {"seg_inference": sets["weights"] / "seg_inference"})

    return run


def _on_bundle_path(bundle: str) -> Callable[[], Any]:
    from tools.bundles import BUNDLES_ROOT, bundle_on_path

    return lambda: bundle_on_path(BUNDLES_ROOT / bundle)


# ---------------------------------------------------------------------------------------------------------------
# the cases


def cases() -> list[Case]:
    """Every (output, reader) pair, the makers of the outputs first. Pairs left out, and why:

    * ``data prepare`` on a windowed set: prepare finds the body by HU and refuses a windowed source by design
      (naming its mark); on vae_ct / ldm_abdomen sets: a random-weight generator's output is not CT;
    * ``data list --validate`` and the bundles' pipelines on a vae_ct / ldm_abdomen set alone: they check that
      images look like CT, and a random-weight generator's output need not (``evaluate synthetic``,
      ``reader_study build`` and ``study ratio --synthetic`` read such sets without that check, as designed; the
      ``mix`` datalists with vae_ct cases go through seg_unet3d's pipeline);
    * ldm_abdomen on windowed sets: it models HU in [-1000, 1000] and refuses a windowed set by design
      (``scripts/data.check_prepared`` names the ``prepare`` command to run); it reads the full crops it is made for;
    * vae_ct's 4-slice pipeline reads the sub-volumes, its 3D one the pancreas crops; seg_unet3d reads every 3D set,
      difftumor's training the whole scans and pancreas crops (its inference runs inside ``synthesize difftumor``).
    """
    prepared = {
        f"prep_{mode}_{window}": (mode, hu_window) for mode in PREPARE_MODES for window, hu_window in WINDOWS.items()
    }
    hu_sets = [name for name in prepared if name.endswith("_hu")]
    out: list[Case] = [
        Case("tools data phantom", (), _phantom, makes="phantom"),
        Case("tiny random networks (seg_unet3d, vae_ct, ldm_abdomen)", (), _weights, makes="weights"),
        *[Case(f"tools data prepare --mode {mode} --hu_window {hu_window}", ("phantom",),
               _prepare_set(mode, hu_window), makes=name) for name, (mode, hu_window) in prepared.items()],
        Case("tools data split <- phantom", ("phantom",), _split("phantom"), makes="split_phantom"),
        *[Case(f"tools data split <- prep_pancreas_{window}", (f"prep_pancreas_{window}",),
               _split(f"prep_pancreas_{window}"), makes=f"split_crops_{window}") for window in WINDOWS],
        Case("tools synthesize vae_ct <- split_crops_hu", ("split_crops_hu", "weights"),
             _synthesized("vae_ct", "split_crops_hu"), makes="syn_vae"),
        Case("tools synthesize vae_ct <- split_crops_windowed", ("split_crops_windowed", "weights"),
             _synthesized("vae_ct", "split_crops_windowed")),
        Case("tools synthesize ldm_abdomen <- prep_full_hu", ("prep_full_hu", "weights"),
             _synthesized("ldm_abdomen", "prep_full_hu", max_items=2), makes="syn_ldm"),
        Case("tools synthesize difftumor <- phantom", ("phantom",), _synthesized("difftumor", "phantom"),
             makes="syn_difftumor"),
        Case("tools synthesize difftumor <- prep_pancreas_windowed", ("prep_pancreas_windowed",),
             _synthesized("difftumor", "prep_pancreas_windowed")),
        *[Case(f"tools mix <- split_crops_{window} + syn_vae", (f"split_crops_{window}", "syn_vae"),
               _mix(f"split_crops_{window}", "syn_vae"), makes=f"mix_{window}") for window in WINDOWS],
    ]  # fmt: skip
    real_sets = ["phantom", *prepared, "split_phantom", "split_crops_hu", "split_crops_windowed", "syn_difftumor"]
    out += [Case(f"tools data list --validate <- {name}", (name,), _list_validate(name))
            for name in [*real_sets, "mix_hu", "mix_windowed"]]  # fmt: skip
    out += [Case(f"tools data quartiles <- {name}", (name,), _quartiles(name))
            for name in [*real_sets, "syn_vae", "syn_ldm", "mix_hu", "mix_windowed"]]  # fmt: skip
    out += [Case(f"tools data prepare <- {name}", (name,), _prepare_set("pancreas", None, name))
            for name in ["phantom", *hu_sets, "split_phantom", "syn_difftumor"]]  # fmt: skip
    out += [Case(f"tools data split <- {name}", (name,), _split(name))
            for name in ["syn_vae", "syn_ldm", "syn_difftumor", "mix_hu", "mix_windowed"]]  # fmt: skip
    out += [
        Case(f"tools evaluate synthetic <- {syn} vs {real}", (syn, real, *([training] if training else [])),
             _evaluate_synthetic(syn, real, training))
        for syn, real, training in (("syn_vae", "prep_pancreas_windowed", "prep_pancreas_windowed"),
                                    ("syn_ldm", "prep_full_hu", None),
                                    ("syn_difftumor", "phantom", "phantom"))
    ]  # fmt: skip
    out += [Case(f"tools evaluate seg <- {name}", (name, "weights"), _evaluate_seg(name))
            for name in ("prep_full_hu", "split_crops_windowed")]  # fmt: skip
    out += [
        Case(f"tools reader_study build <- {real} + {syn}", (real, syn), _reader_study(real, syn))
        for real, syn in (("prep_pancreas_windowed", "syn_vae"), ("phantom", "syn_difftumor"))
    ]
    out += [
        Case(f"tools study ratio --real {real} --synthetic VAE={syn}", (real, syn), _study_given_sets(real, syn))
        for real, syn in (("split_crops_hu", "syn_vae"), ("split_crops_windowed", "syn_vae"),
                          ("split_crops_windowed", "syn_ldm"), ("split_crops_hu", "syn_difftumor"))
    ]  # fmt: skip
    out.append(Case("tools study tumor_size --data phantom", ("phantom",), _study_data("phantom")))
    return out + _bundle_cases(prepared)


def _bundle_cases(prepared: Sequence[str]) -> list[Case]:
    three_d = ["phantom", *[name for name in prepared if "subvolumes" not in name]]
    seg = _on_bundle_path("seg_unet3d")
    out = [
        Case(f"seg_unet3d train/evaluate <- {name}", (name,),
             _bundle("seg_unet3d", ["train.json"], "train#dataset", SEG, name, "datalist"), context=seg)
        for name in [*three_d, "split_phantom", "split_crops_windowed", "syn_difftumor", "mix_hu", "mix_windowed"]
    ]  # fmt: skip
    out += [Case(f"seg_unet3d inference <- {name}", (name, "weights"), _seg_inference_on(name), context=seg)
            for name in ("prep_pancreas_hu", "prep_pancreas_windowed", "prep_full_windowed")]  # fmt: skip
    vae = _on_bundle_path("vae_ct")
    for window in WINDOWS:
        out += [
            Case(f"vae_ct train/evaluate <- prep_subvolumes_{window}", (f"prep_subvolumes_{window}",),
                 _bundle("vae_ct", ["train.json"], "train#dataset", TINY_VAE, f"prep_subvolumes_{window}"),
                 context=vae),
            Case(f"vae_ct train_3d <- prep_pancreas_{window}", (f"prep_pancreas_{window}",),
                 _bundle("vae_ct", ["train.json", "train_3d.json"], "train#dataset",
                         {**TINY_VAE, "roi_size": [16, 16, 16]}, f"prep_pancreas_{window}"), context=vae),
            Case(f"vae_ct inference <- prep_pancreas_{window}", (f"prep_pancreas_{window}",),
                 _bundle("vae_ct", ["inference.json"], "dataset", {**TINY_VAE, "datalist_key": "training"},
                         f"prep_pancreas_{window}"), context=vae),
        ]  # fmt: skip
    ldm, ldm_settings = _on_bundle_path("ldm_abdomen"), {**TINY_LDM, **LDM_FULL}
    out += [
        Case("ldm_abdomen train/evaluate <- prep_full_hu", ("prep_full_hu",),
             _bundle("ldm_abdomen", ["train.json"], "train#dataset", ldm_settings, "prep_full_hu"), context=ldm),
        Case("ldm_abdomen train_controlnet <- prep_full_hu", ("prep_full_hu",),
             _bundle("ldm_abdomen", ["train.json", "train_controlnet.json"], "train#dataset", ldm_settings,
                     "prep_full_hu"), context=ldm),
        Case("ldm_abdomen inference_controlnet <- prep_full_hu", ("prep_full_hu",),
             _bundle("ldm_abdomen", ["inference.json", "inference_controlnet.json"], "dataset",
                     {**ldm_settings, "mask_sections": ["training"]}, "prep_full_hu"), context=ldm),
    ]  # fmt: skip
    difftumor, datasets = _on_bundle_path("difftumor"), ("train#dataset", "validate#dataset")
    for name in ("phantom", "prep_pancreas_hu", "prep_pancreas_windowed", "prep_none_windowed"):
        out += [
            Case(f"difftumor train/evaluate <- {name}", (name,),
                 _bundle("difftumor", ["train.json"], datasets, DT, name), context=difftumor),
            Case(f"difftumor train_diffusion <- {name}", (name,),
                 _bundle("difftumor", ["train.json", "train_diffusion.json"], datasets, DT, name), context=difftumor),
        ]  # fmt: skip
    return out


# ---------------------------------------------------------------------------------------------------------------
# the runner


def run_case(case: Case, sets: dict[str, Path], out: Path) -> Result:
    """Run one case with ``out`` as its output folder; a set it makes is registered in ``sets``."""
    missing = [name for name in case.reads if name not in sets]
    if missing:
        return Result(case.name, False, 0.0, f"needs {', '.join(missing)}, which could not be made")
    out.mkdir(parents=True)
    start = time.monotonic()
    captured = io.StringIO()
    try:
        with contextlib.redirect_stdout(captured), contextlib.redirect_stderr(captured), case.context():
            made = case.run(sets, out)
    except Exception as error:  # the point of the suite: any error on the project's own output is a refusal
        detail = "".join(traceback.format_exception(type(error), error, error.__traceback__))
        ours = _input_errors(error)  # MONAI wraps a transform's error: show the InputError, else the root cause
        shown = ours[0] if ours else root_cause(error)
        message = f"{type(shown).__name__}: {shown}".strip().splitlines()[0]
        return Result(case.name, False, time.monotonic() - start, message, detail)
    if case.makes is not None:
        sets[case.makes] = made
    return Result(case.name, True, time.monotonic() - start)


def run_suite(
    work_dir: str | os.PathLike | None = None,
    case_filter: str | None = None,
    verbose: bool = False,
    echo: Callable[[str], None] | None = print,
    keep: bool = False,
) -> Report:
    """Run every case (or those whose name contains ``case_filter``, plus the makers of the sets they read) in a
    temporary folder under ``work_dir``, deleted at the end unless ``keep``."""
    start = time.monotonic()
    report = Report()
    chosen = _with_makers(cases(), case_filter)
    with contextlib.ExitStack() as stack:
        tmp = tempfile.mkdtemp(prefix="valid_outputs_", dir=work_dir)
        if not keep:
            stack.callback(shutil.rmtree, tmp, ignore_errors=True)
        elif echo is not None:
            echo(f"outputs kept in {tmp}")
        work, sets = Path(tmp), {}
        for index, case in enumerate(chosen):
            result = run_case(case, sets, work / f"case_{index:03d}")
            report.results.append(result)
            if echo is not None:
                status = "ok" if result.accepted else "REFUSED"
                echo(
                    f"[{status}] {result.seconds:5.1f} s  {case.name}"
                    + ("" if result.accepted else f": {result.error}")
                )
                if verbose and not result.accepted:
                    echo(result.detail)
    report.seconds = time.monotonic() - start
    return report


def _with_makers(all_cases: list[Case], case_filter: str | None) -> list[Case]:
    if not case_filter:
        return all_cases
    makers = {case.makes: case for case in all_cases if case.makes}
    wanted: set[str] = set()

    def need(case: Case) -> None:
        if case.name in wanted:
            return
        wanted.add(case.name)
        for name in case.reads:
            need(makers[name])

    for case in all_cases:
        if case_filter in case.name:
            need(case)
    return [case for case in all_cases if case.name in wanted]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.valid_outputs", description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", help="only cases whose name contains this (and the cases making their inputs)")
    parser.add_argument("--verbose", "-v", action="store_true", help="print the traceback of every refusal")
    parser.add_argument("--keep", metavar="DIR", help="make the outputs under DIR and keep them (to look at them)")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    report = run_suite(work_dir=args.keep, case_filter=args.case, verbose=args.verbose, keep=args.keep is not None)
    for result in report.refused:
        print(f"refused: {result.case}: {result.error}")
    print(f"{report.line()} ({report.seconds:.0f} s)")
    return 0 if not report.refused else 1


if __name__ == "__main__":
    sys.exit(main())
