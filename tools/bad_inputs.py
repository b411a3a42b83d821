"""The bad-input suite: every kind of broken input through every entry point, each refused with a clear error.

``python -m tools.bad_inputs`` (or :func:`run_suite` from the tests) builds a tiny valid data set, then for each
kind of bad input (truncated or non-image files, NaN / inf voxels, empty or all-foreground labels, label values
outside the label set, image / label grids that differ, 2D or 4D images, absurd spacing, MR given as CT, a header
claiming a volume beyond the memory guard, datalists naming missing files or paths escaping the data folder) a
copy of it with that one defect, and feeds it to every entry point that reads that kind of input:

* the bundles' training, inference and evaluation data paths, built by ``monai.bundle`` from the bundles' own
  configs with tiny overrides (the dataset component each workflow iterates, so the case fails exactly where the
  workflow would, before a network sees a voxel), and seg_unet3d's whole inference workflow;
* every ``python -m tools`` command that reads scans: ``data list --validate``, ``data prepare``, ``data split``,
  ``data quartiles``, ``mix``, ``synthesize`` (each generator), ``evaluate seg``, ``evaluate synthetic``,
  ``reader_study build``, ``study <name> --data`` and ``study ratio --real / --synthetic``, called through
  :mod:`tools.cli` as a user would, with each data set of a command that reads several as a row of its own.
  ``tests/test_bad_inputs.py`` lists the commands that read no scan and why.

A case is *handled* when the entry point raises an ``InputError`` (a ``ValueError``; possibly wrapped by MONAI)
whose message names the bad file and the problem, no output file (nor a temporary ``.part`` file) is left behind,
and no input file changed (SHA-256 and mtime). Each entry point also runs once on the valid data set (a control
that must *not* fail, so a wiring mistake cannot pass for a refusal). It prints ``N cases, N handled, 0 lost``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
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

import nibabel as nib
import numpy as np

from tools.bundles import BUNDLES_ROOT, bundle_on_path
from tools.studies import SCALE_SETTINGS

SHAPE = (24, 24, 12)
SPACING = (2.0, 2.0, 3.0)
CASE = "case_000"  # the training case every defect is put into
TEST_CASE = "case_100"  # and the test case (inference entry points read it)


# ---------------------------------------------------------------------------------------------------------------
# the valid data set and its defects


def _affine(spacing: Sequence[float] = SPACING) -> np.ndarray:
    return np.diag([*spacing, 1.0])


def _save(path: Path, array: np.ndarray, affine: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = nib.Nifti1Image(array, affine)
    image.header.set_qform(affine, code=1)
    image.header.set_sform(affine, code=1)
    nib.save(image, str(path))


def valid_volumes() -> tuple[np.ndarray, np.ndarray]:
    """A small abdominal-looking CT in HU (air, fat, soft tissue) and its label (pancreas 1 with a tumor 2)."""
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in SHAPE], indexing="ij")
    ct = np.full(SHAPE, -1000, np.int16)
    body = x**2 + y**2 < 0.8
    ct[body] = -100
    ct[x**2 + y**2 < 0.5] = 40
    rng = np.random.default_rng(0)
    ct = (ct + rng.normal(0, 10, SHAPE)).astype(np.int16)
    label = np.zeros(SHAPE, np.uint8)
    label[(x - 0.1) ** 2 + y**2 + (z / 2) ** 2 < 0.12] = 1
    label[(x - 0.1) ** 2 + y**2 + (z / 2) ** 2 < 0.03] = 2
    return ct, label


def write_dataset(root: Path, n_training: int = 2, n_validation: int = 1) -> Path:
    """An MSD-layout folder with copies of the valid case: ``n_training`` training, ``n_validation`` validation
    (the defects go into the first training and the test case), one test case, and ``dataset.json``."""
    ct, label = valid_volumes()
    entries = []
    for index in range(n_training + n_validation):
        name = f"case_{index:03d}"
        _save(root / "imagesTr" / f"{name}.nii.gz", ct, _affine())
        _save(root / "labelsTr" / f"{name}.nii.gz", label, _affine())
        entries.append({"image": f"./imagesTr/{name}.nii.gz", "label": f"./labelsTr/{name}.nii.gz"})
    _save(root / "imagesTs" / f"{TEST_CASE}.nii.gz", ct, _affine())
    _save(root / "labelsTs" / f"{TEST_CASE}.nii.gz", label, _affine())
    content = {
        "name": "bad_inputs",
        "modality": {"0": "CT"},
        "labels": {"0": "background", "1": "pancreas", "2": "tumour"},
        "training": entries[:n_training],
        "validation": entries[n_training:],
        "test": [{"image": f"./imagesTs/{TEST_CASE}.nii.gz", "label": f"./labelsTs/{TEST_CASE}.nii.gz"}],
    }
    (root / "dataset.json").write_text(json.dumps(content, indent=2))
    return root


def _image_files(root: Path) -> list[Path]:
    return [root / "imagesTr" / f"{CASE}.nii.gz", root / "imagesTs" / f"{TEST_CASE}.nii.gz"]


def _label_files(root: Path) -> list[Path]:
    return [root / "labelsTr" / f"{CASE}.nii.gz", root / "labelsTs" / f"{TEST_CASE}.nii.gz"]


def _rewrite(paths: list[Path], make: Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]) -> None:
    for path in paths:
        image = nib.load(str(path))
        array, affine = make(np.asarray(image.dataobj), image.affine)
        _save(path, array, affine)


def _truncate(paths: list[Path]) -> None:
    for path in paths:
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])


def _not_an_image(paths: list[Path]) -> None:
    for path in paths:
        path.write_text("this is not an image\n")


def _huge_header(paths: list[Path]) -> None:
    """A header claiming 4096^3 float32 voxels (256 GiB) followed by a few bytes: the guard must stop it unread."""
    for path in paths:
        header = nib.Nifti1Header()
        header.set_data_shape((4096, 4096, 4096))
        header.set_data_dtype(np.float32)
        header.set_qform(_affine(), code=1)
        header.set_sform(_affine(), code=1)
        header["vox_offset"] = 352
        import gzip

        with gzip.open(path, "wb") as f:
            f.write(header.binaryblock + b"\x00" * 4 + b"\x00" * 1024)


def _set_spacing(value: float) -> Callable[[list[Path]], None]:
    """Write the first voxel size as ``value`` mm into the header (pixdim, qform and sform), data unchanged."""

    def apply(paths: list[Path]) -> None:
        for path in paths:
            image = nib.load(str(path))
            array = np.asarray(image.dataobj)
            header = image.header.copy()
            header["pixdim"][1] = value
            srow = header["srow_x"].copy()
            srow[0] = value
            header["srow_x"] = srow
            if value <= 0:
                header["qform_code"] = 0  # a quaternion cannot hold a zero voxel size; the sform says it
            nib.save(nib.Nifti1Image(array, None, header), str(path))

    return apply


def _edit_datalist(root: Path, image: str | None = None, label: str | None = None) -> None:
    content = json.loads((root / "dataset.json").read_text())
    for section in ("training", "test"):
        entry = content[section][0]
        if image is not None:
            entry["image"] = image
        if label is not None:
            entry["label"] = label
    (root / "dataset.json").write_text(json.dumps(content, indent=2))


@dataclass
class Kind:
    """One kind of bad input: what it breaks, how, the words its error must contain, the file its error names."""

    name: str
    reads: str  # "image", "label" or "datalist": which entry points see it
    apply: Callable[..., None]  # (data folder, folder outside it[, field the datalist kinds break])
    words: tuple[str, ...]
    culprit: str = ""  # part of the path the message must contain (default: imagesT / labelsT by ``reads``)

    def __post_init__(self):
        if not self.culprit:
            self.culprit = {"image": "imagesT", "label": "labelsT"}.get(self.reads, "imagesT")


def _outside_file(outside: Path) -> Path:
    ct, _ = valid_volumes()
    path = outside / "elsewhere.nii.gz"
    if not path.exists():
        _save(path, ct, _affine())
    return path


def _kinds() -> list[Kind]:
    img, lab = _image_files, _label_files

    def rewrite_image(fn):
        return lambda root, _: _rewrite(img(root), fn)

    def rewrite_label(fn):
        return lambda root, _: _rewrite(lab(root), fn)

    def files(root: Path, field: str) -> list[Path]:
        return lab(root) if field == "label" else img(root)

    def symlink(root: Path, outside: Path, field: str = "image") -> None:
        target = _outside_file(outside)
        for path in files(root, field):
            path.unlink()
            path.symlink_to(target)

    def dotdot(root: Path, outside: Path, field: str = "image") -> None:
        _outside_file(outside)
        _edit_datalist(root, **{field: f"../{outside.name}/elsewhere.nii.gz"})

    def absolute(root: Path, outside: Path, field: str = "image") -> None:
        _edit_datalist(root, **{field: str(_outside_file(outside))})

    def missing(root: Path, _: Path, field: str = "image") -> None:
        for path in files(root, field):
            path.unlink()

    def nan(array, affine):
        array = array.astype(np.float32)
        array[3, 3, 3] = np.nan
        return array, affine

    def inf(array, affine):
        array = array.astype(np.float32)
        array[3, 3, 3] = np.inf
        return array, affine

    def mr(array, affine):
        return np.clip((array.astype(np.float32) + 1000) / 2, 0, None).astype(np.int16), affine

    def other_shape(array, affine):
        return array[:-2], affine

    def other_affine(array, affine):
        moved = affine.copy()
        moved[:3, 3] += 7.5
        return array, moved

    def with_value(value):
        def make(array, affine):
            array = array.copy()
            array[array == 2] = value
            return array, affine

        return make

    return [
        Kind("truncated_image", "image", lambda root, _: _truncate(img(root)), ("truncated", "corrupt")),
        Kind("not_an_image", "image", lambda root, _: _not_an_image(img(root)), ("not a readable NIfTI", "corrupt")),
        Kind("nan_voxels", "image", rewrite_image(nan), ("NaN",)),
        Kind("inf_voxels", "image", rewrite_image(inf), ("infinite",)),
        Kind("image_2d", "image", rewrite_image(lambda a, f: (a[:, :, 5], f)), ("3D",)),
        Kind("image_4d", "image", rewrite_image(lambda a, f: (np.stack([a, a], -1), f)), ("3D",)),
        Kind("zero_spacing", "image", lambda root, _: _set_spacing(0.0)(img(root)), ("spacing", "singular")),
        Kind("absurd_spacing", "image", lambda root, _: _set_spacing(50.0)(img(root)), ("spacing",)),
        Kind("mr_as_ct", "image", rewrite_image(mr), ("Hounsfield",)),
        Kind("huge_volume", "image", lambda root, _: _huge_header(img(root)), ("memory guard",)),
        Kind("truncated_label", "label", lambda root, _: _truncate(lab(root)), ("truncated", "corrupt")),
        Kind(
            "empty_label",
            "label",
            rewrite_label(lambda a, f: (np.zeros_like(a), f)),
            ("empty label", "no voxel", "no foreground"),
        ),
        Kind("all_foreground_label", "label", rewrite_label(lambda a, f: (np.ones_like(a), f)), ("all-foreground",)),
        Kind("label_outside_set", "label", rewrite_label(with_value(7)), ("outside the label set",)),
        Kind("label_other_shape", "label", rewrite_label(other_shape), ("differs",)),
        Kind("label_other_affine", "label", rewrite_label(other_affine), ("differs",)),
        Kind("missing_file", "datalist", missing, ("not found", "does not exist")),
        Kind("path_with_dotdot", "datalist", dotdot, ("outside the data folder",), "elsewhere.nii"),
        Kind("absolute_path_outside", "datalist", absolute, ("outside the data folder",), "elsewhere.nii"),
        Kind("symlink_out", "datalist", symlink, ("outside the data folder",)),
    ]


# ---------------------------------------------------------------------------------------------------------------
# entry points


@dataclass
class EntryPoint:
    name: str
    reads: tuple[str, ...]
    run: Callable[[Path, Path], Any]  # (data folder, output folder)
    label_only: bool = False  # reads labels without their image (a grid mismatch cannot be seen)
    skip: tuple[str, ...] = ()  # kinds that do not apply (documented next to the entry point)


def _bundle_dataset(bundle: str, configs: Sequence[str], dataset_id: str | Sequence[str], overrides: dict) -> Callable:
    """The dataset component(s) of a bundle workflow, built by ``monai.bundle`` from the bundle's configs with
    overrides, and their items read (training data paths cache them when the dataset is built)."""
    root = BUNDLES_ROOT / bundle
    loaded: dict[str, Any] = {}

    def run(data: Path, out: Path) -> None:
        from monai.bundle import ConfigParser

        if "config" not in loaded:  # read the files once per entry point
            loaded["config"] = ConfigParser.load_config_files([str(root / "configs" / c) for c in configs])
        parser = ConfigParser(copy.deepcopy(loaded["config"]))
        parser["bundle_root"] = str(root)
        values = {"dataset_dir": str(data), "ckpt_dir": str(out / "models"), "output_dir": str(out / "eval")}
        for key, value in {**values, **overrides}.items():
            parser[key] = value
        for one_id in [dataset_id] if isinstance(dataset_id, str) else dataset_id:
            dataset = parser.get_parsed_content(one_id)
            for index in range(len(dataset)):
                dataset[index]

    run.context = lambda: bundle_on_path(root)  # the bundle's own ``scripts`` while its cases run
    return run


def _tools_validate(data: Path, out: Path) -> None:
    from tools.datasets import LABEL_SET, read_datalist, validate_records

    validate_records(read_datalist(data), allowed_labels=LABEL_SET)


def _tools_prepare(data: Path, out: Path) -> None:
    from tools.prep import prepare_dataset

    prepare_dataset(data, out / "prepared", mode="pancreas", hu_window=None)


def _tools_split(data: Path, out: Path) -> None:
    from tools.splits import make_splits

    make_splits(data, out / "splits.json", fractions=(0.5, 0.5, 0.0))


def _tools_quartiles(data: Path, out: Path) -> None:
    from tools.tumor_stats import dataset_tumor_stats

    dataset_tumor_stats(data)


def _tools_mix(data: Path, out: Path) -> None:
    from tools.mix import mix_datalist

    mix_datalist(data, {"vae": data}, "50:50")


class _WithFixtures:
    """An entry point whose run needs files besides the data set (weights, a valid second data set, a scale file):
    ``make(folder)`` writes them once into a temporary folder that lives while the entry point's cases run, and
    ``call(data, out, fixtures)`` is the run. Output printed by the command (JSON summaries) is kept off the suite's
    report."""

    def __init__(self, make: Callable[[Path], dict], call: Callable[[Path, Path, dict], Any]):
        self.make, self.call, self.fixtures = make, call, None

    @contextlib.contextmanager
    def context(self):
        with tempfile.TemporaryDirectory() as tmp:
            self.fixtures = self.make(Path(tmp))
            try:
                yield
            finally:
                self.fixtures = None

    def __call__(self, data: Path, out: Path) -> Any:
        with contextlib.redirect_stdout(io.StringIO()):
            return self.call(data, out, self.fixtures)


def tiny_networks(bundle: str, configs: Sequence[str], overrides: dict, files: dict[str, str], folder: Path) -> Path:
    """Random-weight networks of a bundle's configs at ``overrides`` size, saved as ``files``
    (config id -> file name) in ``folder``: weights for an entry point's valid control."""
    import torch
    from monai.bundle import ConfigParser

    root = BUNDLES_ROOT / bundle
    parser = ConfigParser()
    parser.read_config([str(root / "configs" / c) for c in configs])
    parser["bundle_root"] = str(root)
    for key, value in overrides.items():
        parser[key] = value
    folder.mkdir(parents=True, exist_ok=True)
    with bundle_on_path(root):
        torch.manual_seed(0)
        for config_id, name in files.items():
            torch.save(parser.get_parsed_content(config_id).state_dict(), folder / name)
    return folder


