"""The precision switch (issue 16): one ``precision`` key, autocast inside the network's forward, losses in float32.

The vendored ``tools/bundle_scripts/precision.py`` is tested on its own, then through seg_unet3d's own configs: a
one-epoch tiny training run with ``precision`` bf16 and fp32, recording inside ``network_def``'s forward whether
autocast is on and in which dtype, and the dtype of the loss the trainer computed. bf16 is emulated on CPUs without
AVX512-BF16 / AMX (slow), so the runs are tiny.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from tools.bundle_scripts import precision

REPO = Path(__file__).resolve().parents[1]
SEG = REPO / "bundles" / "seg_unet3d"
TINY_TRAIN = {
    "pixdim": [6.0, 6.0, 6.0],
    "roi_size": [32, 32, 32],
    "network_def#channels": [4, 8, 16, 32, 64],
    "cache_workers": 1,
    "sw_batch_size": 2,
    "train#trainer#max_epochs": 1,
    "val_interval": 1,
    "num_samples": 1,
}


class ForwardProbe:
    """Records, at each call of a module's forward, whether CPU autocast is on and its dtype."""

    def __init__(self, module: torch.nn.Module):
        self.calls: list[tuple[bool, torch.dtype | None]] = []
        module.register_forward_pre_hook(self)

    def __call__(self, module, args):
        enabled = torch.is_autocast_enabled("cpu")
        self.calls.append((enabled, torch.get_autocast_dtype("cpu") if enabled else None))


# ----------------------------------------------------------------------------------------------------------------
# the helper


def test_auto_is_fp32_on_every_cpu_and_bf16_only_when_asked(monkeypatch):
    """Native bf16 CPUs included: oneDNN's bf16 convolution backward gave NaN gradients there (resolve_precision)."""
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    assert precision.resolve_precision("auto", "cpu") == "fp32"
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    assert precision.resolve_precision("auto", "cpu") == "fp32"
    assert precision.resolve_precision("AUTO", torch.device("cpu")) == "fp32"
    assert precision.resolve_precision("auto", "cuda:0") == "fp16"  # as the bundles did with amp on CUDA
    assert precision.resolve_precision("bf16", "cpu") == "bf16"  # asked for: honoured, with a warning


def test_native_bf16_is_read_from_the_cpu_flags(monkeypatch):
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx2", "avx512_bf16"}))
    assert precision.cpu_has_native_bf16()
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx2", "fma"}))
    assert not precision.cpu_has_native_bf16()


@pytest.mark.parametrize(
    "value, device, message",
    [("bfloat", "cpu", "precision 'bfloat': expected one of auto, fp32, bf16, fp16"), ("fp16", "cpu", "needs a CUDA")],
)
def test_a_wrong_precision_is_refused_by_name(value, device, message):
    with pytest.raises(ValueError, match=message):
        precision.resolve_precision(value, device)


def test_engine_amp_and_the_gradient_scaler_are_for_fp16_only():
    assert not precision.engine_amp("bf16", "cpu") and not precision.engine_amp("fp32", "cpu")
    assert precision.engine_amp("fp16", "cuda")
    assert not precision.grad_scaler("bf16", "cpu").is_enabled()


def test_the_wrapped_network_autocasts_its_forward_returns_float32_and_keeps_the_state_dict():
    torch.manual_seed(0)
    network = torch.nn.Sequential(torch.nn.Conv3d(1, 2, 3), torch.nn.InstanceNorm3d(2))
    probe = ForwardProbe(network[0])
    wrapped = precision.autocast_network(network, "bf16", "cpu")
    assert wrapped is not network and precision.autocast_network(network, "fp32", "cpu") is network
    output = wrapped(torch.randn(1, 1, 6, 6, 6))
    assert output.dtype == torch.float32
    assert probe.calls == [(True, torch.bfloat16)]
    assert list(wrapped.state_dict()) == list(network.state_dict())  # no "network." prefix: checkpoints unchanged
    copy = torch.nn.Sequential(torch.nn.Conv3d(1, 2, 3), torch.nn.InstanceNorm3d(2))
    copy.load_state_dict(wrapped.state_dict())
    wrapped.load_state_dict(copy.state_dict())
    assert [p is q for p, q in zip(wrapped.parameters(), network.parameters())] == [True, True]
    network.spatial_dims = 3
    assert wrapped.spatial_dims == 3  # attributes of the network pass through (encode, decode, ...)
    assert not torch.is_autocast_enabled("cpu")  # nothing leaks out of the forward


def test_nested_outputs_come_back_in_float32():
    class TwoHeads(torch.nn.Module):
        def forward(self, x):
            return {"a": x.to(torch.bfloat16), "b": (x.to(torch.bfloat16), torch.ones(1, dtype=torch.long))}

    output = precision.AutocastNetwork(TwoHeads())(torch.ones(2))
    assert output["a"].dtype == torch.float32 and output["b"][0].dtype == torch.float32
    assert output["b"][1].dtype == torch.long


