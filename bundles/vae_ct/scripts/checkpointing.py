"""Crash-safe, resumable checkpoints and a NaN stop for MONAI / ignite trainers.

Why this is not plain MONAI: ``monai.handlers.CheckpointSaver`` writes with ``atomic=False`` and ignite's
``Checkpoint`` deletes the oldest file *before* writing the new one, so a kill during a save can leave no loadable
checkpoint at all; MONAI has no "resume from the newest checkpoint if there is one" handler; and ignite's
``TerminateOnNan`` ends a run quietly instead of failing it. Bundles travel one by one through the model zoo, so
every bundle carries an identical copy of this file in ``scripts/`` (the source is ``tools/bundle_scripts`` of the
collection's repository; a test keeps the copies equal).

Use in a bundle config::

    "train#handlers": [
        {"_target_": "scripts.checkpointing.ResumeFromLatest", "save_dir": "@ckpt_dir",
         "load_dict": "@checkpoint_objects", "map_location": "@device"},
        {"_target_": "scripts.checkpointing.AtomicCheckpointSaver", "save_dir": "@ckpt_dir",
         "save_dict": "@checkpoint_objects", "save_interval": 1},
        {"_target_": "scripts.checkpointing.StopOnNonFiniteLoss", "save_dir": "@ckpt_dir"},
        ...]
    "checkpoint_objects": {"model": "@network", "optimizer": "@optimizer", "lr_scheduler": "@lr_scheduler",
                           "trainer": "@train#trainer"}
"""

from __future__ import annotations

import logging
import math
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint

CHECKPOINT_PREFIX = "checkpoint"
_EPOCH_RE = re.compile(r"_epoch=(\d+)\.pt$")

logger = logging.getLogger(__name__)


def checkpoint_epoch(path: str | os.PathLike) -> int | None:
    """The epoch number in a file name ``<prefix>_epoch=<N>.pt``, or None."""
    match = _EPOCH_RE.search(Path(path).name)
    return int(match.group(1)) if match else None


def list_checkpoints(save_dir: str | os.PathLike, file_prefix: str = CHECKPOINT_PREFIX) -> list[Path]:
    """Epoch checkpoints in ``save_dir``, newest epoch first (temporary files of an interrupted save are ignored)."""
    folder = Path(save_dir)
    if not folder.is_dir():
        return []
    found = [p for p in folder.glob(f"{file_prefix}_epoch=*.pt") if checkpoint_epoch(p) is not None]
    return sorted(found, key=lambda p: checkpoint_epoch(p), reverse=True)


def latest_checkpoint(save_dir: str | os.PathLike, file_prefix: str = CHECKPOINT_PREFIX) -> Path | None:
    """The newest checkpoint that loads (with ``weights_only=True``); a damaged newer one is skipped with a warning."""
    for path in list_checkpoints(save_dir, file_prefix):
        try:
            torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # a truncated zip, a foreign pickle: fall back to the previous epoch
            logger.warning("checkpoint %s cannot be loaded (%s); trying the previous one", path, error)
            continue
        return path
    return None


def _state_dicts(save_dict: Mapping[str, Any]) -> dict[str, Any]:
    return {name: obj.state_dict() for name, obj in save_dict.items()}


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to a temporary file in the same folder, flushed to disk, then renamed over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".part", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