TINY_SEG = {"roi_size": [16, 16, 16], "num_samples": 1, "cache_workers": 1, "cache_rate": 1.0, "val_fraction": 0.0}
TINY_VAE = {"roi_size": [16, 16, 4], "num_workers": 0}
TINY_LDM = {"image_size": [16, 16, 16], "pre_resize": None, "crop_mode": "none"}
DT_DATASETS = ("train#dataset", "validate#dataset")  # the first n_val cases validate
TINY_DT = {"roi_size": [16, 16, 16], "num_workers": 0, "num_crops": 1}


TINY_SEG_NET = {"network_def#channels": [4, 8, 16], "network_def#strides": [2, 2], "network_def#num_res_units": 1,
                "roi_size": [16, 16, 16], "sw_batch_size": 1, "pixdim": [-1, -1, -1]}  # fmt: skip
TINY_VAE_NET = {"roi_size": [16, 16, 16], "strides": [2, 2], "channels": [4, 8], "latent_size": 8}
TINY_LDM_NET = {
    "image_size": [16, 16, 16],
    "crop_mode": "none",
    "pre_resize": None,
    **SCALE_SETTINGS["demo"]["ldm_nets"],  # the studies' demo-size networks
    "conditioning_embedding_channels": SCALE_SETTINGS["demo"]["ldm_stage"]["controlnet"][
        "conditioning_embedding_channels"
    ],
    "num_inference_steps": 2,
}


