"""Tests of the seg_unet3d bundle (issue 3): harness, the three configs, DDP, kill-and-resume, MONAI Label style use,
real-CT inference geometry, tracking, data mixing, the online augmentation slot, backbones and binary mode.

Every run uses the bundle's own configs with small overrides (coarse spacing, 32^3 crops, a few channels) on the
session's tiny phantom set; checkpoints and outputs go to temporary folders. The metric functions are tested
against hand-computed values in ``test_bundle_seg_unet3d_metrics.py``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import MapTransform, RandomizableTrait

from tools.bundle_check import check_bundle, run_workflow

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "seg_unet3d"
PYTHON = sys.executable
# the same configs, shrunk: ~6 mm voxels, 32^3 crops, a 5-level UNet with 4..64 channels
TINY = {
    "pixdim": [6.0, 6.0, 6.0],
    "roi_size": [32, 32, 32],
    "network_def#channels": [4, 8, 16, 32, 64],
    "cache_workers": 1,
    "sw_batch_size": 2,
}
TINY_TRAIN = {**TINY, "train#trainer#max_epochs": 2, "val_interval": 1, "num_samples": 1}


def cli_overrides(overrides: dict) -> list[str]:
    """``--key value`` arguments of ``python -m monai.bundle run`` (values as JSON, which fire parses)."""
    args = []
    for key, value in overrides.items():
        args += [f"--{key}", value if isinstance(value, str) else json.dumps(value)]
    return args


def load_scripts(name: str = "seg_unet3d_scripts_under_test"):
    """The bundle's ``scripts`` package imported under another name (it imports its modules relatively)."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            name, BUNDLE / "scripts" / "__init__.py", submodule_search_locations=[str(BUNDLE / "scripts")]
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return importlib.import_module(f"{name}.data"), importlib.import_module(f"{name}.seg_metrics")


@contextlib.contextmanager
def bundle_on_path(bundle: Path):
    """What MONAI Label does around a bundle call: bundle root first on sys.path, no stale ``scripts`` module."""
    saved = list(sys.path)
    for name in [n for n in sys.modules if n == "scripts" or n.startswith("scripts.")]:
        del sys.modules[name]
    sys.path.insert(0, str(bundle))
    try:
        yield
    finally:
        sys.path[:] = saved
        for name in [n for n in sys.modules if n == "scripts" or n.startswith("scripts.")]:
            del sys.modules[name]


def read_nifti(path: Path) -> tuple[np.ndarray, np.ndarray]:
    image = nib.load(str(path))
    return np.asarray(image.dataobj), image.affine


# ----------------------------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def trained(tmp_path_factory, phantom_set):
    """The bundle trained for 2 epochs on the phantom set: (run folder, finished train workflow)."""
    run = tmp_path_factory.mktemp("seg_trained")
    workflow = run_workflow(
        BUNDLE,
        "configs/train.json",
        "train",
        overrides={
            **TINY_TRAIN,
            "dataset_dir": str(phantom_set),
            "ckpt_dir": str(run / "models"),
            "output_dir": str(run / "eval"),
        },
    )
    return run, workflow


def ckpt_epoch(path: Path) -> int:
    """The trainer epoch stored in a resumable checkpoint (ignite keeps iteration and epoch length)."""
    trainer = torch.load(path, map_location="cpu", weights_only=True)["trainer"]
    return int(trainer["iteration"]) // int(trainer["epoch_length"])


# ----------------------------------------------------------------------------------------------------------------
# acceptance 1: the harness and a run of each config


@pytest.mark.slow
def test_harness_passes_with_the_full_size_network(phantom_set):
    """verify_metadata, check_properties (train, evaluate, multi-GPU, inference), verify_net_in_out, TorchScript.

    The metadata schema comes from ../shared when it is there (only the SPEC fields are checked otherwise).
    """
    summary = check_bundle(
        BUNDLE,
        overrides={"dataset_dir": str(phantom_set), "pixdim": [6.0, 6.0, 6.0], "roi_size": [32, 32, 32]},
    )
    assert summary.passed
    names = [result.name for result in summary.results if result.status == "pass"]
    assert "TorchScript export: network_def" in names and "net in/out: network_def" in names


def test_default_network_is_the_seed_000_residual_unet():
    """4 encoder + 4 decoder stages with 2 residual units each, about 14 M parameters (seed 000)."""
    from monai.bundle import ConfigParser
    from monai.networks.nets import UNet

    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "configs" / "train.json"))
    network = parser.get_parsed_content("network_def")
    assert isinstance(network, UNet)
    assert len(parser["network_def#strides"]) == 4 and parser["network_def#num_res_units"] == 2
    n_params = sum(p.numel() for p in network.parameters())
    assert abs(n_params - 14e6) <= 0.1 * 14e6, n_params
    assert n_params == 14_715_582  # 3 output channels, instance norm without affine parameters
    inference = ConfigParser()
    inference.read_config(str(BUNDLE / "configs" / "inference.json"))
    assert inference["network_def"] == parser["network_def"]  # train and inference build the same network


