"""Training / validation / test records from an MSD ``dataset.json`` or a datalist JSON, with real:synthetic mixing.

Why this is not plain MONAI: ``monai.data.load_decathlon_datalist`` reads one section of a datalist, but the bundle
needs (1) a validation set held out *by patient* when the datalist has no ``validation`` section (several scans of
one patient must never be split between training and validation), (2) validation and test sets made of real cases
only, and (3) a training set that mixes real and synthetic cases at a chosen ratio (seed 000: synthetic:real 100:0,
50:50, 25:75). Records are dictionaries with ``image`` and ``label`` paths (relative paths are taken from the
datalist's folder, as MONAI does) and optional ``patient`` and ``synthetic`` fields; a record is synthetic when it
carries ``"synthetic": true`` (what ``python -m tools mix`` and the generative bundles write).

``load_split`` is called from ``configs/train.json`` as a config component (``"data_split"``), and the configs use
``@data_split['training']`` etc., so MONAI Label can still replace ``train#dataset#data`` and
``validate#dataset#data`` by plain lists.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from monai.data import load_decathlon_datalist

SECTIONS = ("training", "validation", "test")


def is_synthetic(record: Mapping[str, Any]) -> bool:
    """True when a record is marked synthetic (``"synthetic": true``, also ``"true"``/``1``)."""
    value = record.get("synthetic", False)
    if isinstance(value, str):
        return value.strip().lower() in ("true", "1", "yes")
    return bool(value)


def patient_of(record: Mapping[str, Any]) -> str:
    """The patient a record belongs to: its ``patient`` field, else its image path (one scan per patient)."""
    return str(record.get("patient") or record.get("image"))


def _read_sections(datalist: str | os.PathLike, base_dir: str | os.PathLike | None) -> dict[str, list[dict]]:
    path = Path(datalist)
    if not path.is_file():
        raise FileNotFoundError(f"datalist {path} does not exist (set `dataset_dir` or `datalist`)")
    content = json.loads(path.read_text())
    base = str(base_dir) if base_dir is not None else str(path.parent)
    sections = {}
    for key in SECTIONS:
        if content.get(key):
            sections[key] = [dict(item) for item in load_decathlon_datalist(str(path), True, key, base)]
    return sections


def split_by_patient(
    records: Sequence[Mapping[str, Any]], val_fraction: float, seed: int = 0
) -> tuple[list[dict], list[dict]]:
    """``(training, validation)``: ``val_fraction`` of the patients (at least one when there are two or more).

    Deterministic for a given ``seed`` and record order; a patient's scans stay together.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    patients = sorted({patient_of(record) for record in records})
    n_val = int(round(val_fraction * len(patients)))
    if val_fraction > 0 and len(patients) >= 2:
        n_val = min(max(n_val, 1), len(patients) - 1)
    held_out = set(random.Random(seed).sample(patients, n_val))
    training = [dict(record) for record in records if patient_of(record) not in held_out]
    validation = [dict(record) for record in records if patient_of(record) in held_out]
    return training, validation


def mix_real_synthetic(
    real: Sequence[Mapping[str, Any]],
    synthetic: Sequence[Mapping[str, Any]],
    synthetic_ratio: float,
    n_total: int | None = None,
    seed: int = 0,
) -> list[dict]:
    """``n_total`` records (default: the number of real ones) of which a fraction ``synthetic_ratio`` is synthetic.

    Seed 000's arms keep the training-set size fixed: 100:0 is ``synthetic_ratio=1``, 50:50 is 0.5, 25:75 is 0.25,
    real-only is 0. Records are drawn without replacement (deterministic per ``seed``); asking for more records of
    a kind than the datalist holds is an error rather than a silent repeat.
    """
    if not 0.0 <= float(synthetic_ratio) <= 1.0:
        raise ValueError(f"synthetic_ratio must be in [0, 1], got {synthetic_ratio}")
    total = len(real) if n_total is None else int(n_total)
    n_synthetic = int(round(float(synthetic_ratio) * total))
    n_real = total - n_synthetic
    if n_real > len(real) or n_synthetic > len(synthetic):
        raise ValueError(
            f"synthetic_ratio {synthetic_ratio} of {total} training records needs {n_real} real and {n_synthetic} "
            f"synthetic records, the datalist has {len(real)} real and {len(synthetic)} synthetic (training part)"
        )
    rng = random.Random(seed)
    chosen = rng.sample(list(real), n_real) + rng.sample(list(synthetic), n_synthetic)
    return [dict(record) for record in chosen]


def load_split(
    datalist: str | os.PathLike,
    base_dir: str | os.PathLike | None = None,
    val_fraction: float = 0.2,
    synthetic_ratio: float | None = None,
    n_train: int | None = None,
    seed: int = 0,
) -> dict[str, list[dict]]:
    """``{"training": [...], "validation": [...], "test": [...]}`` records for the bundle.

    - validation: the datalist's ``validation`` section (real records only) when it has one, else ``val_fraction``
      of the real training patients;
    - training: the other real training records plus every synthetic record of the ``training`` section, or, with
      ``synthetic_ratio``, a mix of them (:func:`mix_real_synthetic`, ``n_train`` records);
    - test: the real records of the ``test`` section that have a label (MSD's own test set has none).
    """
    sections = _read_sections(datalist, base_dir)
    training_section = sections.get("training", [])
    missing = [record["image"] for record in training_section if not record.get("label")]
    if missing:
        raise ValueError(f"{datalist}: training records without a label, e.g. {missing[0]}")
    real = [record for record in training_section if not is_synthetic(record)]
    synthetic = [record for record in training_section if is_synthetic(record)]
    if "validation" in sections:
        validation = [record for record in sections["validation"] if not is_synthetic(record)]
        real_training = real
    else:
        real_training, validation = split_by_patient(real, val_fraction, seed)
    if synthetic_ratio is None:
        training = real_training + synthetic
    else:
        training = mix_real_synthetic(real_training, synthetic, synthetic_ratio, n_train, seed)
    if not training:
        raise ValueError(f"{datalist}: no training records")
    test = [record for record in sections.get("test", []) if record.get("label") and not is_synthetic(record)]
    return {"training": training, "validation": validation, "test": test}


def select_section(split: Mapping[str, Sequence[Mapping[str, Any]]], name: str) -> list[dict]:
    """The records of one section of :func:`load_split`'s result; an empty one is an error that says what to do.

    Used by ``configs/evaluate.json`` (``eval_section``): MSD's own test set has no labels, so evaluating it finds
    nothing; ``--eval_section validation`` evaluates the held-out validation patients instead.
    """
    if name not in split:
        raise KeyError(f"eval_section must be one of {sorted(split)}, got {name!r}")
    records = [dict(record) for record in split[name]]
    if not records:
        others = [key for key, value in split.items() if value and key != name]
        raise ValueError(
            f"the datalist has no labelled real records in its '{name}' section; "
            f"choose another with --eval_section (non-empty: {others})"
        )
    return records
