"""`tools synthesize` (issue 7): per-item seeds, resume after a kill, torchrun sharding, provenance marks."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import pytest
import torch

from tools.errors import InputError
from tools.synthesize import item_seed, plan_items, synthesize

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
VAE_TINY = {"roi_size": [16, 16, 16], "strides": [2, 2], "channels": [4, 8], "latent_size": 8}
LDM_TINY = {
    "image_size": [32, 32, 16],
    "autoencoder_def#channels": [8, 8, 8],
    "autoencoder_def#num_res_blocks": 1,
    "autoencoder_def#norm_num_groups": 4,
    "diffusion_def#channels": [8, 8, 16],
    "diffusion_def#num_head_channels": [0, 8, 8],
    "diffusion_def#num_res_blocks": 1,
    "diffusion_def#norm_num_groups": 4,
    "conditioning_embedding_channels": [4, 8, 8],
    "num_inference_steps": 2,
}


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def hashes(folder: Path) -> dict[str, str]:
    """SHA-256 of every case file (volumes and sidecars) of a synthetic set."""
    return {p.name: sha(p) for p in sorted(folder.iterdir()) if p.name.endswith((".nii.gz", ".json"))
            and p.name not in ("datalist.json", "synthesize.json")}  # fmt: skip


def bundle_network(bundle: str, configs: list[str], overrides: dict, keys: list[str]) -> list[torch.nn.Module]:
    from monai.bundle import ConfigParser

    from tools.bundles import bundle_dir, bundle_on_path

    root = bundle_dir(bundle)
    parser = ConfigParser()
    parser.read_config([str(root / "configs" / c) for c in configs])
    for key, value in overrides.items():
        parser[key] = value
    with bundle_on_path(root):
        torch.manual_seed(0)
        return [parser.get_parsed_content(k) for k in keys]


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> Path:
    from tools.phantom import make_dataset

    out = tmp_path_factory.mktemp("syn_phantom")
    make_dataset(out, n_cases=4, seed=3, shape=(48, 48, 24), tumor_fraction=0.5, test_fraction=0.2, progress=False)
    return out


@pytest.fixture(scope="module")
def vae_weights(tmp_path_factory) -> Path:
    """Tiny vae_ct 3D weights (random values, the inference config's architecture)."""
    folder = tmp_path_factory.mktemp("vae_weights")
    (net,) = bundle_network("vae_ct", ["inference.json", "inference_3d.json"], VAE_TINY, ["network_def"])
    torch.save({"model": net.state_dict()}, folder / "model.pt")
    return folder


@pytest.fixture(scope="module")
def vae_reference(phantom, vae_weights, tmp_path_factory) -> Path:
    """An uninterrupted one-process run: 3 masks x 2 samples."""
    out = tmp_path_factory.mktemp("vae_reference")
    synthesize("vae_ct", phantom, out, ckpt_dir=vae_weights, overrides=VAE_TINY, samples_per_item=2, progress=False)
    return out


def test_item_seeds_depend_only_on_seed_index_and_sample():
    records = [{"label": f"/x/case{i}.nii.gz"} for i in range(3)]
    items = plan_items(records, 2, seed=5)
    assert [it["seed"] for it in items] == [5, 6, 100005, 100006, 200005, 200006]
    assert [it["name"] for it in items][:2] == ["case0_s000", "case0_s001"]
    assert plan_items(records[:2], 2, seed=5) == items[:4]  # a shorter list does not change the seeds
    assert item_seed(5, 2, 1) == 200006
    with pytest.raises(ValueError):
        item_seed(0, 0, 100_000)
    twins = plan_items([{"label": "/a/x.nii.gz"}, {"label": "/b/x.nii.gz"}], 1, 0)
    assert len({it["name"] for it in twins}) == 2  # same file name in two folders: still two cases


def test_vae_set_carries_provenance_and_a_complete_datalist(vae_reference, vae_weights, phantom):
    datalist = json.loads((vae_reference / "datalist.json").read_text())
    entries = datalist["training"]
    masks = json.loads((phantom / "dataset.json").read_text())["training"]
    assert len(entries) == 2 * len(masks) == datalist["n_expected"]
    model_sha = sha(vae_weights / "model.pt")
    for entry in entries:
        assert entry["synthetic"] is True and entry["generator"] == "vae_ct/vae"
        assert entry["source_patient"] in {m["patient"] for m in masks}
        image = nib.load(vae_reference / entry["image"])
        label = nib.load(vae_reference / entry["label"])
        descrip = image.header["descrip"].tobytes().decode().rstrip("\x00")
        assert descrip == f"SYNTHETIC vae_ct 0.1.0 seed={entry['seed']}"
        assert label.header["descrip"].tobytes().startswith(b"SYNTHETIC vae_ct")
        for key in ("image", "label"):
            sidecar = json.loads((vae_reference / entry[key].replace(".nii.gz", ".json")).read_text())
            assert sidecar["synthetic"] is True and sidecar["sha256"] == sha(vae_reference / entry[key])
            assert sidecar["checkpoint_sha256"] == model_sha and sidecar["item_seed"] == entry["seed"]
    seeds = [e["seed"] for e in entries]
    assert seeds == [item_seed(0, m, k) for m in range(len(masks)) for k in range(2)]


def test_vae_rerun_makes_only_missing_cases_with_the_same_bytes(vae_reference, vae_weights, phantom, tmp_path):
    import shutil

    out = tmp_path / "partial"
    shutil.copytree(vae_reference, out)
    missing = sorted(out.glob("*_s001_*"))  # drop every second sample, and half a case: image without label
    for path in missing:
        path.unlink()
    (out / next(iter(sorted(vae_reference.glob("*_s000_label.json")))).name).unlink()
    kept = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.iterdir() if "_s000_" in p.name}
    kept.pop(next(iter(sorted(vae_reference.glob("*_s000_label.json")))).name, None)
    synthesize("vae_ct", phantom, out, ckpt_dir=vae_weights, overrides=VAE_TINY, samples_per_item=2, progress=False)
    assert hashes(out) == hashes(vae_reference)
    first_case = sorted(vae_reference.glob("*_s000_label.json"))[0].name.split("_s000_")[0]
    for name, stamp in kept.items():
        if not name.startswith(first_case):  # the unfinished case may be rewritten, finished ones never
            assert (out / name).stat().st_ino == stamp[0] and (out / name).stat().st_mtime_ns == stamp[1], name
    assert json.loads((out / "datalist.json").read_text()) == json.loads((vae_reference / "datalist.json").read_text())


