"""Issue 8, acceptance 2: every training config survives ``kill -9``; a kill during a save leaves a loadable
checkpoint; a NaN loss stops training with a clear error and keeps the last good checkpoint.

Kill-and-resume tests already in the bundle test files (reused, not repeated here):

* ``seg_unet3d`` train: ``test_bundle_seg_unet3d.py::test_a_killed_run_resumes_from_its_last_checkpoint``
* ``vae_ct`` train / train_vaegan / train_gan:
  ``test_bundle_vae_ct.py::test_a_killed_run_resumes_from_its_last_checkpoint``
* ``ldm_abdomen`` train (diffusion):
  ``test_bundle_ldm_abdomen.py::test_killed_training_resumes_from_its_last_checkpoint``
* ``difftumor`` train (autoencoder): ``test_bundle_difftumor.py::test_a_killed_training_resumes_from_its_last_epoch``

This file adds the remaining training configs (``vae_ct`` train_3d, ``ldm_abdomen`` train_autoencoder and
train_controlnet, ``difftumor`` train_diffusion) with one generic procedure: start ``python -m monai.bundle run``
with a large ``max_epochs``, wait until a checkpoint exists, wait a random moment more, ``SIGKILL``; start it again
with ``max_epochs`` = last saved epoch + 2 and check that it resumed from that checkpoint (not from zero), ran
exactly the two missing epochs and ended with the configured number of epochs and iterations. The three chains run
in parallel threads (each step a subprocess) to share the start-up time. A table test checks that every training
config of every bundle is covered by one of these tests.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from tools.bundle_scripts.checkpointing import (
    AtomicCheckpointSaver,
    checkpoint_epoch,
    latest_checkpoint,
    list_checkpoints,
)

REPO = Path(__file__).resolve().parents[1]
BUNDLES = REPO / "bundles"
PYTHON = sys.executable
SEED = int(os.environ.get("PCT_KILL_SEED", "0"))  # the random kill moments; printed on failure

#: every training config (config files in order) -> the test that kills and resumes it
KILL_TESTS = {
    ("seg_unet3d", ("train.json",)): "test_bundle_seg_unet3d.py::test_a_killed_run_resumes_from_its_last_checkpoint",
    ("vae_ct", ("train.json",)): "test_bundle_vae_ct.py::test_a_killed_run_resumes_from_its_last_checkpoint[vae]",
    ("vae_ct", ("train.json", "train_vaegan.json")): "test_bundle_vae_ct.py::...[vae_gan]",
    ("vae_ct", ("train.json", "train_gan.json")): "test_bundle_vae_ct.py::...[gan]",
    ("vae_ct", ("train.json", "train_3d.json")): "test_fault_tolerance.py::...[vae_ct train_3d]",
    ("ldm_abdomen", ("train.json",)): "test_bundle_ldm_abdomen.py::test_killed_training_resumes_from_its_last_checkpoint",  # noqa: E501
    ("ldm_abdomen", ("train.json", "train_autoencoder.json")): "test_fault_tolerance.py::...[ldm train_autoencoder]",
    ("ldm_abdomen", ("train.json", "train_controlnet.json")): "test_fault_tolerance.py::...[ldm train_controlnet]",
    ("difftumor", ("train.json",)): "test_bundle_difftumor.py::test_a_killed_training_resumes_from_its_last_epoch",
    ("difftumor", ("train.json", "train_diffusion.json")): "test_fault_tolerance.py::...[difftumor train_diffusion]",
}  # fmt: skip
#: overlays that are not training configs of their own (DDP, evaluation, backbone switches, BraTS adaptation,
#: tumor-centred crop sampling, tumor augmentation): they change what train.json trains on, not how it checkpoints
#: and resumes
NOT_TRAINING = re.compile(
    r"^(multi_gpu_.*|evaluate.*|inference.*|backbone_.*|binary|tumor_crops|tumor_augmentation|adapt_brats|memorization"
    r"|metadata)$"
)


def training_configs() -> list[tuple[str, tuple[str, ...]]]:
    """Every training config of every bundle: ``train.json`` and each ``train_*.json`` overlay on it."""
    found = []
    for bundle in sorted(p.name for p in BUNDLES.iterdir() if (p / "configs" / "train.json").is_file()):
        found.append((bundle, ("train.json",)))
        for overlay in sorted((BUNDLES / bundle / "configs").glob("train_*.json")):
            found.append((bundle, ("train.json", overlay.name)))
    return found


def test_every_training_config_has_a_kill_and_resume_test():
    configs = training_configs()
    assert set(configs) == set(KILL_TESTS), sorted(set(configs) ^ set(KILL_TESTS))
    for name in (REPO / "bundles").glob("*/configs/*.json"):  # no other training config hides elsewhere
        stem = name.stem
        assert stem == "train" or stem.startswith("train_") or NOT_TRAINING.match(stem) or stem.isdigit(), name
    for test in set(KILL_TESTS.values()):
        module, _, function = test.partition("::")
        text = (REPO / "tests" / module).read_text()
        assert function.startswith("...") or f"def {function.split('[')[0]}(" in text, test


def merged_config(bundle: str, configs: tuple[str, ...]) -> dict:
    from monai.bundle import ConfigParser

    return ConfigParser.load_config_files([str(BUNDLES / bundle / "configs" / c) for c in configs])


@pytest.mark.parametrize("bundle,configs", training_configs(), ids=lambda v: v if isinstance(v, str) else "+".join(v))
def test_every_training_config_resumes_saves_atomically_and_stops_on_nan(bundle, configs):
    """The resumable state is written by the vendored atomic saver, restored at start, and a NaN loss fails the run
    (``StopOnNonFiniteLoss``; its behaviour is tested in test_bundle_scripts.py and below)."""
    text = json.dumps(merged_config(bundle, configs))
    assert "scripts.checkpointing.StopOnNonFiniteLoss" in text
    assert re.search(r"scripts\.(checkpointing\.ResumeFromLatest|handlers\.ResumeTrainer)", text)
    assert re.search(r"scripts\.(checkpointing\.AtomicCheckpointSaver|handlers\.SaveTrainerCheckpoint)", text)
    assert '"_target_": "CheckpointSaver"' not in text or "key_metric_filename" in text  # MONAI's only for model.pt


# ----------------------------------------------------------------------------------------------------------------
# kill and resume of the configs not covered by the bundle test files


def run_bundle(bundle_dir: Path, configs: list[str], overrides: dict, log: Path, timeout: float = 400):
    """``python -m monai.bundle run`` with the overrides as a last config file; returns the finished process."""
    extra = log.with_suffix(".overrides.json")
    extra.write_text(json.dumps(overrides))
    command = [PYTHON, "-m", "monai.bundle", "run", "--config_file", json.dumps([*configs, str(extra)]),
               "--meta_file", "configs/metadata.json", "--logging_file", "configs/logging.conf"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    with open(log, "w") as out:
        return subprocess.Popen(command, cwd=bundle_dir, env=env, stdout=out, stderr=subprocess.STDOUT)


def finish(process: subprocess.Popen, log: Path, timeout: float = 400) -> str:
    try:
        process.wait(timeout=timeout)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    text = log.read_text()
    assert process.returncode == 0, text[-4000:]
    return text


def kill_and_resume(bundle_dir, configs, overrides, ckpt, prefix, max_epochs_key, rng, work: Path) -> dict:
    """The generic procedure of the module docstring; returns what the test asserts on."""
    first_log = work / f"{prefix}_first.log"
    process = run_bundle(bundle_dir, configs, {**overrides, max_epochs_key: 1000}, first_log)
    deadline = time.monotonic() + 400
    try:
        while not list_checkpoints(ckpt, prefix):
            assert process.poll() is None, f"ended before a checkpoint:\n{first_log.read_text()[-4000:]}"
            assert time.monotonic() < deadline, f"no checkpoint within 400 s:\n{first_log.read_text()[-3000:]}"
            time.sleep(0.05)
        delay = rng.uniform(0.0, 1.5)  # a random point after the first checkpoint (maybe inside the next save)
        time.sleep(delay)
        assert process.poll() is None, "the run ended before it was killed"
        os.kill(process.pid, signal.SIGKILL)
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
    assert process.returncode == -signal.SIGKILL
    saved_path = latest_checkpoint(ckpt, prefix)
    saved = checkpoint_epoch(saved_path)
    target = saved + 2
    second_log = work / f"{prefix}_second.log"
    log = finish(run_bundle(bundle_dir, configs, {**overrides, max_epochs_key: target}, second_log), second_log)
    state = torch.load(ckpt / f"{prefix}_epoch={target}.pt", map_location="cpu", weights_only=True)
    resumed = re.search(r"resumed from (\S+) \(epoch (\d+), iteration (\d+)\)", log)
    epochs = [int(m) for m in re.findall(r"Trainer - INFO - Epoch\[(\d+)\] Complete", log)]
    return {"saved": saved, "saved_path": saved_path, "target": target, "state": state, "resumed": resumed,
            "epochs": epochs, "delay": delay, "log": log}  # fmt: skip


def _vae_3d_chain(phantom_set: Path, work: Path, rng: random.Random) -> dict:
    from tools.prep import prepare_dataset

    crops = work / "crops"
    prepare_dataset(phantom_set, crops, mode="pancreas", out_shape=(16, 16, 16), hu_window=None)
    ckpt = work / "models"
    overrides = {"roi_size": [16, 16, 16], "strides": [2, 2], "channels": [4, 8], "latent_size": 8,
                 "dataset_dir": str(crops), "ckpt_dir": str(ckpt), "output_dir": str(work / "eval"),
                 "num_workers": 0, "batch_size": 2, "val_interval": 1000}  # fmt: skip
    return kill_and_resume(BUNDLES / "vae_ct", ["configs/train.json", "configs/train_3d.json"], overrides, ckpt,
                           "checkpoint", "max_epochs", rng, work)  # fmt: skip


LDM_NETS = {
    "image_size": [32, 32, 16],
    "autoencoder_def#channels": [8, 8, 8],
    "autoencoder_def#num_res_blocks": 1,
    "autoencoder_def#norm_num_groups": 4,
    "diffusion_def#channels": [8, 8, 16],
    "diffusion_def#num_head_channels": [0, 8, 8],
    "diffusion_def#num_res_blocks": 1,
    "diffusion_def#norm_num_groups": 4,
}


def _ldm_chain(phantom_set: Path, work: Path, rng: random.Random) -> dict:
    """train_autoencoder killed and resumed; then one diffusion epoch (ControlNet needs its UNet); then
    train_controlnet killed and resumed, all in one checkpoint folder as a user runs them."""
    from tools.prep import prepare_dataset

    full = work / "full"
    prepare_dataset(phantom_set, full, mode="full", hu_window=None)
    bundle = work / "ldm_abdomen"  # a copy: runs never write into the repository
    shutil.copytree(BUNDLES / "ldm_abdomen", bundle, ignore=shutil.ignore_patterns("__pycache__", "*.pt"))
    ckpt = work / "models"
    base = {**LDM_NETS, "train_batch_size": 2, "num_workers": 0, "val_interval": 1000, "scale_factor_samples": 2,
            "dataset_dir": str(full), "crop_mode": "full", "ckpt_dir": str(ckpt), "output_dir": str(work / "eval"),
            "bundle_root": str(bundle)}  # fmt: skip
    autoencoder = {"ae_patch_size": [16, 16, 16], "discriminator_def#channels": 4, "discriminator_def#num_layers_d": 2}
    results = {}
    results["ldm train_autoencoder"] = kill_and_resume(
        bundle, ["configs/train.json", "configs/train_autoencoder.json"], {**base, **autoencoder}, ckpt,
        "checkpoint_autoencoder", "train#trainer#max_epochs", rng, work,
    )  # fmt: skip
    log = work / "diffusion.log"
    finish(run_bundle(bundle, ["configs/train.json"], {**base, "train#trainer#max_epochs": 1}, log), log)
    controlnet = {**base, "conditioning_embedding_channels": [4, 8, 8]}
    results["ldm train_controlnet"] = kill_and_resume(
        bundle, ["configs/train.json", "configs/train_controlnet.json"], controlnet, ckpt, "checkpoint_controlnet",
        "train#trainer#max_epochs", rng, work,
    )  # fmt: skip
    return results


def _difftumor_chain(work: Path, rng: random.Random) -> dict:
    from tools.phantom import make_dataset

    data = work / "phantom"
    make_dataset(data, n_cases=4, seed=3, shape=(48, 48, 32), spacing=(4.0, 4.0, 4.0), tumor_fraction=0.5,
                 test_fraction=0.0, progress=False)  # fmt: skip
    ckpt = work / "models"
    tiny = {"autoencoder_def#channels": [4, 8, 8], "autoencoder_def#num_res_channels": [4, 8, 8],
            "autoencoder_def#num_embeddings": 32, "spacing": [4.0, 4.0, 4.0], "roi_size": [16, 16, 16],
            "train_batch_size": 1, "num_crops": 1, "num_workers": 0, "epoch_length": 2, "discriminator_start": 1,
            "val_fraction": 0.5, "val_interval": 1000, "discriminator_2d_def#channels": 4,
            "discriminator_3d_def#channels": 4, "discriminator_2d_def#num_layers_d": 2,
            "discriminator_3d_def#num_layers_d": 2, "dataset_dir": str(data), "ckpt_dir": str(ckpt),
            "output_dir": str(work / "eval")}  # fmt: skip
    bundle = BUNDLES / "difftumor"
    log = work / "stage1.log"
    finish(run_bundle(bundle, ["configs/train.json"], {**tiny, "max_epochs": 1}, log), log)  # the autoencoder
    stage2 = {**tiny, "diffusion_def#channels": [8, 8], "diffusion_def#attention_levels": [False, True],
              "diffusion_def#num_head_channels": 8, "diffusion_def#norm_num_groups": 4,
              "validate#dataset#data": "$[d for d in @datalist if d.get('has_tumor')][-1:]"}  # fmt: skip
    return kill_and_resume(bundle, ["configs/train.json", "configs/train_diffusion.json"], stage2, ckpt,
                           "diffusion_early_checkpoint", "max_epochs", rng, work)  # fmt: skip


@pytest.fixture(scope="module")
def killed_and_resumed(phantom_set, tmp_path_factory) -> dict:
    """The three chains in parallel threads: config name -> result (or the exception it raised)."""
    rng = {name: random.Random(f"{SEED}-{name}") for name in ("vae", "ldm", "dt")}
    jobs = {
        "vae_ct train_3d": lambda: {"vae_ct train_3d": _vae_3d_chain(phantom_set, tmp_path_factory.mktemp("v3"),
                                                                     rng["vae"])},
        "ldm": lambda: _ldm_chain(phantom_set, tmp_path_factory.mktemp("ldm"), rng["ldm"]),
        "difftumor train_diffusion": lambda: {
            "difftumor train_diffusion": _difftumor_chain(tmp_path_factory.mktemp("dt"), rng["dt"])},
    }  # fmt: skip
    results = {}
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        futures = {name: pool.submit(job) for name, job in jobs.items()}
        for name, future in futures.items():
            try:
                results.update(future.result())
            except Exception as error:  # reported by the test of that config
                results[name] = error
                if name == "ldm":
                    results["ldm train_autoencoder"] = results["ldm train_controlnet"] = error
    return results


@pytest.mark.slow
@pytest.mark.parametrize(
    "name", ["vae_ct train_3d", "ldm train_autoencoder", "ldm train_controlnet", "difftumor train_diffusion"]
)
def test_a_killed_training_resumes_from_its_last_checkpoint(killed_and_resumed, name):
    result = killed_and_resumed[name]
    if isinstance(result, BaseException):
        raise result
    saved, target, state = result["saved"], result["target"], result["state"]
    context = f"seed {SEED}, killed {result['delay']:.2f} s after the first checkpoint:\n{result['log'][-3000:]}"
    assert saved >= 1, context
    assert result["resumed"] and int(result["resumed"].group(2)) == saved, context  # from the checkpoint, not zero
    assert result["epochs"] == [saved + 1, saved + 2], context  # only the missing epochs ran
    trainer = state["trainer"]
    assert trainer["max_epochs"] == target and trainer["iteration"] == target * trainer["epoch_length"], context


# ----------------------------------------------------------------------------------------------------------------
# a kill inside a checkpoint save; a NaN loss


KILLED_SAVER = """
import sys, time, torch
sys.path.insert(0, {repo!r})
from tools.bundle_scripts import checkpointing

