"""Tests of the ldm_abdomen bundle (issue 6): the harness on every config, the scale-factor round trip, the BraTS
adaptation with hash checks, the samplers, sliding-window decoding, mask conditioning, the evaluation command,
DDP and kill-and-resume.

Every run uses the bundle's real configs with tiny overrides (image 32x32x16, a few channels, one or two epochs)
on the session's phantom data set, prepared with ``tools.prep`` for each crop mode and kept in HU. The bundle is
copied to a temporary folder first, and checkpoints and outputs go to temporary folders.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from tools.bundle_check import check_bundle, check_workflow_properties, run_workflow
from tools.cli import Cli
from tools.prep import prepare_dataset

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "ldm_abdomen"
IMAGE_SIZE = [32, 32, 16]
LATENT = [8, 8, 8, 4]
NETS = {
    "image_size": IMAGE_SIZE,
    "autoencoder_def#channels": [8, 8, 8],
    "autoencoder_def#num_res_blocks": 1,
    "autoencoder_def#norm_num_groups": 4,
    "diffusion_def#channels": [8, 8, 16],
    "diffusion_def#num_head_channels": [0, 8, 8],
    "diffusion_def#num_res_blocks": 1,
    "diffusion_def#norm_num_groups": 4,
}
TRAIN = {**NETS, "train_batch_size": 2, "num_workers": 0, "val_interval": 1, "scale_factor_samples": 2}
AUTOENCODER = {"ae_patch_size": [16, 16, 16], "discriminator_def#channels": 4, "discriminator_def#num_layers_d": 2}
CONTROLNET = {"conditioning_embedding_channels": [4, 8, 8]}
AE_KWARGS = dict(
    spatial_dims=3, in_channels=1, out_channels=1, latent_channels=8, channels=[8, 8, 8], num_res_blocks=1,
    norm_num_groups=4, attention_levels=[False, False, False], with_encoder_nonlocal_attn=False,
    with_decoder_nonlocal_attn=False, include_fc=False,
)  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny networks run fastest on one thread, and far faster than on two when other processes load the
    machine (OpenMP threads then wait for each other); restored afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    """A copy of the bundle (runs never write into the repository)."""
    target = tmp_path_factory.mktemp("bundle") / "ldm_abdomen"
    shutil.copytree(BUNDLE, target, ignore=shutil.ignore_patterns("__pycache__", "*.pt", "eval", "output"))
    return target


@pytest.fixture(scope="module")
def prepared(phantom_set, tmp_path_factory) -> dict[str, Path]:
    """The session phantom prepared in each crop mode, in HU (``tools data prepare --hu_window None``)."""
    root = tmp_path_factory.mktemp("prepared")
    out = {}
    for mode in ("full", "semi", "pancreas"):
        prepare_dataset(phantom_set, root / mode, mode=mode, hu_window=None)
        out[mode] = root / mode
    return out


def bundle_scripts(bundle_dir: Path):
    """The bundle's ``scripts`` package imported from ``bundle_dir`` (replacing any other bundle's)."""
    for name in [n for n in sys.modules if n == "scripts" or n.startswith("scripts.")]:
        del sys.modules[name]
    sys.path.insert(0, str(bundle_dir))
    try:
        import scripts.adapt_brats  # noqa: F401
        import scripts.data  # noqa: F401
        import scripts.evaluate_synthetic  # noqa: F401
        import scripts.latent  # noqa: F401
        import scripts.sampling  # noqa: F401
        import scripts.trainers  # noqa: F401
    finally:
        sys.path.remove(str(bundle_dir))
    return sys.modules["scripts"]


@pytest.fixture()
def ldm(bundle):
    """The bundle's scripts package for direct calls; forgotten afterwards."""
    yield bundle_scripts(bundle)
    for name in [n for n in sys.modules if n == "scripts" or n.startswith("scripts.")]:
        del sys.modules[name]


def train_overrides(dataset: Path, ckpt: Path, out: Path, **extra) -> dict:
    base = {**TRAIN, "dataset_dir": str(dataset), "crop_mode": "full", "ckpt_dir": str(ckpt), "output_dir": str(out)}
    return {**base, **extra}


def infer_overrides(ckpt: Path, out: Path, **extra) -> dict:
    return {**NETS, "ckpt_dir": str(ckpt), "output_dir": str(out), **extra}


@pytest.fixture(scope="module")
def trained(bundle, prepared, tmp_path_factory) -> dict:
    """Stage 1 (autoencoder GAN, 1 epoch) then stage 2 (diffusion on frozen latents, 2 epochs) on the full crop."""
    ckpt = tmp_path_factory.mktemp("ckpt")
    out = tmp_path_factory.mktemp("out")
    base = train_overrides(prepared["full"], ckpt, out)
    stage1 = run_workflow(
        bundle, ["configs/train.json", "configs/train_autoencoder.json"], "train",
        overrides={**base, **AUTOENCODER, "train#trainer#max_epochs": 1},
    )  # fmt: skip
    ae_sha = sha(ckpt / "model_autoencoder.pt")
    stage2 = run_workflow(bundle, "configs/train.json", "train", overrides={**base, "train#trainer#max_epochs": 2})
    return {"ckpt": ckpt, "out": out, "stage1": stage1, "stage2": stage2, "ae_sha_before": ae_sha}


def error_chain(error: BaseException) -> str:
    """The messages of an error and of every error it was raised from."""
    texts = []
    while error is not None:
        texts.append(f"{type(error).__name__}: {error}")
        error = error.__cause__ or error.__context__
    return " <- ".join(texts)


def sha(path: Path) -> str:
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# ----------------------------------------------------------------------------------------------------------------
# acceptance 1: the harness and every config


@pytest.mark.slow
def test_check_bundle_passes_every_check(bundle, prepared):
    summary = check_bundle(
        bundle,
        overrides={"dataset_dir": str(prepared["full"]), **NETS},
        train_overrides={k: v for k, v in TRAIN.items() if k not in NETS},
        nets={
            "network_def": {
                "extra_forward_args": {"timesteps": torch.tensor([3])},
                "overrides": {
                    "_meta_#network_data_format#inputs#image#spatial_shape": LATENT[1:],
                    "_meta_#network_data_format#outputs#pred#spatial_shape": LATENT[1:],
                },
            },
            "autoencoder_def": None,  # forward returns (reconstruction, mu, sigma): see the data-format test below
        },
        export={"net_id": "export_def", "use_trace": True, "input_shape": [1, LATENT[0] + 1, *LATENT[1:]]},
    )
    statuses = {result.name: result.status for result in summary.results}
    assert summary.passed, summary.report()
    assert statuses["net in/out: network_def"] == "pass"
    assert statuses["TorchScript export: export_def"] == "pass"
    assert statuses["properties: multi_gpu_train (ids only)"] == "pass"