def test_rerun_with_other_settings_is_refused(vae_reference, vae_weights, phantom):
    with pytest.raises(InputError, match="seed"):
        synthesize("vae_ct", phantom, vae_reference, ckpt_dir=vae_weights, overrides=VAE_TINY, samples_per_item=2,
                   seed=1, progress=False)  # fmt: skip


@pytest.mark.slow
def test_difftumor_killed_half_way_and_rerun_equals_an_uninterrupted_run(phantom, tmp_path):
    """Acceptance 4: SIGKILL after the first finished case, rerun, compare with an uninterrupted run."""
    args = dict(overrides={"family_name": "handcrafted"}, samples_per_item=4, progress=False)
    reference = tmp_path / "reference"
    synthesize("difftumor", phantom, reference, **args)
    out = tmp_path / "killed"
    command = [PYTHON, "-m", "tools", "synthesize", "difftumor", str(phantom), str(out), "--samples_per_item", "4",
               "--overrides", json.dumps({"family_name": "handcrafted"}), "--progress", "False"]  # fmt: skip
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not list(out.glob("*_label.json")) and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    finished = sorted(p.name.replace("_label.json", "") for p in out.glob("*_label.json"))
    assert finished and len(finished) < 4, f"kill came too late or too early: {finished}"
    stamps = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.iterdir()
              if any(p.name.startswith(name + "_") for name in finished)}  # fmt: skip
    synthesize("difftumor", phantom, out, **args)
    assert hashes(out) == hashes(reference) and len(hashes(reference)) == 16
    for name, (inode, mtime) in stamps.items():
        assert (out / name).stat().st_ino == inode and (out / name).stat().st_mtime_ns == mtime, name
    entries = json.loads((out / "datalist.json").read_text())["training"]
    assert [e["generator"] for e in entries] == ["difftumor/handcrafted"] * 4
    image = nib.load(out / entries[0]["image"])
    assert image.header["descrip"].tobytes().startswith(b"SYNTHETIC difftumor 0.1.0 seed=")
    assert (nib.load(out / entries[0]["label"]).get_fdata() == 2).any()  # a tumor was added


