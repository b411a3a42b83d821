"""Issue 8, acceptance 4: every ``multi_gpu_*.json`` overlay runs under ``torchrun --nproc_per_node=2 --standalone``
on CPU with gloo. Overlays already run by a bundle's own test file are named in :data:`DDP_TESTS` (reused, not
repeated); this file runs the remaining one, ldm_abdomen's stage-1 (autoencoder GAN) overlay."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
BUNDLES = REPO / "bundles"

#: every DDP overlay -> the test that runs it under torchrun with two CPU processes
DDP_TESTS = {
    "seg_unet3d/multi_gpu_train.json": "test_bundle_seg_unet3d.py::test_multi_gpu_overlay_runs_under_torchrun_on_cpu",
    "vae_ct/multi_gpu_train.json": "test_bundle_vae_ct.py::test_ddp_training_on_cpu_with_two_processes",
    "ldm_abdomen/multi_gpu_train.json": "test_bundle_ldm_abdomen.py::test_ddp_training_on_two_cpu_processes",
    "ldm_abdomen/multi_gpu_train_autoencoder.json": (
        "test_multi_gpu.py::test_ldm_autoencoder_overlay_runs_under_torchrun"
    ),
    "difftumor/multi_gpu_train.json": (
        "test_bundle_difftumor.py::test_multi_gpu_overlay_runs_both_stages_under_torchrun_on_cpu"
    ),
}


def test_every_multi_gpu_overlay_has_a_two_process_test():
    overlays = sorted(f"{p.parent.parent.name}/{p.name}" for p in BUNDLES.glob("*/configs/multi_gpu_*.json"))
    assert overlays == sorted(DDP_TESTS)
    for test in DDP_TESTS.values():
        module, function = test.split("::")
        text = (REPO / "tests" / module).read_text()
        assert f"def {function}(" in text, test
        body = text[text.index(f"def {function}(") :]
        body = body[: body.find("\ndef ", 1)]
        assert "--nproc_per_node=2" in body and "--standalone" in body, f"{test} does not use torchrun with 2 procs"


def test_every_overlay_picks_gloo_on_cpu_and_the_device_from_local_rank():
    for path in BUNDLES.glob("*/configs/multi_gpu_train.json"):
        text = path.read_text()
        assert "'nccl' if torch.cuda.is_available() else 'gloo'" in text, path
        assert "LOCAL_RANK" in text, path


@pytest.mark.slow
def test_ldm_autoencoder_overlay_runs_under_torchrun(phantom_set, tmp_path):
    """Stage 1 (autoencoder + discriminator, both DistributedDataParallel) on two CPU processes with gloo."""
    from tools.prep import prepare_dataset

    full = tmp_path / "full"
    prepare_dataset(phantom_set, full, mode="full", hu_window=None)
    bundle = tmp_path / "ldm_abdomen"  # a copy: runs never write into the repository
    shutil.copytree(BUNDLES / "ldm_abdomen", bundle, ignore=shutil.ignore_patterns("__pycache__", "*.pt"))
    ckpt = tmp_path / "models"
    overrides = {
        "image_size": [32, 32, 16],
        "autoencoder_def#channels": [8, 8, 8],
        "autoencoder_def#num_res_blocks": 1,
        "autoencoder_def#norm_num_groups": 4,
        "ae_patch_size": [16, 16, 16],
        "discriminator_def#channels": 4,
        "discriminator_def#num_layers_d": 2,
        "train_batch_size": 1,
        "num_workers": 0,
        "val_interval": 1,
        "dataset_dir": str(full),
        "crop_mode": "full",
        "ckpt_dir": str(ckpt),
        "output_dir": str(tmp_path / "eval"),
        "bundle_root": str(bundle),
        "train#trainer#max_epochs": 1,
    }
    extra = tmp_path / "overrides.json"
    extra.write_text(json.dumps(overrides))
    configs = ["configs/train.json", "configs/train_autoencoder.json", "configs/multi_gpu_train.json",
               "configs/multi_gpu_train_autoencoder.json", str(extra)]  # fmt: skip
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
               "-m", "monai.bundle", "run", "--config_file", json.dumps(configs),
               "--meta_file", "configs/metadata.json", "--logging_file", "configs/logging.conf"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(command, cwd=bundle, capture_output=True, text=True, timeout=400, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    state = torch.load(ckpt / "checkpoint_autoencoder_epoch=1.pt", map_location="cpu", weights_only=True)
    for network in ("model", "discriminator"):
        if network in state:
            assert not any(key.startswith("module.") for key in state[network]), network  # saved unwrapped
    weights = torch.load(ckpt / "model_autoencoder.pt", map_location="cpu", weights_only=True)
    assert weights and not any(key.startswith("module.") for key in weights)