def test_tumor_crops_overlay_centres_the_configured_share_of_crops_on_the_tumor():
    """configs/tumor_crops.json: RandCropByLabelClassesd with ``crop_ratios`` [1, 1, 2] puts half of a tumor scan's
    crops on tumor voxels (RandCropByPosNegLabeld of train.json: pancreas or tumor alike), and ``class_weights``
    reaches DiceCE."""
    from monai.bundle import ConfigParser
    from monai.transforms import Compose

    parser = ConfigParser()
    parser.read_config([str(BUNDLE / "configs" / "train.json"), str(BUNDLE / "configs" / "tumor_crops.json")])
    parser.update({"bundle_root": str(BUNDLE), "roi_size": [8, 8, 8], "num_samples": 1, "device": "cpu",
                   "class_weights": [1.0, 1.0, 3.0]})  # fmt: skip
    with bundle_on_path(BUNDLE):
        sampling = Compose(parser.get_parsed_content("train#sampling_transforms"))
        crop = parser.get_parsed_content("train#random_transforms")[0]
        loss = parser.get_parsed_content("loss")
    assert type(crop).__name__ == "RandCropByLabelClassesd" and list(crop.cropper.ratios) == [1, 1, 2]
    assert torch.equal(loss.cross_entropy.weight, torch.tensor([1.0, 1.0, 3.0]))
    label = torch.zeros(1, 64, 64, 64, dtype=torch.uint8)
    label[0, 8:56, 8:56, 8:56] = 1  # a large pancreas
    label[0, 28:32, 28:32, 28:32] = 2  # a small tumor: 64 of its 110592 voxels
    data = sampling({"image": torch.rand(1, 64, 64, 64), "label": label})
    crop.set_random_state(0)
    centred = [crop(data)[0]["label"][0, 4, 4, 4].item() == 2 for _ in range(400)]
    assert 0.42 <= sum(centred) / len(centred) <= 0.58  # about 2 of 4 (binomial sd 0.025)


