"""The vae_ct bundle (issue 5): harness, every training config, inference pairs, memorization check, resume, DDP.

Every test runs the bundle's own configs with overrides that shrink the networks (16x16 in-plane stacks of 4
slices, a few channels) on phantom sub-volumes made by ``tools.prep.prepare_dataset(mode="subvolumes")``, the same
way a GPU user runs them at full scale. Checkpoints and outputs go to temporary folders.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from tools.bundle_check import check_bundle, export_torchscript_and_compare, run_workflow, verify_network_in_out

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "vae_ct"
PYTHON = sys.executable

SIZE = [16, 16, 4]
TINY_NET = {
    "max_spacing_mm": 40.0,  # 16x16 sub-volumes of a whole slice have 26 mm voxels (the real 256x256 ones ~1.6 mm)
    "roi_size": SIZE,
    "strides": [[2, 2, 1], [2, 2, 1]],
    "channels": [4, 8],
    "latent_size": 8,
    "gan_channels": [8, 8, 4],
    "gan_strides": [[2, 2, 1], [2, 2, 1]],
    "_meta_#network_data_format#inputs#image#spatial_shape": SIZE,
    "_meta_#network_data_format#outputs#pred#spatial_shape": SIZE,
}
TINY_TRAIN = {
    "num_workers": 0,
    "batch_size": 2,
    "cache_rate": 1.0,
    "val_interval": 1,
    "max_epochs": 2,
    "disc_channels": 4,
    "disc_layers": 2,
    "adv_start_epoch": 1,
}
FAMILIES = {
    "vae": ["configs/train.json"],
    "vae_gan": ["configs/train.json", "configs/train_vaegan.json"],
    "gan": ["configs/train.json", "configs/train_gan.json"],
}
INFERENCE = {
    "vae": ["configs/inference.json"],
    "vae_gan": ["configs/inference.json", "configs/inference_vaegan.json"],
    "gan": ["configs/inference.json", "configs/inference_gan.json"],
}


def load_bundle_module(name: str):
    """A module of the bundle's ``scripts`` imported by file path (as the tools package would)."""
    spec = importlib.util.spec_from_file_location(f"vae_ct_{name}", BUNDLE / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def defined_in(configs: list[str], overrides: dict) -> dict:
    """The overrides whose top-level key one of ``configs`` defines: the command line refuses any other key (the
    tiny settings above hold the GAN and discriminator keys of every family)."""
    keys = set()
    for config in configs:
        keys |= set(json.loads((BUNDLE / config).read_text()))
    return {k: v for k, v in overrides.items() if k.split("#")[0] in keys}


def cli_overrides(overrides: dict) -> list[str]:
    """``--key value`` arguments of ``python -m monai.bundle run`` (values as JSON, read by fire)."""
    args = []
    for key, value in overrides.items():
        args += [f"--{key}", json.dumps(value) if not isinstance(value, str) else value]
    return args


@pytest.fixture(scope="module")
def phantom_cases(tmp_path_factory) -> Path:
    from tools.phantom import make_dataset

    out = tmp_path_factory.mktemp("vae_phantom")
    make_dataset(out, n_cases=4, seed=11, shape=(64, 64, 32), tumor_fraction=0.5, test_fraction=0.25, progress=False)
    return out


@pytest.fixture(scope="module")
def subvolumes(phantom_cases, tmp_path_factory) -> Path:
    """Seed-000 sub-volumes of the phantom in HU (4 slices, 16x16 in-plane) with a datalist (training / test)."""
    from tools.prep import prepare_dataset

    out = tmp_path_factory.mktemp("vae_subvolumes")
    prepare_dataset(
        phantom_cases, out, mode="subvolumes", size=(16, 16), hu_window=None, max_spacing_mm=TINY_NET["max_spacing_mm"]
    )
    datalist = json.loads((out / "dataset.json").read_text())
    assert datalist["training"] and datalist["test"], "the phantom gave no sub-volume with pancreas"
    return out


@pytest.fixture(scope="module")
def trained(subvolumes, tmp_path_factory) -> dict[str, Path]:
    """Each family trained for 2 epochs through run_workflow: family -> checkpoint folder."""
    folders = {}
    for family, configs in FAMILIES.items():
        ckpt = tmp_path_factory.mktemp(f"ckpt_{family}")
        overrides = {"dataset_dir": str(subvolumes), "ckpt_dir": str(ckpt), "output_dir": str(ckpt / "eval")}
        overrides.update({**TINY_NET, **TINY_TRAIN, "val_interval": 2})
        workflow = run_workflow(BUNDLE, configs, "train", overrides=overrides)
        assert workflow.parser.get_parsed_content("train#trainer").state.epoch == 2
        folders[family] = ckpt
    return folders


# ----------------------------------------------------------------------------------------------------------------
# acceptance 1: the harness, every training config and the inference run; the parameter count


@pytest.mark.slow
def test_bundle_passes_the_harness(subvolumes):
    summary = check_bundle(
        BUNDLE,
        overrides={**TINY_NET, "dataset_dir": str(subvolumes), "num_workers": 0},
        train_overrides={"max_epochs": 1},
        infer_overrides={"num_samples": 1},
        nets={"discriminator_def": None},  # a PatchDiscriminator returns a list of features: not an image->image net
    )
    assert summary.passed and summary.counts()["fail"] == 0
    names = [result.name for result in summary.results if result.status == "pass"]
    assert "TorchScript export: network_def" in names and "net in/out: network_def" in names


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_each_training_config_writes_resumable_checkpoints(trained, family):
    ckpt = trained[family]
    assert (ckpt / "model.pt").is_file()
    state = torch.load(ckpt / "checkpoint_epoch=2.pt", map_location="cpu", weights_only=True)
    assert state["trainer"]["iteration"] == 2 * state["trainer"]["epoch_length"]
    expected = {"model", "optimizer", "trainer"} | ({"discriminator", "d_optimizer"} if family != "vae" else set())
    assert set(state) == expected


@pytest.mark.slow
@pytest.mark.parametrize("family", ["vae", "gan"])
def test_a_non_finite_loss_stops_training_with_a_clear_error(subvolumes, tmp_path, family):
    overrides = {**TINY_NET, **TINY_TRAIN, "dataset_dir": str(subvolumes), "ckpt_dir": str(tmp_path)}
    overrides.update({"output_dir": str(tmp_path / "eval"), "learning_rate": 1e30})  # the weights blow up at once
    with pytest.raises(RuntimeError) as raised:  # MONAI wraps errors of a config expression in a RuntimeError
        run_workflow(BUNDLE, FAMILIES[family], "train", overrides=overrides, logging_file=False)
    cause = raised.value
    while cause.__cause__ is not None and not isinstance(cause, FloatingPointError):
        cause = cause.__cause__
    assert isinstance(cause, FloatingPointError), raised.value
    assert re.search(r"loss is (nan|inf|-inf) at epoch 1, iteration \d+", str(cause)), cause
    assert not (tmp_path / "model.pt").exists()


@pytest.mark.slow
def test_evaluate_reports_the_reconstruction_error_in_hu(trained, subvolumes, tmp_path):
    workflow = run_workflow(
        BUNDLE,
        ["configs/train.json", "configs/evaluate.json"],
        "train",
        overrides={**TINY_NET, **TINY_TRAIN, "dataset_dir": str(subvolumes), "ckpt_dir": str(trained["vae"]),
                   "output_dir": str(tmp_path)},
    )  # fmt: skip
    mae = workflow.parser.get_parsed_content("validate#evaluator").state.metrics["val_mae_hu"]
    assert 0 < mae < 2000  # HU over the [-1000, 1000] window: an error of more than the window is impossible
    assert (tmp_path / "metrics.csv").is_file()


def _network_arguments(config_files: list[str], overrides: dict | None = None) -> dict:
    """The resolved arguments of ``network_def`` in the merged configs (nothing is instantiated)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(BUNDLE / name) for name in config_files])
    for key, value in (overrides or {}).items():
        parser[key] = value
    names = [key for key in parser["network_def"] if key != "_target_"]
    return {name: parser.get_parsed_content(f"network_def#{name}") for name in names}


def test_default_vae_has_about_66_million_parameters():
    networks = load_bundle_module("networks")
    with torch.device("meta"):  # no memory, no time: parameters are only counted
        vae = networks.ConditionalVAE(**_network_arguments(["configs/train.json"]))
        sampler = networks.ConditionalVAESampler(**_network_arguments(["configs/inference.json"]))
        gan_configs = ["configs/train.json", "configs/train_gan.json"]
        gan = networks.MaskConditionedGenerator(**_network_arguments(gan_configs))
        seed_scale = {"gan_channels": [2560, 2560, 2048, 1536, 1024, 512, 256, 128, 64]}  # the docs' switch
        gan_seed_scale = networks.MaskConditionedGenerator(**_network_arguments(gan_configs, seed_scale))
    n_vae = networks.count_parameters(vae)
    assert abs(n_vae - 66e6) <= 0.1 * 66e6, f"default VAE has {n_vae / 1e6:.1f} M parameters, seed 000: about 66 M"
    assert networks.count_parameters(sampler) == n_vae  # inference builds the same network
    assert abs(networks.count_parameters(gan) - 66e6) <= 0.1 * 66e6  # the documented default: the VAE's scale
    assert abs(networks.count_parameters(gan_seed_scale) - 456e6) <= 0.1 * 456e6  # seed 000's GAN scale


# ----------------------------------------------------------------------------------------------------------------
# acceptance 3: generated pairs have the mask's geometry, HU values, the mask as label, provenance and seeds


def _run_inference(family, trained, masks_dir, out, extra=None):
    overrides = {
        **TINY_NET,
        "dataset_dir": str(masks_dir),
        "ckpt_dir": str(trained[family]),
        "output_dir": str(out),
        "num_samples": 2,
        **(extra or {}),
    }
    return run_workflow(BUNDLE, INFERENCE[family], "infer", overrides=overrides)


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_generated_pairs_keep_the_mask_geometry_hu_and_label(trained, subvolumes, tmp_path, family):
    _run_inference(family, trained, subvolumes, tmp_path)
    datalist = json.loads((tmp_path / "datalist.json").read_text())
    masks = json.loads((subvolumes / "dataset.json").read_text())["training"]
    assert len(datalist["training"]) == 2 * len(masks)
    checkpoint_sha = load_bundle_module("provenance").sha256_file(trained[family] / "model.pt")
    for entry in datalist["training"]:
        image = nib.load(tmp_path / entry["image"])
        label = nib.load(tmp_path / entry["label"])
        mask = nib.load(entry["source_mask"])
        assert image.shape == label.shape == mask.shape
        np.testing.assert_allclose(image.affine, mask.affine, atol=1e-5)
        np.testing.assert_allclose(label.affine, mask.affine, atol=1e-5)
        np.testing.assert_array_equal(np.asarray(label.dataobj), np.asarray(mask.dataobj))
        values = np.asarray(image.dataobj)
        assert values.min() >= -1024 and values.max() <= 3071 and values.std() > 0
        assert image.header["descrip"].tobytes().startswith(b"SYNTHETIC vae_ct")
        sidecar = json.loads((tmp_path / entry["image"].replace(".nii.gz", ".json")).read_text())
        assert sidecar["synthetic"] is True and sidecar["checkpoint_sha256"] == checkpoint_sha
        assert sidecar["version"] == json.loads((BUNDLE / "configs" / "metadata.json").read_text())["version"]
        assert sidecar["seed"] == 100_000 * sidecar["mask_index"] + sidecar["sample"]  # the documented seed, seed=0
        assert sidecar["precision"] == "fp32" and sidecar["precision_details"]["requested"] == "fp32"  # the default
    first, second = datalist["training"][0], datalist["training"][1]
    assert not np.array_equal(
        np.asarray(nib.load(tmp_path / first["image"]).dataobj),
        np.asarray(nib.load(tmp_path / second["image"]).dataobj),
    ), "two samples of one mask are identical: the noise does not reach the image"


@pytest.mark.slow
def test_inference_is_reproducible_and_resizes_back_to_other_mask_grids(trained, phantom_cases, tmp_path):
    """Masks of another in-plane size (24x24) are generated at 16x16 and written back on their own 24x24 grid; a
    rerun writes the same voxels (sample k of mask m always uses the same seed)."""
    from tools.prep import prepare_dataset

    masks = tmp_path / "masks24"
    prepare_dataset(phantom_cases, masks, mode="subvolumes", size=(24, 24), hu_window=None, sections=["test"])
    runs = []
    for name in ("first", "again"):
        _run_inference("vae", trained, masks, tmp_path / name, {"datalist_key": "test", "num_samples": 1})
        runs.append(json.loads((tmp_path / name / "datalist.json").read_text())["training"])
    assert runs[0] and [e["image"] for e in runs[0]] == [e["image"] for e in runs[1]]
    for entry in runs[0]:
        image = nib.load(tmp_path / "first" / entry["image"])
        mask = nib.load(entry["source_mask"])
        assert image.shape == mask.shape == (24, 24, 4)
        np.testing.assert_allclose(image.affine, mask.affine, atol=1e-5)
        again = nib.load(tmp_path / "again" / entry["image"])
        np.testing.assert_array_equal(np.asarray(image.dataobj), np.asarray(again.dataobj))


# ----------------------------------------------------------------------------------------------------------------
# precision (issue 16): one switch, recorded in the training folder and in every synthetic file


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_bf16_training_records_its_precision_and_saves_the_bare_network(
    subvolumes, tmp_path, family, reference_bf16_convolutions
):
    """``precision bf16`` trains (emulated and slow on a CPU without AVX512-BF16: tiny sizes), writes
    ``precision.json``, saves weights that load into the bare ``network_def``, and its samples say bf16."""
    ckpt = tmp_path / "models"
    overrides = {**TINY_NET, **TINY_TRAIN, "max_epochs": 1, "precision": "bf16", "dataset_dir": str(subvolumes)}
    overrides.update({"ckpt_dir": str(ckpt), "output_dir": str(tmp_path / "eval")})
    workflow = run_workflow(BUNDLE, FAMILIES[family], "train", overrides=overrides)
    trainer = workflow.parser.get_parsed_content("train#trainer")
    assert trainer.state.epoch == 1
    if family == "vae":  # MONAI's SupervisedTrainer calls the wrapped network, whose forward autocasts
        assert type(workflow.parser.get_parsed_content("network")).__name__ == "AutocastNetwork"
    else:  # the adversarial trainer autocasts both networks itself
        with trainer._autocast(trainer):
            assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    record = json.loads((ckpt / "precision.json").read_text())
    assert record["precision"] == "bf16" and record["requested"] == "bf16" and record["runs"][0]["epoch"] == 0
    networks = load_bundle_module("networks")
    target = json.loads((BUNDLE / FAMILIES[family][-1]).read_text()).get("network_def", {}).get("_target_")
    target = (target or "scripts.networks.ConditionalVAE").rsplit(".", 1)[-1]
    sizes = {key: value for key, value in TINY_NET.items() if not key.startswith("_meta_")}
    bare = getattr(networks, target)(**_network_arguments(FAMILIES[family], sizes))
    weights = torch.load(ckpt / "model.pt", map_location="cpu", weights_only=True)
    assert set(weights) == set(bare.state_dict())  # no wrapper prefix in the checkpoint
    bare.load_state_dict(weights, strict=True)
    _run_inference(family, {family: ckpt}, subvolumes, tmp_path / "synthetic", {"num_samples": 1, "precision": "bf16"})
    sidecars = [json.loads(p.read_text()) for p in (tmp_path / "synthetic").glob("*_image.json")]
    assert sidecars and all(
        s["precision"] == "bf16" and s["precision_details"]["precision"] == "bf16" for s in sidecars
    )


def test_sample_seeds_follow_the_documented_rule():
    inference = load_bundle_module("inference")
    items = inference.expand_samples([{"label": "a.nii.gz"}, "b.nii.gz"], num_samples=3, seed=7)
    assert [item["seed"] for item in items] == [7, 8, 9, 100_007, 100_008, 100_009]
    assert [item["name"] for item in items][:2] == ["a_s000", "a_s001"]
    noise = inference.SeededNoised([5])
    np.testing.assert_array_equal(noise({"seed": 8})["noise"], noise({"seed": 8})["noise"])
    assert not torch.equal(noise({"seed": 8})["noise"], noise({"seed": 9})["noise"])


@pytest.mark.slow
def test_gan_generator_passes_the_network_checks(subvolumes):
    overrides = {**TINY_NET, "dataset_dir": str(subvolumes)}
    shape = verify_network_in_out(BUNDLE, "network_def", INFERENCE["gan"], overrides)
    assert shape == (1, 1, *SIZE)
    export = export_torchscript_and_compare(BUNDLE, config_file=INFERENCE["gan"], overrides=overrides)
    assert export.output_shapes == [(1, 1, *SIZE)]


def test_discriminator_output_matches_its_data_format():
    """The full-size patch discriminator maps a (CT, label) pair of 256x256x4 to the metadata's patch grid."""
    from monai.bundle import ConfigParser
    from monai.networks.nets import PatchDiscriminator

    parser = ConfigParser()
    parser.read_config([str(BUNDLE / "configs" / name) for name in ("train.json", "train_vaegan.json")])
    parser.read_meta(str(BUNDLE / "configs" / "metadata.json"))
    data_format = parser.get("_meta_#discriminator_data_format")
    names = [key for key in parser["discriminator_def"] if key != "_target_"]
    arguments = {name: parser.get_parsed_content(f"discriminator_def#{name}") for name in names}
    discriminator = PatchDiscriminator(**arguments).eval()
    image = data_format["inputs"]["image"]
    with torch.no_grad():
        logits = discriminator(torch.zeros(1, image["num_channels"], *image["spatial_shape"]))[-1]
    pred = data_format["outputs"]["pred"]
    assert tuple(logits.shape) == (1, pred["num_channels"], *pred["spatial_shape"])


# ----------------------------------------------------------------------------------------------------------------
# acceptance 4: memorization check


def test_memorization_check_flags_an_exact_copy_and_not_a_different_image(phantom_cases, tmp_path, capsys):
    from tools.prep import prepare_dataset

    memorization = load_bundle_module("memorization")
    stacks = tmp_path / "stacks32"  # 32x32 in-plane: enough anatomy for a similarity to mean something
    prepare_dataset(phantom_cases, stacks, mode="subvolumes", size=(32, 32), hu_window=None)
    datalist = json.loads((stacks / "dataset.json").read_text())
    training = [str(stacks / e["image"]) for e in datalist["training"]]
    copy = tmp_path / "copy_image.nii.gz"
    source = nib.load(training[0])
    nib.save(nib.Nifti1Image(np.asarray(source.dataobj), source.affine), copy)
    other = str(stacks / datalist["test"][0]["image"])  # a held-out patient
    report = memorization.check_memorization([str(copy), other], stacks / "dataset.json")
    copied, different = report["results"]
    assert copied["near_copy"] and copied["ncc"] > 0.999 and copied["nearest"] == training[0]
    assert copied["mae_hu"] < 1e-3
    assert not different["near_copy"] and different["ncc"] < report["threshold"], different
    assert "NEAR-COPY" in capsys.readouterr().out


@pytest.mark.slow
def test_memorization_runs_as_a_bundle_config(trained, subvolumes, tmp_path):
    _run_inference("vae", trained, subvolumes, tmp_path, {"num_samples": 1})
    run_workflow(
        BUNDLE,
        "configs/memorization.json",
        "infer",
        overrides={"output_dir": str(tmp_path), "dataset_dir": str(subvolumes)},
        logging_file=False,
    )
    report = json.loads((tmp_path / "memorization.json").read_text())
    assert report["n_samples"] == len(json.loads((subvolumes / "dataset.json").read_text())["training"])
    assert all(-1 <= r["ncc"] <= 1 for r in report["results"])


# ----------------------------------------------------------------------------------------------------------------
# acceptance 5: a run killed with SIGKILL after a checkpoint continues from the saved epoch, for each config


@pytest.fixture(scope="module")
def killed_runs(subvolumes, tmp_path_factory) -> dict[str, tuple[Path, int, str]]:
    """Each family started as ``python -m monai.bundle run`` (all three at once, to share the start-up time) and
    killed with SIGKILL once ``checkpoint_epoch=2.pt`` exists: family -> (checkpoint folder, epoch, log)."""
    runs = {}
    for family, configs in FAMILIES.items():
        ckpt = tmp_path_factory.mktemp(f"killed_{family}")
        overrides = {**TINY_NET, **TINY_TRAIN, "max_epochs": 100000, "val_interval": 1000}
        overrides.update({"dataset_dir": str(subvolumes), "ckpt_dir": str(ckpt), "output_dir": str(ckpt / "eval")})
        del overrides["_meta_#network_data_format#inputs#image#spatial_shape"]
        del overrides["_meta_#network_data_format#outputs#pred#spatial_shape"]
        overrides = defined_in(configs, overrides)
        command = [PYTHON, "-m", "monai.bundle", "run", "--config_file", json.dumps(configs)]
        log = open(ckpt / "run.log", "w")
        process = subprocess.Popen(
            command + cli_overrides(overrides), cwd=BUNDLE, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        runs[family] = (ckpt, process, log)
    results = {}
    deadline = time.monotonic() + 300  # generous: the three runs import torch and MONAI at the same time
    try:
        while len(results) < len(runs) and time.monotonic() < deadline:
            for family, (ckpt, process, log) in runs.items():
                if family in results:
                    continue
                if (ckpt / "checkpoint_epoch=2.pt").is_file():
                    os.kill(process.pid, signal.SIGKILL)
                    process.wait()
                    log.close()
                    epochs = sorted(int(p.stem.split("=")[1]) for p in ckpt.glob("checkpoint_epoch=*.pt"))
                    results[family] = (ckpt, epochs[-1], (ckpt / "run.log").read_text())
                elif process.poll() is not None:
                    log.close()
                    pytest.fail(f"{family}: the run ended before it was killed:\n{(ckpt / 'run.log').read_text()}")
            time.sleep(0.05)
    finally:
        for family, (_, process, log) in runs.items():
            if process.poll() is None:
                os.kill(process.pid, signal.SIGKILL)
                process.wait()
            log.close()
    missing = sorted(set(runs) - set(results))
    assert not missing, f"no checkpoint within 300 s for {missing}"
    return results


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_killed_run_resumes_from_its_last_checkpoint(killed_runs, subvolumes, family, caplog):
    ckpt, saved_epoch, log = killed_runs[family]
    assert saved_epoch >= 2 and "Engine run finished" not in log
    target = saved_epoch + 2
    overrides = {**TINY_NET, **TINY_TRAIN, "max_epochs": target, "val_interval": 1000}
    overrides.update({"dataset_dir": str(subvolumes), "ckpt_dir": str(ckpt), "output_dir": str(ckpt / "eval")})
    with caplog.at_level("INFO"):
        workflow = run_workflow(BUNDLE, FAMILIES[family], "train", overrides=overrides, logging_file=False)
    trainer = workflow.parser.get_parsed_content("train#trainer")
    resume = workflow.parser.get_parsed_content("train#handlers")[0]
    assert resume.resumed_from == ckpt / f"checkpoint_epoch={saved_epoch}.pt"
    trainer_epochs = [
        int(m.group(1))
        for record in caplog.records
        if "Trainer" in record.name and (m := re.search(r"Epoch\[(\d+)\] Complete", record.getMessage()))
    ]
    assert trainer_epochs == [saved_epoch + 1, saved_epoch + 2], trainer_epochs
    assert trainer.state.epoch == target and trainer.state.iteration == target * trainer.state.epoch_length
    state = torch.load(ckpt / f"checkpoint_epoch={target}.pt", map_location="cpu", weights_only=True)
    assert state["trainer"]["iteration"] == target * state["trainer"]["epoch_length"]


# ----------------------------------------------------------------------------------------------------------------
# DDP: the multi-GPU overlay on CPU (gloo), two processes


@pytest.mark.slow
def test_ddp_training_on_cpu_with_two_processes(subvolumes, tmp_path):
    """The multi-GPU overlay under torchrun with 2 CPU processes (gloo), for the VAE (MONAI's SupervisedTrainer) and
    the VAE-GAN (the bundle's adversarial trainer, generator and discriminator both DistributedDataParallel); the two
    runs start together to share the start-up time."""
    runs = {}
    for family in ("vae", "vae_gan"):
        ckpt = tmp_path / family
        configs = FAMILIES[family] + ["configs/multi_gpu_train.json"]
        overrides = {k: v for k, v in {**TINY_NET, **TINY_TRAIN}.items() if not k.startswith("_meta_")}
        overrides.update({"dataset_dir": str(subvolumes), "ckpt_dir": str(ckpt), "output_dir": str(ckpt / "eval")})
        command = [PYTHON, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", "-m", "monai.bundle"]
        command += ["run", "--config_file", json.dumps(configs)] + cli_overrides(defined_in(configs, overrides))
        ckpt.mkdir()
        with open(ckpt / "run.log", "w") as log:
            runs[family] = (ckpt, subprocess.Popen(command, cwd=BUNDLE, stdout=log, stderr=subprocess.STDOUT))
    for family, (ckpt, process) in runs.items():
        process.wait(timeout=400)
        assert process.returncode == 0, f"{family}:\n" + (ckpt / "run.log").read_text()[-4000:]
        assert (ckpt / "model.pt").is_file() and (ckpt / "checkpoint_epoch=2.pt").is_file()
        state = torch.load(ckpt / "checkpoint_epoch=2.pt", map_location="cpu", weights_only=True)
        assert state["trainer"]["iteration"] == 2 * state["trainer"]["epoch_length"]
        for network in ("model", "discriminator") if family == "vae_gan" else ("model",):
            assert not any(key.startswith("module.") for key in state[network])  # saved unwrapped for inference


# ----------------------------------------------------------------------------------------------------------------
# 3D crops


@pytest.mark.slow
def test_3d_crop_config_trains_and_generates(phantom_cases, tmp_path):
    from tools.prep import prepare_dataset

    crops = tmp_path / "crops"
    prepare_dataset(phantom_cases, crops, mode="pancreas", out_shape=(16, 16, 16), hu_window=None)
    cube = [16, 16, 16]
    tiny_3d = {
        "roi_size": cube,
        "strides": [2, 2],
        "channels": [4, 8],
        "latent_size": 8,
        "dataset_dir": str(crops),
        "ckpt_dir": str(tmp_path / "models"),
        "output_dir": str(tmp_path / "eval"),
    }
    run_workflow(BUNDLE, ["configs/train.json", "configs/train_3d.json"], "train", overrides={**TINY_TRAIN, **tiny_3d})
    tiny_3d.update({"num_samples": 1, "datalist_key": "test"})  # the weights: model.pt of the same ckpt_dir
    run_workflow(BUNDLE, ["configs/inference.json", "configs/inference_3d.json"], "infer", overrides=tiny_3d)
    entries = json.loads((tmp_path / "eval" / "datalist.json").read_text())["training"]
    assert entries
    for entry in entries:
        image = nib.load(tmp_path / "eval" / entry["image"])
        assert image.shape == nib.load(entry["source_mask"]).shape == (16, 16, 16)