@pytest.mark.parametrize(
    "configs, workflow_type",
    [
        (["configs/train.json", "configs/train_autoencoder.json"], "train"),
        (["configs/train.json", "configs/train_controlnet.json"], "train"),
        (["configs/train.json", "configs/train_autoencoder.json", "configs/multi_gpu_train.json"], "train"),
        (["configs/inference.json", "configs/inference_controlnet.json"], "inference"),
    ],
    ids=["train_autoencoder", "train_controlnet", "multi_gpu_autoencoder", "inference_controlnet"],
)
def test_overlay_configs_have_the_bundle_properties(bundle, prepared, configs, workflow_type):
    overrides = {"dataset_dir": str(prepared["full"]), **NETS}
    if workflow_type == "train":
        overrides.update({k: v for k, v in TRAIN.items() if k not in NETS})
    instantiate = "configs/multi_gpu_train.json" not in configs
    if "configs/train_autoencoder.json" in configs:
        overrides.update(AUTOENCODER)
    checked = check_workflow_properties(bundle, configs, workflow_type, overrides=overrides, instantiate=instantiate)
    assert ("trainer" in checked) == (workflow_type == "train")


def test_autoencoder_and_controlnet_match_their_data_formats(bundle):
    """AutoencoderKL and ControlNet return tuples, which verify_net_in_out cannot check: compare with the metadata."""
    from monai.bundle import ConfigParser

    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    parser = ConfigParser()
    parser.read_config([str(bundle / "configs" / n) for n in ("inference.json", "inference_controlnet.json")])
    for key, value in {**NETS, **CONTROLNET, "bundle_root": str(bundle)}.items():
        parser[key] = value
    ae_format = meta["autoencoder_data_format"]
    autoencoder = parser.get_parsed_content("autoencoder_def").eval()
    shape = [16, 16, 8]  # the metadata's 112x128x80 at the test's small size: any multiple of 4 works the same way
    with torch.no_grad():
        reconstruction, z_mu, z_sigma = autoencoder(torch.rand(1, ae_format["inputs"]["image"]["num_channels"], *shape))
    assert reconstruction.shape[1] == ae_format["outputs"]["pred"]["num_channels"]
    assert list(reconstruction.shape[2:]) == shape and list(z_mu.shape[1:]) == [8, 4, 4, 2]
    cn_format = meta["controlnet_data_format"]
    controlnet = parser.get_parsed_content("controlnet_def").eval()
    mask = torch.zeros(1, cn_format["inputs"]["image"]["num_channels"], *IMAGE_SIZE)
    with torch.no_grad():
        down, mid = controlnet(torch.randn(1, *LATENT), torch.tensor([5]), controlnet_cond=mask)
    assert down[0].shape[2:] == torch.Size(LATENT[1:])
    for key in ("network_data_format", "autoencoder_data_format", "controlnet_data_format"):
        pred = meta[key]["outputs"]["pred"]
        assert pred["num_channels"] in (1, 8)
    # the declared full-scale shapes are consistent: autoencoder downsamples by 4, 144x176x112 -> 36x44x28
    assert [s // 4 for s in cn_format["inputs"]["image"]["spatial_shape"]] == cn_format["outputs"]["pred"][
        "spatial_shape"
    ]
    assert meta["network_data_format"]["inputs"]["image"]["spatial_shape"] == [36, 44, 28]


def test_two_stage_training_writes_weights_and_stats(trained):
    ckpt = trained["ckpt"]
    assert trained["stage1"].trainer.state.epoch == 1 and trained["stage2"].trainer.state.epoch == 2
    for name in ("model_autoencoder.pt", "model.pt", "latent_stats.json", "checkpoint_diffusion_epoch=2.pt"):
        assert (ckpt / name).is_file(), name
    metrics = trained["stage2"].parser.get_parsed_content("validate#evaluator").state.metrics
    assert np.isfinite(metrics["val_diffusion_mse"])
    psnr = trained["stage1"].parser.get_parsed_content("validate#evaluator").state.metrics["val_psnr"]
    assert np.isfinite(psnr)
    stats = json.loads((ckpt / "latent_stats.json").read_text())
    assert stats["objective"] == "epsilon" and stats["crop_mode"] == "full" and stats["image_size"] == IMAGE_SIZE
    assert stats["latent_shape"] == LATENT and stats["scale_factor"] > 0
    assert not np.allclose(np.asarray(stats["reference_affine"])[:3, :3], np.eye(3))
    # the diffusion training froze the autoencoder: same file, same weights in memory
    assert sha(ckpt / "model_autoencoder.pt") == trained["ae_sha_before"]
    autoencoder = trained["stage2"].parser.get_parsed_content("autoencoder")
    assert not any(p.requires_grad for p in autoencoder.parameters())


@pytest.mark.slow
def test_autoencoder_learning_rate_decays_only_at_its_own_milestones(bundle, prepared, trained, tmp_path):
    """``ae_lr_milestones`` (epochs) decays the autoencoder's learning rate by ``lr_gamma``; the default (none) keeps
    it constant, so the diffusion stage's ``lr_milestones`` never reach the autoencoder."""
    stage1 = trained["stage1"].parser
    assert stage1.get_parsed_content("optimizer").param_groups[0]["lr"] == pytest.approx(1e-5)
    decayed = run_workflow(
        bundle, ["configs/train.json", "configs/train_autoencoder.json"], "train",
        overrides={**train_overrides(prepared["full"], tmp_path / "ckpt", tmp_path / "out"), **AUTOENCODER,
                   "train#trainer#max_epochs": 2, "learning_rate": 1e-3, "ae_lr_milestones": [1]},
    )  # fmt: skip
    assert decayed.parser.get_parsed_content("optimizer").param_groups[0]["lr"] == pytest.approx(1e-4)
    scheduler = decayed.parser.get_parsed_content("checkpoint_objects")["lr_scheduler"]  # resumed with the weights
    assert scheduler is decayed.parser.get_parsed_content("ae_lr_scheduler") and scheduler.last_epoch == 2


