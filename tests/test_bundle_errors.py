"""What every bundle does with a user's mistakes (issue 13): one checkpoint key (``ckpt_dir``), inference that refuses
to run on no input cases, mistyped overrides refused at ``initialize`` naming the nearest key, and a last printed
line that names the file and the problem when a bundle's own input check fails.

The checks live in the vendored ``scripts/config_check.py`` (source: ``tools/bundle_scripts/config_check.py``);
the fast tests call it directly on the bundles' real config files, the slow ones run ``python -m monai.bundle run``
from a bundle folder as a user does.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import monai.bundle.__main__ as monai_bundle_main
import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser

from tools.bad_inputs import TINY_LDM_NET, _ldm_weights, tiny_networks
from tools.bundle_scripts.config_check import (
    StatsHandler,
    UnknownKeyError,
    check_command_line,
    check_overrides,
    command_line_overrides,
    datalist_section,
    error_line,
    excepthook,
    innermost_input_error,
    require_cases,
    scans_in,
)
from tools.bundle_scripts.validation import InputError
from tools.bundles import run_config

REPO = Path(__file__).resolve().parents[1]
BUNDLES = REPO / "bundles"
NAMES = ("seg_unet3d", "vae_ct", "ldm_abdomen", "difftumor")
MONAI_MAIN = monai_bundle_main.__file__  # what sys.argv[0] is under `python -m monai.bundle`
PYTHON = sys.executable
INIT_CALL = "$scripts.config_check.initialize()"
# seg_unet3d at smoke size: 3 levels of 4..16 channels, 32x32x16 windows on the scan's own voxel size
SEG_TINY = {
    "network_def#channels": [4, 8, 16],
    "network_def#strides": [2, 2],
    "network_def#num_res_units": 1,
    "roi_size": [32, 32, 16],
    "pixdim": [-1, -1, -1],
    "sw_batch_size": 1,
}


def configs(bundle: str, *names: str) -> list[str]:
    return [str(BUNDLES / bundle / "configs" / name) for name in names]


def cli_args(overrides: dict) -> list[str]:
    args = []
    for key, value in overrides.items():
        args += [f"--{key}", value if isinstance(value, str) else json.dumps(value)]
    return args


def bundle_run(bundle: str, config_files: list[str], overrides: dict, timeout: float = 300):
    """``python -m monai.bundle run`` from the bundle folder, as a user types it."""
    command = [PYTHON, "-m", "monai.bundle", "run", "--config_file", json.dumps(config_files), *cli_args(overrides)]
    return subprocess.run(
        command, cwd=BUNDLES / bundle, capture_output=True, text=True, timeout=timeout, env=_env(), check=False
    )


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}


def last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def write_ct(path: Path, shape=(32, 32, 16), spacing=2.0) -> Path:
    """A small CT in HU: air around an elliptic body of fat and soft tissue."""
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    body = (x / 0.8) ** 2 + (y / 0.6) ** 2 <= 1.0
    core = (x / 0.6) ** 2 + (y / 0.4) ** 2 <= 1.0
    volume = np.full(shape, -1000.0, dtype=np.float32)
    volume[body] = -100.0
    volume[core] = 40.0 + 10.0 * z[core]
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(volume, np.diag([spacing, spacing, spacing, 1.0])), str(path))
    return path


# ----------------------------------------------------------------------------------------------------------------
# one checkpoint key


# (bundle, config files, keys that name one checkpoint file and must follow ckpt_dir)
CHECKPOINT_FILES = [
    ("seg_unet3d", ["inference.json"], ["ckpt_path"]),
    ("seg_unet3d", ["train.json", "evaluate.json"], ["ckpt_path"]),
    ("vae_ct", ["inference.json"], ["ckpt_path"]),
    ("vae_ct", ["inference.json", "inference_3d.json"], ["ckpt_path"]),
    ("vae_ct", ["inference.json", "inference_gan.json"], ["ckpt_path"]),
    ("vae_ct", ["inference.json", "inference_vaegan.json"], ["ckpt_path"]),
    ("vae_ct", ["train.json", "evaluate.json"], ["ckpt_path"]),
    ("ldm_abdomen", ["inference.json"], ["autoencoder_path", "diffusion_path", "latent_stats_file"]),
    ("ldm_abdomen", ["inference.json", "inference_controlnet.json"], ["controlnet_path", "diffusion_path"]),
    ("difftumor", ["inference.json"], ["autoencoder_path", "diffusion_early_path", "diffusion_late_path"]),
]


@pytest.mark.parametrize("bundle, names, keys", CHECKPOINT_FILES, ids=lambda v: v if isinstance(v, str) else None)
def test_every_config_takes_its_weights_from_ckpt_dir(bundle, names, keys):
    parser = ConfigParser()
    parser.read_config(configs(bundle, *names))
    parser["ckpt_dir"] = "/weights/here"
    for key in keys:
        assert parser.get_parsed_content(key).startswith("/weights/here/"), (bundle, names, key)
    check_overrides(configs(bundle, *names), ["ckpt_dir"])  # and the command line accepts --ckpt_dir


def test_the_vae_ct_gan_overlays_keep_their_own_weights_folder():
    for overlay, folder in (("inference_gan.json", "models/gan"), ("inference_vaegan.json", "models/vae_gan")):
        parser = ConfigParser()
        parser.read_config(configs("vae_ct", "inference.json", overlay))
        assert parser.get_parsed_content("ckpt_path") == f"./{folder}/model.pt"
        train = ConfigParser()
        train.read_config(configs("vae_ct", "train.json", overlay.replace("inference", "train")))
        assert train.get_parsed_content("ckpt_dir") == f"./{folder}"  # where training wrote it


# ----------------------------------------------------------------------------------------------------------------
# typos refused


def test_command_line_is_read_as_fire_reads_it(tmp_path):
    args_file = tmp_path / "args.json"
    args_file.write_text(json.dumps({"config_file": "configs/train.json", "val_interval": 3}))
    parsed = command_line_overrides(
        [MONAI_MAIN, "run", "training", "--args_file", str(args_file), "--roi_size", "[32,32,32]", "--amp",
         "--learning_rate=0.01", "--seed", "-1", "--", "--help"]  # fmt: skip
    )
    assert parsed is not None
    files, values = parsed
    assert files == "configs/train.json"
    assert values["run_id"] == "training" and values["roi_size"] == [32, 32, 32] and values["amp"] is True
    assert values["learning_rate"] == 0.01 and values["seed"] == -1 and values["val_interval"] == 3
    assert "help" not in values  # after a lone "--" the flags are fire's own
    listed = command_line_overrides([MONAI_MAIN, "run", "--config_file", "['a.json','b.json']"])
    assert listed[0] == ["a.json", "b.json"]
    assert command_line_overrides(["/usr/bin/pytest", "run", "--x", "1"]) is None  # not a bundle run
    assert command_line_overrides([MONAI_MAIN, "verify_metadata", "--x", "1"]) is None


@pytest.mark.parametrize(
    "bundle, names, typo, nearest",
    [
        ("seg_unet3d", ["inference.json"], "roi_sizes", "roi_size"),
        ("seg_unet3d", ["train.json"], "train#trainer#max_epoch", "train#trainer#max_epochs"),
        ("vae_ct", ["inference.json", "inference_gan.json"], "gan_chanels", "gan_channels"),
        ("ldm_abdomen", ["inference.json"], "num_inference_step", "num_inference_steps"),
        ("difftumor", ["inference.json"], "tumour_type", "tumor_type"),
    ],
)
def test_a_mistyped_override_is_refused_naming_the_nearest_key(bundle, names, typo, nearest):
    argv = [MONAI_MAIN, "run", "--config_file", json.dumps(configs(bundle, *names)), f"--{typo}", "1"]
    with pytest.raises(UnknownKeyError) as caught:
        check_command_line(argv)
    assert caught.value.key == typo and caught.value.nearest == nearest
    assert repr(typo) in str(caught.value) and repr(nearest) in str(caught.value)


def test_valid_overrides_pass():
    files = configs("seg_unet3d", "train.json", "evaluate.json")
    check_overrides(
        files,
        [
            "dataset_dir",
            "train#trainer#max_epochs",
            "validate#dataset#data",  # a '#' key of the overlay
            "network_def#channels",
            "network_def#dropout",  # a new argument of a component: UNet's constructor checks it
            "optimizer#_target_",
            "train#handlers#0#save_dir",
            "_meta_#version",
            "meta_file",  # run() arguments are not config keys
        ],
    )
    for bad in ("train#handlers#99", "train#trainer#max_epochs#x", "pixdim#0#1", "datalist#x"):
        with pytest.raises(UnknownKeyError):
            check_overrides(files, [bad])
    # --tracking mlflow reads these settings from the config (seg_unet3d's train.json defines some of them)
    check_command_line([MONAI_MAIN, "run", "--config_file", files[0], "--tracking", "mlflow", "--save_execute_config"])
    with pytest.raises(UnknownKeyError):
        check_command_line([MONAI_MAIN, "run", "--config_file", files[0], "--save_execute_config"])


def test_every_config_checks_its_command_line_first():
    """Each config that defines ``initialize`` starts it with the check; base configs import the module; every
    ``StatsHandler`` is the one-line one."""
    for path in sorted(BUNDLES.glob("*/configs/**/*.json")):
        if path.name == "metadata.json":
            continue
        config = json.loads(path.read_text())
        if "initialize" in config:
            assert config["initialize"][:1] == [INIT_CALL], path
        if "imports" in config:
            assert {"$import scripts", "$import scripts.config_check"} <= set(config["imports"]), path
        assert '"StatsHandler"' not in path.read_text(), f"{path}: use scripts.config_check.StatsHandler"
    for bundle in NAMES:  # a run of only train.json or inference.json gets the check too
        for name in ("train.json", "inference.json"):
            assert json.loads((BUNDLES / bundle / "configs" / name).read_text())["initialize"][0] == INIT_CALL


def test_run_config_refuses_an_unknown_override_before_running(tmp_path):
    with pytest.raises(UnknownKeyError, match="roi_size"):
        run_config("seg_unet3d", ["inference.json"], {"roi_sizes": [32, 32, 32], "output_dir": str(tmp_path)})
    assert not list(tmp_path.iterdir())


# ----------------------------------------------------------------------------------------------------------------
# readable errors and no silent empty runs


def test_the_last_line_names_the_innermost_input_error(capsys):
    def raise_chain():
        try:
            try:
                raise OSError("not a gzip file")
            except OSError:
                raise InputError("/data/x.nii.gz", "not a readable NIfTI image")
        except InputError as error:
            raise RuntimeError("applying transform") from error

    try:
        try:
            raise_chain()
        except RuntimeError as error:
            raise RuntimeError("Failed to evaluate ConfigExpression") from error
    except RuntimeError as error:
        outer = error
    assert isinstance(innermost_input_error(outer), InputError)
    assert error_line(outer) == "ERROR: /data/x.nii.gz: not a readable NIfTI image"
    excepthook(type(outer), outer, outer.__traceback__)
    err = capsys.readouterr().err
    assert last_line(err) == "ERROR: /data/x.nii.gz: not a readable NIfTI image"
    assert err.count("/data/x.nii.gz: not a readable NIfTI image") == 2  # once in the traceback, once last
    # not an input error: the root cause a wrapper hides, or nothing when the traceback already ends with it
    try:
        try:
            raise FileNotFoundError("/data/dataset.json: no datalist")
        except FileNotFoundError as error:
            raise RuntimeError("Failed to evaluate") from error
    except RuntimeError as error:
        assert error_line(error) == "ERROR: FileNotFoundError: /data/dataset.json: no datalist"
    assert error_line(ValueError("plain")) is None


def test_the_stats_handler_reports_an_exception_once_in_one_line():
    handler = StatsHandler(iteration_log=False, name="test_stats")
    records = []
    handler.logger.addHandler(logging.Handler())
    handler.logger.handlers[-1].emit = records.append  # MONAI's logger does not propagate to pytest's capture
    error = InputError("/data/x.nii.gz", "bad")
    for _ in range(2):  # ignite calls it from the iteration loop and again from the run loop
        with pytest.raises(InputError):
            handler.exception_raised(object(), error)
    assert len(records) == 1 and records[0].exc_info is None and "InputError" in records[0].getMessage()


def test_empty_inputs_are_refused_naming_what_was_read(tmp_path):
    with pytest.raises(InputError, match="folder not found") as caught:
        scans_in(tmp_path / "missing")
    assert caught.value.path == str(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match=r"no \*\.nii\.gz file"):
        scans_in(tmp_path / "empty")
    write_ct(tmp_path / "scans" / "b.nii.gz")
    write_ct(tmp_path / "scans" / "a.nii.gz")
    assert [Path(p).name for p in scans_in(tmp_path / "scans")] == ["a.nii.gz", "b.nii.gz"]
    with pytest.raises(InputError, match="no input cases") as caught:
        require_cases([], "datalist")
    assert caught.value.path == "datalist"
    datalist = tmp_path / "dataset.json"
    with pytest.raises(InputError, match="datalist not found"):
        datalist_section(datalist, "training")
    datalist.write_text(json.dumps({"training": [], "test": [{"label": "scans/a.nii.gz"}]}))
    with pytest.raises(InputError, match="'training' section") as caught:
        datalist_section(datalist, "training")
    assert caught.value.path == str(datalist)
    with pytest.raises(InputError, match="no section 'validation'"):
        datalist_section(datalist, "validation")
    assert datalist_section(datalist, "test") == [{"label": str(tmp_path / "scans" / "a.nii.gz")}]


# the keys of the ControlNet overlay (mask loading and crop checks) left out
LDM_UNCONDITIONAL = {
    k: v for k, v in TINY_LDM_NET.items() if k not in ("conditioning_embedding_channels", "pre_resize", "crop_mode")
}


@pytest.fixture(scope="module")
def ldm_weights(tmp_path_factory) -> Path:
    """Random tiny ldm_abdomen weights and latent statistics (the run reads them before its data)."""
    return _ldm_weights(tmp_path_factory.mktemp("ldm_weights"))["ldm"]


@pytest.mark.parametrize(
    "bundle, names, overrides, source",
    [
        ("vae_ct", ["inference.json", "inference_3d.json"], {}, "dataset.json"),
        ("difftumor", ["inference.json"], {}, "dataset.json"),
        ("ldm_abdomen", ["inference.json"], {**LDM_UNCONDITIONAL, "num_samples": 0}, None),
        ("ldm_abdomen", ["inference.json", "inference_controlnet.json"], TINY_LDM_NET, "dataset.json"),
    ],
)
def test_generative_inference_with_no_input_cases_fails(bundle, names, overrides, source, tmp_path, request):
    """A data set whose sections are empty (or no samples asked for) stops the run with the datalist named."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "dataset.json").write_text(json.dumps({"training": [], "validation": [], "test": []}))
    weights = request.getfixturevalue("ldm_weights") if bundle == "ldm_abdomen" else tmp_path / "no_weights"
    with pytest.raises(Exception) as caught:
        run_config(bundle, names, {"dataset_dir": str(data), "output_dir": str(tmp_path / "out"),
                                   "ckpt_dir": str(weights), **overrides}, workflow_type="infer")  # fmt: skip
    cause = innermost_input_error(caught.value)
    assert cause is not None, caught.value
    assert (cause.path or "").endswith(source or "") and (source is None) == (cause.path is None), cause
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").rglob("*.nii.gz"))


