"""Command line of the tools package (Google ``fire``): ``python -m tools <command> [--help]``.

Groups: ``data`` (phantom, DICOM, preparation, splits, tumor statistics, realism), ``check-bundle`` and ``demo``.
Imports are inside the commands so that ``--help`` answers at once. :func:`main` checks the arguments against the
command's signature before fire runs it, and writes the help pages from the docstrings (:mod:`tools.cli_args`), so
every argument needs its text under ``Args:``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Sequence

import fire


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=2, default=str))


def _tuple(value, n: int | None = None, cast=float):
    """Fire gives ``1,2,3`` as a tuple and ``"1,2,3"`` as text; accept both (and None)."""
    if value is None:
        return None
    if isinstance(value, str):
        if value in ("fit", "scanner"):
            return value
        value = [v.strip() for v in value.split(",") if v.strip()]
    elif not isinstance(value, (list, tuple)):
        value = [value]  # fire gives a single number (`--seeds 0`) as that number
    out = tuple(cast(v) for v in value)
    if n is not None and len(out) != n:
        raise ValueError(f"expected {n} values, got {out}")
    return out


class Data:
    """Data sets: make the phantom, convert DICOM, prepare crops and sub-volumes, split, tumor sizes, realism."""

    def phantom(
        self,
        out: str = "data/phantom",
        n_cases: int = 20,
        seed: int = 0,
        shape=(160, 160, 80),
        spacing="fit",
        phase: str = "portal_venous",
        tumor_fraction: float = 0.5,
        test_fraction: float = 0.2,
        orientation: str = "RAS",
        tumor_radius_mm=None,
    ):
        """Make an MSD-layout phantom data set of synthetic abdominal CT (HU) with pancreas/tumor labels.

        Args:
            out: output folder (dataset.json, imagesTr/, labelsTr/, organsTr/, imagesTs/, labelsTs/, organsTs/).
            n_cases: number of patients (phase=both gives two scans each).
            seed: data set seed; same seed and options give byte-identical volumes.
            shape: voxels per case, e.g. 160,160,80 (with spacing=scanner: None derives it from the field of view).
            spacing: "fit" (the field of view covers the body), "scanner" (0.6-0.9 mm in-plane, 1-5 mm slices)
                or mm as sx,sy,sz.
            phase: non_contrast, portal_venous, both (each patient twice) or mixed.
            tumor_fraction: fraction of patients with a pancreatic tumor (the others are healthy).
            test_fraction: fraction of patients put in imagesTs/ (with labelsTs/).
            orientation: RAS, LPS or mixed.
            tumor_radius_mm: tumor equivalent radius in mm, a lo,hi range, or None (log-normal around 11 mm).
        """
        from tools.phantom import make_dataset

        shape = None if shape in (None, "None") else _tuple(shape, 3, int)
        spacing = None if spacing in (None, "fit") else _tuple(spacing, 3)
        radius = (
            tumor_radius_mm
            if tumor_radius_mm is None or isinstance(tumor_radius_mm, (int, float))
            else _tuple(tumor_radius_mm, 2)
        )
        path = make_dataset(
            out,
            n_cases=n_cases,
            seed=seed,
            shape=shape,
            spacing=spacing,
            phase=phase,
            tumor_fraction=tumor_fraction,
            test_fraction=test_fraction,
            orientation=orientation,
            tumor_radius_mm=radius,
        )
        print(path)

    def realism(self, real_dir: str | None = None, out: str = "runs/realism", n_cases: int = 5, seed: int = 0):
        """Measure the phantom against the real CT of ../shared: organ median HU, HU histogram distance, PNG.

        Args:
            real_dir: folder with example_ct_sm.nii.gz, example_seg.nii.gz and the tissue masks
                (default ../shared/data/real_ct).
            out: folder for realism.json and realism.png.
            n_cases: phantom cases to measure (non-contrast, 3 mm, like the real scan).
            seed: phantom seed.
        """
        from tools.demo import DEFAULT_SHARED
        from tools.realism import run_realism

        real = Path(real_dir) if real_dir else DEFAULT_SHARED / "data" / "real_ct"
        if not real.is_dir():
            raise SystemExit(f"{real}: not found; give --real_dir (the real CT samples of ../shared/data/real_ct)")
        result = run_realism(real, out, n_cases=n_cases, seed=seed)
        if not result["all_within_tolerance"]:
            sys.exit(1)

    def convert_dicom(self, series_dir: str, out: str, series_uid: str | None = None):
        """Convert one DICOM CT series to NIfTI (HU, real geometry); refuses a series with a missing slice.

        Args:
            series_dir: folder holding the series' files.
            out: output .nii.gz path (written atomically).
            series_uid: which series when the folder holds several.
        """
        from tools.dicom import convert_dicom_series

        print(convert_dicom_series(series_dir, out, series_uid))

    def list(self, source: str, validate: bool = False):
        """Read a data source into a datalist and print a summary (MSD folder, datalist JSON, NIfTI or DICOM folder).

        Args:
            source: MSD task folder, MONAI datalist JSON, folder of NIfTI pairs or folder tree of DICOM series.
            validate: also open every volume and check it (truncated files, grids, CT intensities).
        """
        from tools.datasets import read_datalist, summarize, validate_records

        records = read_datalist(source)
        if validate:
            validate_records(records)
        _print_json(summarize(records))

    def prepare(
        self,
        src: str,
        out: str,
        mode: str = "pancreas",
        spacing=None,
        out_shape=None,
        margin_mm: float = 10.0,
        hu_window=(-175, 250),
        n_slices: int = 4,
        size=(256, 256),
        sections=None,
    ):
        """Crop a data set (modes full, semi, pancreas, none) or cut it into seed 000 sub-volumes (subvolumes).

        Every output keeps correct geometry (affine updated) and a datalist is written; reruns reuse outputs.

        Args:
            src: MSD folder or datalist JSON.
            out: output folder (never the source folder).
            mode: full (body box), semi (largest cube inside the body), pancreas (box around the label),
                subvolumes (n_slices-slice stacks resized to size, stacks without pancreas dropped), none.
            spacing: resample to this spacing (mm) first, e.g. 1,1,1 (default: keep each scan's spacing).
            out_shape: resize crops to this shape, e.g. 240,240,155 (default: keep each crop's shape).
            margin_mm: margin around the pancreas box.
            hu_window: lo,hi HU clipped and scaled to [0, 1]; None keeps HU.
            n_slices: slices per sub-volume (seed 000: 4).
            size: in-plane size of sub-volumes (seed 000: 256,256).
            sections: datalist sections to process, e.g. training,test (default: all).
        """
        from tools.prep import prepare_dataset

        result = prepare_dataset(
            src,
            out,
            mode=mode,
            spacing=_tuple(spacing, 3),
            out_shape=_tuple(out_shape, 3, int),
            margin_mm=margin_mm,
            hu_window=None if hu_window in (None, "None") else _tuple(hu_window, 2),
            n_slices=n_slices,
            size=_tuple(size, 2, int),
            sections=None if sections is None else _tuple(sections, cast=str),
        )
        _print_json({k: (v if k == "datalist" else len(v)) for k, v in result.items()})

    def split(
        self,
        src: str,
        out: str,
        fractions=(0.7, 0.1, 0.2),
        n_folds: int | None = None,
        seed: int = 0,
        test_fraction: float = 0.0,
        stratify_key: str | None = None,
        patient_key: str = "patient",
    ):
        """Patient-level split of a data set into a datalist JSON (no patient in two sets).

        Args:
            src: MSD folder or datalist JSON.
            out: output datalist JSON.
            fractions: training,validation,test fractions of patients (ignored with n_folds).
            n_folds: k-fold split instead (records get a "fold" key).
            seed: split seed.
            test_fraction: with n_folds, patients held out as a test set first.
            stratify_key: keep this record field (e.g. has_tumor) in proportion in every set.
            patient_key: the record field naming the patient.
        """
        from tools.splits import make_splits

        split = make_splits(
            src,
            out,
            fractions=None if n_folds else _tuple(fractions),
            n_folds=n_folds,
            seed=seed,
            test_fraction=test_fraction,
            stratify_key=stratify_key,
            patient_key=patient_key,
        )
        _print_json({k: len(v) for k, v in split.items() if isinstance(v, list)})

    def quartiles(self, src: str, out: str | None = None, section: str | None = "training"):
        """Tumor-size statistics of a data set: equivalent radius (mm) per tumor, quartiles, size classes.

        Args:
            src: MSD folder or datalist JSON with labels (tumor = 2).
            out: optional JSON output path.
            section: datalist section (None: all).
        """
        from tools.tumor_stats import dataset_tumor_stats, write_tumor_stats

        stats = write_tumor_stats(src, out, section=section) if out else dataset_tumor_stats(src, section=section)
        _print_json({k: v for k, v in stats.items() if k != "tumors"})


def _parse_generators(synthetic) -> dict:
    """``vae=a.json,dm=b.json`` (or a dict from fire) -> {"vae": "a.json", "dm": "b.json"}."""
    if synthetic in (None, "", "None"):
        return {}
    if isinstance(synthetic, dict):
        return {str(k): str(v) for k, v in synthetic.items()}
    items = synthetic if isinstance(synthetic, (list, tuple)) else str(synthetic).split(",")
    out = {}
    for item in items:
        name, sep, path = str(item).partition("=")
        if not sep:
            raise ValueError(f"--synthetic entries look like name=path, got {item!r}")
        out[name.strip()] = path.strip()
    return out


def _records_of(source, section, n, seed):
    from tools.splits import load_records

    records = load_records(source).records(section)
    if n is not None and n < len(records):
        import numpy as np

        pick = np.random.default_rng(seed).choice(len(records), size=n, replace=False)
        records = [records[int(i)] for i in sorted(pick)]
    return records


def _json_arg(value) -> dict:
    """A JSON object given on the command line (fire may already have parsed it into a dict)."""
    if value in (None, "", "None"):
        return {}
    if isinstance(value, dict):
        return value
    parsed = json.loads(value)
    if not isinstance(parsed, dict):
        raise ValueError(f"expected a JSON object, got {value!r}")
    return parsed


class ReaderStudy:
    """Blinded reader study: build the set of rendered real and synthetic cases, then score the readers' ratings."""

    def build(
        self,
        real: str,
        synthetic: str,
        out: str,
        n: int | None = None,
        seed: int = 0,
        readers="reader1,reader2",
        section: str | None = None,
    ):
        """Shuffle real and synthetic cases into anonymous, rendered views with a hidden key and a ratings sheet.

        Args:
            real: real cases (MSD folder or datalist JSON).
            synthetic: synthetic cases (folder or datalist JSON written by `synthesize`).
            out: study folder: out/readers/ (views/, ratings_template.csv, INSTRUCTIONS.txt) is what you hand to
                the readers; out/key.json, the answer, stays beside it.
            n: cases per group (default all).
            seed: shuffling and sampling seed.
            readers: comma-separated reader names for the template.
            section: datalist section to draw from (default all sections).
        """
        from tools.reader_study import build_reader_study

        names = readers.split(",") if isinstance(readers, str) else list(readers)
        _print_json(
            build_reader_study(
                _records_of(real, section, n, seed),
                _records_of(synthetic, section, n, seed),
                out,
                seed=seed,
                readers=names,
            )
        )

    def score(self, study: str, ratings):
        """Per-reader sensitivity, specificity, accuracy, mean realism, and Cohen's kappa between readers.

        Args:
            study: the study folder made by `reader_study build` (the one holding key.json), or its key.json.
            ratings: filled ratings CSV file(s), comma-separated.
        """
        from tools.reader_study import score_reader_study

        files = ratings.split(",") if isinstance(ratings, str) else list(ratings)
        _print_json(score_reader_study(study, files))


def _overrides(value) -> dict:
    """Config overrides from a JSON object text, a dict (fire parses ``{...}``) or None."""
    if value in (None, "", "None"):
        return {}
    if isinstance(value, dict):
        return dict(value)
    return dict(json.loads(value))


class Evaluate:
    """Metrics: segmentation (seg_unet3d's own evaluation) and synthetic sets (realism, diversity, memorization)."""

    def seg(self, datalist: str, ckpt_dir: str, out: str, overrides=None, section: str = "test"):
        """Run seg_unet3d's configs/evaluate.json on a datalist; print and save its summary (Dice, NSD, HD95,
        lesion detection per size bin, patient specificity).

        Args:
            datalist: MSD folder with dataset.json or datalist JSON holding the evaluated section.
            ckpt_dir: folder with the trained model.pt.
            out: output folder (summary.json, metrics_per_case.csv, metrics_summary.csv, detection_summary.csv,
                predictions/).
            overrides: config overrides as a JSON object, e.g. '{"network_def#channels": [4, 8, 16, 32, 64]}'.
            section: datalist section to evaluate.
        """
        from tools.evaluation import evaluate_segmentation

        _print_json(evaluate_segmentation(datalist, ckpt_dir, out, overrides=_overrides(overrides), section=section))

    def synthetic(
        self,
        synthetic: str,
        real: str,
        out: str,
        seg_bundle: str | None = None,
        seg_ckpt: str | None = None,
        training: str | None = None,
        seg_overrides=None,
        min_pancreas_dice: float = 0.5,
    ):
        """Compare a synthetic set with a real one: HU histogram distance, median HU per label/organ, pancreas
        found by seg_unet3d, 3D Frechet feature distance, sample diversity, memorization.

        Writes metrics.json, metrics.csv, montage.png and histogram.png under --out.

        Args:
            synthetic: synthetic set (datalist.json written by `synthesize`, or its folder).
            real: real set (MSD folder or datalist JSON).
            out: output folder.
            seg_bundle: seg_unet3d bundle folder (default bundles/seg_unet3d).
            seg_ckpt: seg_unet3d weights (model.pt or its folder): enables the pancreas check and trained features
                (without it the feature distance uses a fixed random-weight network, with a warning).
            training: the generator's training set: enables the memorization check (vae_ct's near-copy search).
            seg_overrides: seg_unet3d config overrides as a JSON object (network size of a small model...).
            min_pancreas_dice: Dice between seg_unet3d's pancreas and the synthetic label from which a scan
                counts as "pancreas found" (read pancreas_dice_to_synthetic_label first).
        """
        from tools.evaluation import evaluate_synthetic

        metrics = evaluate_synthetic(
            synthetic, real, out, seg_bundle=seg_bundle, seg_ckpt=seg_ckpt, training=training,
            seg_overrides=_overrides(seg_overrides), min_pancreas_dice=min_pancreas_dice,
        )  # fmt: skip
        _print_json(metrics)


class Study:
    """The seed papers' studies: arms x seeds of seg_unet3d trainings -> results.csv, table.md, PNG figures.

    Each command is resumable (finished jobs are kept) and shards its jobs over processes under torchrun:
    `torchrun --standalone --nproc_per_node=2 -m tools study ratio --out runs/studies` gives the same table as one
    process. `--scale demo|small|paper` chooses data size, epochs and network widths (paper: the bundles' defaults).
    """

    @staticmethod
    def _run(name: str, out, scale, seeds, threads, **options):
        from tools.studies import run_study

        seeds = None if seeds in (None, "", "None") else [int(s) for s in _tuple(seeds, cast=int)]
        table = run_study(name, out, scale=scale, seeds=seeds, threads=int(threads), **options)
        if table is not None:
            print((Path(out) / name / "table.md").read_text())

    def ratio(
        self,
        out: str = "runs/studies",
        scale: str = "demo",
        seeds=None,
        threads: int = 1,
        data: str | None = None,
        real: str | None = None,
        synthetic=None,
        generators=None,
    ):
        """(a) seed 000 Table 1: real only vs synthetic:real 100:0 / 50:50 / 25:75 for VAE, DM and VAE+DM.

        Binary pancreas segmentation (seg_unet3d + binary.json) on pancreas crops, every arm evaluated on the same
        real test crops. Without --synthetic the study makes its inputs under <out>/generative: pancreas crops of the
        phantom (or --data), vae_ct (3D crops) and ldm_abdomen (ControlNet on the mask) trained at the scale, one
        synthetic image + label per real training mask.

        Args:
            out: folder of all studies (this one writes <out>/ratio/).
            scale: demo, small, paper or a JSON file of settings ({"base": "demo", <setting>: <value>, "arms":
                {"ratio": ["VAE"]}}; tools/studies.py lists the settings).
            seeds: comma-separated seeds per arm (default: the scale's, demo 0,1).
            threads: torch threads per job (keep 1 for tables identical across process counts).
            data: MSD folder to crop instead of the phantom.
            real: with --synthetic: the real datalist the synthetic sets came from, with training, validation
                (required: the 100:0 arms have no real training case) and test sections, as `data split` writes.
            synthetic: existing synthetic sets, e.g. VAE=runs/syn/vae/datalist.json,DM=runs/syn/dm/datalist.json.
            generators: arms' generators, comma-separated: VAE, DM, VAE+DM, or the names of --synthetic
                (default: the scale's arms.ratio, else VAE,DM,VAE+DM).
        """
        gens = None if generators is None else [g for g in _tuple(generators, cast=str)]
        self._run("ratio", out, scale, seeds, threads, data=data, real=real,
                  synthetic=_parse_generators(synthetic) or None, generators=gens)  # fmt: skip

    def tumor_size(
        self, out: str = "runs/studies", scale: str = "demo", seeds=None, threads: int = 1, data: str | None = None,
        family: str | None = None, sizes=None,
    ):  # fmt: skip
        """(b) seed 001 Table 1: no synthesis vs synthetic tumors tiny / small / medium / large / mixed.

        Tumors are inserted online into healthy training cases by difftumor's TumorSynthesisd in seg_unet3d's
        online_augmentation slot (size classes: quartiles of the training tumors, as seed 001). Tumor DSC and NSD
        on the real tumor test cases.

        Args:
            out: folder of all studies (writes <out>/tumor_size/).
            scale: demo, small, paper or a JSON file of settings (see `study ratio --help`).
            seeds: comma-separated seeds per arm (default: the scale's).
            threads: torch threads per job.
            data: MSD folder instead of the phantom.
            family: synthesis family (default: handcrafted at demo scale, difftumor otherwise).
            sizes: size arms, comma-separated (default: the scale's arms.tumor_size, else
                tiny,small,medium,large,mixed).
        """
        sizes = None if sizes is None else list(_tuple(sizes, cast=str))
        self._run("tumor_size", out, scale, seeds, threads, data=data, family=family, sizes=sizes)

    def label_noise(self, out: str = "runs/studies", scale: str = "demo", seeds=None, threads: int = 1,
                    data: str | None = None):  # fmt: skip
        """(c) seed 001 Tables 2-3: clean labels vs noisy tumor labels (low / moderate / high / extreme).

        Static noisy copies of the training labels (difftumor's NoisyTumorLabeld, one draw per seed), training on
        them, evaluation on the clean test labels.

        Args:
            out: folder of all studies (writes <out>/label_noise/).
            scale: demo, small, paper or a JSON file of settings (see `study ratio --help`).
            seeds: comma-separated seeds per arm (default: the scale's).
            threads: torch threads per job.
            data: MSD folder instead of the phantom.
        """
        self._run("label_noise", out, scale, seeds, threads, data=data)

    def crop_context(self, out: str = "runs/studies", scale: str = "demo", seeds=None, threads: int = 1,
                     data: str | None = None, seg_ckpt: str | None = None):  # fmt: skip
        """(d) seed 002: ldm_abdomen trained per crop mode (full / semi / pancreas), samples evaluated.

        Each job trains the autoencoder, diffusion model and ControlNet on one crop mode, synthesizes one image +
        label per training mask and scores the set with tools.evaluation.evaluate_synthetic (HU histogram
        distance, per-organ HU, pancreas found by seg_unet3d when --seg_ckpt is given, feature distance, diversity,
        memorization).

        Args:
            out: folder of all studies (writes <out>/crop_context/).
            scale: demo, small, paper or a JSON file of settings (see `study ratio --help`).
            seeds: comma-separated seeds per arm (default: the scale's).
            threads: torch threads per job.
            data: MSD folder instead of the phantom.
            seg_ckpt: a trained seg_unet3d checkpoint folder for "pancreas found" (optional).
        """
        self._run("crop_context", out, scale, seeds, threads, data=data, seg_ckpt=seg_ckpt)

    def tumor_families(
        self, out: str = "runs/studies", scale: str = "demo", seeds=None, threads: int = 1, data: str | None = None,
        families=None,
    ):  # fmt: skip
        """(e) none vs DiffTumor vs hand-crafted vs cellular-automaton tumors: detection sensitivity per size bin.

        Args:
            out: folder of all studies (writes <out>/tumor_families/).
            scale: demo, small, paper or a JSON file of settings (see `study ratio --help`).
            seeds: comma-separated seeds per arm (default: the scale's).
            threads: torch threads per job.
            data: MSD folder instead of the phantom.
            families: family arms, comma-separated (default: the scale's arms.tumor_families, else
                difftumor,handcrafted,cellular).
        """
        families = None if families is None else list(_tuple(families, cast=str))
        self._run("tumor_families", out, scale, seeds, threads, data=data, families=families)


class Cli:
    """Tools for the pancreas CT synthesis bundles. Run `python -m tools <command> --help` for each command."""

    def __init__(self):
        self.data = Data()
        self.reader_study = ReaderStudy()
        self.evaluate = Evaluate()
        self.study = Study()

    def mix(
        self,
        real: str,
        out: str,
        ratio: str = "25:75",
        synthetic=None,
        total: int | None = None,
        seed: int = 0,
        replace: bool = False,
    ):
        """Write a training datalist mixing real and synthetic cases at a synthetic:real ratio (seed 000 Table 1).

        The training size stays the real training set's size (or --total); several generators share the synthetic
        part equally; validation and test lists are copied unchanged (real only).

        Args:
            real: real data set (MSD folder or datalist JSON with a training list).
            out: output datalist JSON.
            ratio: synthetic:real, e.g. 100:0, 50:50, 25:75.
            synthetic: generator=datalist pairs, comma-separated, e.g. vae=runs/syn/vae/datalist.json,dm=...
            total: training cases in the mix (default: number of real training cases).
            seed: sampling seed.
            replace: allow drawing synthetic cases more than once when too few exist.
        """
        from tools.mix import write_mix

        mixed = write_mix(real, _parse_generators(synthetic), str(ratio), out, total=total, seed=seed, replace=replace)
        _print_json(mixed["mix"])

    def adapt_brats(
        self,
        brats_dir: str,
        dataset_dir: str,
        ckpt_dir: str,
        mode: str = "freeze",
        overrides: str | None = None,
        autoencoder_overrides: str | None = None,
    ):
        """Adapt the BraTS latent diffusion bundle to abdominal CT (seed 002), through ldm_abdomen's adapt_brats.json.

        Loads the autoencoder weights of a local brats_mri_generative_diffusion bundle (current MONAI key names or
        the old generative-repo ones), swaps the MRI intensity normalisation for ldm_abdomen's CT HU window, then
        trains on CT: `freeze` keeps the autoencoder and trains the diffusion model (the seed's method; the
        autoencoder's hash before and after is recorded and must match), `finetune` trains the autoencoder first.

        Args:
            brats_dir: local BraTS bundle folder (configs/ + models/; nothing is downloaded).
            dataset_dir: CT prepared for one crop mode (a folder with dataset.json, e.g. `data prepare --mode full`).
            ckpt_dir: where the converted and trained weights and adaptation.json go.
            mode: freeze or finetune.
            overrides: JSON dict of ldm_abdomen train.json overrides for every run (sizes, epochs, crop_mode...).
            autoencoder_overrides: JSON dict of train_autoencoder.json overrides (finetune only).
        """
        from tools.bundles import run_config

        workflow = run_config(
            "ldm_abdomen",
            ["adapt_brats.json"],
            {
                "brats_dir": str(Path(brats_dir).resolve()),
                "dataset_dir": str(Path(dataset_dir).resolve()),
                "ckpt_dir": str(Path(ckpt_dir).resolve()),
                "adapt_mode": mode,
                "train_overrides": json.dumps(_json_arg(overrides)),
                "autoencoder_overrides": json.dumps(_json_arg(autoencoder_overrides)),
            },
            workflow_type="train",
        )
        _print_json(workflow.parser.get_parsed_content("adaptation"))

    def synthesize(
        self,
        bundle: str,
        source: str,
        out: str,
        ckpt_dir: str | None = None,
        configs=None,
        overrides=None,
        samples_per_item: int = 1,
        seed: int = 0,
        section: str = "training",
        max_items: int | None = None,
        progress: bool = True,
        quality_gate: str | None = None,
        gate_reference: str | None = None,
        gate_reference_section: str = "training",
        gate_overrides=None,
        gate_tries: int = 3,
        gate_min_dice: float = 0.5,
    ):
        """Write a synthetic data set with a generative bundle (vae_ct, ldm_abdomen, difftumor) and its datalist.

        Resumable (a rerun makes only the missing cases, never rewrites a finished one) and shardable:
        `torchrun --nproc_per_node=N -m tools synthesize ...` splits the cases between N processes. Every file
        carries the bundle's provenance (NIfTI description SYNTHETIC + sidecar JSON). With --quality_gate (vae_ct,
        ldm_abdomen) every case is judged and made again with the next seed while it fails (tools.quality_gate).

        Args:
            bundle: vae_ct, ldm_abdomen or difftumor (or a bundle folder).
            source: masks (vae_ct, ldm_abdomen) or healthy scans with pancreas labels (difftumor): MSD or prepared
                folder, or datalist JSON. ldm_abdomen wants a folder made by `data prepare --mode full
                --hu_window None` (or pass --overrides '{"crop_mode": "none"}').
            out: output folder (cases, sidecars, datalist.json).
            ckpt_dir: weights folder (default the bundle's models/).
            configs: config files, comma-separated (default per bundle).
            overrides: config overrides as a JSON object, e.g. '{"tumor_type": "large"}'.
            samples_per_item: samples per source record.
            seed: base seed (sample k of record m gets seed + 100000 m + k).
            section: datalist section of the source.
            max_items: use only the first records.
            progress: progress bar.
            quality_gate: the judge of the quality gate: a seg_unet3d model folder holding model.pt (trained on
                real CT). Each case passes when the judge's pancreas Dice to the mask reaches --gate_min_dice and
                its median HU inside the pancreas label lies within mean +- 3 sd of the real per-case medians of
                --gate_reference (MAISI's check); a failing case is made again with the next seed (try t of sample
                k of record m: seed + 100000 m + k + 10000 t), up to --gate_tries tries. Every try is recorded in
                the case's sidecars; a case that never passed keeps the try with the highest Dice and is marked
                "quality_gate": {"passed": false} in datalist.json.
            gate_reference: with --quality_gate: the real datalist JSON or data folder the generator trained on
                (its pancreas HU medians give the pass range; saved as quality_gate_reference.json in --out).
            gate_reference_section: the section of --gate_reference to use.
            gate_overrides: the judge's seg_unet3d overrides as a JSON object (network size, pixdim, roi_size,
                num_classes: 2 for a binary model), as evaluate synthetic's --seg_overrides.
            gate_tries: tries per case with --quality_gate: the first plus up to N-1 regenerations (1 to 10).
            gate_min_dice: the judge's pancreas Dice to the mask from which a case is label-consistent (0 to 1).
        """
        from tools.synthesize import synthesize

        names = None if configs in (None, "", "None") else _tuple(configs, cast=str)
        print(
            synthesize(
                bundle, source, out, ckpt_dir=ckpt_dir, configs=names, overrides=_overrides(overrides),
                samples_per_item=samples_per_item, seed=seed, section=section, max_items=max_items, progress=progress,
                quality_gate=quality_gate, gate_reference=gate_reference,
                gate_reference_section=gate_reference_section, gate_overrides=_overrides(gate_overrides),
                gate_tries=gate_tries, gate_min_dice=gate_min_dice,
            )
        )  # fmt: skip

    def check_bundle(self, bundle_dir: str, schema: str | None = None, **overrides):
        """Run the bundle check harness on a bundle folder (layout, metadata, properties, net in/out, TorchScript).

        Args:
            bundle_dir: e.g. bundles/seg_unet3d.
            schema: metadata schema JSON (default ../shared/reference/meta_schema_20240725.json).
            overrides: config overrides as --key value, e.g. --dataset_dir data/phantom.
        """
        from tools.bundle_check import check_bundle_cli

        check_bundle_cli(bundle_dir, schema=schema, **overrides)

    def sync_bundle_scripts(self, bundles_root: str | None = None):
        """Copy the vendored modules of tools/bundle_scripts (checkpointing, provenance, validation, config_check)
        into every bundle's scripts/.

        Args:
            bundles_root: folder holding the bundles (default: bundles/ of this repository).
        """
        from tools.bundle_scripts import sync

        root = Path(bundles_root) if bundles_root else Path(__file__).resolve().parents[1] / "bundles"
        for path in sync(root):
            print(f"updated {path}")

    def report(self, out: str = "runs/demo", title: str = "Pancreas CT synthesis: study report"):
        """One Markdown + HTML report (report.md, report.html) from the study folders found in a folder.

        Includes every study's table (mean +- std over seeds), bar charts with error bars, training-loss curves,
        the synthetic sets' evaluation (montages, HU histograms, memorization) and the phantom figures when present.

        Args:
            out: the folder holding the study folders (ratio/, tumor_size/, ...), e.g. runs/demo or runs/studies.
            title: the report's title.
        """
        from tools.studies import write_report

        md, page = write_report(out, title=title)
        print(md)
        print(page)

    def demo(self, out: str = "runs/demo", seed: int = 0, scale: str = "demo", nproc: int = 2, studies=None):
        """The main job at demo scale (what `make demo` runs), under 30 minutes on a 2-core CPU.

        phantom data set -> vae_ct and ldm_abdomen trained briefly -> synthetic image + label sets -> ratio study
        (seed 000 Table 1) -> synthetic-set evaluation -> tumor-size study (seed 001 Table 1) -> report.md/.html.
        A second run reuses everything already made.

        Args:
            out: output folder (reused by a second run).
            seed: phantom seed.
            scale: demo (default), small or paper.
            nproc: processes for the studies' jobs (one thread each).
            studies: comma-separated subset of ratio,tumor_size (default both).
        """
        from tools.demo import run_demo

        chosen = ("ratio", "tumor_size") if studies is None else tuple(_tuple(studies, cast=str))
        run_demo(out, seed=seed, scale=scale, nproc=int(nproc), studies=chosen)


PROG = "python -m tools"


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m tools``: check the arguments against the command's signature (and answer --help) before fire
    runs the command, so that a misspelled flag or a missing value is refused before anything is written."""
    from tools.cli_args import prepare

    cli = Cli()
    command = prepare(cli, sys.argv[1:] if argv is None else argv, PROG)
    if command is not None:
        fire.Fire(cli, command=command, name=PROG)


if __name__ == "__main__":
    main()