def test_evaluate_config_reports_the_validation_loss(bundle, prepared, trained, tmp_path):
    workflow = run_workflow(
        bundle, ["configs/train.json", "configs/evaluate.json"], "train",
        overrides=train_overrides(prepared["full"], trained["ckpt"], tmp_path),
    )  # fmt: skip
    value = workflow.parser.get_parsed_content("validate#evaluator").state.metrics["val_diffusion_mse"]
    assert np.isfinite(value)
    assert (tmp_path / "val_diffusion_mse_raw.csv").is_file()


# ----------------------------------------------------------------------------------------------------------------
# precision (issue 16): one switch, recorded in the training folder and in every synthetic file


@pytest.mark.slow
def test_bf16_training_of_every_stage_records_its_precision_and_saves_bare_networks(
    bundle, prepared, tmp_path, reference_bf16_convolutions
):
    """Autoencoder GAN, diffusion model and ControlNet trained one epoch each with ``precision bf16`` (emulated and
    slow on a CPU without AVX512-BF16: tiny sizes): ``precision.json`` lists the three starts, the weights load into
    the bare networks, and bf16 samples say so in their sidecars."""
    from monai.bundle import ConfigParser
    from monai.networks.nets import AutoencoderKL

    ckpt, out = tmp_path / "ckpt", tmp_path / "out"
    base = train_overrides(prepared["full"], ckpt, out, precision="bf16", **{"train#trainer#max_epochs": 1})
    stages = {
        "autoencoder": (["configs/train.json", "configs/train_autoencoder.json"], AUTOENCODER),
        "diffusion": (["configs/train.json"], {}),
        "controlnet": (["configs/train.json", "configs/train_controlnet.json"], CONTROLNET),
    }
    networks = {}
    for name, (configs, extra) in stages.items():
        workflow = run_workflow(bundle, configs, "train", overrides={**base, **extra})
        assert workflow.trainer.state.epoch == 1
        network = workflow.parser.get_parsed_content("network")
        assert type(network).__name__ == "AutocastNetwork" and network.dtype == torch.bfloat16
        networks[name] = workflow.parser.get_parsed_content("network_def")
    record = json.loads((ckpt / "precision.json").read_text())
    assert record["precision"] == "bf16" and [run["precision"] for run in record["runs"]] == ["bf16"] * 3
    parser = ConfigParser()
    parser.read_config([str(bundle / "configs" / name) for name in ("train.json", "train_controlnet.json")])
    for key, value in {**NETS, **CONTROLNET}.items():
        parser[key] = value
    bare = {
        "model_autoencoder.pt": AutoencoderKL(**AE_KWARGS),
        "model.pt": parser.get_parsed_content("diffusion_def"),
        "model_controlnet.pt": parser.get_parsed_content("controlnet_def"),
    }
    for file, network in bare.items():
        weights = torch.load(ckpt / file, map_location="cpu", weights_only=True)
        assert set(weights) == set(network.state_dict()), file  # no wrapper prefix in the checkpoint
        network.load_state_dict(weights, strict=True)
    synthetic = tmp_path / "synthetic"
    overrides = infer_overrides(ckpt, synthetic, num_inference_steps=2, num_samples=1, precision="bf16")
    run_workflow(bundle, "configs/inference.json", "inference", overrides=overrides)
    sidecar = json.loads((synthetic / "sample_00000_image.json").read_text())
    assert sidecar["precision"] == "bf16" and sidecar["precision_details"]["device"] == "cpu"
    assert np.asarray(nib.load(synthetic / "sample_00000_image.nii.gz").dataobj).std() > 0


# ----------------------------------------------------------------------------------------------------------------
# acceptance 2: the scale factor


def test_scale_factor_round_trip(ldm, trained, prepared):
    """encode -> scale -> unscale -> decode equals encode -> decode; forgetting the division does not."""
    workflow = trained["stage2"]
    stats = workflow.parser.get_parsed_content("latent_stats")
    autoencoder = stats.autoencoder
    scale = stats.scale_factor
    assert scale == json.loads((trained["ckpt"] / "latent_stats.json").read_text())["scale_factor"]
    images = torch.stack([workflow.parser.get_parsed_content("train#dataset")[i]["image"] for i in range(2)])
    images = images.as_tensor() if hasattr(images, "as_tensor") else images
    with torch.no_grad():
        plain = autoencoder.decode(autoencoder.encode(images)[0])
        scaled = ldm.latent.encode_to_latent(autoencoder, images, scale, sample=False)
        round_trip = ldm.latent.decode_from_latent(autoencoder, scaled, scale)
        forgotten = autoencoder.decode(scaled)  # the model-zoo sampler's bug: no division before decoding
    assert torch.allclose(round_trip, plain, atol=1e-5)
    assert not torch.allclose(forgotten, plain, atol=1e-3)


def test_scale_factor_is_one_over_the_latent_std_and_computed_once(ldm, trained):
    stats = trained["stage2"].parser.get_parsed_content("latent_stats")
    dataset = trained["stage2"].parser.get_parsed_content("train#dataset")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        latents = torch.cat(
            [
                ldm.latent.encode_to_latent(
                    stats.autoencoder, torch.as_tensor(dataset[i]["image"])[None], 1.0, True, generator
                )
                for i in range(2)
            ]
        ).double()
    assert stats.scale_factor == pytest.approx(1.0 / float(latents.std(unbiased=False)), rel=1e-6)
    stats_file = trained["ckpt"] / "latent_stats.json"
    before = stats_file.read_bytes()
    again = ldm.latent.LatentStats(
        stats_file, copy.deepcopy(stats.autoencoder), trained["ckpt"] / "model_autoencoder.pt", dataset=None,
        hu_window=[-1000, 1000], image_size=IMAGE_SIZE, crop_mode="full", objective="epsilon",
    ).prepare()  # fmt: skip
    assert again.scale_factor == stats.scale_factor and stats_file.read_bytes() == before
    with pytest.raises(ValueError, match="computed for other settings.*image_size"):
        ldm.latent.LatentStats(
            stats_file, copy.deepcopy(stats.autoencoder), trained["ckpt"] / "model_autoencoder.pt",
            hu_window=[-1000, 1000], image_size=[64, 64, 32],
        ).prepare()  # fmt: skip