real_save = torch.save

def slow_save(obj, f, *args, **kwargs):  # writes the start of the file, then hangs: killed right there
    f.write(b"PK\\x03\\x04 half of a zip")
    f.flush()
    print("inside save", flush=True)
    time.sleep(600)

class Engine:
    class state:
        epoch = 3

net = torch.nn.Linear(2, 1)
saver = checkpointing.AtomicCheckpointSaver({ckpt!r}, {{"model": net}}, n_saved=1)
checkpointing.torch.save = slow_save
saver(Engine)
"""


def test_a_kill_inside_a_checkpoint_save_leaves_the_previous_one_loadable(tmp_path):
    """A real SIGKILL while ``torch.save`` is writing epoch 3: epoch 2 stays, the half-written temporary file is
    ignored by the loader and the resume, and the next save of epoch 3 succeeds."""
    net = torch.nn.Linear(2, 1)

    class Engine:
        class state:
            epoch = 2

    AtomicCheckpointSaver(tmp_path, {"model": net}, n_saved=1)(Engine)
    script = tmp_path / "killed_saver.py"
    script.write_text(KILLED_SAVER.format(repo=str(REPO), ckpt=str(tmp_path)))
    process = subprocess.Popen([PYTHON, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().strip() == "inside save"
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.endswith(".part")]
    assert leftovers, "the kill should leave the temporary file of the interrupted save"
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint_epoch=2.pt"]
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint_epoch=2.pt"
    state = torch.load(tmp_path / "checkpoint_epoch=2.pt", map_location="cpu", weights_only=True)
    assert torch.equal(state["model"]["weight"], net.weight)
    # even a truncated file under a final name (a copy interrupted by hand) is skipped in favour of the older one
    (tmp_path / "checkpoint_epoch=3.pt").write_bytes(b"PK\x03\x04 truncated")
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint_epoch=2.pt"
    (tmp_path / "checkpoint_epoch=3.pt").unlink()

    class Next:
        class state:
            epoch = 3

    AtomicCheckpointSaver(tmp_path, {"model": net}, n_saved=1)(Next)
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint_epoch=3.pt"


def test_a_nan_loss_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint(tmp_path):
    """A MONAI SupervisedTrainer with the vendored handlers: epoch 1 is saved, the loss turns NaN in epoch 2, the run
    fails naming the epoch and the kept checkpoint, and that checkpoint is untouched and loadable."""
    from monai.engines import SupervisedTrainer

    from tools.bundle_scripts.checkpointing import StopOnNonFiniteLoss

    net = torch.nn.Linear(3, 1)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    data = [{"image": torch.randn(2, 3), "label": torch.randn(2, 1)} for _ in range(2)]

    def loss(pred, label):
        value = torch.nn.functional.mse_loss(pred, label)
        return value * float("nan") if trainer.state.epoch >= 2 else value

    handlers = [AtomicCheckpointSaver(tmp_path, {"model": net, "optimizer": optimizer}), StopOnNonFiniteLoss(tmp_path)]
    trainer = SupervisedTrainer(torch.device("cpu"), 3, data, net, optimizer, loss, train_handlers=handlers)
    with pytest.raises(FloatingPointError, match=r"loss is nan at epoch 2, iteration 3; the last good checkpoint is"):
        trainer.run()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint_epoch=1.pt"]
    state = torch.load(tmp_path / "checkpoint_epoch=1.pt", map_location="cpu", weights_only=True)
    assert all(torch.isfinite(v).all() for v in state["model"].values())