def _seg_weights(folder: Path) -> dict:
    return {"seg": tiny_networks("seg_unet3d", ["train.json"], TINY_SEG_NET, {"network_def": "model.pt"},
                                 folder / "seg")}  # fmt: skip


def _seg_inference_weights(folder: Path) -> dict:
    return {"seg_inference": tiny_networks("seg_unet3d", ["inference.json"], TINY_SEG_NET, {"network_def": "model.pt"},
                                           folder / "seg_inference")}  # fmt: skip


def _seg_inference(data: Path, out: Path, fixtures: dict) -> Any:
    """seg_unet3d's whole ``configs/inference.json`` workflow (loader, sliding window, writer), not only its
    dataset: MONAI's ThreadDataLoader used to end the run silently on a file that failed in its thread."""
    from tools.bundles import run_config

    settings = {"dataset_dir": str(data), "output_dir": str(out / "predictions"),
                "ckpt_path": str(fixtures["seg_inference"] / "model.pt"), **TINY_SEG_NET}  # fmt: skip
    run_config("seg_unet3d", ["inference.json"], settings, workflow_type="infer")


def _vae_weights(folder: Path) -> dict:
    return {"vae": tiny_networks("vae_ct", ["inference.json", "inference_3d.json"], TINY_VAE_NET,
                                 {"network_def": "model.pt"}, folder / "vae")}  # fmt: skip