def test_cached_posteriors_give_what_a_new_encoding_gives(ldm, trained):
    from monai.data import list_data_collate

    parser = trained["stage2"].parser
    stats, scheduler = parser.get_parsed_content("latent_stats"), parser.get_parsed_content("noise_scheduler")
    dataset = parser.get_parsed_content("train#dataset")
    batch = list_data_collate([dataset[0], dataset[1]])
    fresh = ldm.latent.LatentDiffusionPrepareBatch(stats, scheduler, seed=3)
    cached = ldm.latent.LatentDiffusionPrepareBatch(stats, scheduler, seed=3, cache_posteriors=True)
    expected = fresh(batch)
    cached(batch)
    latents, target, _, kwargs = cached(batch)  # the second visit draws from the cached posteriors
    assert len(cached._posteriors) == 2
    assert torch.allclose(latents, expected[0], atol=1e-5) and torch.equal(target, expected[1])
    assert torch.equal(kwargs["timesteps"], expected[3]["timesteps"])


# ----------------------------------------------------------------------------------------------------------------
# sampling


def test_ddim_samples_are_seeded_hu_volumes_with_geometry_and_provenance(bundle, trained, tmp_path):
    runs = {}
    for name, first_seed in (("a", 5), ("b", 5), ("c", 6)):
        out = tmp_path / name
        overrides = infer_overrides(trained["ckpt"], out, sampler="ddim", num_inference_steps=3, num_samples=1)
        run_workflow(bundle, "configs/inference.json", "inference", overrides={**overrides, "first_seed": first_seed})
        runs[name] = out / f"sample_{first_seed:05d}_image.nii.gz"
    image = nib.load(runs["a"])
    data = np.asarray(image.dataobj)
    stats = json.loads((trained["ckpt"] / "latent_stats.json").read_text())
    assert image.shape == tuple(IMAGE_SIZE) and data.dtype == np.int16
    assert data.min() >= -1000 and data.max() <= 1000
    assert np.allclose(image.affine, np.asarray(stats["reference_affine"]), atol=1e-4)
    assert np.allclose(image.header.get_zooms(), stats["spacing_mm"], rtol=1e-4)
    assert image.header["descrip"].tobytes().startswith(b"SYNTHETIC ldm_abdomen 0.1.0 seed=5")
    sidecar = json.loads(runs["a"].with_name("sample_00005_image.json").read_text())
    assert sidecar["seed"] == 5 and sidecar["sampler"] == "ddim" and sidecar["num_inference_steps"] == 3
    assert sidecar["checkpoint_sha256"] == sha(trained["ckpt"] / "model.pt")
    assert sidecar["sha256"] == sha(runs["a"]) and sidecar["hu_window"] == [-1000, 1000]
    assert sidecar["precision"] == "fp32" and sidecar["precision_details"]["requested"] == "fp32"  # the default
    assert np.array_equal(data, np.asarray(nib.load(runs["b"]).dataobj))  # same seed, same volume
    assert not np.array_equal(data, np.asarray(nib.load(runs["c"]).dataobj))


def test_ddpm_sampling_and_rectified_flow_needs_a_rectified_flow_model(bundle, trained, tmp_path):
    run_workflow(
        bundle, "configs/inference.json", "inference",
        overrides=infer_overrides(trained["ckpt"], tmp_path / "ddpm", sampler="ddpm", num_inference_steps=4,
                                  num_samples=1),
    )  # fmt: skip
    assert (tmp_path / "ddpm" / "sample_00000_image.nii.gz").is_file()
    with pytest.raises(Exception) as failure:  # MONAI may wrap the error of a config expression in a RuntimeError
        run_workflow(
            bundle, "configs/inference.json", "inference",
            overrides=infer_overrides(trained["ckpt"], tmp_path / "rf", sampler="rflow", num_inference_steps=3,
                                      num_samples=1),
        )  # fmt: skip
    assert re.search(r"trained with objective 'epsilon'; sampler 'rflow' needs", error_chain(failure.value))
    assert not (tmp_path / "rf" / "sample_00000_image.nii.gz").exists()


@pytest.mark.slow
def test_rectified_flow_training_and_sampling(bundle, prepared, trained, tmp_path):
    ckpt = tmp_path / "rflow_ckpt"
    ckpt.mkdir()
    shutil.copy(trained["ckpt"] / "model_autoencoder.pt", ckpt)
    overrides = train_overrides(prepared["full"], ckpt, tmp_path / "out")
    workflow = run_workflow(
        bundle,
        "configs/train.json",
        "train",
        overrides={**overrides, "train_scheduler": "rflow", "train#trainer#max_epochs": 1},
    )
    assert type(workflow.parser.get_parsed_content("noise_scheduler")).__name__ == "RFlowScheduler"
    assert json.loads((ckpt / "latent_stats.json").read_text())["objective"] == "rflow"
    run_workflow(
        bundle, "configs/inference.json", "inference",
        overrides=infer_overrides(ckpt, tmp_path / "rf", sampler="rflow", num_inference_steps=3, num_samples=1),
    )  # fmt: skip
    volume = nib.load(tmp_path / "rf" / "sample_00000_image.nii.gz")
    assert volume.shape == tuple(IMAGE_SIZE)
    assert json.loads((tmp_path / "rf" / "sample_00000_image.json").read_text())["sampler"] == "rflow"


def test_samplers_take_their_step_counts(ldm):
    from monai.networks.nets import DiffusionModelUNet

    unet = DiffusionModelUNet(
        spatial_dims=3, in_channels=8, out_channels=8, channels=[8, 8, 16], attention_levels=[False, True, True],
        num_head_channels=[0, 8, 8], num_res_blocks=1, norm_num_groups=4, include_fc=False, use_combined_linear=False,
    ).eval()  # fmt: skip
    calls = []

    def counting(x, t, **kwargs):
        calls.append(int(t[0]))
        return unet(x, t, **kwargs)

    stub = type("Stub", (), {"record": None})()
    noise = torch.randn(1, *LATENT)
    for name, steps in (("ddpm", 7), ("ddim", 5), ("rflow", 4)):
        calls.clear()
        sampler = ldm.sampling.LatentSampler(stub, ldm.sampling.make_scheduler(name), name, steps)
        out = sampler.sample_latents(noise.clone(), counting, torch.Generator().manual_seed(0))
        assert len(calls) == steps and calls == sorted(calls, reverse=True) and torch.isfinite(out).all()
    assert ldm.sampling.default_steps("ddim") == 50 and ldm.sampling.default_steps("ddpm") == 1000


# ----------------------------------------------------------------------------------------------------------------
# large volumes: sliding-window decoding