# ----------------------------------------------------------------------------------------------------------------
# as a user runs it: python -m monai.bundle run from the bundle folder


@pytest.fixture(scope="module")
def seg_weights(tmp_path_factory) -> Path:
    """A random smoke-size seg_unet3d ``model.pt`` in a folder of its own (what ``--ckpt_dir`` points at)."""
    folder = tmp_path_factory.mktemp("seg_weights")
    torch.manual_seed(0)
    return tiny_networks("seg_unet3d", ["inference.json"], SEG_TINY, {"network_def": "model.pt"}, folder)


@pytest.mark.slow
def test_seg_inference_reads_model_pt_from_ckpt_dir(seg_weights, tmp_path):
    scan = write_ct(tmp_path / "data" / "imagesTs" / "case_0.nii.gz")
    out = tmp_path / "preds"
    result = bundle_run(
        "seg_unet3d",
        ["configs/inference.json"],
        {**SEG_TINY, "dataset_dir": str(tmp_path / "data"), "ckpt_dir": str(seg_weights), "output_dir": str(out)},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    prediction = nib.load(str(out / "case_0_seg.nii.gz"))
    assert prediction.shape == nib.load(str(scan)).shape


@pytest.mark.slow
@pytest.mark.parametrize("folder", ["empty", "missing"])
def test_seg_inference_on_no_scans_fails_naming_the_folder(folder, seg_weights, tmp_path):
    dataset = tmp_path / folder
    if folder == "empty":
        (dataset / "imagesTs").mkdir(parents=True)
    result = bundle_run(
        "seg_unet3d",
        ["configs/inference.json"],
        {**SEG_TINY, "dataset_dir": str(dataset), "ckpt_dir": str(seg_weights)},
    )
    assert result.returncode != 0
    assert "skip the `run`" not in result.stdout + result.stderr
    line = last_line(result.stderr)
    assert line.startswith(f"ERROR: {dataset / 'imagesTs'}: "), line


@pytest.mark.slow
def test_a_typo_stops_the_run_at_initialize(tmp_path):
    out = tmp_path / "out"
    result = bundle_run("seg_unet3d", ["configs/inference.json"], {"roi_sizes": [32, 32, 32], "output_dir": str(out)})
    assert result.returncode != 0
    line = last_line(result.stderr)
    assert "'roi_sizes'" in line and "'roi_size'" in line and line.startswith("ERROR: unknown override"), line
    assert "Engine run" not in result.stderr + result.stdout and not out.exists()


@pytest.mark.slow
def test_a_bad_scan_is_named_on_the_last_line_once(seg_weights, tmp_path):
    """A PNG renamed .nii.gz: the bundle's InputError ends the output instead of MONAI's RuntimeError wrapper, and
    its message is not repeated by every handler on the way out."""
    scans = tmp_path / "data" / "imagesTs"
    scans.mkdir(parents=True)
    bad = scans / "photo.nii.gz"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    result = bundle_run(
        "seg_unet3d",
        ["configs/inference.json"],
        {**SEG_TINY, "dataset_dir": str(tmp_path / "data"), "ckpt_dir": str(seg_weights), "output_dir": str(tmp_path)},
    )
    assert result.returncode != 0
    line = last_line(result.stderr)
    assert line.startswith(f"ERROR: {bad}: not a readable NIfTI image"), line
    assert (result.stdout + result.stderr).count(f"{bad}: not a readable NIfTI image") == 2  # traceback + last line