class AtomicCheckpointSaver:
    """Save ``save_dict`` every ``save_interval`` epochs as ``<prefix>_epoch=<N>.pt``, atomically.

    The new file is complete on disk before any older one is removed, and ``n_saved`` (at least 1) of the newest
    are kept, so a kill at any moment leaves a loadable checkpoint. Objects are saved as ``state_dict`` s only
    (tensors and plain Python values), so they load with ``torch.load(..., weights_only=True)``.
    """

    def __init__(
        self,
        save_dir: str | os.PathLike,
        save_dict: Mapping[str, Any],
        save_interval: int = 1,
        n_saved: int = 2,
        file_prefix: str = CHECKPOINT_PREFIX,
        final_filename: str | None = None,
    ):
        if save_interval < 1 or n_saved < 1:
            raise ValueError("save_interval and n_saved must be at least 1")
        self.save_dir = Path(save_dir)
        self.save_dict = dict(save_dict)
        self.save_interval = save_interval
        self.n_saved = n_saved
        self.file_prefix = file_prefix
        self.final_filename = final_filename

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.save_interval), self)
        if self.final_filename:
            engine.add_event_handler(Events.COMPLETED, self.save_final)

    def __call__(self, engine: Engine) -> Path:
        path = self.save_dir / f"{self.file_prefix}_epoch={engine.state.epoch}.pt"
        atomic_torch_save(_state_dicts(self.save_dict), path)
        for old in list_checkpoints(self.save_dir, self.file_prefix)[self.n_saved :]:
            old.unlink(missing_ok=True)
        logger.info("saved checkpoint %s", path)
        return path

    def save_final(self, engine: Engine) -> Path:
        """The model weights alone under ``final_filename`` (e.g. ``model.pt``), for inference."""
        model = self.save_dict.get("model")
        if model is None:
            raise KeyError("save_dict needs a 'model' entry to save a final model file")
        return atomic_torch_save(model.state_dict(), self.save_dir / self.final_filename)


class ResumeFromLatest:
    """At the start of a run, restore every object of ``load_dict`` from the newest loadable checkpoint.

    With ``trainer`` in ``load_dict`` the epoch and iteration counters come back too, so a run killed after epoch
    N continues with epoch N + 1; ``max_epochs`` stays the one of the current run's config. Nothing happens when
    the folder holds no checkpoint (a fresh run).
    """

    def __init__(
        self,
        save_dir: str | os.PathLike,
        load_dict: Mapping[str, Any],
        map_location: Any = "cpu",
        file_prefix: str = CHECKPOINT_PREFIX,
        strict: bool = True,
        enabled: bool = True,
    ):
        self.save_dir = Path(save_dir)
        self.load_dict = dict(load_dict)
        self.map_location = map_location
        self.file_prefix = file_prefix
        self.strict = strict
        self.enabled = enabled
        self.resumed_from: Path | None = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Engine) -> None:
        if not self.enabled:
            return
        path = latest_checkpoint(self.save_dir, self.file_prefix)
        if path is None:
            logger.info("no checkpoint in %s: training starts from epoch 0", self.save_dir)
            return
        checkpoint = torch.load(path, map_location=self.map_location, weights_only=True)
        max_epochs = engine.state.max_epochs
        Checkpoint.load_objects(to_load=self.load_dict, checkpoint=checkpoint, strict=self.strict)
        if max_epochs is not None:
            if engine.state.epoch > max_epochs:
                raise ValueError(
                    f"{path}: checkpoint is at epoch {engine.state.epoch}, beyond max_epochs {max_epochs} of this run"
                )
            engine.state.max_epochs = max_epochs
        self.resumed_from = path
        logger.info("resumed from %s (epoch %d, iteration %d)", path, engine.state.epoch, engine.state.iteration)


def _loss_of(output: Any) -> float:
    """The loss from a MONAI trainer's output (a dict, or a list of per-sample dicts after decollation)."""
    if isinstance(output, (list, tuple)) and output and isinstance(output[0], Mapping):
        output = output[0]
    if isinstance(output, Mapping):
        output = output["loss"]
    return float(output.detach().float().mean()) if torch.is_tensor(output) else float(output)


class StopOnNonFiniteLoss:
    """Fail the run with a clear error when the loss becomes NaN or infinite.

    The error names the epoch, the iteration and the last good checkpoint, which stays untouched because
    checkpoints are only written at the end of an epoch.
    """

    def __init__(
        self,
        save_dir: str | os.PathLike | None = None,
        output_transform: Callable[[Any], float] = _loss_of,
        file_prefix: str = CHECKPOINT_PREFIX,
    ):
        self.save_dir = save_dir
        self.output_transform = output_transform
        self.file_prefix = file_prefix

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        loss = self.output_transform(engine.state.output)
        if math.isfinite(loss):
            return
        last = latest_checkpoint(self.save_dir, self.file_prefix) if self.save_dir else None
        kept = f"the last good checkpoint is {last}" if last else "no checkpoint was saved yet"
        raise FloatingPointError(
            f"training stopped: loss is {loss} at epoch {engine.state.epoch}, iteration {engine.state.iteration}; "
            f"{kept}. Lower the learning rate, check the inputs for NaN, or enable gradient clipping."
        )