def test_sliding_window_decoding_matches_whole_decoding(ldm):
    from monai.inferers import SlidingWindowInferer
    from monai.networks.nets import AutoencoderKL

    torch.manual_seed(0)
    autoencoder = AutoencoderKL(**AE_KWARGS).eval()
    latents = torch.randn(1, 8, 16, 16, 8) * 1.7
    with torch.no_grad():
        whole = ldm.latent.decode_from_latent(autoencoder, latents, 1.7)
        one_window = ldm.latent.decode_from_latent(
            autoencoder, latents, 1.7, SlidingWindowInferer(roi_size=(16, 16, 8), sw_batch_size=1, mode="gaussian")
        )
        patches = ldm.latent.decode_from_latent(
            autoencoder, latents, 1.7,
            SlidingWindowInferer(roi_size=(12, 12, 8), sw_batch_size=1, overlap=0.5, mode="gaussian"),
        )  # fmt: skip
        other = ldm.latent.decode_from_latent(autoencoder, torch.randn_like(latents), 1.0)
    assert patches.shape == whole.shape == (1, 1, 64, 64, 32)
    assert torch.allclose(one_window, whole, atol=1e-5)
    # GroupNorm statistics computed per patch make it an approximation: close, and far closer than another decoding
    error = float((patches - whole).abs().mean() / whole.std())
    correlation = float(torch.corrcoef(torch.stack([patches.flatten(), whole.flatten()]))[0, 1])
    assert error < 0.15 and correlation > 0.98
    assert float((other - whole).abs().mean() / whole.std()) > 5 * error


def test_sliding_window_inference_config_writes_a_larger_volume(bundle, trained, tmp_path):
    overrides = infer_overrides(
        trained["ckpt"], tmp_path, sampler="ddim", num_inference_steps=2, num_samples=1, latent_shape=[8, 16, 16, 8],
        sliding_window_decode=True, decode_latent_roi=[8, 8, 8],
    )  # fmt: skip
    run_workflow(bundle, "configs/inference.json", "inference", overrides=overrides)
    volume = nib.load(tmp_path / "sample_00000_image.nii.gz")
    stats = json.loads((trained["ckpt"] / "latent_stats.json").read_text())
    assert volume.shape == (64, 64, 32)
    assert np.allclose(volume.header.get_zooms(), np.asarray(stats["spacing_mm"]) / 2, rtol=1e-4)  # same field of view
    assert json.loads((tmp_path / "sample_00000_image.json").read_text())["sliding_window_decode"] is True


# ----------------------------------------------------------------------------------------------------------------
# mask conditioning: ControlNet on the pancreas mask -> image + label pairs


@pytest.mark.slow
def test_controlnet_makes_image_label_pairs_on_the_mask_grid(bundle, prepared, trained, tmp_path):
    overrides = {**train_overrides(prepared["full"], trained["ckpt"], tmp_path / "out"), **CONTROLNET}
    workflow = run_workflow(
        bundle, ["configs/train.json", "configs/train_controlnet.json"], "train",
        overrides={**overrides, "train#trainer#max_epochs": 1},
    )  # fmt: skip
    assert (trained["ckpt"] / "model_controlnet.pt").is_file()
    diffusion = workflow.parser.get_parsed_content("diffusion")
    assert not any(p.requires_grad for p in diffusion.parameters())  # the UNet stays frozen
    assert sha(trained["ckpt"] / "model_autoencoder.pt") == trained["ae_sha_before"]
    out = tmp_path / "pairs"
    run_workflow(
        bundle, ["configs/inference.json", "configs/inference_controlnet.json"], "inference",
        overrides={**infer_overrides(trained["ckpt"], out, num_inference_steps=2), **CONTROLNET,
                   "dataset_dir": str(prepared["full"]), "mask_sections": ["test"]},
    )  # fmt: skip
    test_cases = json.loads((prepared["full"] / "dataset.json").read_text())["test"]
    images = sorted(out.glob("*_image.nii.gz"))
    assert len(images) == len(test_cases)
    for image_path in images:
        label_path = image_path.with_name(image_path.name.replace("_image", "_label"))
        image, label = nib.load(image_path), nib.load(label_path)
        assert image.shape == label.shape == tuple(IMAGE_SIZE)
        assert np.allclose(image.affine, label.affine)
        assert set(np.unique(np.asarray(label.dataobj))) <= {0, 1} and np.asarray(label.dataobj).any()
        source = nib.load(
            prepared["full"] / next(c["label"] for c in test_cases if image_path.name.startswith(c["case"]))
        )
        corners = np.array([[0, 0, 0, 1], [*(np.array(source.shape) - 1), 1]], dtype=float)
        world = (source.affine @ corners.T).T[:, :3]  # the pair covers the mask's field of view
        out_corners = np.array([[0, 0, 0, 1], [*(np.array(IMAGE_SIZE) - 1), 1]], dtype=float)
        out_world = (image.affine @ out_corners.T).T[:, :3]
        spacing_in, spacing_out = np.array(source.header.get_zooms()), np.array(image.header.get_zooms())
        assert np.allclose(out_world[0] - spacing_out / 2, world[0] - spacing_in / 2, atol=1e-3)
        sidecar = json.loads(label_path.with_suffix("").with_suffix(".json").read_text())
        assert sidecar["controlnet_sha256"] == sha(trained["ckpt"] / "model_controlnet.pt")


# ----------------------------------------------------------------------------------------------------------------
# acceptance 3: BraTS adaptation


def write_brats_bundle(root: Path, old_keys: bool, seed: int = 1) -> tuple[Path, str]:
    """A BraTS-shaped bundle: model-zoo config names and transforms, AutoencoderKL weights with random values, under
    the old MONAI Generative key names (``num_channels`` in the config, upsampling ``conv`` keys) or the current
    ones. Returns the folder and the state hash of the weights (under current names)."""
    from monai.networks.nets import AutoencoderKL

    sys.path.insert(0, str(BUNDLE))
    (root / "configs").mkdir(parents=True)
    (root / "models").mkdir()
    channels_key = "num_channels" if old_keys else "channels"
    target = "generative.networks.nets.AutoencoderKL" if old_keys else "monai.networks.nets.autoencoderkl.AutoencoderKL"
    ae = {k: v for k, v in AE_KWARGS.items() if k not in ("channels", "latent_channels", "include_fc")}
    config = {
        "latent_channels": 8,
        "autoencoder_def": {"_target_": target, **ae, channels_key: [8, 8, 8], "latent_channels": "@latent_channels"},
        "preprocessing_transforms": [
            {"_target_": "LoadImaged", "keys": "image"},
            {
                "_target_": "ScaleIntensityRangePercentilesd",
                "keys": "image",
                "lower": 0,
                "upper": 99.5,
                "b_min": 0,
                "b_max": 1,
            },
        ],
    }
    name = "train_autoencoder.json" if old_keys else "inference.json"
    (root / "configs" / name).write_text(json.dumps(config, indent=1))
    torch.manual_seed(seed)
    network = AutoencoderKL(**AE_KWARGS)
    state = network.state_dict()
    if old_keys:
        state = {key.replace(".postconv.", ".conv."): value for key, value in state.items()}
    torch.save(state, root / "models" / "model_autoencoder.pt")
    from hashlib import sha256

    digest = sha256()
    for key in sorted(network.state_dict()):
        tensor = network.state_dict()[key].contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.numpy().tobytes())
    sys.path.remove(str(BUNDLE))
    return root, digest.hexdigest()


