"""The difftumor bundle (issue 4): harness, both training stages, evaluation and synthesis configs, the real-CT
insertion, the online transform (seeds, seg_unet3d's input format, DataLoader workers), DDP and kill-and-resume.

Every workflow runs the bundle's own configs with overrides that shrink the networks (a 4-8-8 VQVAE with 32 codes,
an 8-8 diffusion U-Net, 16^3 crops at 4 mm) on a small phantom set, the way a GPU user runs them at full scale.
Without trained weights the synthesis runs with random weights: these tests check geometry, blending, labels and
provenance, not realism. Checkpoints and outputs go to temporary folders.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from tools.bundle_check import check_bundle, run_workflow

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "difftumor"
SEG_BUNDLE = REPO / "bundles" / "seg_unet3d"
PYTHON = sys.executable
ALIAS = "difftumor_scripts"

TINY_AE = {
    "autoencoder_def#channels": [4, 8, 8],
    "autoencoder_def#num_res_channels": [4, 8, 8],
    "autoencoder_def#num_embeddings": 32,
}
TINY_DIFFUSION = {
    "diffusion_def#channels": [8, 8],
    "diffusion_def#attention_levels": [False, True],
    "diffusion_def#num_head_channels": 8,
    "diffusion_def#norm_num_groups": 4,
}
TINY_TRAIN = {
    **TINY_AE,
    "spacing": [4.0, 4.0, 4.0],
    "roi_size": [16, 16, 16],
    "train_batch_size": 1,
    "num_crops": 1,
    "num_workers": 0,
    "epoch_length": 2,
    "max_epochs": 1,
    "discriminator_start": 1,
    "val_fraction": 0.5,
    "discriminator_2d_def#channels": 4,
    "discriminator_3d_def#channels": 4,
    "discriminator_2d_def#num_layers_d": 2,
    "discriminator_3d_def#num_layers_d": 2,
}
TINY_STAGE2 = {
    **TINY_TRAIN,
    **TINY_DIFFUSION,
    "validate#dataset#data": "$[d for d in @datalist if d.get('has_tumor')][-1:]",
}
TINY_INFER = {
    **TINY_AE,
    **TINY_DIFFUSION,
    "crop_size": 16,
    "size_multiple": 16,
    "model_spacing": [4.0, 4.0, 4.0],
    "late_inference_steps": 5,
}
FAMILY_ARGS = {  # the tiny networks as argument dicts: built lazily in each process
    "autoencoder": {"channels": [4, 8, 8], "num_res_channels": [4, 8, 8], "num_embeddings": 32},
    "diffusion_early": {"channels": [8, 8], "attention_levels": [False, True], "num_head_channels": 8,
                        "norm_num_groups": 4},  # fmt: skip
    "diffusion_late": {"channels": [8, 8], "attention_levels": [False, True], "num_head_channels": 8,
                       "norm_num_groups": 4},  # fmt: skip
    "allow_random_weights": True,
    "crop_size": 16,
    "size_multiple": 16,
    "model_spacing": [4.0, 4.0, 4.0],
    "late_inference_steps": 5,
}


def bundle_module(name: str):
    """``scripts.<name>`` of the bundle imported as ``difftumor_scripts.<name>`` (how tools load it)."""
    if ALIAS not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            ALIAS, BUNDLE / "scripts" / "__init__.py", submodule_search_locations=[str(BUNDLE / "scripts")]
        )
        package = importlib.util.module_from_spec(spec)
        sys.modules[ALIAS] = package
        spec.loader.exec_module(package)
    return importlib.import_module(f"{ALIAS}.{name}")


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The small networks of these tests run faster on one thread (two threads mostly wait on each other)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def dt_phantom(tmp_path_factory) -> Path:
    """4 phantom patients at 4 mm: cases 0 and 1 healthy, 2 and 3 with a tumor."""
    from tools.phantom import make_dataset

    out = tmp_path_factory.mktemp("difftumor_phantom")
    make_dataset(out, n_cases=4, seed=3, shape=(48, 48, 32), spacing=(4.0, 4.0, 4.0), tumor_fraction=0.5,
                 test_fraction=0.0, progress=False)  # fmt: skip
    records = json.loads((out / "dataset.json").read_text())["training"]
    assert [r["has_tumor"] for r in records] == [False, False, True, True]
    return out


@pytest.fixture(scope="module")
def trained(dt_phantom, tmp_path_factory) -> dict:
    """Stage 1 then stage 2 trained one tiny epoch each into one checkpoint folder."""
    ckpt = tmp_path_factory.mktemp("difftumor_models")
    common = {"dataset_dir": str(dt_phantom), "ckpt_dir": str(ckpt), "output_dir": str(ckpt / "eval")}
    stage1 = run_workflow(BUNDLE, "configs/train.json", "train", overrides={**TINY_TRAIN, **common})
    stage2 = run_workflow(
        BUNDLE, ["configs/train.json", "configs/train_diffusion.json"], "train", overrides={**TINY_STAGE2, **common}
    )
    return {"ckpt": ckpt, "stage1": stage1, "stage2": stage2, "common": common}


def load(path) -> tuple[np.ndarray, np.ndarray, nib.Nifti1Image]:
    image = nib.load(str(path))
    return np.asanyarray(image.dataobj), image.affine, image


def dilated(mask: np.ndarray, affine: np.ndarray, radius_mm: float) -> np.ndarray:
    return bundle_module("synthesis").dilate_mm(mask, affine, radius_mm)


# ----------------------------------------------------------------------------------------------------------------
# acceptance 1: the configs run and pass the harness


@pytest.mark.slow
def test_harness_passes(dt_phantom):
    summary = check_bundle(
        BUNDLE,
        overrides={**TINY_AE, "dataset_dir": str(dt_phantom)},
        train_overrides={k: v for k, v in TINY_TRAIN.items() if k not in TINY_AE},
        infer_overrides=TINY_DIFFUSION,
        nets={"diffusion_def": {"data_format": "diffusion_data_format",
                                "extra_forward_args": {"timesteps": torch.tensor([1])}}},  # fmt: skip
        export={"use_trace": True},
    )
    assert summary.passed and summary.counts()["fail"] == 0
    names = [result.name for result in summary.results]
    assert "net in/out: diffusion_def" in names and "TorchScript export: network_def" in names


def test_reference_scale_networks_match_the_spec():
    """The configs' networks at full scale: VQVAE 16-32-64, 4x down, 16384 x 8 EMA codebook (0.99, 0.25);
    DiffusionModelUNet 17 -> 8; and the defaults of the online transform are the same networks."""
    from monai.bundle import ConfigParser

    synthesis = bundle_module("synthesis")
    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "configs" / "inference.json"))
    for key, defaults in (("autoencoder_def", synthesis.DEFAULT_AUTOENCODER_ARGS),
                          ("diffusion_def", synthesis.DEFAULT_DIFFUSION_ARGS)):  # fmt: skip
        config = {k: v for k, v in parser[key].items() if k != "_target_"}
        assert config == defaults, key
    autoencoder = bundle_module("networks").DiffTumorVQVAE(**synthesis.DEFAULT_AUTOENCODER_ARGS)
    quantizer = autoencoder.quantizer.quantizer
    assert (quantizer.num_embeddings, quantizer.embedding_dim, quantizer.decay, quantizer.commitment_cost) == (
        16384, 8, 0.99, 0.25)  # fmt: skip
    with torch.no_grad():
        assert autoencoder.encode(torch.zeros(1, 1, 32, 32, 32)).shape == (1, 8, 8, 8, 8)  # 4x downsampling
    train = ConfigParser()
    train.read_config([str(BUNDLE / "configs" / "train.json"), str(BUNDLE / "configs" / "train_diffusion.json")])
    assert train["diffusion_def"] == parser["diffusion_def"] and train["autoencoder_def"] == parser["autoencoder_def"]
    assert train["noise_scheduler"]["schedule"] == "cosine" and train["num_train_timesteps"] == 4


@pytest.mark.slow
def test_stage1_trains_the_autoencoder_against_both_discriminators(trained):
    output = trained["stage1"].trainer.state.output
    assert output["discriminator_loss"] > 0 and output["feature_matching_loss"] > 0  # adversarial part is on
    assert output["generator_loss"] != 0 and torch.isfinite(output["loss"])
    assert output["quantization_loss"] > 0
    weights = torch.load(trained["ckpt"] / "autoencoder.pt", map_location="cpu", weights_only=True)
    assert "quantizer.quantizer.embedding.weight" in weights and not any(k.startswith("module.") for k in weights)
    checkpoint = torch.load(trained["ckpt"] / "autoencoder_checkpoint_epoch=1.pt", weights_only=True)
    assert {"model", "optimizer", "discriminator_2d", "discriminator_3d", "d_optimizer", "trainer"} <= set(checkpoint)


def test_discriminators_start_after_the_configured_step():
    engines = bundle_module("engines")
    trainer = engines.VQGANTrainer.__new__(engines.VQGANTrainer)
    trainer.discriminator_start = 10000
    assert not trainer.adversarial_active(10000) and trainer.adversarial_active(10001)  # 1-based iterations


@pytest.mark.slow
def test_stage2_trains_the_diffusion_model_with_ema_weights(trained):
    ckpt = trained["ckpt"]
    final = torch.load(ckpt / "diffusion_early.pt", map_location="cpu", weights_only=True)
    ema = trained["stage2"].parser.get_parsed_content("ema").ema_model.state_dict()
    assert final.keys() == ema.keys() and all(torch.equal(final[k], ema[k]) for k in final)
    checkpoint = torch.load(ckpt / "diffusion_early_checkpoint_epoch=1.pt", weights_only=True)
    assert {"model", "ema_model", "optimizer", "trainer"} <= set(checkpoint)
    metrics = trained["stage2"].parser.get_parsed_content("validate#evaluator").state.metrics
    assert np.isfinite(metrics["val_noise_l1"])
    assert final["conv_in.conv.weight"].shape[1] == 17 and final["out.2.conv.weight"].shape[0] == 8


@pytest.mark.slow
def test_evaluate_reports_reconstruction_metrics(trained, tmp_path):
    overrides = {**TINY_TRAIN, **trained["common"], "output_dir": str(tmp_path)}
    workflow = run_workflow(BUNDLE, ["configs/train.json", "configs/evaluate.json"], "train", overrides=overrides)
    metrics = workflow.parser.get_parsed_content("validate#evaluator").state.metrics
    assert np.isfinite(metrics["val_psnr"]) and np.isfinite(metrics["val_mae"])
    assert (tmp_path / "val_psnr_raw.csv").is_file() and (tmp_path / "metrics.csv").is_file()


@pytest.mark.slow
def test_inference_writes_synthetic_pairs_for_the_healthy_cases(trained, dt_phantom, tmp_path):
    every_case = "$[{'image': d['image'], 'organ': d['label']} for d in " + (
        "monai.data.load_decathlon_datalist(@data_list_file_path, True, 'training')]"
    )  # the tumor cases too: recognised by their label 2 and not written
    overrides = {**TINY_INFER, "dataset_dir": str(dt_phantom), "ckpt_dir": str(trained["ckpt"]),
                 "output_dir": str(tmp_path), "tumor_type": "small", "datalist": every_case}  # fmt: skip
    run_workflow(BUNDLE, "configs/inference.json", "infer", overrides=overrides)
    written = sorted(p.name for p in tmp_path.glob("*.nii.gz"))
    assert written == [f"phantom_00{i}_synthetic_{k}.nii.gz" for i in (0, 1) for k in ("ct", "label")]  # healthy only
    for case in ("phantom_000", "phantom_001"):
        source, affine, _ = load(dt_phantom / "imagesTr" / f"{case}.nii.gz")
        ct, ct_affine, ct_image = load(tmp_path / f"{case}_synthetic_ct.nii.gz")
        label, _, _ = load(tmp_path / f"{case}_synthetic_label.nii.gz")
        original_label, _, _ = load(dt_phantom / "labelsTr" / f"{case}.nii.gz")
        assert np.allclose(ct_affine, affine) and ct.dtype == np.int16
        tumor = label == 2
        assert tumor.any() and np.array_equal(label > 0, original_label > 0)  # tumor inside the pancreas
        outside = ~dilated(tumor, affine, 3.0)
        assert np.array_equal(ct[outside], source[outside])
        assert ct_image.header["descrip"].tobytes().startswith(b"SYNTHETIC difftumor 0.1.0 seed=")
        sidecar = json.loads((tmp_path / f"{case}_synthetic_ct.json").read_text())
        assert sidecar["checkpoint_sha256"]["autoencoder"] == bundle_module("provenance").sha256_file(
            trained["ckpt"] / "autoencoder.pt"
        )
        assert sidecar["weights"]["autoencoder"].endswith("autoencoder.pt") and sidecar["tumor_class"] == "small"
        assert sidecar["precision"] == "fp32" and sidecar["precision_details"]["requested"] == "fp32"  # the default


# ----------------------------------------------------------------------------------------------------------------
# precision (issue 16): one switch, recorded in the training folder and in every synthetic file


@pytest.mark.slow
def test_bf16_training_of_both_stages_records_its_precision_and_saves_bare_networks(
    dt_phantom, tmp_path, reference_bf16_convolutions
):
    """Both stages trained with ``precision bf16`` (emulated and slow on a CPU without AVX512-BF16: tiny sizes):
    ``precision.json`` lists both starts, the weights load into the bare networks, and bf16 synthesis says so."""
    from monai.networks.nets import DiffusionModelUNet

    ckpt = tmp_path / "models"
    common = {"dataset_dir": str(dt_phantom), "ckpt_dir": str(ckpt), "output_dir": str(tmp_path / "eval"),
              "precision": "bf16"}  # fmt: skip
    for configs, sizes in ((["configs/train.json"], TINY_TRAIN),
                           (["configs/train.json", "configs/train_diffusion.json"], TINY_STAGE2)):  # fmt: skip
        workflow = run_workflow(BUNDLE, configs, "train", overrides={**sizes, **common})
        assert np.isfinite(float(workflow.trainer.state.output["loss"].detach()))
        network = workflow.parser.get_parsed_content("network")
        assert type(network).__name__ == "AutocastNetwork" and network.dtype == torch.bfloat16
    record = json.loads((ckpt / "precision.json").read_text())
    assert record["precision"] == "bf16" and [run["precision"] for run in record["runs"]] == ["bf16", "bf16"]
    synthesis, networks = bundle_module("synthesis"), bundle_module("networks")
    bare = {
        "autoencoder.pt": networks.DiffTumorVQVAE(
            **{**synthesis.DEFAULT_AUTOENCODER_ARGS, **FAMILY_ARGS["autoencoder"]}
        ),
        "diffusion_early.pt": DiffusionModelUNet(
            **{**synthesis.DEFAULT_DIFFUSION_ARGS, **FAMILY_ARGS["diffusion_early"]}
        ),
    }
    for file, network in bare.items():
        weights = torch.load(ckpt / file, map_location="cpu", weights_only=True)
        assert set(weights) == set(network.state_dict()), file  # no wrapper prefix in the checkpoint
        network.load_state_dict(weights, strict=True)
    out = tmp_path / "synthetic"
    overrides = {**TINY_INFER, "dataset_dir": str(dt_phantom), "ckpt_dir": str(ckpt), "output_dir": str(out),
                 "tumor_type": "tiny", "precision": "bf16"}  # fmt: skip
    run_workflow(BUNDLE, "configs/inference.json", "infer", overrides=overrides)
    sidecars = [json.loads(path.read_text()) for path in out.glob("*_synthetic_ct.json")]
    assert sidecars and all(
        s["precision"] == "bf16" and s["precision_details"]["precision"] == "bf16" for s in sidecars
    )
    assert all(s["weights"]["diffusion_early"].endswith("diffusion_early.pt") for s in sidecars)


def test_the_codebook_lookup_stays_float32_under_autocast():
    """MONAI's quantizer switches off only CUDA autocast; the bundle's VQVAE runs it in float32 under CPU bf16."""
    synthesis, networks = bundle_module("synthesis"), bundle_module("networks")
    autoencoder = networks.DiffTumorVQVAE(**{**synthesis.DEFAULT_AUTOENCODER_ARGS, **FAMILY_ARGS["autoencoder"]})
    seen = []
    autoencoder.quantizer.register_forward_pre_hook(
        lambda module, args: seen.append((args[0].dtype, torch.is_autocast_enabled("cpu")))
    )
    with torch.autocast("cpu", dtype=torch.bfloat16):
        reconstruction, loss = autoencoder(torch.rand(1, 1, 16, 16, 16), return_quantization_loss=True)
    assert seen == [(torch.float32, False)]
    assert reconstruction.dtype == torch.bfloat16 and loss.dtype == torch.float32


# ----------------------------------------------------------------------------------------------------------------
# acceptance 2: tumors into the real CT


@pytest.mark.slow
def test_real_ct_insertion_changes_only_the_dilated_tumor_and_keeps_the_affine(real_ct_dir, tmp_path):
    """The one command (``python -m monai.bundle run`` with ``--image --organ_mask --organ_label 7``, small networks
    from an overlay file) on example_ct_sm writes a CT whose every voxel outside the dilated tumor is bit-identical,
    on the scan's affine, with label 2 inside the pancreas; a PNG shows before / after slices."""
    ct_path, seg_path = real_ct_dir / "example_ct_sm.nii.gz", real_ct_dir / "example_seg.nii.gz"
    small = overrides_file(tmp_path, {**TINY_INFER, "model_spacing": [1.0, 1.0, 1.0], "crop_size": 32})
    command = [PYTHON, *bundle_command(["configs/inference.json", str(small)]), "--image", str(ct_path),
               "--organ_mask", str(seg_path), "--organ_label", "7", "--tumor_type", "medium", "--seed", "1",
               "--ckpt_dir", str(tmp_path / "no_weights"), "--output_dir", str(tmp_path)]  # fmt: skip
    done = subprocess.run(command, cwd=BUNDLE, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "RANDOM weights" in done.stdout + done.stderr  # no weights: said loudly
    source, affine, _ = load(ct_path)
    pancreas = load(seg_path)[0] == 7
    ct, ct_affine, _ = load(tmp_path / "example_ct_sm_synthetic_ct.nii.gz")
    label, label_affine, _ = load(tmp_path / "example_ct_sm_synthetic_label.nii.gz")
    assert np.array_equal(ct_affine, affine) and np.array_equal(label_affine, affine) and ct.shape == source.shape
    tumor = label == 2
    assert tumor.any() and not (tumor & ~pancreas).any()
    assert np.array_equal(label == 1, pancreas & ~tumor) and set(np.unique(label)) == {0, 1, 2}
    region = dilated(tumor, affine, 3.0)
    assert np.array_equal(ct[~region], source[~region])  # bit for bit outside the dilated mask
    assert np.any(ct[tumor] != source[tumor])
    sidecar = json.loads((tmp_path / "example_ct_sm_synthetic_ct.json").read_text())
    assert sidecar["weights"] == {"autoencoder": "random", "diffusion_early": "random", "diffusion_late": "random"}
    png = bundle_module("figures").before_after_png(source, ct, label, tmp_path / "before_after.png", (3, 3, 3))
    assert png.stat().st_size > 10_000


# ----------------------------------------------------------------------------------------------------------------
# the online transform (seg_unet3d's slot) and acceptance 5


def seg_style_case(dt_phantom: Path, index: int) -> dict:
    """A phantom case as seg_unet3d's slot sees it: RAS, spacing, HU window [-175, 250] -> [0, 1], float32 image
    and uint8 label MetaTensors, channel first."""
    from monai import transforms as mt

    record = json.loads((dt_phantom / "dataset.json").read_text())["training"][index]
    load_case = mt.Compose([
        mt.LoadImaged(["image", "label"], image_only=True),
        mt.EnsureChannelFirstd(["image", "label"]),
        mt.Orientationd(["image", "label"], axcodes="RAS", labels=None),
        mt.Spacingd(["image", "label"], pixdim=(4.0, 4.0, 4.0), mode=("bilinear", "nearest")),
        mt.ScaleIntensityRanged("image", a_min=-175, a_max=250, b_min=0.0, b_max=1.0, clip=True),
        mt.EnsureTyped(["image", "label"], dtype=[torch.float32, torch.uint8]),
    ])  # fmt: skip
    return load_case({k: str(dt_phantom / record[k]) for k in ("image", "label")})


def make_transform(family: str, **kwargs):
    transforms = bundle_module("transforms")
    family_args = FAMILY_ARGS if family == "difftumor" else None
    return transforms.TumorSynthesisd(keys=["image", "label"], family=family, family_args=family_args, **kwargs)


@pytest.mark.parametrize("family", [pytest.param("difftumor", marks=pytest.mark.slow), "handcrafted", "cellular"])
def test_online_transform_on_seg_unet3d_input(dt_phantom, family):
    case = seg_style_case(dt_phantom, 0)
    transform = make_transform(family, prob=1.0)
    transform.set_random_state(0)
    out = transform(dict(case))
    image, label = out["image"], out["label"]
    assert image.dtype == torch.float32 and label.dtype == torch.uint8 and image.shape == case["image"].shape
    assert torch.equal(image.affine, case["image"].affine) and torch.equal(label.affine, case["label"].affine)
    tumor = (label[0] == 2).numpy()
    organ = (case["label"][0] > 0).numpy()
    assert tumor.any() and not (tumor & ~organ).any() and torch.equal(label > 0, case["label"] > 0)
    changed = (image != case["image"])[0].numpy()
    assert changed.any() and not (changed & ~dilated(tumor, case["image"].affine.numpy(), 8.0)).any()
    assert float(image.min()) >= 0.0 and float(image.max()) <= 1.0
    # a case that already has a tumor is left alone; so is the case when the coin says no
    tumor_case = seg_style_case(dt_phantom, 2)
    assert torch.equal(transform(dict(tumor_case))["image"], tumor_case["image"])


def test_probability_and_healthy_only(dt_phantom):
    case = seg_style_case(dt_phantom, 1)
    transform = make_transform("handcrafted", prob=0.5)
    transform.set_random_state(3)
    applied = [bool((transform(dict(case))["label"] == 2).any()) for _ in range(60)]
    assert 15 <= sum(applied) <= 45  # p = 0.5 (binomial, 60 draws: 4 sd)
    assert make_transform("handcrafted").prob == 0.5 and make_transform("handcrafted").tumor_weights == {
        "tiny": 0.4, "small": 0.4, "medium": 0.1, "large": 0.1}  # fmt: skip


@pytest.mark.parametrize("family", [pytest.param("difftumor", marks=pytest.mark.slow), "handcrafted", "cellular"])
def test_same_seed_same_tumor_different_seed_different_tumor(dt_phantom, family):
    """Acceptance 5 for each family: identical image and label for the same seed, different for another."""
    case = seg_style_case(dt_phantom, 1)
    results = []
    for seed in (11, 11, 12):
        transform = make_transform(family, prob=1.0)
        transform.set_random_state(seed)
        results.append(transform(dict(case)))
    assert torch.equal(results[0]["image"], results[1]["image"]) and torch.equal(
        results[0]["label"], results[1]["label"]
    )
    assert not torch.equal(results[0]["label"], results[2]["label"])
    assert not torch.equal(results[0]["image"], results[2]["image"])


def test_models_load_lazily_once_per_worker_and_are_not_pickled(dt_phantom):
    from monai.data import DataLoader, Dataset

    transform = make_transform("difftumor", prob=1.0)
    family = transform.family
    assert family._models is None
    family.models()  # built in this process ...
    assert len(pickle.dumps(transform)) < 200_000  # ... but a pickled copy (spawned workers) carries no weights
    assert pickle.loads(pickle.dumps(transform)).family._models is None
    family._models = None
    case = seg_style_case(dt_phantom, 0)
    loader = DataLoader(Dataset([dict(case) for _ in range(4)], transform=transform), batch_size=1, num_workers=2)
    labels = [batch["label"] for batch in loader]
    assert all((label == 2).any() for label in labels)
    assert family._models is None  # the workers built their own; the main process did not


@pytest.mark.slow
def test_windowed_decoding_equals_full_decoding(dt_phantom):
    """Decoding only the latent window the blend needs gives the values a full decode gives there."""
    synthesis = bundle_module("synthesis")
    case = seg_style_case(dt_phantom, 0)
    hu = case["image"][0].numpy() * 425.0 - 175.0
    organ = (case["label"][0] == 1).numpy()
    affine = case["image"].affine.numpy()
    draws = []
    for margin in (None, 4):
        family = synthesis.DiffTumorSynthesis(**FAMILY_ARGS, decode_margin=margin)
        draws.append(family(hu, organ, affine, np.random.RandomState(5), "small"))
    assert np.array_equal(draws[0].region, draws[1].region)
    assert np.allclose(draws[0].values, draws[1].values, atol=1e-3)


def test_decode_windows_cover_each_part_of_the_region():
    """Far-apart tumors get a latent window each, close ones one merged window; every region voxel is decoded."""
    synthesis = bundle_module("synthesis")
    family = synthesis.DiffTumorSynthesis(**FAMILY_ARGS, decode_margin=2)
    region = np.zeros((96, 96, 96), bool)
    region[10:16, 10:16, 10:16] = region[70:76, 70:76, 70:76] = True
    voxels = np.argwhere(region)
    windows = family.decode_windows(region, voxels, voxels.astype(float), np.array([24, 24, 24]))
    assert len(windows) == 2 and sorted(np.concatenate([m for _, _, m in windows])) == list(range(len(voxels)))
    for low, high, members in windows:
        assert np.all(voxels[members] // 4 >= low) and np.all(voxels[members] // 4 < high)
    close = np.zeros((96, 96, 96), bool)
    close[10:16, 10:16, 10:16] = close[19:25, 10:16, 10:16] = True  # two parts 3 voxels apart: windows overlap
    voxels = np.argwhere(close)
    assert len(family.decode_windows(close, voxels, voxels.astype(float), np.array([24, 24, 24]))) == 1
    family.decode_margin = None
    assert len(family.decode_windows(close, voxels, voxels.astype(float), np.array([24, 24, 24]))) == 1


@pytest.mark.slow
def test_transform_plugs_into_seg_unet3d_training(dt_phantom, tmp_path):
    """seg_unet3d's ``online_augmentation`` slot runs the transform (imported under another package name)."""
    if not (SEG_BUNDLE / "configs" / "train.json").is_file():
        pytest.skip("bundles/seg_unet3d/configs/train.json is not there")
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(SEG_BUNDLE / "configs" / "train.json"))
    wanted = {"pixdim": [4.0, 4.0, 4.0], "roi_size": [32, 32, 32], "network_def#channels": [4, 8, 16, 32, 64],
              "num_samples": 1, "cache_workers": 1, "sw_batch_size": 2}  # fmt: skip
    overrides = {k: v for k, v in wanted.items() if k.split("#")[0] in parser}
    baselines, transforms = bundle_module("baselines"), bundle_module("transforms")

    class CountingFamily:
        def __init__(self):
            self.inner, self.shapes = baselines.HandcraftedSynthesis(), []

        def __call__(self, hu, organ, affine, rng, tumor_type):
            self.shapes.append(hu.shape)
            return self.inner(hu, organ, affine, rng, tumor_type)

    family = CountingFamily()
    transform = transforms.TumorSynthesisd(keys=["image", "label"], family=family, prob=1.0)
    workflow = run_workflow(
        SEG_BUNDLE, "configs/train.json", "train",
        overrides={**overrides, "train#trainer#max_epochs": 1, "dataset_dir": str(dt_phantom),
                   "ckpt_dir": str(tmp_path / "models"), "output_dir": str(tmp_path / "eval"),
                   "online_augmentation": transform},
    )  # fmt: skip
    records = workflow.parser.get_parsed_content("train#dataset#data")
    assert 0 < len(family.shapes) <= len(records)  # healthy training cases got tumors, on whole volumes
    assert all(min(shape) >= 16 for shape in family.shapes)


# ----------------------------------------------------------------------------------------------------------------
# DDP and kill-and-resume (subprocesses, the command line users run)


def overrides_file(tmp_path: Path, overrides: dict) -> Path:
    path = tmp_path / "overrides.json"
    path.write_text(json.dumps(overrides))
    return path


def bundle_command(config_files: list[str]) -> list[str]:
    return ["-m", "monai.bundle", "run", "--config_file", json.dumps(config_files),
            "--meta_file", "configs/metadata.json", "--logging_file", "configs/logging.conf"]  # fmt: skip


def subprocess_env() -> dict:
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "PYTHONPATH": str(BUNDLE) + os.pathsep + env.get("PYTHONPATH", "")})
    return env