def test_tumor_augmentation_overlay_appends_spatial_and_intensity_augmentation_after_the_crops():
    """configs/tumor_augmentation.json: after train.json's crop, flips, rotation and shift come an affine (rotation,
    scaling) and noise / smoothing / intensity scale / gamma, each with ``augmentation_prob``; image and label keep
    their shapes and the label its values."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(BUNDLE / "configs" / name) for name in ("train.json", "tumor_crops.json",
                                                                    "tumor_augmentation.json")])  # fmt: skip
    parser.update({"bundle_root": str(BUNDLE), "roi_size": [16, 16, 16], "num_samples": 2, "augmentation_prob": 1.0})
    with bundle_on_path(BUNDLE):
        chain = parser.get_parsed_content("train#preprocessing").transforms
    names = [type(t).__name__ for t in chain]
    assert names.index("RandCropByLabelClassesd") < names.index("RandShiftIntensityd") < names.index("RandAffined")
    assert names[-5:] == ["RandAffined", "RandGaussianNoised", "RandGaussianSmoothd", "RandScaleIntensityd",
                          "RandAdjustContrastd"]  # fmt: skip
    assert all(t.prob == 1.0 for t in chain[-5:])
    label = torch.zeros(1, 16, 16, 16, dtype=torch.uint8)
    label[0, 4:12, 4:12, 4:12] = 1
    label[0, 6:9, 6:9, 6:9] = 2
    sample = {"image": torch.rand(1, 16, 16, 16), "label": label}
    augment = chain[-5:]
    for transform in augment:
        transform.set_random_state(0)
        sample = transform(sample)
    assert sample["image"].shape == (1, 16, 16, 16) and sample["label"].shape == (1, 16, 16, 16)
    assert set(torch.unique(sample["label"]).tolist()) <= {0, 1, 2}


@pytest.mark.slow
def test_train_validates_saves_best_and_final_models_and_archives_the_resume_state(trained):
    run, workflow = trained
    trainer = workflow.parser.get_parsed_content("train#trainer")
    assert trainer.state.epoch == 2
    metrics = workflow.parser.get_parsed_content("validate#evaluator").state.metrics
    assert {"val_mean_dice", "val_pancreas_dice", "val_tumor_dice"} <= set(metrics)
    models = run / "models"
    assert (models / "model.pt").is_file() and (models / "model_final.pt").is_file()
    assert not list(models.glob("checkpoint_epoch=*.pt"))  # a completed run does not resume
    assert ckpt_epoch(models / "checkpoint_completed.pt") == 2
    state = torch.load(models / "checkpoint_completed.pt", map_location="cpu", weights_only=True)
    assert set(state) == {"model", "optimizer", "lr_scheduler", "best_model_tracker", "trainer"}
    assert state["best_model_tracker"]["_saved"]  # the best-metric tracker survives a restart
    assert list((run / "eval" / "tensorboard").glob("events.out.tfevents.*"))


@pytest.mark.slow
def test_evaluate_writes_per_case_and_summary_csv_on_the_original_grid(trained, phantom_set):
    run, _ = trained
    out = run / "evaluate"
    run_workflow(
        BUNDLE,
        ["configs/train.json", "configs/evaluate.json"],
        "train",
        overrides={**TINY, "dataset_dir": str(phantom_set), "ckpt_dir": str(run / "models"), "output_dir": str(out)},
    )
    dataset = json.loads((phantom_set / "dataset.json").read_text())
    test_cases = sorted(Path(entry["label"]).name.replace(".nii.gz", "") for entry in dataset["test"])
    per_case = (out / "metrics_per_case.csv").read_text().splitlines()
    header = per_case[0].split(",")
    for column in ("pancreas_dice", "pancreas_nsd", "pancreas_hd95", "tumor_dice", "tumor_nsd", "tumor_hd95"):
        assert column in header
    assert sorted(line.split(",")[0] for line in per_case[1:]) == test_cases
    summary = json.loads((out / "summary.json").read_text())
    assert {(row["region"], row["metric"]) for row in summary["regions"]} >= {("pancreas", "dice"), ("pancreas", "nsd")}
    detection = (out / "detection_summary.csv").read_text()
    for group in ("[0,5)", "[5,10)", "[10,15)", "[15,20)", ">=20", "patient_specificity"):
        assert group in detection
    # predictions are written on each test scan's own grid
    for entry in dataset["test"]:
        case = Path(entry["image"]).name.replace(".nii.gz", "")
        pred, pred_affine = read_nifti(out / "predictions" / f"{case}_seg.nii.gz")
        image, image_affine = read_nifti(phantom_set / entry["image"])
        assert pred.shape == image.shape
        np.testing.assert_allclose(pred_affine, image_affine, atol=1e-4)


# ----------------------------------------------------------------------------------------------------------------
# acceptance 2: inference on the real CT keeps its geometry


@pytest.mark.slow
def test_inference_on_the_real_ct_keeps_shape_and_affine(trained, real_ct_dir, tmp_path):
    run, _ = trained
    source = real_ct_dir / "example_ct_sm.nii.gz"
    # the same scan stored in LPS order, so that inverting the orientation is exercised too
    image = nib.load(str(source))
    lps = nib.as_closest_canonical(image).slicer[::-1, ::-1, :]
    lps_path = tmp_path / "example_ct_lps.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(lps.dataobj), lps.affine, lps.header), str(lps_path))
    out = tmp_path / "pred"
    run_workflow(
        BUNDLE,
        "configs/inference.json",
        "infer",
        overrides={
            **TINY,
            "pixdim": [2.0, 2.5, 4.0],  # anisotropic and unlike the scan's 3 mm: resampling both ways
            "roi_size": [64, 64, 64],  # fewer windows over the 183 x 121 x 90 resampled scan
            "datalist": [str(source), str(lps_path)],
            "ckpt_dir": str(run / "models"),
            "output_dir": str(out),
        },
    )
    for path, name in ((source, "example_ct_sm_seg.nii.gz"), (lps_path, "example_ct_lps_seg.nii.gz")):
        pred, pred_affine = read_nifti(out / name)
        original, original_affine = read_nifti(path)
        assert pred.shape == original.shape
        assert np.array_equal(pred_affine, original_affine), (pred_affine, original_affine)
        assert pred.dtype == np.uint8 and set(np.unique(pred)) <= {0, 1, 2}


# ----------------------------------------------------------------------------------------------------------------
# acceptance 3: MONAI Label's BundleInferTask / BundleTrainTask, replicated with ConfigParser and monai.bundle.run


@pytest.mark.slow
def test_monai_label_infer_task_loads_and_runs_the_bundle(trained, phantom_set, tmp_path):
    from monai.bundle import ConfigParser
    from monai.transforms import Compose, LoadImaged, SaveImaged

    run, _ = trained
    bundle = Path(shutil.copytree(BUNDLE, tmp_path / "seg_unet3d"))
    (bundle / "models").mkdir()
    shutil.copy(run / "models" / "model.pt", bundle / "models" / "model.pt")
    with bundle_on_path(bundle):
        config = ConfigParser()
        config.read_config(str(bundle / "configs" / "inference.json"))
        config.config.update({"bundle_root": str(bundle)})
        for key, value in TINY.items():  # the test's size overrides; MONAI Label would use the defaults
            config[key] = value
        metadata = json.loads((bundle / "configs" / "metadata.json").read_text())
        key_image, image_format = next(iter(metadata["network_data_format"]["inputs"].items()))
        key_pred, pred_format = next(iter(metadata["network_data_format"]["outputs"].items()))
        assert (key_image, key_pred) == ("image", "pred")
        labels = {v.lower(): int(k) for k, v in pred_format["channel_def"].items() if v.lower() != "background"}
        assert labels == {"pancreas": 1, "tumor": 2}
        assert len(image_format["spatial_shape"]) == 3
        network = config.get_parsed_content("network_def", instantiate=True)
        checkpoint = torch.load(bundle / "models" / "model.pt", map_location="cpu", weights_only=True)
        network.load_state_dict(checkpoint.get("model", checkpoint), strict=False)
        network.eval()
        # _update_device: MONAI Label puts a device *name* into the config
        config.config.update({"device": "cpu"})
        pre = config.get_parsed_content("preprocessing", instantiate=True)
        pre = list(pre.transforms) if isinstance(pre, Compose) else pre
        for transform in pre:
            if isinstance(transform, LoadImaged):
                transform._loader.image_only = False
        inferer = config.get_parsed_content("inferer", instantiate=True)
        post = config.get_parsed_content("postprocessing", instantiate=True)
        post = [
            t for t in (list(post.transforms) if isinstance(post, Compose) else post) if not isinstance(t, SaveImaged)
        ]

        entry = json.loads((phantom_set / "dataset.json").read_text())["test"][0]
        image_path = phantom_set / entry["image"]
        data = {key_image: str(image_path)}
        for transform in pre:
            data = transform(data)
        with torch.no_grad():
            data[key_pred] = inferer(data[key_image][None], network)[0]
        for transform in post:
            data = transform(data)
    pred = np.asarray(data[key_pred])
    original, _ = read_nifti(image_path)
    assert pred.shape[-3:] == original.shape  # inverted to the scan's grid before MONAI Label's own Restored
    assert set(np.unique(pred)) <= {0, 1, 2}


@pytest.mark.slow
def test_monai_label_train_task_with_a_plain_datalist(trained, phantom_set, tmp_path):
    import monai.bundle
    from monai.bundle import ConfigParser

    run, _ = trained
    bundle = Path(shutil.copytree(BUNDLE, tmp_path / "seg_unet3d"))
    (bundle / "models").mkdir()
    shutil.copy(run / "models" / "model.pt", bundle / "models" / "model.pt")  # the "pretrained" model
    dataset = json.loads((phantom_set / "dataset.json").read_text())
    datalist = [
        {"image": str(phantom_set / e["image"]), "label": str(phantom_set / e["label"])} for e in dataset["training"]
    ]
    train_list, val_list = datalist[:-1], datalist[-1:]

    config = ConfigParser()
    config.read_config(str(bundle / "configs" / "train.json"))
    config.config.update({"bundle_root": str(bundle)})
    train_handlers = config.get("train#handlers", [])
    if not [h for h in train_handlers if h.get("_target_") == "CheckpointLoader"]:
        train_handlers.insert(
            0,
            {
                "_target_": "CheckpointLoader",
                "load_path": str(bundle / "models" / "model.pt"),
                "load_dict": {"model": "$@network"},
                "strict": False,
            },
        )
    overrides = {
        "bundle_root": str(bundle),
        "train#trainer#max_epochs": 1,
        "train#dataset#data": train_list,
        "device": torch.device("cpu"),
        "train#handlers": train_handlers,
        "validate#dataset#data": val_list,
        **{key: value for key, value in TINY.items()},
        "val_interval": 1,
    }
    with bundle_on_path(bundle):
        monai.bundle.run(
            run_id="run",
            init_id=None,
            final_id=None,
            meta_file=str(bundle / "configs" / "metadata.json"),
            config_file=str(bundle / "configs" / "train.json"),
            logging_file=str(bundle / "configs" / "logging.conf"),
            **overrides,
        )
    # dataset_dir stayed the bundle default (absent here): the plain lists were used
    assert (bundle / "models" / "model_final.pt").is_file()
    assert ckpt_epoch(bundle / "models" / "checkpoint_completed.pt") == 1


# ----------------------------------------------------------------------------------------------------------------
# acceptance 4: DDP on CPU


@pytest.mark.slow
def test_multi_gpu_overlay_runs_under_torchrun_on_cpu(phantom_set, tmp_path):
    overrides = {
        **TINY_TRAIN,
        "dataset_dir": str(phantom_set),
        "ckpt_dir": str(tmp_path / "models"),
        "output_dir": str(tmp_path / "eval"),
        "val_fraction": 0.5,
    }
    command = [
        str(Path(PYTHON).parent / "torchrun"),
        "--nproc_per_node=2",
        "--standalone",
        "-m",
        "monai.bundle",
        "run",
        "--config_file",
        "['configs/train.json','configs/multi_gpu_train.json']",
        *cli_overrides(overrides),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(command, cwd=BUNDLE, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    log = result.stdout + result.stderr
    assert ckpt_epoch(tmp_path / "models" / "checkpoint_completed.pt") == 2
    assert (tmp_path / "models" / "model.pt").is_file()
    # each rank trained on its half of the 2 training cases: 1 iteration per epoch
    assert "Epoch: 2/2, Iter: 1/1" in log and "Iter: 1/2" not in log


# ----------------------------------------------------------------------------------------------------------------
# acceptance 5: kill and resume


PAUSING_RUN = textwrap.dedent("""
    import json, sys, time
    from ignite.engine import Events
    from monai.bundle import ConfigWorkflow

    # the bundle's train workflow, as `python -m monai.bundle run` builds it, plus a pause after epoch 2 (once its
    # checkpoint is written) so that the test kills the process mid-run at a known point
    overrides = json.loads(sys.argv[1])
    workflow = ConfigWorkflow(config_file="configs/train.json", workflow_type="train", **overrides)
    workflow.initialize()
    trainer = workflow.parser.get_parsed_content("train#trainer")
    trainer.add_event_handler(Events.EPOCH_COMPLETED(once=2), lambda engine: time.sleep(600))
    workflow.run()
    """)


@pytest.mark.slow
def test_a_killed_run_resumes_from_its_last_checkpoint(phantom_set, tmp_path):
    models = tmp_path / "models"
    overrides = {
        **TINY_TRAIN,
        "train#trainer#max_epochs": 4,
        "dataset_dir": str(phantom_set),
        "ckpt_dir": str(models),
        "output_dir": str(tmp_path / "eval"),
    }
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(
        [PYTHON, "-c", PAUSING_RUN, json.dumps(overrides)],
        cwd=BUNDLE,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 240
        while not (models / "checkpoint_epoch=2.pt").exists():
            assert first.poll() is None, "the first run ended before writing its epoch-2 checkpoint"
            assert time.time() < deadline, "no epoch-2 checkpoint within 240 s"
            time.sleep(0.1)
        time.sleep(0.5)
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == -signal.SIGKILL
    assert not (models / "checkpoint_completed.pt").exists()
    assert ckpt_epoch(models / "checkpoint_epoch=2.pt") == 2

    second = subprocess.run(
        [PYTHON, "-m", "monai.bundle", "run", "--config_file", "configs/train.json", *cli_overrides(overrides)],
        cwd=BUNDLE,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    log = second.stdout + second.stderr
    assert second.returncode == 0, log[-3000:]
    assert "resumed from" in log and "checkpoint_epoch=2.pt (epoch 2" in log
    assert "Epoch: 3/4" in log and "Epoch: 4/4" in log
    assert "Epoch: 1/4" not in log and "Epoch: 2/4" not in log  # not restarted from zero
    assert ckpt_epoch(models / "checkpoint_completed.pt") == 4


def test_resume_off_sets_the_epoch_checkpoints_of_an_earlier_run_aside(tmp_path):
    from ignite.engine import Engine

    load_scripts()
    handlers = importlib.import_module("seg_unet3d_scripts_under_test.handlers")
    for epoch in (7, 8):
        torch.save({"x": torch.zeros(1)}, tmp_path / f"checkpoint_epoch={epoch}.pt")
    engine = Engine(lambda engine, batch: None)
    handlers.ResumeTrainer(tmp_path, {}, enabled=False)(engine)
    assert not list(tmp_path.glob("checkpoint_epoch=*.pt"))
    moved = list(tmp_path.glob("superseded_*/checkpoint_epoch=*.pt"))
    assert sorted(p.name for p in moved) == ["checkpoint_epoch=7.pt", "checkpoint_epoch=8.pt"]
    assert engine.state.epoch == 0


# ----------------------------------------------------------------------------------------------------------------
# tracking


@pytest.mark.slow
def test_mlflow_tracking_writes_an_offline_file_store_under_output_dir(phantom_set, tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    import socket

    from monai.bundle import ConfigWorkflow

    attempts = []

    def refuse(sock, address, *args, **kwargs):  # recorded, so that an attempt from any thread fails the test
        attempts.append(address)
        raise OSError("this test runs offline")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    out = tmp_path / "eval"
    overrides = {
        **TINY_TRAIN,
        "train#trainer#max_epochs": 1,
        "dataset_dir": str(phantom_set),
        "ckpt_dir": str(tmp_path / "models"),
        "output_dir": str(out),
    }
    with bundle_on_path(BUNDLE):
        workflow = ConfigWorkflow(
            config_file=str(BUNDLE / "configs" / "train.json"),
            workflow_type="train",
            tracking="mlflow",
            logging_file=False,
            **overrides,
        )
        workflow.initialize()
        workflow.run()
        workflow.finalize()
    assert attempts == []
    runs = [path.parent for path in (out / "mlruns").glob("*/*/meta.yaml")]
    assert len(runs) == 1
    assert {"train_loss", "val_mean_dice", "val_pancreas_dice"} <= {p.name for p in (runs[0] / "metrics").iterdir()}


def test_default_training_does_not_need_mlflow():
    """Nothing in train.json refers to MLflow unless `--tracking mlflow` patches its handlers in."""
    text = (BUNDLE / "configs" / "train.json").read_text()
    assert "MLFlowHandler" not in text and "import mlflow" not in text


# ----------------------------------------------------------------------------------------------------------------
# data: real:synthetic mixing, validation and test sets of real cases only


def write_datalist(folder: Path, n_real: int, n_synthetic: int, with_validation: bool = False) -> Path:
    training = [
        {"image": f"imagesTr/r{i}.nii.gz", "label": f"labelsTr/r{i}.nii.gz", "patient": f"p{i // 2}"}
        for i in range(n_real)
    ] + [
        {"image": f"synth/s{i}.nii.gz", "label": f"synth/s{i}_label.nii.gz", "synthetic": True}
        for i in range(n_synthetic)
    ]
    content = {
        "training": training,
        "test": [{"image": "imagesTs/t0.nii.gz", "label": "labelsTs/t0.nii.gz"}, {"image": "imagesTs/t1.nii.gz"}],
    }
    if with_validation:
        content["test"] = ["imagesTs/t0.nii.gz", "imagesTs/t1.nii.gz"]  # MSD's own test list: images only
        content["validation"] = [
            {"image": "imagesVa/v0.nii.gz", "label": "labelsVa/v0.nii.gz"},
            {"image": "synth/v1.nii.gz", "label": "synth/v1_label.nii.gz", "synthetic": True},
        ]
    path = folder / "datalist.json"
    path.write_text(json.dumps(content))
    return path


def test_split_keeps_patients_together_and_synthetic_cases_out_of_validation_and_test(tmp_path):
    data, _ = load_scripts()
    path = write_datalist(tmp_path, n_real=10, n_synthetic=6)
    split = data.load_split(str(path), val_fraction=0.2, seed=3)
    val_patients = {r["patient"] for r in split["validation"]}
    assert len(val_patients) == 1 and len(split["validation"]) == 2  # 5 patients of 2 scans: one held out
    assert not val_patients & {r.get("patient") for r in split["training"]}
    assert not any(r.get("synthetic") for r in split["validation"] + split["test"])
    assert len(split["training"]) == 8 + 6  # every synthetic record trains when no ratio is given
    assert [r["image"] for r in split["test"]] == [str(tmp_path / "imagesTs/t0.nii.gz")]  # unlabelled test dropped
    assert all(Path(r["image"]).is_absolute() for r in split["training"])
    assert split == data.load_split(str(path), val_fraction=0.2, seed=3)  # deterministic


@pytest.mark.parametrize("ratio, n_synthetic", [(0.0, 0), (0.25, 2), (0.5, 4), (1.0, 8)])
def test_synthetic_ratio_mixes_at_a_fixed_training_set_size(tmp_path, ratio, n_synthetic):
    data, _ = load_scripts()
    path = write_datalist(tmp_path, n_real=10, n_synthetic=8)
    split = data.load_split(str(path), val_fraction=0.2, synthetic_ratio=ratio, seed=0)
    training = split["training"]
    assert len(training) == 8  # the size of the real training part, as in seed 000's arms
    assert sum(data.is_synthetic(r) for r in training) == n_synthetic


def test_synthetic_ratio_asking_for_more_than_the_datalist_has_is_an_error(tmp_path):
    data, _ = load_scripts()
    path = write_datalist(tmp_path, n_real=10, n_synthetic=3)
    with pytest.raises(ValueError, match="needs 4 real and 4 synthetic"):
        data.load_split(str(path), val_fraction=0.2, synthetic_ratio=0.5)
    with pytest.raises(ValueError, match="synthetic_ratio must be in"):
        data.load_split(str(path), synthetic_ratio=1.5)


def test_a_validation_section_is_used_with_its_real_records_only(tmp_path):
    data, _ = load_scripts()
    path = write_datalist(tmp_path, n_real=4, n_synthetic=2, with_validation=True)
    split = data.load_split(str(path), val_fraction=0.5)
    assert [Path(r["image"]).name for r in split["validation"]] == ["v0.nii.gz"]
    assert len(split["training"]) == 6
    assert split["test"] == []  # an unlabelled test list gives no evaluation records
    with pytest.raises(ValueError, match="--eval_section"):
        data.select_section(split, "test")
    assert data.select_section(split, "validation") == split["validation"]


# ----------------------------------------------------------------------------------------------------------------
# the online augmentation slot (filled by the difftumor bundle)


class RecordingTumorAugmentation(MapTransform, RandomizableTrait):
    """A stand-in for the difftumor synthesis: records what it receives, turns the pancreas into 'tumor'."""

    def __init__(self):
        super().__init__(keys=["image", "label"])
        self.calls = []

    def __call__(self, data):
        image, label = data["image"], data["label"]
        self.calls.append(
            {
                "keys": sorted(data),
                "image_meta": isinstance(image, MetaTensor) and image.affine.shape == (4, 4),
                "image_range": (float(image.min()), float(image.max())),
                "image_dtype": image.dtype,
                "label_values": sorted(int(v) for v in torch.unique(label)),
                "label_dtype": label.dtype,
                "shape": tuple(image.shape),
                "spacing": [float(v) for v in np.linalg.norm(np.asarray(image.affine)[:3, :3], axis=0)],
            }
        )
        out = dict(data)
        pancreas = label == 1
        out["label"], out["image"] = label.clone(), image.clone()
        out["label"][pancreas] = 2
        out["image"][pancreas] = image[pancreas] * 0.5
        return out


@pytest.mark.slow
def test_online_augmentation_gets_the_documented_input_before_the_crops(phantom_set, tmp_path):
    augmentation = RecordingTumorAugmentation()
    workflow = run_workflow(
        BUNDLE,
        "configs/train.json",
        "train",
        overrides={
            **TINY_TRAIN,
            "train#trainer#max_epochs": 1,
            "dataset_dir": str(phantom_set),
            "ckpt_dir": str(tmp_path / "models"),
            "output_dir": str(tmp_path / "eval"),
            "online_augmentation": augmentation,
        },
    )
    n_train = len(workflow.parser.get_parsed_content("train#dataset#data"))
    assert len(augmentation.calls) == n_train  # a random transform runs on every item, every epoch (not cached)
    for call in augmentation.calls:
        assert {"image", "label"} <= set(call["keys"])
        assert call["image_meta"]
        assert 0.0 <= call["image_range"][0] and call["image_range"][1] <= 1.0
        assert call["image_dtype"] == torch.float32 and call["label_dtype"] == torch.uint8
        assert set(call["label_values"]) <= {0, 1, 2}
        assert np.allclose(call["spacing"], TINY["pixdim"], atol=1e-3)  # after Spacingd
        assert call["shape"][0] == 1 and max(call["shape"][1:]) > max(TINY["roi_size"])  # a whole volume, not a crop
    # the cached deterministic part is not changed by the augmentation (copy_cache is on for random transforms)
    dataset = workflow.parser.get_parsed_content("train#dataset")
    assert dataset.copy_cache is True


def test_identity_augmentation_is_cached_without_copies():
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "configs" / "train.json"))
    parser["train#dataset#data"] = []
    assert parser.get_parsed_content("train#dataset#copy_cache") is False


def test_cached_sampling_indices_can_be_switched_off_to_save_memory():
    from monai.bundle import ConfigParser

    from tools.bundles import bundle_on_path

    names = {}
    for flag in (True, False):
        parser = ConfigParser()
        parser.read_config(str(BUNDLE / "configs" / "train.json"))
        parser["cache_indices"] = flag
        with bundle_on_path(BUNDLE):  # the pipeline starts with the bundle's scripts.validation.ValidateCTd
            names[flag] = [type(t).__name__ for t in parser.get_parsed_content("train#preprocessing").transforms]
    assert "FgBgToIndicesd" in names[True] and "FgBgToIndicesd" not in names[False]
    assert names[False].index("RandCropByPosNegLabeld") == names[True].index("RandCropByPosNegLabeld") - 1


def test_evaluate_and_inference_filter_tumor_confidence_between_the_inversion_and_the_argmax():
    from monai.bundle import ConfigParser

    from tools.bundles import bundle_on_path

    for files, key in (
        (["train.json", "evaluate.json"], "validate#postprocessing"),
        (["inference.json"], "postprocessing"),
    ):
        parser = ConfigParser()
        parser.read_config([str(BUNDLE / "configs" / name) for name in files])
        assert parser["min_tumor_confidence"] == 0.0  # off by default: the argmax as it was
        parser["min_tumor_confidence"] = 0.85
        with bundle_on_path(BUNDLE):
            chain = parser.get_parsed_content(key).transforms
        names = [type(t).__name__ for t in chain]
        position = names.index("TumorConfidenceFilterd")
        assert names[position - 1] == "Invertd" and names[position + 1] == "AsDiscreted", names
        assert chain[position].min_confidence == 0.85 and chain[position].tumor_channel == 2


# ----------------------------------------------------------------------------------------------------------------
# backbones, binary mode, loss and optimizer choices


@pytest.mark.slow
@pytest.mark.parametrize(
    "overlay, target", [("configs/backbone_dynunet.json", "DynUNet"), ("configs/backbone_swinunetr.json", "SwinUNETR")]
)
def test_backbone_overlays_switch_the_network(overlay, target):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(BUNDLE / "configs" / "train.json"), str(BUNDLE / overlay)])
    # the overlay's network with fewer features, to keep the test fast
    if target == "DynUNet":
        parser["network_def#filters"] = [8, 16, 32, 64, 64, 64]
    else:
        parser["network_def#feature_size"] = 12
    network = parser.get_parsed_content("network_def")
    assert type(network).__name__ == target
    network.eval()
    with torch.no_grad():
        out = network(torch.rand(1, 1, 64, 64, 64))  # 5 halvings (DynUNet) / 32x patch merging (Swin): 64 -> 2
    assert out.shape == (1, 3, 64, 64, 64)


@pytest.mark.slow
def test_binary_mode_merges_the_tumor_into_the_pancreas(phantom_set, tmp_path):
    workflow = run_workflow(
        BUNDLE,
        ["configs/train.json", "configs/binary.json"],
        "train",
        overrides={
            **TINY_TRAIN,
            "train#trainer#max_epochs": 1,
            "dataset_dir": str(phantom_set),
            "ckpt_dir": str(tmp_path / "models"),
            "output_dir": str(tmp_path / "eval"),
        },
    )
    network = workflow.parser.get_parsed_content("network_def")
    assert network(torch.rand(1, 1, 32, 32, 32)).shape[1] == 2
    validation = workflow.parser.get_parsed_content("validate#dataset")
    labels = torch.cat([item["label"].flatten() for item in validation])
    assert set(torch.unique(labels).tolist()) <= {0, 1} and (labels == 1).any()
    assert set(workflow.parser.get_parsed_content("validate#evaluator").state.metrics) == {
        "val_mean_dice",
        "val_pancreas_dice",
    }


def test_dice_loss_and_adamw_are_one_override_each():
    from monai.bundle import ConfigParser
    from monai.losses import DiceCELoss, DiceLoss

    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "configs" / "train.json"))
    parser["network_def#channels"] = TINY["network_def#channels"]
    with bundle_on_path(BUNDLE):  # the network goes through scripts.precision
        assert isinstance(parser.get_parsed_content("loss"), DiceCELoss)
        assert isinstance(parser.get_parsed_content("optimizer"), torch.optim.Adam)
        parser["loss#_target_"] = "DiceLoss"
        parser["optimizer#_target_"] = "torch.optim.AdamW"
        parser.parse(reset=True)
        assert type(parser.get_parsed_content("loss")) is DiceLoss
        assert type(parser.get_parsed_content("optimizer")) is torch.optim.AdamW


def test_thread_loader_raises_what_fails_in_its_thread():
    """MONAI's ThreadDataLoader ends the iteration when its thread fails (a bad scan evaluated as 0 cases); the
    bundle's loader raises the error, after the items before it, and otherwise yields what MONAI's does."""
    from monai.data import Dataset
    from monai.data import ThreadDataLoader as MonaiThreadDataLoader

    load_scripts()
    loaders = importlib.import_module("seg_unet3d_scripts_under_test.loaders")

    def transform(x):
        if x == 3:
            raise ValueError("item 3 is broken")
        return x

    dataset = Dataset(list(range(5)), transform=transform)
    seen = []
    with pytest.raises(RuntimeError) as info:  # MONAI's transform wrapper, the broken item's error as its cause
        for batch in loaders.ThreadDataLoader(dataset, batch_size=1):
            seen.append(int(batch))
    assert seen == [0, 1, 2] and "item 3 is broken" in str(info.value.__cause__)
    assert len(list(MonaiThreadDataLoader(dataset, batch_size=1))) == 3  # MONAI's: no error, items missing
    good = Dataset(list(range(5)))
    ours = [b.tolist() for b in loaders.ThreadDataLoader(good, batch_size=2, repeats=2)]
    assert ours == [b.tolist() for b in MonaiThreadDataLoader(good, batch_size=2, repeats=2)]
    assert ours == [[0, 1], [0, 1], [2, 3], [2, 3], [4], [4]]
