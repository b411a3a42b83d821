"""Write an MSD-layout phantom data set (``dataset.json``, ``imagesTr/``, ``labelsTr/``, ``imagesTs/`` ...).

Layout (a superset of Medical Segmentation Decathlon Task07, so every MSD reader works on it):

- ``imagesTr/<case>.nii.gz`` CT in HU (int16), ``labelsTr/<case>.nii.gz`` 0 background / 1 pancreas / 2 tumor,
  ``organsTr/<case>.nii.gz`` the full organ map (``dataset.json["organ_labels"]``), ``imagesTr/<case>.json`` the
  sidecar provenance; the same under ``*Ts/`` for the test patients (unlike real MSD, test labels are given,
  because the phantom knows them).
- ``dataset.json``: the MSD keys plus, per entry, ``patient``, ``phase``, ``has_tumor`` and ``organs``.

Patients, not scans, are split between training and test: with ``phase="both"`` a patient's non-contrast and
portal-venous scans share one anatomy and always land in the same set. Every file is marked synthetic (NIfTI
description and sidecar). A rerun with the same parameters reuses what is already written.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm.auto import tqdm

import tools
from tools.io import SYNTHETIC_DESCRIP, file_sha256, save_nifti, write_json
from tools.phantom.anatomy import ORGAN_LABELS
from tools.phantom.appearance import PHASES
from tools.phantom.case import ORIENTATIONS, make_case

PHASE_CHOICES = PHASES + ("both", "mixed")
ORIENTATION_CHOICES = ORIENTATIONS + ("mixed",)
_PHASE_SUFFIX = {"non_contrast": "nc", "portal_venous": "pv"}


def _params(**kwargs) -> dict:
    params = {k: (list(v) if isinstance(v, tuple) else v) for k, v in kwargs.items()}
    params["generator"] = f"tools.phantom {tools.__version__}"
    return params


def _params_hash(params: dict) -> str:
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]


def plan_cases(
    n_cases: int, seed: int, phase: str, tumor_fraction: float, test_fraction: float, orientation: str
) -> list[dict]:
    """Which patient gets a tumor, which phase and orientation each scan has, and which set it belongs to.

    Decided from ``seed`` alone (not from the order cases are written), so a partial rerun plans identically.
    """
    if phase not in PHASE_CHOICES:
        raise ValueError(f"phase must be one of {PHASE_CHOICES}, got {phase!r}")
    if orientation not in ORIENTATION_CHOICES:
        raise ValueError(f"orientation must be one of {ORIENTATION_CHOICES}, got {orientation!r}")
    if not 0.0 <= tumor_fraction <= 1.0 or not 0.0 <= test_fraction < 1.0:
        raise ValueError("tumor_fraction must be in [0, 1] and test_fraction in [0, 1)")
    if n_cases < 1:
        raise ValueError("n_cases must be at least 1")
    rng = np.random.Generator(np.random.PCG64([int(seed), 0x5EED]))
    tumor_patients = set(rng.permutation(n_cases)[: int(round(tumor_fraction * n_cases))].tolist())
    n_test = int(round(test_fraction * n_cases))
    test_patients = set(rng.permutation(n_cases)[:n_test].tolist())
    plan = []
    for p in range(n_cases):
        if phase == "both":
            phases = list(PHASES)
        elif phase == "mixed":
            phases = [PHASES[int(rng.integers(2))]]
        else:
            phases = [phase]
        for ph in phases:
            orient = orientation if orientation != "mixed" else ORIENTATIONS[int(rng.integers(2))]
            patient = f"phantom_{p:03d}"
            case = f"{patient}_{_PHASE_SUFFIX[ph]}" if phase == "both" else patient
            plan.append(
                {
                    "patient": patient,
                    "patient_index": p,
                    "case": case,
                    "phase": ph,
                    "orientation": orient,
                    "tumor": p in tumor_patients,
                    "split": "test" if p in test_patients else "training",
                }
            )
    return plan


def make_dataset(
    out_dir: str | os.PathLike,
    n_cases: int = 20,
    seed: int = 0,
    shape: Sequence[int] | None = (160, 160, 80),
    spacing=None,
    phase: str = "portal_venous",
    tumor_fraction: float = 0.5,
    test_fraction: float = 0.2,
    orientation: str = "RAS",
    tumor_radius_mm=None,
    progress: bool = True,
) -> Path:
    """Make (or complete) the phantom data set in ``out_dir`` and return the path of its ``dataset.json``.

    ``n_cases`` counts patients; ``phase="both"`` gives each patient a non-contrast and a portal-venous scan.
    ``tumor_fraction`` of the patients have a pancreatic tumor, the others are healthy. ``spacing`` is a 3-tuple in
    mm, ``None``/``"fit"`` (the field of view covers the body with ``shape`` voxels) or ``"scanner"`` (clinical
    spacings 0.6-0.9 mm in-plane, 1-5 mm slices). ``orientation`` "RAS", "LPS" or "mixed".
    """
    out_dir = Path(out_dir)
    params = _params(
        n_cases=int(n_cases),
        seed=int(seed),
        shape=None if shape is None else [int(v) for v in shape],
        spacing=spacing if (spacing is None or isinstance(spacing, str)) else [float(v) for v in spacing],
        phase=phase,
        tumor_fraction=float(tumor_fraction),
        test_fraction=float(test_fraction),
        orientation=orientation,
        tumor_radius_mm=(
            tumor_radius_mm
            if tumor_radius_mm is None or np.ndim(tumor_radius_mm) == 0
            else [float(v) for v in tumor_radius_mm]
        ),
    )
    key = _params_hash(params)
    dataset_json = out_dir / "dataset.json"
    if dataset_json.exists():
        existing = json.loads(dataset_json.read_text())
        if existing.get("generator", {}).get("params_hash") == key:
            return dataset_json
    plan = plan_cases(n_cases, seed, phase, tumor_fraction, test_fraction, orientation)
    entries: dict[str, list] = {"training": [], "test": []}
    for item in tqdm(plan, desc=f"phantom {out_dir.name}", disable=not progress, unit="case"):
        entries[item["split"]].append(_write_case(out_dir, item, params, key))
    organ_labels = {str(v): k for k, v in sorted(ORGAN_LABELS.items(), key=lambda kv: kv[1])}
    dataset = {
        "name": "PancreasPhantom",
        "description": "SYNTHETIC procedural abdominal CT phantom (not patient data): pancreas and pancreatic tumor",
        "reference": "tools.phantom of this repository (SPEC 2.2)",
        "licence": "CC0 (generated data)",
        "release": tools.__version__,
        "tensorImageSize": "3D",
        "modality": {"0": "CT"},
        "labels": {"0": "background", "1": "pancreas", "2": "tumour"},
        "organ_labels": organ_labels,
        "synthetic": True,
        "numTraining": len(entries["training"]),
        "numTest": len(entries["test"]),
        "training": entries["training"],
        "test": entries["test"],
        "generator": {"params": params, "params_hash": key},
    }
    write_json(dataset_json, dataset)
    return dataset_json


def _write_case(out_dir: Path, item: dict, params: dict, key: str) -> dict:
    """Write one case's image, label, organ map and sidecar unless an identical one is already there."""
    suffix = "Tr" if item["split"] == "training" else "Ts"
    rel = {
        "image": f"./images{suffix}/{item['case']}.nii.gz",
        "label": f"./labels{suffix}/{item['case']}.nii.gz",
        "organs": f"./organs{suffix}/{item['case']}.nii.gz",
    }
    sidecar = out_dir / f"images{suffix}" / f"{item['case']}.json"
    entry = {**rel, "patient": item["patient"], "phase": item["phase"], "has_tumor": item["tumor"]}
    if sidecar.exists():
        try:
            done = json.loads(sidecar.read_text())
            files_ok = all((out_dir / r).exists() for r in rel.values())
            if done.get("params_hash") == key and files_ok:
                entry["has_tumor"] = bool(done["meta"]["has_tumor"])
                return entry
        except (json.JSONDecodeError, KeyError):
            pass  # an unreadable sidecar means the case is redone
    case = make_case(
        seed=(params["seed"], item["patient_index"]),
        shape=params["shape"],
        spacing=params["spacing"],
        phase=item["phase"],
        tumor=item["tumor"],
        tumor_radius_mm=params["tumor_radius_mm"],
        orientation=item["orientation"],
    )
    descrip = f"{SYNTHETIC_DESCRIP} tools.phantom seed={params['seed']}:{item['patient_index']} {item['phase']}"
    save_nifti(out_dir / rel["image"], case.ct, case.affine, descrip=descrip)
    save_nifti(out_dir / rel["label"], case.label, case.affine, descrip=descrip, intent_label=True)
    save_nifti(out_dir / rel["organs"], case.organs, case.affine, descrip=descrip, intent_label=True)
    provenance = {
        "synthetic": True,
        "generator": params["generator"],
        "params_hash": key,
        "seed": [params["seed"], item["patient_index"]],
        "case": item["case"],
        "patient": item["patient"],
        "split": item["split"],
        "meta": case.meta,
        "sha256": {k: file_sha256(out_dir / r) for k, r in rel.items()},
    }
    write_json(sidecar, provenance)  # written last: its presence means the case is complete
    entry["has_tumor"] = bool(case.meta["has_tumor"])
    return entry
