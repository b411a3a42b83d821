"""Ignite handlers that MONAI lacks: the evaluation report, the end of a resumable run, checkpointing in a config.

- :class:`SegmentationReport` (``configs/evaluate.json``): MONAI's ``MetricsSaver`` writes the metrics the evaluator
  computed on the resampled grid; the evaluation here must measure on each scan's *original* grid with its real
  voxel spacing (NSD at 2 mm, HD95 in mm) and add lesion-level detection per size bin and patient-level
  specificity, which no MONAI handler does. The handler reloads each case's original label file (a label resampled
  to 1 mm and back would not be the original) and compares it with the prediction inverted to that grid.
- :class:`ArchiveResumeState` (``configs/train.json``): ``scripts.checkpointing.ResumeFromLatest`` resumes from the
  newest ``checkpoint_epoch=N.pt``; once a run has completed, a later run with the same ``ckpt_dir`` (a second
  MONAI Label training request, a rerun with a new data set) must start afresh, not "resume" a finished run. At
  COMPLETED the newest epoch checkpoint is renamed ``checkpoint_completed.pt`` (kept for anyone who wants to
  continue by hand) and the older ones are removed. A killed run never reaches COMPLETED, so it still resumes.
- :class:`ResumeTrainer` / :class:`SaveTrainerCheckpoint`: the vendored ``ResumeFromLatest`` and
  ``AtomicCheckpointSaver`` need the trainer in their object dictionary to restore the epoch, but in a config the
  trainer is built from its handler list, so ``"trainer": "@train#trainer"`` inside a handler is a circular
  reference. These subclasses add the engine they are attached to under ``"trainer"`` at ``attach`` time.
- :func:`local_mlflow_uri`: the offline MLflow file store of ``--tracking mlflow`` under ``output_dir``, which
  MLflow 3 only accepts with ``MLFLOW_ALLOW_FILE_STORE`` set.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ignite.engine import Engine, Events

from .checkpointing import CHECKPOINT_PREFIX, AtomicCheckpointSaver, ResumeFromLatest, list_checkpoints
from .seg_metrics import (
    MIN_TUMOR_MM3,
    NSD_TOLERANCE_MM,
    RADIUS_EDGES_MM,
    REGIONS,
    evaluate_case,
    spacing_from_affine,
    summarize,
    write_csv,
)

logger = logging.getLogger(__name__)


def local_mlflow_uri(output_dir: str | os.PathLike) -> str:
    """``file:`` URI of ``<output_dir>/mlruns``, the offline MLflow store of ``--tracking mlflow``.

    MLflow 3.x keeps the file store in maintenance mode and refuses it unless ``MLFLOW_ALLOW_FILE_STORE`` is set;
    a file store is what works offline without a database package, so the variable is set here (only when the
    user has not set it), and only when tracking is on (this function is reached only through ``@tracking_uri``).
    """
    from monai.utils import path_to_uri

    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return path_to_uri(Path(output_dir) / "mlruns")


class ResumeTrainer(ResumeFromLatest):
    """``ResumeFromLatest`` that also restores the engine it is attached to (saved under ``"trainer"``).

    With ``enabled=False`` (``--resume false``) a fresh run must not share the folder with another run's epoch
    checkpoints (the saver keeps the highest epoch numbers, so the new run's files would be the ones dropped): they
    are moved to ``<save_dir>/superseded_<time>/`` first (by rank 0 only under DDP).
    """

    def attach(self, engine: Engine) -> None:
        self.load_dict.setdefault("trainer", engine)
        super().attach(engine)

    def __call__(self, engine: Engine) -> None:
        if not self.enabled:
            self._set_aside_old_checkpoints()
        super().__call__(engine)

    def _set_aside_old_checkpoints(self) -> None:
        import time

        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
            return
        old = list_checkpoints(self.save_dir, self.file_prefix)
        if not old:
            return
        target = self.save_dir / f"superseded_{time.strftime('%Y%m%d_%H%M%S')}"
        target.mkdir(parents=True, exist_ok=True)
        for path in old:
            os.replace(path, target / path.name)
        logger.info("resume is off: %d checkpoints of an earlier run moved to %s", len(old), target)


class SaveTrainerCheckpoint(AtomicCheckpointSaver):
    """``AtomicCheckpointSaver`` that also saves the engine it is attached to (under ``"trainer"``)."""

    def attach(self, engine: Engine) -> None:
        self.save_dict.setdefault("trainer", engine)
        super().attach(engine)


class ArchiveResumeState:
    """At COMPLETED, rename the newest ``<prefix>_epoch=N.pt`` to ``<prefix>_completed.pt`` and drop older ones."""

    def __init__(self, save_dir: str | os.PathLike, file_prefix: str = CHECKPOINT_PREFIX):
        self.save_dir = Path(save_dir)
        self.file_prefix = file_prefix

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> Path | None:
        checkpoints = list_checkpoints(self.save_dir, self.file_prefix)
        if not checkpoints:
            return None
        target = self.save_dir / f"{self.file_prefix}_completed.pt"
        os.replace(checkpoints[0], target)
        for old in checkpoints[1:]:
            old.unlink(missing_ok=True)
        logger.info("run completed: resumable state kept as %s", target)
        return target


def _source_path(item: dict, key: str) -> str:
    value = item.get(key)
    meta = getattr(value, "meta", None) or item.get(f"{key}_meta_dict") or {}
    path = meta.get("filename_or_obj")
    if isinstance(path, (list, tuple)):
        path = path[0]
    if not path:
        raise KeyError(f"`{key}` carries no source file name (meta 'filename_or_obj'); the report needs it")
    return str(path)


class SegmentationReport:
    """Per-case and summary CSV of Dice, NSD, HD95 per region, lesion sensitivity per bin, patient specificity.

    Attach to the evaluator of ``configs/evaluate.json``. Each iteration's output items must hold ``pred_key``: a
    label map (argmax, 1 x X x Y x Z) already inverted to the input scan's original grid, and ``label_key`` whose
    metadata names the original label file. Files written to ``output_dir``: ``metrics_per_case.csv``,
    ``lesions.csv``, ``metrics_summary.csv``, ``detection_summary.csv`` and ``summary.json``.

    Args:
        output_dir: folder for the tables.
        tumor: evaluate the tumor region, detection and specificity (a 3-class model); ``False`` for a binary
            pancreas model (pancreas region only).
        nsd_tolerance_mm: NSD tolerance (2 mm as in seed 001 / DiffTumor).
        min_tumor_mm3: predicted tumor components below this volume are ignored for detection and specificity.
        radius_edges_mm: lower edges of the equivalent-radius bins.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        tumor: bool = True,
        nsd_tolerance_mm: float = NSD_TOLERANCE_MM,
        min_tumor_mm3: float = MIN_TUMOR_MM3,
        radius_edges_mm: Sequence[float] = RADIUS_EDGES_MM,
        pred_key: str = "pred",
        label_key: str = "label",
    ):
        self.output_dir = Path(output_dir)
        self.tumor = bool(tumor)
        self.nsd_tolerance_mm = float(nsd_tolerance_mm)
        self.min_tumor_mm3 = float(min_tumor_mm3)
        self.radius_edges_mm = tuple(float(e) for e in radius_edges_mm)
        self.pred_key = pred_key
        self.label_key = label_key
        self.cases: list[dict[str, Any]] = []
        self.lesions: list[dict[str, Any]] = []
        self.summary: dict[str, Any] = {}

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)
        engine.add_event_handler(Events.COMPLETED, self.completed)

    def reset(self, engine: Engine | None = None) -> None:
        self.cases, self.lesions, self.summary = [], [], {}

    def iteration_completed(self, engine: Engine) -> None:
        from monai.transforms import LoadImage

        output = engine.state.output
        for item in output if isinstance(output, (list, tuple)) else [output]:
            label_path = _source_path(item, self.label_key)
            gt = LoadImage(image_only=True)(label_path)
            pred = item[self.pred_key]
            spacing = spacing_from_affine(gt.affine)
            row, lesions = evaluate_case(
                pred,
                gt,
                spacing,
                tumor=self.tumor,
                tolerance_mm=self.nsd_tolerance_mm,
                min_tumor_mm3=self.min_tumor_mm3,
                edges=self.radius_edges_mm,
            )
            case = Path(label_path).name.replace(".nii.gz", "").replace(".nii", "")
            try:
                image_path = _source_path(item, "image")
            except KeyError:
                image_path = ""
            self.cases.append({"case": case, "image": image_path, "label": label_path, **row})
            self.lesions.extend({"case": case, **lesion} for lesion in lesions)
            logger.info(
                "%s: pancreas Dice %.4f NSD %.4f HD95 %.2f mm",
                case,
                row["pancreas_dice"],
                row["pancreas_nsd"],
                row["pancreas_hd95"],
            )

    def completed(self, engine: Engine | None = None) -> dict[str, Any]:
        regions = tuple(REGIONS) if self.tumor else ("pancreas",)
        self.summary = summarize(self.cases, self.lesions, regions, self.radius_edges_mm)
        self.summary["settings"] = {
            "nsd_tolerance_mm": self.nsd_tolerance_mm,
            "min_tumor_mm3": self.min_tumor_mm3,
            "radius_edges_mm": list(self.radius_edges_mm),
            "regions": {name: list(REGIONS[name]) for name in regions},
            "cases": len(self.cases),
        }
        write_csv(self.output_dir / "metrics_per_case.csv", self.cases)
        lesion_columns = ["case", "lesion", "voxels", "volume_mm3", "radius_mm", "bin", "hit"]
        write_csv(self.output_dir / "lesions.csv", self.lesions, lesion_columns)
        write_csv(self.output_dir / "metrics_summary.csv", self.summary["regions"])
        detection_rows = list(self.summary["detection"])
        if self.summary["patient"]:
            patient = self.summary["patient"]
            detection_rows.append(
                {
                    "bin": "patient_specificity",
                    "lesions": patient["healthy_cases"],
                    "detected": patient["true_negative"],
                    "sensitivity": patient["specificity"],
                    "ci_low": patient["specificity_ci"][0],
                    "ci_high": patient["specificity_ci"][1],
                }
            )
            detection_rows.append(
                {
                    "bin": "patient_sensitivity",
                    "lesions": patient["tumor_cases"],
                    "detected": patient["true_positive"],
                    "sensitivity": patient["patient_sensitivity"],
                    "ci_low": patient["patient_sensitivity_ci"][0],
                    "ci_high": patient["patient_sensitivity_ci"][1],
                }
            )
        write_csv(
            self.output_dir / "detection_summary.csv",
            [
                {"group": row["bin"], "n": row["lesions"], "positive": row["detected"], "rate": row["sensitivity"],
                 "ci95_low": row["ci_low"], "ci95_high": row["ci_high"]}  # fmt: skip
                for row in detection_rows
            ],
        )
        (self.output_dir / "summary.json").write_text(json.dumps(_json_safe(self.summary), indent=1))
        for row in self.summary["regions"]:
            if row["metric"] == "dice":
                logger.info("mean %s Dice over %d cases: %.4f", row["region"], row["n"], row["mean"])
        return self.summary


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else str(value)
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    return value