@pytest.mark.slow
def test_multi_gpu_overlay_runs_both_stages_under_torchrun_on_cpu(dt_phantom, tmp_path):
    """``torchrun --nproc_per_node=2`` (gloo) with the DDP overlay: stage 1, then stage 2 on its autoencoder."""
    ckpt = tmp_path / "models"
    common = {"dataset_dir": str(dt_phantom), "ckpt_dir": str(ckpt), "output_dir": str(tmp_path / "eval")}
    torchrun = [PYTHON, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone"]
    both_tumor_cases = "$[d for d in @datalist if d.get('has_tumor')]"  # one validation case per rank
    stages = {
        "autoencoder": (["configs/train.json"], {**TINY_TRAIN, **common}),
        "diffusion": (["configs/train.json", "configs/train_diffusion.json"],
                      {**TINY_STAGE2, **common, "validate#dataset#data": both_tumor_cases}),
    }  # fmt: skip
    for name, (configs, overrides) in stages.items():
        extra = tmp_path / f"{name}.json"
        extra.write_text(json.dumps(overrides))
        command = [*torchrun, *bundle_command([*configs, "configs/multi_gpu_train.json", str(extra)])]
        done = subprocess.run(command, cwd=BUNDLE, env=subprocess_env(), capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, name + ": " + done.stdout[-3000:] + done.stderr[-3000:]
    for final in ("autoencoder.pt", "diffusion_early.pt"):
        weights = torch.load(ckpt / final, map_location="cpu", weights_only=True)
        assert not any(key.startswith("module.") for key in weights), final
    assert (ckpt / "autoencoder_checkpoint_epoch=1.pt").is_file()
    assert (ckpt / "diffusion_early_checkpoint_epoch=1.pt").is_file()


@pytest.mark.slow
def test_a_killed_training_resumes_from_its_last_epoch(dt_phantom, tmp_path):
    ckpt = tmp_path / "models"
    extra = overrides_file(tmp_path, {**TINY_TRAIN, "dataset_dir": str(dt_phantom), "ckpt_dir": str(ckpt),
                                      "output_dir": str(tmp_path / "eval"), "max_epochs": 4,
                                      "epoch_length": 2})  # fmt: skip
    command = [PYTHON, *bundle_command(["configs/train.json", str(extra)])]
    first_log = tmp_path / "first_run.log"
    with open(first_log, "w") as log_file:
        first = subprocess.Popen(command, cwd=BUNDLE, env=subprocess_env(), stdout=log_file, stderr=subprocess.STDOUT)
        deadline = time.time() + 240
        while not (ckpt / "autoencoder_checkpoint_epoch=1.pt").exists() and time.time() < deadline:
            assert first.poll() is None, first_log.read_text()[-3000:]
            time.sleep(0.05)
        assert first.poll() is None, "the first run ended before it could be killed"
        os.kill(first.pid, signal.SIGKILL)
        first.wait(timeout=30)
    assert first.returncode == -signal.SIGKILL
    saved = max(int(p.name.split("=")[1].split(".")[0]) for p in ckpt.glob("autoencoder_checkpoint_epoch=*.pt"))
    assert 1 <= saved < 4 and not (ckpt / "autoencoder.pt").exists()

    second = subprocess.run(command, cwd=BUNDLE, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    log = second.stdout + second.stderr
    assert second.returncode == 0, log[-3000:]
    assert f"autoencoder_checkpoint_epoch={saved}.pt (epoch {saved}," in log  # resumed, not restarted
    assert f"Epoch[{saved}] Complete" not in log and "Epoch[4] Complete" in log
    state = torch.load(ckpt / "autoencoder_checkpoint_epoch=4.pt", map_location="cpu", weights_only=True)
    assert state["trainer"]["iteration"] == 4 * 2 and (ckpt / "autoencoder.pt").is_file()