@pytest.mark.slow
def test_two_processes_with_torchrun_give_the_same_files_as_one(vae_reference, vae_weights, phantom, tmp_path):
    out = tmp_path / "ddp"
    torchrun = str(Path(PYTHON).parent / "torchrun")
    command = [torchrun, "--nproc_per_node=2", "--standalone", "-m", "tools", "synthesize", "vae_ct", str(phantom),
               str(out), "--ckpt_dir", str(vae_weights), "--overrides", json.dumps(VAE_TINY),
               "--samples_per_item", "2", "--progress", "False"]  # fmt: skip
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert hashes(out) == hashes(vae_reference)
    assert json.loads((out / "datalist.json").read_text()) == json.loads((vae_reference / "datalist.json").read_text())


@pytest.mark.slow
def test_ldm_controlnet_set_from_masks(phantom, tmp_path):
    weights = tmp_path / "ldm"
    weights.mkdir()
    nets = bundle_network("ldm_abdomen", ["inference.json", "inference_controlnet.json"], LDM_TINY,
                          ["autoencoder_def", "diffusion_def", "controlnet_def"])  # fmt: skip
    for net, name in zip(nets, ("model_autoencoder.pt", "model.pt", "model_controlnet.pt")):
        torch.save(net.state_dict(), weights / name)
    ae_sha = sha(weights / "model_autoencoder.pt")
    stats = {"scale_factor": 1.0, "latent_shape": [8, 8, 8, 4], "autoencoder_sha256": ae_sha,
             "hu_window": [-1000.0, 1000.0], "image_size": LDM_TINY["image_size"], "objective": "epsilon",
             "reference_affine": torch.eye(4).tolist()}  # fmt: skip
    (weights / "latent_stats.json").write_text(json.dumps(stats))
    out = tmp_path / "out"
    with pytest.raises((ValueError, RuntimeError)) as info:  # the default crop_mode "full" wants a prepared folder
        synthesize("ldm_abdomen", phantom, out, ckpt_dir=weights, overrides=LDM_TINY, max_items=1, progress=False)
    chain, error = [], info.value
    while error is not None:
        chain.append(str(error))
        error = error.__cause__ or error.__context__
    assert any("no `prep` record" in text for text in chain), chain
    path = synthesize("ldm_abdomen", phantom, out, ckpt_dir=weights, overrides={**LDM_TINY, "crop_mode": "none"},
                      max_items=2, seed=3, progress=False)  # fmt: skip
    entries = json.loads(path.read_text())["training"]
    assert [e["seed"] for e in entries] == [3, 100003] and {e["generator"] for e in entries} == {"ldm_abdomen"}
    for entry in entries:
        image = nib.load(out / entry["image"])
        assert image.shape == nib.load(out / entry["label"]).shape
        assert image.header["descrip"].tobytes().startswith(b"SYNTHETIC ldm_abdomen")
        sidecar = json.loads((out / entry["image"].replace(".nii.gz", ".json")).read_text())
        assert sidecar["checkpoint_sha256"] == sha(weights / "model.pt") and sidecar["seed"] == entry["seed"]


def test_unknown_bundle_and_unusable_source_are_refused(phantom, tmp_path):
    with pytest.raises(ValueError, match="not a generative bundle"):
        synthesize("seg_unet3d", phantom, tmp_path / "x", progress=False)
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"training": []}))
    with pytest.raises(InputError):
        synthesize("vae_ct", empty, tmp_path / "y", progress=False)


def test_a_datalist_json_source_pointing_to_another_folder(vae_reference, vae_weights, phantom, tmp_path):
    masks = json.loads((phantom / "dataset.json").read_text())["training"][:1]
    datalist = tmp_path / "lists" / "masks.json"
    datalist.parent.mkdir()
    entries = [{"label": str(phantom / m["label"]), "image": str(phantom / m["image"]), "patient": m["patient"]}
               for m in masks]  # fmt: skip
    datalist.write_text(json.dumps({"training": entries}))
    path = synthesize("vae_ct", datalist, tmp_path / "out", ckpt_dir=vae_weights, overrides=VAE_TINY,
                      samples_per_item=2, progress=False)  # fmt: skip
    assert hashes(path.parent) == {k: v for k, v in hashes(vae_reference).items() if k.startswith(masks[0]["patient"])}