def _ldm_weights(folder: Path) -> dict:
    files = {"autoencoder_def": "model_autoencoder.pt", "diffusion_def": "model.pt",
             "controlnet_def": "model_controlnet.pt"}  # fmt: skip
    ckpt = tiny_networks("ldm_abdomen", ["inference.json", "inference_controlnet.json"], TINY_LDM_NET, files,
                         folder / "ldm")  # fmt: skip
    downsampling = 2 ** (len(TINY_LDM_NET["autoencoder_def#channels"]) - 1)
    latent_shape = [TINY_LDM_NET.get("latent_channels", 8)] + [n // downsampling for n in TINY_LDM_NET["image_size"]]
    stats = {"scale_factor": 1.0, "latent_shape": latent_shape,
             "autoencoder_sha256": hashlib.sha256((ckpt / "model_autoencoder.pt").read_bytes()).hexdigest(),
             "hu_window": [-1000.0, 1000.0], "image_size": TINY_LDM_NET["image_size"], "objective": "epsilon",
             "reference_affine": np.eye(4).tolist()}  # fmt: skip
    (ckpt / "latent_stats.json").write_text(json.dumps(stats))
    return {"ldm": ckpt}


def _reference_set(folder: Path) -> dict:
    return {"reference": write_dataset(folder / "reference")}


def _synthesize(bundle: str, ckpt: str | None, overrides: dict) -> Callable[[Path, Path, dict], Any]:
    def call(data: Path, out: Path, fixtures: dict) -> Any:
        from tools.cli import Cli

        Cli().synthesize(bundle, str(data), str(out / "synthetic"), ckpt_dir=fixtures[ckpt] if ckpt else None,
                         overrides=json.dumps(overrides), progress=False)  # fmt: skip

    return call


def _evaluate_seg(data: Path, out: Path, fixtures: dict) -> Any:
    from tools.cli import Evaluate

    Evaluate().seg(str(data), str(fixtures["seg"]), str(out / "eval"), overrides=json.dumps(TINY_SEG_NET))


def _evaluate_synthetic(role: str) -> Callable[[Path, Path, dict], Any]:
    """``tools evaluate synthetic`` with the bad data set as its synthetic, real or training (memorization) set."""

    def call(data: Path, out: Path, fixtures: dict) -> Any:
        from tools.cli import Evaluate

        sets = {"synthetic": fixtures["reference"], "real": fixtures["reference"], "training": None, role: data}
        Evaluate().synthetic(str(sets["synthetic"]), str(sets["real"]), str(out / "eval"),
                             training=None if sets["training"] is None else str(sets["training"]))  # fmt: skip

    return call


def _reader_study(role: str) -> Callable[[Path, Path, dict], Any]:
    def call(data: Path, out: Path, fixtures: dict) -> Any:
        from tools.cli import ReaderStudy

        sets = {"real": fixtures["reference"], "synthetic": fixtures["reference"], role: data}
        ReaderStudy().build(str(sets["real"]), str(sets["synthetic"]), str(out / "reader_study"))

    return call


def _tiny_scale(folder: Path) -> dict:
    """A study scale file: one seed, one arm besides the baseline, 1-epoch tiny networks (the valid controls run
    every study whole)."""
    from tools.studies import scale_settings

    demo = scale_settings("demo")
    seg = {**TINY_SEG_NET, "num_samples": 1, "cache_workers": 1, "train#trainer#max_epochs": 1, "val_interval": 1}
    scale = {
        "base": "demo",
        "seeds": [0],
        "seg": seg,
        "tumor_seg": seg,
        "crop_shape": [16, 16, 16],
        "vae": {**demo["vae"], "strides": [2, 2], "channels": [4, 8], "latent_size": 8, "max_epochs": 1,
                "val_interval": 1},
        "ldm_epochs": {"autoencoder": 1, "diffusion": 1, "controlnet": 1},
        "ldm_stage": {**demo["ldm_stage"], "autoencoder": {**demo["ldm_stage"]["autoencoder"],
                                                           "ae_patch_size": [16, 16, 16]}},
        "ldm_infer": {**demo["ldm_infer"], "num_inference_steps": 2},
        "arms": {"label_noise": ["low"], "ratio": ["VAE"], "tumor_size": ["small"], "crop_context": ["pancreas"],
                 "tumor_families": ["handcrafted"]},
    }  # fmt: skip
    path = folder / "tiny_scale.json"
    path.write_text(json.dumps(scale))
    return {**_reference_set(folder), "scale": path}


def _study_data(name: str) -> Callable[[Path, Path, dict], Any]:
    """``tools study <name> --data D`` with the bad data set as D."""

    def call(data: Path, out: Path, fixtures: dict) -> Any:
        from tools.cli import Study

        getattr(Study(), name)(out=str(out / "studies"), scale=str(fixtures["scale"]), data=str(data))

    return call


def _study_ratio(role: str) -> Callable[[Path, Path, dict], Any]:
    """``tools study ratio --real R --synthetic VAE=S`` with the bad data set as R or S."""

    def call(data: Path, out: Path, fixtures: dict) -> Any:
        from tools.cli import Study

        sets = {"real": fixtures["reference"], "synthetic": fixtures["reference"], role: data}
        Study().ratio(out=str(out / "studies"), scale=str(fixtures["scale"]), real=str(sets["real"]),
                      synthetic=f"VAE={sets['synthetic']}")  # fmt: skip

    return call


def entry_points() -> list[EntryPoint]:
    everything = ("image", "label", "datalist")
    return [
        EntryPoint("seg_unet3d train/evaluate", everything,
                   _bundle_dataset("seg_unet3d", ["train.json"], "train#dataset", TINY_SEG)),
        EntryPoint("seg_unet3d inference", ("image",),
                   _WithFixtures(_seg_inference_weights, _seg_inference)),
        EntryPoint("vae_ct train (all families)/evaluate", everything,
                   _bundle_dataset("vae_ct", ["train.json"], "train#dataset", TINY_VAE)),
        EntryPoint("vae_ct inference", ("label", "datalist"),
                   _bundle_dataset("vae_ct", ["inference.json"], "dataset", {**TINY_VAE, "datalist_key": "training"}),
                   label_only=True),
        EntryPoint("ldm_abdomen train/evaluate", ("image", "datalist"),
                   _bundle_dataset("ldm_abdomen", ["train.json"], "train#dataset", TINY_LDM)),
        EntryPoint("ldm_abdomen train_controlnet", everything,
                   _bundle_dataset("ldm_abdomen", ["train.json", "train_controlnet.json"], "train#dataset", TINY_LDM)),
        EntryPoint("ldm_abdomen inference_controlnet", ("label", "datalist"),
                   _bundle_dataset("ldm_abdomen", ["inference.json", "inference_controlnet.json"], "dataset",
                                   {**TINY_LDM, "mask_sections": ["training"]}), label_only=True),
        EntryPoint("difftumor train/evaluate", ("image", "datalist"),
                   _bundle_dataset("difftumor", ["train.json"], DT_DATASETS, TINY_DT)),
        EntryPoint("difftumor train_diffusion", everything,
                   _bundle_dataset("difftumor", ["train.json", "train_diffusion.json"], DT_DATASETS, TINY_DT)),
        EntryPoint("difftumor inference", everything,
                   _bundle_dataset("difftumor", ["inference.json"], "dataset", {**TINY_DT, "family_name": "cellular"}),
                   skip=("label_outside_set",)),  # the organ mask may be any organ map
        EntryPoint("tools data list --validate", everything, _tools_validate),
        EntryPoint("tools data prepare", everything, _tools_prepare),
        EntryPoint("tools data split", ("datalist",), _tools_split),
        EntryPoint("tools data quartiles", ("label", "datalist"), _tools_quartiles, label_only=True,
                   skip=("empty_label", "all_foreground_label", "label_outside_set")),  # it only counts tumour
        # components (a healthy case has none); label contents are refused by `data list --validate` and prepare
        EntryPoint("tools mix", ("datalist",), _tools_mix),
        EntryPoint("tools synthesize vae_ct", ("label", "datalist"),
                   _WithFixtures(_vae_weights, _synthesize("vae_ct", "vae", TINY_VAE_NET)), label_only=True),
        EntryPoint("tools synthesize ldm_abdomen", ("label", "datalist"),
                   _WithFixtures(_ldm_weights, _synthesize("ldm_abdomen", "ldm", TINY_LDM_NET)), label_only=True),
        EntryPoint("tools synthesize difftumor", everything,
                   _WithFixtures(lambda folder: {}, _synthesize("difftumor", None, {"family_name": "handcrafted"})),
                   skip=("label_outside_set",)),  # the organ mask may be any organ map (as difftumor inference)
        EntryPoint("tools evaluate seg", everything, _WithFixtures(_seg_weights, _evaluate_seg)),
        EntryPoint("tools evaluate synthetic (real set)", everything,
                   _WithFixtures(_reference_set, _evaluate_synthetic("real"))),
        EntryPoint("tools evaluate synthetic (synthetic set)", everything,
                   _WithFixtures(_reference_set, _evaluate_synthetic("synthetic")),
                   skip=("mr_as_ct",)),  # a generator's output is measured, not refused, when it is not CT-like
        EntryPoint("tools evaluate synthetic (training set)", ("image", "datalist"),
                   _WithFixtures(_reference_set, _evaluate_synthetic("training"))),
        EntryPoint("tools reader_study build (real)", everything, _WithFixtures(_reference_set, _reader_study("real"))),
        EntryPoint("tools reader_study build (synthetic)", everything,
                   _WithFixtures(_reference_set, _reader_study("synthetic")), skip=("mr_as_ct",)),
        *[EntryPoint(f"tools study {name} --data", everything, _WithFixtures(_tiny_scale, _study_data(name)))
          for name in ("ratio", "tumor_size", "label_noise", "crop_context", "tumor_families")],
        EntryPoint("tools study ratio --real", everything, _WithFixtures(_tiny_scale, _study_ratio("real"))),
        EntryPoint("tools study ratio --synthetic", everything, _WithFixtures(_tiny_scale, _study_ratio("synthetic")),
                   skip=("mr_as_ct",)),
    ]  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# the runner


@dataclass
class Result:
    entry_point: str
    kind: str
    handled: bool
    problem: str = ""
    message: str = ""


@dataclass
class Report:
    results: list[Result] = field(default_factory=list)
    controls: list[Result] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def handled(self) -> int:
        return sum(r.handled for r in self.results)

    @property
    def lost(self) -> int:
        return len(self.results) - self.handled

    def line(self) -> str:
        return f"{len(self.results)} cases, {self.handled} handled, {self.lost} lost"


def _fingerprint(folder: Path) -> dict[str, tuple[str, int]]:
    found = {}
    for dirpath, _, files in os.walk(folder):
        for name in files:
            path = Path(dirpath) / name
            if path.is_symlink() and not path.exists():
                continue
            found[str(path)] = (hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns)
    return found


def _input_errors(error: BaseException) -> list[BaseException]:
    chain, seen = [], set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        chain.append(error)
        error = error.__cause__ or error.__context__
    return [e for e in chain if isinstance(e, ValueError) and type(e).__name__ == "InputError"]


def _left_behind(out: Path) -> list[str]:
    return [str(p) for p in out.rglob("*") if p.is_file()] if out.exists() else []


def run_case(entry: EntryPoint, kind: Kind | None, base: Path, work: Path) -> Result:
    """One entry point on a copy of the valid data set with one defect (``kind``; None: the valid control)."""
    name = kind.name if kind else "valid control"
    case_dir = work / f"{abs(hash((entry.name, name))) % 10**8:08d}"
    data, outside, out = case_dir / "data", case_dir / "outside", case_dir / "out"
    shutil.copytree(base, data)
    outside.mkdir()
    field = "label" if entry.label_only else "image"
    if kind and kind.reads == "datalist":
        kind.apply(data, outside, field)
    elif kind:
        kind.apply(data, outside)
    before = {**_fingerprint(data), **_fingerprint(outside)}
    error = None
    try:
        entry.run(data, out)
    except Exception as caught:  # the point of the suite: look at whatever comes out
        error = caught
    after = {**_fingerprint(data), **_fingerprint(outside)}
    changed = sorted(path for path in before if after.get(path) != before[path])
    left = [p for p in _left_behind(out) if kind is not None or ".part" in Path(p).name]
    try:
        if kind is None:
            if error is not None:
                detail = "".join(traceback.format_exception(type(error), error, error.__traceback__))[-1500:]
                return Result(entry.name, name, False, "the valid data set was refused", detail)
            return Result(entry.name, name, True)
        problems = []
        ours = _input_errors(error) if error is not None else []
        message = str(ours[0]) if ours else (f"{type(error).__name__}: {error}" if error else "")
        if error is None:
            problems.append("no error raised")
        elif not ours:
            problems.append("the error is not an InputError")
        else:
            culprit = kind.culprit.replace("imagesT", "labelsT") if field == "label" else kind.culprit
            if culprit not in message:
                problems.append(f"the message does not name {culprit}")
            if not any(word.lower() in message.lower() for word in kind.words):
                problems.append(f"the message does not say {' / '.join(kind.words)}")
        if left:
            problems.append(f"output left behind: {left[:3]}")
        if changed:
            problems.append(f"inputs changed: {changed[:3]}")
        return Result(entry.name, name, not problems, "; ".join(problems), message[:500])
    finally:
        shutil.rmtree(case_dir, ignore_errors=True)


def applicable(entry: EntryPoint, kind: Kind) -> bool:
    if kind.reads not in entry.reads or kind.name in entry.skip:
        return False
    if entry.label_only and kind.name.startswith("label_other_"):
        return False  # no image is read next to the label: there is no grid to compare with
    return True


def run_suite(
    work_dir: str | os.PathLike | None = None,
    entry_filter: str | None = None,
    kind_filter: str | None = None,
    verbose: bool = False,
) -> Report:
    """Run every applicable (entry point, kind) case plus one valid control per entry point; return the report."""
    start = time.monotonic()
    report = Report()
    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        work = Path(tmp)
        base = write_dataset(work / "valid")
        entries = [e for e in entry_points() if not entry_filter or entry_filter in e.name]
        kinds = [k for k in _kinds() if not kind_filter or kind_filter in k.name]
        for entry in entries:
            with getattr(entry.run, "context", contextlib.nullcontext)():
                _run_entry(entry, kinds, base, work, report, verbose)
    report.seconds = time.monotonic() - start
    return report


def _run_entry(entry: EntryPoint, kinds: list[Kind], base: Path, work: Path, report: Report, verbose: bool) -> None:
    control = run_case(entry, None, base, work)
    report.controls.append(control)
    if verbose or not control.handled:
        print(f"[{'ok' if control.handled else 'FAILED'}] {entry.name}: valid control {control.problem}")
        if not control.handled:
            print(control.message)
    for kind in kinds:
        if not applicable(entry, kind):
            continue
        result = run_case(entry, kind, base, work)
        report.results.append(result)
        if verbose or not result.handled:
            status = "handled" if result.handled else f"LOST: {result.problem}"
            print(f"[{status}] {entry.name} x {kind.name}: {result.message[:200]}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.bad_inputs", description=__doc__.split("\n\n")[0])
    parser.add_argument("--entry", help="only entry points whose name contains this")
    parser.add_argument("--kind", help="only kinds whose name contains this")
    parser.add_argument("--verbose", "-v", action="store_true", help="print every case and its error message")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    report = run_suite(entry_filter=args.entry, kind_filter=args.kind, verbose=args.verbose)
    failed_controls = [c for c in report.controls if not c.handled]
    print(
        f"{len(report.controls)} entry points, {len(failed_controls)} refused their valid data ({report.seconds:.0f} s)"
    )
    print(report.line())
    return 0 if report.lost == 0 and not failed_controls else 1


if __name__ == "__main__":
    sys.exit(main())
