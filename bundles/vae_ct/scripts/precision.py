"""Mixed precision on the CPU and on CUDA from one config key, ``precision``: ``auto``, ``fp32``, ``bf16``, ``fp16``.

Why this is not plain MONAI: MONAI 1.5's engines take a boolean ``amp`` and hard-code ``torch.autocast("cuda")`` and
a CUDA ``GradScaler`` (``monai/engines/trainer.py``, ``evaluator.py``), so on a CPU ``amp=True`` does nothing, and a
CPU with native bfloat16 (AVX512-BF16, AMX) never trains in bf16. This module resolves the setting for the device,
and gives the three things a bundle needs:

- :func:`autocast_network`: the network wrapped so that its ``forward`` runs under ``torch.autocast(device, bf16)``
  and returns float32 tensors, so losses, metrics and post-processing stay in float32. The wrapper's
  ``state_dict`` is the network's own (same keys), so checkpoints, ``ckpt_export`` and MONAI Label are unchanged.
  Used with MONAI's ``SupervisedTrainer`` / ``SupervisedEvaluator`` and any inferer.
- :func:`engine_amp`: the ``amp`` flag for MONAI's engines, true only for fp16 on CUDA (MONAI's own autocast and
  gradient scaler, as the model-zoo bundles do it).
- :func:`autocast` and :func:`grad_scaler`: for the collection's own trainers and samplers (adversarial and latent
  diffusion steps), which call sub-modules (``encode``, ``decode``) rather than ``forward``.

``auto`` means fp16 on CUDA and, on a CPU, bf16 only where the CPU computes bf16 natively: on a CPU without it
(AVX2 only) oneDNN emulates bf16 convolutions, measured 14x slower than float32 for seg_unet3d's network (AMD EPYC,
AVX2, 2026-12-07), so ``auto`` is float32 there. :class:`PrecisionRecord` writes what a training run used to
``<ckpt_dir>/precision.json``; generators add :func:`describe` to every synthetic file's provenance. Bundles travel
one by one through the model zoo, so every bundle carries an identical copy of this file in ``scripts/`` (the source
is ``tools/bundle_scripts`` of the collection's repository; a test keeps the copies equal).

Use in a bundle config::

    "precision": "auto",
    "amp": "$scripts.precision.engine_amp(@precision, @device)",
    "network": "$scripts.precision.autocast_network(@network_def.to(@device), @precision, @device)",
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import platform
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

logger = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
#: CPU flags (Linux ``/proc/cpuinfo``) that mean bf16 matrix arithmetic in hardware.
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
RECORD_NAME = "precision.json"


@functools.lru_cache(maxsize=None)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux); empty elsewhere."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def cpu_has_native_bf16() -> bool:
    """True where the CPU computes bf16 in hardware (AVX512-BF16 or AMX); elsewhere bf16 is emulated and slow.

    Outside Linux the flags cannot be read; there oneDNN's own check decides.
    """
    flags = cpu_flags()
    if flags:
        return any(flag in flags for flag in NATIVE_BF16_FLAGS)
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def _device(device: Any) -> torch.device:
    return device if isinstance(device, torch.device) else torch.device(device if device is not None else "cpu")


def resolve_precision(precision: str, device: Any = "cpu") -> str:
    """``auto`` / ``fp32`` / ``bf16`` / ``fp16`` -> what runs on ``device``: ``"fp32"``, ``"bf16"`` or ``"fp16"``.

    ``auto``: fp16 on CUDA, fp32 on a CPU. ``bf16`` is honoured where asked, even on a CPU that emulates it (slow,
    with a warning); ``fp16`` needs CUDA.

    Why not bf16 on a CPU with native bf16 (AVX512-BF16 / AMX): there, torch 2.13's oneDNN bfloat16 convolution
    backward returned NaN weight gradients in some steps (a 2-layer ``PatchDiscriminator`` on 16^3 patches: 2 of 60
    steps, none with oneDNN off; the diffusion UNet's convolutions too), which stopped trainings at their first
    iterations. ``auto`` picks bf16 on a CPU again once a run shows it trains as well as fp32.
    """
    name = str(precision).strip().lower()
    if name not in PRECISIONS:
        raise ValueError(f"precision '{precision}': expected one of {', '.join(PRECISIONS)}")
    kind = _device(device).type
    if name == "auto":
        if kind == "cuda":
            return "fp16"
        return "fp32"
    if name == "fp16" and kind != "cuda":
        raise ValueError(f"precision 'fp16' needs a CUDA device (this run is on {kind}); use 'bf16', 'auto' or 'fp32'")
    if name == "bf16" and kind == "cpu" and not cpu_has_native_bf16():
        _warn_emulated_bf16()
    return name


@functools.lru_cache(maxsize=None)
def _warn_emulated_bf16() -> None:
    """Once per process: samplers and trainers resolve the precision at every step."""
    logger.warning(
        "precision 'bf16' on a CPU without AVX512-BF16 / AMX: bf16 is emulated there and much slower than fp32"
    )


def autocast(precision: str, device: Any = "cpu") -> contextlib.AbstractContextManager:
    """``torch.autocast`` for the resolved precision on ``device`` (disabled for fp32)."""
    device = _device(device)
    resolved = resolve_precision(precision, device)
    if resolved == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[resolved])


def engine_amp(precision: str, device: Any = "cpu") -> bool:
    """The ``amp`` flag of MONAI's engines: true only for fp16 on CUDA (MONAI's CUDA autocast and gradient scaler).

    bf16 (CPU or CUDA) is done by :func:`autocast_network` instead and needs no gradient scaler.
    """
    return resolve_precision(precision, device) == "fp16"


def grad_scaler(precision: str, device: Any = "cpu") -> torch.amp.GradScaler:
    """A gradient scaler, enabled for fp16 only (bf16 has float32's exponent range and needs none)."""
    device = _device(device)
    return torch.amp.GradScaler(device.type, enabled=resolve_precision(precision, device) == "fp16")


def _to_float32(value: Any) -> Any:
    if torch.is_tensor(value):
        return value.float() if value.is_floating_point() and value.dtype != torch.float32 else value
    if isinstance(value, Mapping):
        return type(value)({k: _to_float32(v) for k, v in value.items()})
    if isinstance(value, (list, tuple)):
        items = [_to_float32(v) for v in value]
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
    return value


class AutocastNetwork(nn.Module):
    """``network`` whose ``forward`` runs under ``torch.autocast(device_type, dtype)`` and returns float32.

    The wrapper adds no parameter and no state-dict prefix: ``state_dict`` / ``load_state_dict`` are the wrapped
    network's, so checkpoints load into the bare ``network_def`` (``ckpt_export``, MONAI Label) and back. Other
    attributes (``encode``, ``decode``, ...) are the network's, outside autocast.
    """

    def __init__(self, network: nn.Module, device_type: str = "cpu", dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.network = network
        self.device_type = device_type
        self.dtype = dtype

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with torch.autocast(self.device_type, dtype=self.dtype):
            output = self.network(*args, **kwargs)
        return _to_float32(output)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["network"], name)

    def state_dict(self, *args: Any, **kwargs: Any) -> Any:
        return self.network.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        return self.network.load_state_dict(state_dict, strict=strict, assign=assign)


def autocast_network(network: nn.Module, precision: str, device: Any = "cpu") -> nn.Module:
    """``network`` itself for fp32 and CUDA fp16 (done by MONAI's engine, :func:`engine_amp`); wrapped for bf16."""
    device = _device(device)
    resolved = resolve_precision(precision, device)
    if resolved != "bf16":
        return network
    return AutocastNetwork(network, device.type, DTYPES[resolved])


def describe(precision: str, device: Any = "cpu") -> dict[str, Any]:
    """What a run computes in: ``{"precision": "fp32", "requested": "auto", "device": "cpu", ...}``."""
    device = _device(device)
    record = {"precision": resolve_precision(precision, device), "requested": str(precision), "device": str(device)}
    if device.type == "cpu":
        record["cpu"] = platform.processor() or platform.machine()
        record["cpu_native_bf16"] = cpu_has_native_bf16()
    record["torch"] = torch.__version__
    return record


class PrecisionRecord:
    """Log the precision at the start of training and write it to ``<save_dir>/precision.json`` (atomically).

    Each start of the run (a fresh run or a resume) appends ``{"epoch": <start epoch>, **describe(...)}``, so a run
    resumed in another precision says so.
    """

    def __init__(self, save_dir: str | os.PathLike, precision: str, device: Any = "cpu"):
        self.save_dir = Path(save_dir)
        self.record = describe(precision, device)

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Any) -> None:
        record = self.record
        logger.info("precision: %s on %s (requested %s)", record["precision"], record["device"], record["requested"])
        path = self.save_dir / RECORD_NAME
        runs = json.loads(path.read_text()).get("runs", []) if path.is_file() else []
        runs.append({"epoch": int(engine.state.epoch), **self.record})
        self.save_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".precision.", suffix=".part", dir=self.save_dir)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump({**self.record, "runs": runs}, f, indent=1)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise
