"""The modules every bundle vendors: resumable atomic checkpoints, the NaN stop, synthetic provenance."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from ignite.engine import Events
from monai.data import MetaTensor
from monai.engines import SupervisedTrainer

from tools.bundle_scripts import SOURCE_DIR, VENDORED
from tools.bundle_scripts.checkpointing import (
    AtomicCheckpointSaver,
    ResumeFromLatest,
    StopOnNonFiniteLoss,
    latest_checkpoint,
    list_checkpoints,
)
from tools.bundle_scripts.provenance import SaveSyntheticd, sha256_file, sidecar_path, write_synthetic_nifti

REPO = Path(__file__).resolve().parents[1]


def test_every_bundle_copy_equals_the_source():
    for bundle, modules in VENDORED.items():
        scripts = REPO / "bundles" / bundle / "scripts"
        if not (REPO / "bundles" / bundle / "configs").is_dir():
            continue  # a skeleton without configs carries no scripts yet
        for module in modules:
            copy = scripts / module
            assert copy.is_file(), f"{copy} is missing: run `python -m tools sync_bundle_scripts`"
            assert copy.read_text() == (SOURCE_DIR / module).read_text(), (
                f"{copy} differs from tools/bundle_scripts/{module}: edit the source and run "
                "`python -m tools sync_bundle_scripts`"
            )


class _Counter:
    """Counts the iterations a trainer really runs (to tell a resumed run from a restarted one)."""

    def __init__(self):
        self.epochs_run = []

    def attach(self, engine):

        engine.add_event_handler(Events.EPOCH_COMPLETED, lambda e: self.epochs_run.append(e.state.epoch))


def _trainer(ckpt_dir, max_epochs, extra_handlers=(), loss_fn=None, seed=0):
    torch.manual_seed(seed)
    net = torch.nn.Linear(3, 1)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    data = [{"image": torch.randn(2, 3), "label": torch.randn(2, 1)} for _ in range(3)]
    counter = _Counter()
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=max_epochs,
        train_data_loader=data,
        network=net,
        optimizer=opt,
        loss_function=loss_fn or torch.nn.MSELoss(),
        train_handlers=list(extra_handlers) + [counter],
        amp=False,
    )
    objects = {"model": net, "optimizer": opt, "lr_scheduler": sched, "trainer": trainer}
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: sched.step())
    return trainer, objects, counter


def _attach_checkpointing(trainer, objects, ckpt_dir, **saver_kwargs):
    resume = ResumeFromLatest(ckpt_dir, objects)
    resume.attach(trainer)
    saver = AtomicCheckpointSaver(ckpt_dir, objects, **saver_kwargs)
    saver.attach(trainer)
    return resume, saver


def test_a_stopped_run_resumes_from_its_last_epoch(tmp_path):
    trainer, objects, counter = _trainer(tmp_path, max_epochs=2)
    _attach_checkpointing(trainer, objects, tmp_path)
    trainer.run()
    assert counter.epochs_run == [1, 2]
    weights_after_2 = objects["model"].weight.detach().clone()
    lr_after_2 = objects["optimizer"].param_groups[0]["lr"]

    again, objects2, counter2 = _trainer(tmp_path, max_epochs=4, seed=123)
    resume, _ = _attach_checkpointing(again, objects2, tmp_path)
    again.add_event_handler(Events.STARTED, lambda e: weights_seen.append(objects2["model"].weight.detach().clone()))
    weights_seen = []
    again.run()
    assert resume.resumed_from.name == "checkpoint_epoch=2.pt"
    assert counter2.epochs_run == [3, 4], "the second run continues with epoch 3, it does not start from zero"
    assert torch.equal(weights_seen[0], weights_after_2)
    assert objects2["optimizer"].param_groups[0]["lr"] == pytest.approx(lr_after_2 * 0.25)
    assert again.state.iteration == 12
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint_epoch=4.pt", "checkpoint_epoch=3.pt"]


def test_a_kill_during_save_leaves_the_previous_checkpoint_loadable(tmp_path, monkeypatch):
    trainer, objects, _ = _trainer(tmp_path, max_epochs=3)
    _, saver = _attach_checkpointing(trainer, objects, tmp_path, n_saved=1)
    real_save = torch.save

    def dying_save(obj, f, *args, **kwargs):
        if trainer.state.epoch == 3:
            f.write(b"PK\x03\x04 half a zip")
            raise KeyboardInterrupt("killed while saving")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        trainer.run()
    monkeypatch.setattr(torch, "save", real_save)
    assert latest_checkpoint(tmp_path).name == "checkpoint_epoch=2.pt"
    assert not list(tmp_path.glob("*.part")), "the interrupted temporary file is removed"
    state = torch.load(tmp_path / "checkpoint_epoch=2.pt", map_location="cpu", weights_only=True)
    assert state["trainer"]["iteration"] == 2 * state["trainer"]["epoch_length"]


def test_a_damaged_or_malicious_newer_checkpoint_is_skipped(tmp_path):
    trainer, objects, _ = _trainer(tmp_path, max_epochs=1)
    _attach_checkpointing(trainer, objects, tmp_path)
    trainer.run()
    (tmp_path / "checkpoint_epoch=7.pt").write_bytes(b"PK\x03\x04 truncated")

    class Payload:
        def __reduce__(self):
            return (exec, ("raise SystemExit('payload ran')",))

    (tmp_path / "checkpoint_epoch=9.pt").write_bytes(pickle.dumps(Payload()))
    assert latest_checkpoint(tmp_path).name == "checkpoint_epoch=1.pt"


def test_non_finite_loss_stops_with_a_clear_error(tmp_path):
    calls = {"n": 0}

    def poisoned(pred, target):
        calls["n"] += 1
        loss = torch.nn.functional.mse_loss(pred, target)
        return loss * float("nan") if calls["n"] > 4 else loss

    stop = StopOnNonFiniteLoss(save_dir=tmp_path)
    trainer, objects, _ = _trainer(tmp_path, max_epochs=3, extra_handlers=[stop], loss_fn=poisoned)
    AtomicCheckpointSaver(tmp_path, objects).attach(trainer)
    with pytest.raises(FloatingPointError, match=r"loss is nan at epoch 2, iteration 5.*checkpoint_epoch=1\.pt"):
        trainer.run()
    assert latest_checkpoint(tmp_path).name == "checkpoint_epoch=1.pt"


def test_write_synthetic_nifti_marks_and_traces(tmp_path):
    affine = np.diag([0.8, 0.8, 2.5, 1.0])
    affine[:3, 3] = [10, -20, 30]
    provenance = {"bundle": "vae_ct", "version": "0.1.0", "checkpoint_sha256": "ab" * 32, "seed": 17}
    image_path, side = write_synthetic_nifti(
        tmp_path / "case_image.nii.gz", np.full((4, 5, 6), 40.4), affine, provenance
    )
    img = nib.load(str(image_path))
    assert img.header["descrip"].tobytes().rstrip(b"\x00").decode() == "SYNTHETIC vae_ct 0.1.0 seed=17"
    np.testing.assert_allclose(img.affine, affine)
    assert img.get_data_dtype() == np.int16 and np.all(np.asanyarray(img.dataobj) == 40)
    record = json.loads(side.read_text())
    assert record["synthetic"] is True and record["seed"] == 17 and record["sha256"] == sha256_file(image_path)
    assert side == sidecar_path(image_path) and side.name == "case_image.json"


def test_save_syntheticd_uses_the_items_geometry(tmp_path):
    affine = torch.diag(torch.tensor([1.5, 1.5, 3.0, 1.0], dtype=torch.float64))
    meta = {"filename_or_obj": "/data/masks/case_007.nii.gz"}
    item = {
        "image": MetaTensor(torch.full((1, 3, 4, 5), 120.0), affine=affine, meta=dict(meta)),
        "label": MetaTensor(torch.ones(1, 3, 4, 5), affine=affine, meta=dict(meta)),
        "provenance": {"seed": 3},
    }
    saver = SaveSyntheticd(["image", "label"], tmp_path, provenance={"bundle": "vae_ct", "version": "1.0.0"})
    out = saver(item)
    assert Path(out["image_path"]).name == "case_007_image.nii.gz"
    label = nib.load(out["label_path"])
    assert label.get_data_dtype() == np.uint8 and label.header.get_intent()[0] == "label"
    np.testing.assert_allclose(label.affine, affine.numpy())
    assert json.loads(sidecar_path(out["label_path"]).read_text())["seed"] == 3