@pytest.mark.slow
def test_adaptation_loads_old_keys_and_trains_the_diffusion_model_on_a_frozen_autoencoder(bundle, prepared, tmp_path):
    brats, source_hash = write_brats_bundle(tmp_path / "brats_old", old_keys=True)
    ckpt = tmp_path / "ckpt"
    overrides = {**TRAIN, "crop_mode": "full", "output_dir": str(tmp_path / "out"), "train#trainer#max_epochs": 1}
    # the tools command, which runs configs/adapt_brats.json through monai.bundle
    Cli().adapt_brats(str(brats), str(prepared["full"]), str(ckpt), overrides=json.dumps(overrides))
    record = json.loads((ckpt / "adaptation.json").read_text())
    assert record["key_style"] == "generative" and record["renamed_keys"] > 0
    assert record["mri_normalisation_replaced"]["_target_"] == "ScaleIntensityRangePercentilesd"
    assert record["ct_normalisation"]["_target_"] == "ScaleIntensityRanged"
    assert record["autoencoder_state_sha256"] == source_hash  # the BraTS weights, under current names
    assert record["autoencoder_state_sha256_after_diffusion"] == source_hash  # unchanged by the diffusion training
    assert record["autoencoder_sha256_before_diffusion"] == record["autoencoder_sha256_after_diffusion"]
    assert record["diffusion_epochs"] == 1 and (ckpt / "model.pt").is_file()
    assert json.loads((ckpt / "adaptation.json").read_text())["autoencoder_unchanged_by_diffusion_training"]


def test_adaptation_loads_new_keys_and_refuses_another_architecture(ldm, bundle, tmp_path):
    brats, source_hash = write_brats_bundle(tmp_path / "brats_new", old_keys=False)
    record = ldm.adapt_brats.convert_brats_autoencoder(brats, tmp_path / "ae.pt", bundle, NETS)
    assert record["key_style"] == "monai" and record["renamed_keys"] == 0
    assert record["autoencoder_state_sha256"] == source_hash
    assert record["architecture"]["channels"] == [8, 8, 8] and record["architecture"]["latent_channels"] == 8
    with pytest.raises(ValueError, match="differs from this bundle's autoencoder_def: channels"):
        ldm.adapt_brats.convert_brats_autoencoder(
            brats, tmp_path / "x.pt", bundle, {**NETS, "autoencoder_def#channels": [8, 8, 16]}
        )
    (brats / "configs" / "inference.json").unlink()  # no config: the weights alone must still fit exactly
    with pytest.raises(ValueError, match="do not fit this AutoencoderKL"):
        ldm.adapt_brats.convert_brats_autoencoder(
            brats, tmp_path / "y.pt", bundle, {**NETS, "autoencoder_def#channels": [8, 8, 16]}
        )


@pytest.mark.slow
def test_adaptation_finetune_mode_changes_the_autoencoder_before_the_diffusion_stage(ldm, bundle, prepared, tmp_path):
    brats, source_hash = write_brats_bundle(tmp_path / "brats", old_keys=True, seed=3)
    overrides = {**TRAIN, "crop_mode": "full", "output_dir": str(tmp_path / "out"), "train#trainer#max_epochs": 1}
    record = ldm.adapt_brats.adapt(
        brats,
        prepared["full"],
        bundle,
        tmp_path / "ckpt",
        "finetune",
        overrides,
        {**AUTOENCODER, "adversarial_weight": 0.1},
    )
    assert record["mode"] == "finetune" and record["autoencoder_state_sha256"] == source_hash
    assert record["autoencoder_state_sha256_after_diffusion"] != source_hash  # fine-tuned on CT first
    assert record["autoencoder_unchanged_by_diffusion_training"]


def test_autoencoder_key_mapping(ldm):
    from monai.networks.nets import AutoencoderKL

    target = AutoencoderKL(**{**AE_KWARGS, "attention_levels": [False, False, True]}).state_dict()
    old = {}
    for key, value in target.items():
        key = key.replace(".postconv.", ".conv.").replace(".attn.to_", ".to_").replace(".attn.out_proj.", ".proj_attn.")
        old["module." + key] = value
    mapped, report = ldm.latent.map_autoencoder_state(ldm.latent.unwrap_state_dict({"state_dict": old}), target)
    assert report["key_style"] == "generative" and set(mapped) == set(target)
    assert all(torch.equal(mapped[k], target[k]) for k in target)
    with pytest.raises(ValueError, match="1 unknown keys \\['stray.weight'\\]"):
        ldm.latent.map_autoencoder_state({**target, "stray.weight": torch.zeros(1)}, target)


# ----------------------------------------------------------------------------------------------------------------
# configs of the seed: crop modes and Table 1


SEED_TABLE1 = {  # model: crop mode, 240x240x155?, milestones, lr, gamma, epochs (seed 002 Tables 1 and 6)
    1: ("full", False, [100, 1000], 1e-5, 0.1, 4600),
    2: ("pancreas", False, [100, 1000], 1e-5, 0.1, 1600),
    3: ("pancreas", False, [700, 1400], 1e-5, 0.1, 2600),
    4: ("pancreas", False, [100, 1000], 1e-4, 0.1, 1000),
    5: ("pancreas", False, [100, 1000], 1e-5, 0.5, 1100),
    6: ("pancreas", True, [100, 1000], 1e-5, 0.1, 1800),
    7: ("semi", True, [100, 1000], 1e-5, 0.1, 1800),
}


