"""Patient-level data splits and MONAI datalists.

A patient may have several scans (phases, follow-ups, sub-volumes of one scan): if one scan of a patient trains a
model and another tests it, the test measures memory rather than generalisation. Every split here therefore
assigns *patients* to sets, deterministically per seed, and :func:`assert_no_patient_leak` checks any datalist
(the studies call it before training).

Datalists are MONAI's format (``monai.data.load_decathlon_datalist``): ``{"training": [...], "validation":
[...], "test": [...]}`` with ``{"image", "label", ...}`` records; k-fold datalists keep one ``"training"`` list
whose records carry a ``"fold"`` key (the Auto3DSeg convention) and an optional held-out ``"test"`` list.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from tools.datasets import read_datalist
from tools.errors import InputError
from tools.io import write_json

#: Record keys that hold file paths (made absolute on reading, relative or absolute on writing).
PATH_KEYS = ("image", "label", "organs")
#: Set names of a fraction split, in the order of ``fractions``.
SPLIT_NAMES = ("training", "validation", "test")


class PatientLeakError(AssertionError):
    """A patient appears in two sets (or two folds) of one datalist."""


@dataclass
class LoadedDatalist:
    """What :func:`load_records` read: list sections with absolute paths, where from, and the other top-level keys."""

    sections: dict[str, list[dict[str, Any]]]
    base_dir: Path | None
    source: Path | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    def records(self, section: str | None = None) -> list[dict[str, Any]]:
        """The records of one section, or of all sections in order when ``section`` is None."""
        if section is None:
            return [r for recs in self.sections.values() for r in recs]
        if section not in self.sections:
            raise InputError(self.source, f"no section {section!r} (have {sorted(self.sections)})")
        return self.sections[section]


def _absolute(value: Any, base: Path | None) -> Any:
    if not isinstance(value, str) or not value:
        return value
    path = Path(value)
    if not path.is_absolute() and base is not None:
        path = base / path
    return os.path.normpath(str(path))


def _json_extras(json_path: Path | None) -> dict[str, Any]:
    """The non-list top-level keys of a datalist JSON (MSD ``labels``, the phantom's ``organ_labels``...)."""
    if json_path is None:
        return {}
    try:
        content = json.loads(json_path.read_text())
    except (OSError, ValueError) as err:
        raise InputError(json_path, f"cannot read as JSON: {err}")
    return {k: v for k, v in content.items() if not isinstance(v, list)} if isinstance(content, Mapping) else {}


def load_records(
    src: str | os.PathLike | Mapping[str, Any] | Sequence[Mapping[str, Any]], base_dir: str | os.PathLike | None = None
) -> LoadedDatalist:
    """Records of a data source, grouped by datalist section, with absolute paths.

    A path (MSD folder or ``dataset.json``, MONAI datalist JSON, NIfTI folder, DICOM tree) is read by
    :func:`tools.datasets.read_datalist`, which checks the files exist and gives every record ``case`` and
    ``patient`` (the case name when the source has no patient id); its ``section`` field becomes the grouping.
    An in-memory datalist (dict of lists) or list of records (section ``"training"``) is taken as given, string
    entries becoming ``{"image": ...}`` and relative paths joined to ``base_dir``. Records are copies.
    """
    if isinstance(src, (str, os.PathLike)):
        path = Path(os.path.abspath(src))
        records = read_datalist(path)
        json_path = path if path.is_file() else path / "dataset.json"
        json_path = json_path if json_path.is_file() else None
        sections: dict[str, list[dict[str, Any]]] = {}
        for record in records:
            record = dict(record)
            sections.setdefault(str(record.pop("section", "training")), []).append(record)
        base = path.parent if path.is_file() else path
        return LoadedDatalist(sections=sections, base_dir=base, source=json_path, extras=_json_extras(json_path))
    base = Path(base_dir) if base_dir is not None else None
    if isinstance(src, Mapping):
        raw_sections = {k: v for k, v in src.items() if isinstance(v, list)}
        extras = {k: v for k, v in src.items() if not isinstance(v, list)}
    elif isinstance(src, Sequence) and not isinstance(src, (str, bytes)):
        raw_sections, extras = {"training": list(src)}, {}
    else:
        raise InputError(None, "a datalist must be a path, a dict of lists or a list of records")
    sections = {}
    for name, entries in raw_sections.items():
        records = []
        for index, entry in enumerate(entries):
            if isinstance(entry, str):
                entry = {"image": entry}
            if not isinstance(entry, Mapping) or not entry.get("image"):
                raise InputError(None, f"entry {index} of {name!r} has no 'image' path")
            record = dict(entry)
            for key in PATH_KEYS:
                if key in record:
                    record[key] = _absolute(record[key], base)
            records.append(record)
        sections[name] = records
    return LoadedDatalist(sections=sections, base_dir=base, source=None, extras=extras)


def relative_records(datalist: Mapping[str, Any], base_dir: str | os.PathLike | None) -> dict[str, Any]:
    """Copy of a datalist with the path keys relative to ``base_dir`` (None: absolute paths)."""
    out: dict[str, Any] = {}
    for key, value in datalist.items():
        if not isinstance(value, list):
            out[key] = value
            continue
        records = []
        for record in value:
            record = dict(record) if isinstance(record, Mapping) else {"image": record}
            for path_key in PATH_KEYS:
                if isinstance(record.get(path_key), str):
                    path = os.path.abspath(record[path_key])
                    record[path_key] = path if base_dir is None else os.path.relpath(path, os.path.abspath(base_dir))
            records.append(record)
        out[key] = records
    return out


def write_datalist(
    datalist: Mapping[str, Any],
    path: str | os.PathLike,
    base_dir: str | os.PathLike | None = "",
    inputs: tuple = (),
) -> Path:
    """Write a datalist JSON atomically. Paths (absolute or relative to the working directory in ``datalist``)
    are written relative to ``base_dir`` (default ``""``: the JSON file's folder; None: absolute)."""
    path = Path(path)
    if base_dir == "":
        base_dir = path.parent
    return write_json(path, relative_records(datalist, base_dir), inputs=inputs)


def patient_of(record: Mapping[str, Any], patient_key: str = "patient", where: str = "") -> str:
    """The patient id of a record as a string; :class:`InputError` when it has none."""
    value = record.get(patient_key)
    if value is None or value == "":
        raise InputError(
            record.get("image"),
            f"{where}record has no {patient_key!r} key: patient-level splits need patient ids "
            "(records read from a data folder get their case name as patient; for in-memory records where every "
            "scan is its own patient, pass patient_key='image')",
        )
    return str(value)


def group_by_patient(records: Iterable[Mapping[str, Any]], patient_key: str = "patient") -> dict[str, list[int]]:
    """Record indices per patient id, patients in sorted order."""
    groups: dict[str, list[int]] = {}
    for index, record in enumerate(records):
        groups.setdefault(patient_of(record, patient_key, f"entry {index}: "), []).append(index)
    return dict(sorted(groups.items()))


def _allocate(n: int, fractions: Sequence[float]) -> list[int]:
    """Split ``n`` items into counts proportional to ``fractions`` (largest remainder); every set with a positive
    fraction gets at least one item when there are enough items."""
    raw = np.asarray(fractions, dtype=np.float64) * n
    counts = np.floor(raw).astype(int)
    for index in np.argsort(-(raw - counts), kind="stable")[: n - counts.sum()]:
        counts[index] += 1
    positive = np.flatnonzero(np.asarray(fractions) > 0)
    if n >= len(positive):
        for index in positive:
            if counts[index] == 0:
                donor = int(np.argmax(counts))
                counts[donor] -= 1
                counts[index] += 1
    return counts.tolist()


def _patient_order(
    records: Sequence[Mapping[str, Any]], patient_key: str, stratify_key: str | None, seed: int
) -> tuple[list[str], dict[str, list[int]]]:
    """Patients in a seeded random order; with ``stratify_key``, spread so that every stratum is evenly mixed.

    Each patient gets the position ``(rank within its stratum + 0.5) / stratum size`` after a seeded shuffle of the
    stratum; sorting by it interleaves the strata, so any contiguous block or round-robin fold holds each stratum
    in proportion. A patient's stratum is the set of its records' values (e.g. ``has_tumor``).
    """
    groups = group_by_patient(records, patient_key)
    rng = np.random.default_rng(seed)
    strata: dict[str, list[str]] = {}
    for patient, indices in groups.items():
        stratum = ""
        if stratify_key is not None:
            stratum = json.dumps(sorted({str(records[i].get(stratify_key)) for i in indices}))
        strata.setdefault(stratum, []).append(patient)
    keyed = []
    for stratum_index, stratum in enumerate(sorted(strata)):
        members = strata[stratum]
        order = rng.permutation(len(members))
        for rank, member_index in enumerate(order):
            keyed.append(((rank + 0.5) / len(members), stratum_index, members[member_index]))
    keyed.sort()
    return [patient for _, _, patient in keyed], groups


def split_by_patient(
    records: Sequence[Mapping[str, Any]],
    fractions: Sequence[float] | None = (0.7, 0.1, 0.2),
    n_folds: int | None = None,
    seed: int = 0,
    *,
    patient_key: str = "patient",
    stratify_key: str | None = None,
    test_fraction: float = 0.0,
) -> dict[str, list[dict[str, Any]]]:
    """Split records into sets by patient: all scans of a patient land in the same set (or fold).

    ``fractions`` (training, validation, test) are shares of *patients* (largest-remainder rounding, at least one
    patient per non-empty share when possible). With ``n_folds`` instead, a ``test_fraction`` of the patients is
    held out as ``"test"`` and every other record goes to ``"training"`` with a ``"fold"`` key 0..n_folds-1
    (round-robin over the shuffled patients, so fold sizes differ by at most one patient). ``stratify_key``
    (e.g. ``"has_tumor"``) keeps its values in proportion in every set / fold. Deterministic per ``seed``
    (independent of the input order); records are copied, in their input order within each set.
    """
    records = [dict(r) for r in records]
    if not records:
        raise InputError(None, "no records to split")
    patients, groups = _patient_order(records, patient_key, stratify_key, seed)
    if n_folds is not None:
        n_folds = int(n_folds)
        if not 0.0 <= test_fraction < 1.0:
            raise InputError(None, f"test_fraction must be in [0, 1), got {test_fraction}")
        n_test = _allocate(len(patients), (1.0 - test_fraction, test_fraction))[1] if test_fraction > 0 else 0
        # take the test patients evenly from the interleaved order, so the test set is stratified too
        test_positions = (
            set(np.linspace(0, len(patients) - 1, n_test).round().astype(int).tolist()) if n_test else set()
        )
        test_patients = {patients[i] for i in test_positions}
        fold_patients = [p for p in patients if p not in test_patients]
        if n_folds < 2 or n_folds > len(fold_patients):
            raise InputError(None, f"n_folds must be in [2, {len(fold_patients)}] (patients left), got {n_folds}")
        fold_of = {patient: position % n_folds for position, patient in enumerate(fold_patients)}
        training, test = [], []
        for record in records:
            patient = patient_of(record, patient_key)
            if patient in test_patients:
                test.append(record)
            else:
                training.append({**record, "fold": fold_of[patient]})
        return {"training": training, "test": test}
    if fractions is None or len(fractions) != 3:
        raise InputError(None, f"fractions must be (training, validation, test), got {fractions}")
    fractions = [float(f) for f in fractions]
    if min(fractions) < 0 or abs(sum(fractions) - 1.0) > 1e-6:
        raise InputError(None, f"fractions must be >= 0 and sum to 1, got {fractions}")
    counts = _allocate(len(patients), fractions)
    # contiguous blocks of the interleaved order: each block holds every stratum in proportion
    set_of: dict[str, str] = {}
    position = 0
    for name, count in zip(SPLIT_NAMES, counts):
        for patient in patients[position : position + count]:
            set_of[patient] = name
        position += count
    out: dict[str, list[dict[str, Any]]] = {name: [] for name in SPLIT_NAMES}
    for record in records:
        out[set_of[patient_of(record, patient_key)]].append(record)
    assert sum(len(v) for v in out.values()) == len(records) and len(set_of) == len(groups)
    return out


def fold_datalist(datalist: Mapping[str, Any], fold: int, fold_key: str = "fold") -> dict[str, list[dict]]:
    """Training / validation / test lists of one fold of a k-fold datalist (validation = records of ``fold``)."""
    training = [dict(r) for r in datalist.get("training", [])]
    if not training or any(fold_key not in r for r in training):
        raise InputError(None, f"not a k-fold datalist: some 'training' records have no {fold_key!r} key")
    folds = sorted({int(r[fold_key]) for r in training})
    if int(fold) not in folds:
        raise InputError(None, f"fold {fold} not in the datalist's folds {folds}")
    return {
        "training": [r for r in training if int(r[fold_key]) != int(fold)],
        "validation": [r for r in training if int(r[fold_key]) == int(fold)],
        "test": [dict(r) for r in datalist.get("test", [])],
    }


def assert_no_patient_leak(
    datalist: Mapping[str, Any] | str | os.PathLike, patient_key: str = "patient", fold_key: str = "fold"
) -> dict[str, set[str]]:
    """Raise :class:`PatientLeakError` if one patient appears in two sets of a datalist (or two folds).

    Every top-level list of records is a set; within one list, records with a ``fold_key`` form one set per fold.
    A record without a patient id makes the check impossible and raises :class:`InputError`. ``datalist`` may be a
    path to a datalist JSON. Returns the patient ids of each set (``"training"`` or ``"training/fold0"``...).
    """
    if isinstance(datalist, (str, os.PathLike)):
        datalist = {name: recs for name, recs in load_records(datalist).sections.items()}
    sets: dict[str, set[str]] = {}
    for name, records in datalist.items():
        if not isinstance(records, list):
            continue
        for index, record in enumerate(records):
            if not isinstance(record, Mapping):
                raise InputError(None, f"entry {index} of {name!r} is not a record with a patient id")
            group = name if fold_key not in record else f"{name}/fold{record[fold_key]}"
            sets.setdefault(group, set()).add(patient_of(record, patient_key, f"{name} entry {index}: "))
    owners: dict[str, list[str]] = {}
    for group, patients in sets.items():
        for patient in patients:
            owners.setdefault(patient, []).append(group)
    leaks = {patient: groups for patient, groups in sorted(owners.items()) if len(groups) > 1}
    if leaks:
        shown = "; ".join(f"{p} in {', '.join(sorted(g))}" for p, g in list(leaks.items())[:5])
        raise PatientLeakError(f"{len(leaks)} patient(s) in more than one set: {shown}")
    return sets


def make_splits(
    src: str | os.PathLike | Mapping[str, Any] | Sequence[Mapping[str, Any]],
    out_json: str | os.PathLike,
    fractions: Sequence[float] | None = (0.7, 0.1, 0.2),
    n_folds: int | None = None,
    seed: int = 0,
    *,
    section: str | None = "training",
    patient_key: str = "patient",
    stratify_key: str | None = None,
    test_fraction: float = 0.0,
    base_dir: str | os.PathLike | None = "",
) -> dict[str, list[dict[str, Any]]]:
    """File level: read ``src`` (MSD folder, datalist JSON...), split ``section`` (None: all sections) by patient,
    check it, write the datalist JSON (paths relative to ``base_dir``, default its folder; None: absolute)."""
    loaded = load_records(src)
    split = split_by_patient(
        loaded.records(section), fractions, n_folds, seed,
        patient_key=patient_key, stratify_key=stratify_key, test_fraction=test_fraction,
    )  # fmt: skip
    assert_no_patient_leak(split, patient_key)
    inputs = (loaded.source,) if loaded.source is not None else ()
    write_datalist({"seed": seed, "patient_key": patient_key, **split}, out_json, base_dir, inputs=inputs)
    return split