def test_the_record_appends_one_entry_per_start(tmp_path):
    class State:
        epoch = 0

    class Engine:
        state = State()

    record = precision.PrecisionRecord(tmp_path / "models", "fp32", "cpu")
    record(Engine())
    Engine.state.epoch = 3
    record(Engine())
    written = json.loads((tmp_path / "models" / "precision.json").read_text())
    assert written["precision"] == "fp32" and written["requested"] == "fp32"
    assert [run["epoch"] for run in written["runs"]] == [0, 3]


# ----------------------------------------------------------------------------------------------------------------
# through seg_unet3d's configs


def _train_tiny(run: Path, phantom_set: Path, value: str):
    from monai.bundle import ConfigWorkflow

    saved = list(sys.path)
    for name in [n for n in sys.modules if n == "scripts" or n.startswith("scripts.")]:
        del sys.modules[name]
    sys.path.insert(0, str(SEG))
    try:
        workflow = ConfigWorkflow(
            config_file=str(SEG / "configs" / "train.json"),
            meta_file=str(SEG / "configs" / "metadata.json"),
            logging_file=False,
            workflow_type="train",
            bundle_root=str(SEG),
            dataset_dir=str(phantom_set),
            ckpt_dir=str(run / "models"),
            output_dir=str(run / "eval"),
            precision=value,
            **TINY_TRAIN,
        )
        workflow.initialize()
        probe = ForwardProbe(workflow.parser.get_parsed_content("network_def"))
        losses = []  # what the trainer's loss function returned, before MONAI turns it into a Python float
        workflow.parser.get_parsed_content("loss").register_forward_hook(lambda m, i, out: losses.append(out))
        workflow.run()
        workflow.finalize()
        network_def = workflow.parser.get_parsed_content("network_def", instantiate=True, lazy=False)
        return probe, losses, network_def
    finally:
        sys.path[:] = saved
        for name in [n for n in sys.modules if n == "scripts" or n.startswith("scripts.")]:
            del sys.modules[name]


@pytest.mark.parametrize("value", ["bf16", "fp32"])
def test_seg_unet3d_autocasts_inside_the_forward_only_with_the_switch_on_and_keeps_the_loss_in_float32(
    value, phantom_set, tmp_path, request
):
    if value == "bf16":  # oneDNN off: its bf16 convolution backward gives NaN gradients on some CPUs (conftest)
        request.getfixturevalue("reference_bf16_convolutions")
    probe, losses, network_def = _train_tiny(tmp_path, phantom_set, value)
    training_and_validation = set(probe.calls)
    if value == "bf16":
        assert training_and_validation == {(True, torch.bfloat16)}
    else:
        assert training_and_validation == {(False, None)}
    assert losses and all(loss.dtype == torch.float32 for loss in losses)
    record = json.loads((tmp_path / "models" / "precision.json").read_text())
    assert record["precision"] == value and record["requested"] == value
    # the final model loads into the bare network, key for key (ckpt_export and MONAI Label read it that way)
    weights = torch.load(tmp_path / "models" / "model_final.pt", map_location="cpu", weights_only=True)
    network_def.load_state_dict(weights, strict=True)


@pytest.mark.parametrize(
    "bundle, configs, workflow_type",
    [
        ("seg_unet3d", ["configs/train.json"], "train"),
        ("seg_unet3d", ["configs/inference.json"], "infer"),
        ("vae_ct", ["configs/train.json", "configs/train_gan.json"], "train"),
        ("vae_ct", ["configs/inference.json"], "infer"),
        ("ldm_abdomen", ["configs/train.json", "configs/train_autoencoder.json"], "train"),
        ("ldm_abdomen", ["configs/inference.json"], "infer"),
        ("ldm_abdomen", ["configs/evaluate_synthetic.json"], "infer"),
        ("difftumor", ["configs/train.json"], "train"),
        ("difftumor", ["configs/inference.json"], "infer"),
    ],
    ids=lambda v: "+".join(Path(c).stem for c in v) if isinstance(v, list) else str(v),
)
def test_an_unknown_precision_stops_every_bundle_at_start_naming_it(bundle, configs, workflow_type, tmp_path):
    from tools.bundle_check import run_workflow
    from tools.bundle_scripts.config_check import root_cause

    overrides = {
        "precision": "fp8",
        "dataset_dir": str(tmp_path),
        "ckpt_dir": str(tmp_path),
        "output_dir": str(tmp_path),
    }
    with pytest.raises(Exception) as raised:  # MONAI wraps errors of a config expression in a RuntimeError
        run_workflow(REPO / "bundles" / bundle, configs, workflow_type, overrides=overrides, logging_file=False)
    cause = root_cause(raised.value)
    assert isinstance(cause, ValueError), cause
    assert "precision 'fp8': expected one of auto, fp32, bf16, fp16" in str(cause)
    assert not (tmp_path / "precision.json").exists()