@pytest.mark.parametrize("model", sorted(SEED_TABLE1))
def test_table1_configs_reproduce_the_seed_schedules(bundle, model):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(
        [str(bundle / "configs" / "train.json"), str(bundle / "configs" / "table1" / f"model{model}.json")]
    )
    parser["bundle_root"] = str(bundle)
    mode, resized, milestones, lr, gamma, epochs = SEED_TABLE1[model]
    assert parser["crop_mode"] == mode
    assert parser["prep_out_shape"] == ([240, 240, 155] if resized else None)
    assert parser["pre_resize"] == (None if resized else [512, 512, -1])
    assert parser.get_parsed_content("lr_milestones") == milestones
    assert parser.get_parsed_content("learning_rate") == lr and parser.get_parsed_content("lr_gamma") == gamma
    assert parser["train#trainer#max_epochs"] == epochs
    assert parser.get_parsed_content("ckpt_dir").endswith(f"table1_model{model}")


@pytest.mark.slow
def test_a_table1_config_trains_on_its_crop(bundle, prepared, trained, tmp_path):
    """Model 4 (pancreas crop, starting learning rate 1e-4) for one epoch; its in-plane pre-resize to 512 is made
    64 here to keep the test short (the same transform)."""
    overrides = {
        **TRAIN, "dataset_dir": str(prepared["pancreas"]), "ckpt_dir": str(tmp_path), "output_dir": str(tmp_path / "o"),
        "autoencoder_path": str(trained["ckpt"] / "model_autoencoder.pt"), "train#trainer#max_epochs": 1,
        "pre_resize": [64, 64, -1],
    }  # fmt: skip
    workflow = run_workflow(bundle, ["configs/train.json", "configs/table1/model4.json"], "train", overrides=overrides)
    assert workflow.parser.get_parsed_content("optimizer").param_groups[0]["initial_lr"] == 1e-4
    image = workflow.parser.get_parsed_content("train#dataset")[0]["image"]
    assert tuple(image.shape[1:]) == tuple(IMAGE_SIZE)
    assert json.loads((tmp_path / "latent_stats.json").read_text())["crop_mode"] == "pancreas"


def test_crop_mode_must_match_the_prepared_data(ldm, prepared, tmp_path):
    assert ldm.data.check_prepared(prepared["semi"], "semi")["mode"] == "semi"
    with pytest.raises(
        ValueError, match="crop_mode is 'pancreas' but it was prepared with mode 'semi'.*--mode pancreas"
    ):
        ldm.data.check_prepared(prepared["semi"], "pancreas")
    with pytest.raises(ValueError, match="resized to None, the config expects \\[240, 240, 155\\]"):
        ldm.data.check_prepared(prepared["semi"], "semi", [240, 240, 155])
    windowed = tmp_path / "windowed"
    shutil.copytree(prepared["semi"], windowed)
    datalist = json.loads((windowed / "dataset.json").read_text())
    datalist["prep"]["hu_window"] = [-175.0, 250.0]
    (windowed / "dataset.json").write_text(json.dumps(datalist))
    with pytest.raises(ValueError, match="windowed to \\[0, 1\\].*--hu_window None"):
        ldm.data.check_prepared(windowed, "semi")


def test_perceptual_term_needs_a_local_weights_file(ldm, tmp_path):
    assert ldm.trainers.make_perceptual_loss(0.0, None) is None
    with pytest.raises(ValueError, match="perceptual_weights_path None is not a file"):
        ldm.trainers.make_perceptual_loss(0.1, None)
    with pytest.raises(ValueError, match="only 'resnet50' loads local weights offline"):
        ldm.trainers.make_perceptual_loss(0.1, str(tmp_path), network_type="medicalnet_resnet10_23datasets")


# ----------------------------------------------------------------------------------------------------------------
# acceptance 5: evaluation of generated volumes


def write_fake_seg_bundle(root: Path) -> Path:
    """A seg_unet3d-shaped bundle whose 'network' calls every voxel above 37.5 HU pancreas (a 1x1x1 convolution),
    with seg_unet3d's kind of preprocessing (reorientation, resampling, foreground crop) that must be inverted."""
    (root / "configs").mkdir(parents=True)
    (root / "models").mkdir()
    inference = {
        "imports": ["$import torch"],
        "bundle_root": ".",
        "device": "$torch.device('cpu')",
        "network_def": {"_target_": "torch.nn.Conv3d", "in_channels": 1, "out_channels": 3, "kernel_size": 1},
        "preprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "LoadImaged", "keys": "image", "image_only": True},
            {"_target_": "EnsureChannelFirstd", "keys": "image"},
            {"_target_": "Orientationd", "keys": "image", "axcodes": "LPS", "labels": None},
            {"_target_": "Spacingd", "keys": "image", "pixdim": [9.0, 9.0, 9.0], "mode": "bilinear"},
            {"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": -175, "a_max": 250, "b_min": 0.0,
             "b_max": 1.0, "clip": True},
            {"_target_": "CropForegroundd", "keys": "image", "source_key": "image", "allow_smaller": True},
        ]},
        "inferer": {"_target_": "SimpleInferer"},
    }  # fmt: skip
    (root / "configs" / "inference.json").write_text(json.dumps(inference))
    channel_def = {"0": "background", "1": "pancreas", "2": "tumour"}
    meta = {
        "version": "0.1.0",
        "network_data_format": {"outputs": {"pred": {"num_channels": 3, "channel_def": channel_def}}},
    }
    (root / "configs" / "metadata.json").write_text(json.dumps(meta))
    conv = torch.nn.Conv3d(1, 3, 1)
    with torch.no_grad():
        conv.weight.zero_()
        conv.bias.copy_(torch.tensor([0.0, -5.0, -100.0]))
        conv.weight[1] = 10.0
    torch.save(conv.state_dict(), root / "models" / "model.pt")
    return root


@pytest.mark.slow
def test_evaluation_command_reports_each_crop_mode(bundle, prepared, trained, tmp_path):
    synthetic = tmp_path / "synthetic"
    run_workflow(
        bundle, "configs/inference.json", "inference",
        overrides=infer_overrides(trained["ckpt"], synthetic, num_inference_steps=2, num_samples=2),
    )  # fmt: skip
    # a "synthetic" folder holding real crops: its histogram distance to the real crops must be 0
    copies = tmp_path / "real_as_synthetic"
    copies.mkdir()
    for entry in json.loads((prepared["semi"] / "dataset.json").read_text())["test"]:
        shutil.copy(prepared["semi"] / entry["image"], copies / f"{entry['case']}_image.nii.gz")
    seg = write_fake_seg_bundle(tmp_path / "seg_unet3d")
    runs = {"full": {"synthetic": str(synthetic), "real": str(prepared["full"])},
            "semi": {"synthetic": str(copies), "real": str(prepared["semi"])}}  # fmt: skip
    out = tmp_path / "report"
    workflow = run_workflow(
        bundle, "configs/evaluate_synthetic.json", "inference",
        overrides={"runs": runs, "output_dir": str(out), "seg_bundle_dir": str(seg), "max_real": 2},
    )  # fmt: skip
    report = workflow.parser.get_parsed_content("report")
    full, semi = report["modes"]["full"], report["modes"]["semi"]
    assert semi["histogram_distance"]["wasserstein_hu"] < 1e-6 and semi["histogram_distance"]["intersection"] > 0.999
    assert full["histogram_distance"]["wasserstein_hu"] > 1.0 and full["hu_window"] == [-1000, 1000]
    assert full["n_synthetic"] == 2 and full["pancreas_found"]["of"] == 2
    assert report["precision"]["precision"] == "fp32"  # what seg_unet3d ran in
    assert semi["pancreas_found_real"]["of"] == 2 and semi["pancreas_found"] == semi["pancreas_found_real"]
    assert full["medians_hu"]["liver"]["real"] is not None and "pancreas (seg_unet3d)" in full["medians_hu"]
    for name in ("report.json", "report.md", "montage_full.png", "montage_semi.png", "histograms.png"):
        assert (out / name).stat().st_size > 0, name
    skipped = run_workflow(
        bundle, "configs/evaluate_synthetic.json", "inference",
        overrides={"runs": {"full": runs["full"]}, "output_dir": str(tmp_path / "r2"),
                   "seg_bundle_dir": str(tmp_path / "absent"), "max_real": 1},
    ).parser.get_parsed_content("report")  # fmt: skip
    assert skipped["seg_unet3d"].startswith("skipped:") and skipped["modes"]["full"]["pancreas_found"] is None


def test_pancreas_finder_maps_the_seg_bundle_prediction_back_to_the_scan(ldm, prepared, tmp_path):
    finder = ldm.evaluate_synthetic.PancreasFinder(write_fake_seg_bundle(tmp_path / "seg_unet3d"))
    entry = json.loads((prepared["full"] / "dataset.json").read_text())["test"][0]
    scan = nib.load(prepared["full"] / entry["image"])
    mask, voxel_ml = finder(prepared["full"] / entry["image"])
    expected = np.asarray(scan.dataobj) > 37.5  # what the fake network calls pancreas, on the scan's own grid
    assert mask.shape == expected.shape and voxel_ml == pytest.approx(np.prod(scan.header.get_zooms()) / 1000)
    assert ldm.evaluate_synthetic.dice(mask, expected) > 0.7  # resampled to 9 mm and back


def test_histogram_distances_match_tools_realism(ldm):
    from tools.realism import histogram_distances

    rng = np.random.default_rng(0)
    a, b = rng.normal(40, 60, 5000), rng.normal(0, 200, 7000)
    ours = ldm.evaluate_synthetic.histogram_distances(a, b)
    theirs = histogram_distances(a, b)
    assert ours == pytest.approx(theirs)


# ----------------------------------------------------------------------------------------------------------------
# DDP and kill-and-resume (subprocesses, as a user runs them)


def cli_overrides(values: dict) -> list[str]:
    args = []
    for key, value in values.items():
        args += [f"--{key}", json.dumps(value) if not isinstance(value, str) else value]
    return args


@pytest.mark.slow
def test_ddp_training_on_two_cpu_processes(bundle, prepared, trained, tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    shutil.copy(trained["ckpt"] / "model_autoencoder.pt", ckpt)
    overrides = {
        **train_overrides(prepared["full"], ckpt, tmp_path / "out"),
        "train#trainer#max_epochs": 1,
        "bundle_root": str(bundle),
    }
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
        "-m", "monai.bundle", "run",
        "--config_file", "['configs/train.json','configs/multi_gpu_train.json']",
        "--meta_file", "configs/metadata.json", "--logging_file", "configs/logging.conf", *cli_overrides(overrides),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(command, cwd=bundle, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (ckpt / "model.pt").is_file() and (ckpt / "checkpoint_diffusion_epoch=1.pt").is_file()
    state = torch.load(ckpt / "model.pt", map_location="cpu", weights_only=True)
    assert not any(key.startswith("module.") for key in state)  # saved unwrapped, loadable without DDP
    assert sha(ckpt / "model_autoencoder.pt") == trained["ae_sha_before"]


@pytest.mark.slow
def test_killed_training_resumes_from_its_last_checkpoint(bundle, prepared, trained, tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    shutil.copy(trained["ckpt"] / "model_autoencoder.pt", ckpt)
    max_epochs = 4
    overrides = {**train_overrides(prepared["full"], ckpt, tmp_path / "out"), "train#trainer#max_epochs": max_epochs,
                 "bundle_root": str(bundle), "val_interval": 100}  # fmt: skip
    command = [
        sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/train.json",
        "--meta_file", "configs/metadata.json", "--logging_file", "configs/logging.conf", *cli_overrides(overrides),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    first_log = tmp_path / "first.log"
    with first_log.open("w") as log:
        process = subprocess.Popen(command, cwd=bundle, stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.time() + 240
        while time.time() < deadline and process.poll() is None:
            if list(ckpt.glob("checkpoint_diffusion_epoch=*.pt")):
                break
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
        process.wait()
    saved = sorted(
        int(re.search(r"epoch=(\d+)", p.name).group(1)) for p in ckpt.glob("checkpoint_diffusion_epoch=*.pt")
    )
    assert saved and saved[-1] < max_epochs, first_log.read_text()[-2000:]
    done = subprocess.run(command, cwd=bundle, capture_output=True, text=True, timeout=240, env=env)
    assert done.returncode == 0, done.stdout[-3000:]
    resumed = re.search(r"resumed from \S+epoch=(\d+)\.pt \(epoch (\d+)", done.stdout)
    assert resumed and int(resumed.group(2)) >= saved[-1], done.stdout[-2000:]
    trainer_epochs = sorted(
        set(int(m) for m in re.findall(r"SupervisedTrainer - INFO - Epoch\[(\d+)\] Complete", done.stdout))
    )
    assert trainer_epochs and trainer_epochs[0] == int(resumed.group(2)) + 1 and trainer_epochs[-1] == max_epochs
    assert (ckpt / f"checkpoint_diffusion_epoch={max_epochs}.pt").is_file() and (ckpt / "model.pt").is_file()
