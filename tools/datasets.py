"""Data sources -> MONAI-style datalists: MSD task folders, NIfTI folders, DICOM trees and datalist JSON files.

Every reader returns a list of records (plain dicts, JSON-serialisable, absolute paths as strings) with the keys

* ``image``: the CT (a NIfTI file, or a DICOM series folder when :func:`read_dicom_folder` is asked not to convert),
* ``label`` (optional): its label map on the same grid,
* ``patient``: the patient the scan belongs to (DICOM PatientID; otherwise an explicit ``patient`` field, else the
  case name). Splits are made per patient so that no patient leaks across training / validation / test,
* ``case``: a name unique within the data set (used for output file names),

plus whatever other fields the source had (``organs``, ``section``, ``series_uid``...). Readers check what can be
checked without opening volumes (files exist, paths stay inside the data folder, names pair up, no duplicates) and
write nothing, except :func:`read_dicom_folder` converting into the ``cache_dir`` it is given.
:func:`validate_records` then opens every volume through :mod:`tools.io` so that truncated files, grids that do not
match and non-CT volumes are refused before a training run starts, with the offending file named.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Sequence

import nibabel as nib
import numpy as np

from tools.bundle_scripts.validation import (
    ORGAN_KEYS,
    check_label,
    check_windowed_intensity,
    intensity_of,
    parse_intensity,
    windowed_to_hu,
)
from tools.dicom import convert_dicom_series, list_series, looks_like_dicom, read_dicom_series
from tools.errors import InputError
from tools.io import check_ct_intensity, check_pair, load_ct, load_label, load_nifti, write_json

logger = logging.getLogger(__name__)

#: File name endings of NIfTI volumes, longest first so that ``.nii.gz`` is stripped whole.
NIFTI_SUFFIXES = (".nii.gz", ".nii")
#: Datalist sections of MSD (``test``) and MONAI / Auto3DSeg (``testing``) files, read first and in this order; any
#: other top-level list whose entries all have an ``image`` is read as a section too.
SECTIONS = ("training", "validation", "test", "testing")
#: Record fields that hold label maps on the image grid (checked by :func:`validate_records`).
LABEL_KEYS = ("label", "organs")
#: The values of a ``label`` map in this collection: background, pancreas, tumor.
LABEL_SET = (0, 1, 2)
#: The datalist ``tools synthesize`` writes into its output folder, next to the cases.
SYNTHETIC_DATALIST = "datalist.json"
#: nnU-Net names single-channel images ``<case>_0000.nii.gz`` and their labels ``<case>.nii.gz``.
NNUNET_CHANNEL_SUFFIX = "_0000"


def case_name(path: str | os.PathLike) -> str:
    """File name without its NIfTI ending (``/a/pancreas_001.nii.gz`` -> ``pancreas_001``)."""
    name = Path(path).name
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def is_nifti(path: str | os.PathLike) -> bool:
    return Path(path).name.endswith(NIFTI_SUFFIXES) and not Path(path).name.startswith(".")


def _is_path_field(key: str, value: Any) -> bool:
    """``image`` and label fields always hold paths; any other field does when its value names a NIfTI file."""
    if key == "image" or key in LABEL_KEYS:
        return True
    values = value if isinstance(value, list) else [value]
    return bool(values) and all(isinstance(v, str) and v.endswith(NIFTI_SUFFIXES) for v in values)


def _resolve(value: str, base_dir: Path, source: Path, confine: bool) -> str:
    """Absolute path of ``value`` (relative to ``base_dir``); with ``confine``, refuse one outside ``base_dir``."""
    path = Path(os.path.normpath(base_dir / value))
    if confine and not (path == base_dir or base_dir in path.parents):
        raise InputError(source, f"entry {value!r} points outside the data folder {base_dir} (resolves to {path})")
    if confine:  # a symlink inside the folder that leads out of it (the bundles refuse the same, scripts/validation)
        real = Path(os.path.realpath(path))
        real_base = Path(os.path.realpath(base_dir))
        if not (real == real_base or real_base in real.parents):
            raise InputError(source, f"entry {value!r} points outside the data folder {base_dir} (a symlink to {real})")
    if not path.exists():
        raise InputError(source, f"names {value!r}, which does not exist ({path})")
    return str(path)


def _resolve_entry(entry: Any, base_dir: Path, source: Path, confine: bool, where: str) -> dict:
    """One datalist entry (a dict, or a bare image path as in MSD ``test``) with every path field made absolute."""
    if isinstance(entry, str):
        entry = {"image": entry}
    if not isinstance(entry, dict) or not isinstance(entry.get("image"), (str, list)):
        raise InputError(source, f"{where}: expected an object with an 'image' path, got {str(entry)[:120]}")
    record = {}
    for key, value in entry.items():
        if value is None and key in LABEL_KEYS:
            continue  # "label": null in a test entry means no label
        if _is_path_field(key, value):
            if isinstance(value, list):
                record[key] = [_resolve(v, base_dir, source, confine) for v in value]
            elif isinstance(value, str):
                record[key] = _resolve(value, base_dir, source, confine)
            else:
                raise InputError(source, f"{where}: field {key!r} should be a path, got {value!r}")
        else:
            record[key] = value
    image = record["image"][0] if isinstance(record["image"], list) else record["image"]
    record["case"] = str(entry["case"]) if entry.get("case") not in (None, "") else case_name(image)
    record["patient"] = str(entry["patient"]) if entry.get("patient") not in (None, "") else record["case"]
    return record


def check_unique(records: Sequence[dict], source: str | os.PathLike | None) -> None:
    """Refuse a datalist naming one image twice or two records with one case name (outputs would collide)."""
    seen_images: dict[str, int] = {}
    seen_cases: dict[str, int] = {}
    for index, record in enumerate(records):
        image = str(record["image"])
        if image in seen_images:
            raise InputError(source, f"image {image} is listed twice (records {seen_images[image]} and {index})")
        if record["case"] in seen_cases:
            raise InputError(
                source, f"case name {record['case']!r} is used twice (records {seen_cases[record['case']]} and {index})"
            )
        seen_images[image] = index
        seen_cases[record["case"]] = index


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(path, "file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(path, f"not valid JSON ({err})") from None


def _section_names(content: dict) -> list[str]:
    extra = [
        key
        for key, value in content.items()
        if key not in SECTIONS
        and isinstance(value, list)
        and value
        and all(isinstance(v, dict) and "image" in v for v in value)
    ]
    return [name for name in SECTIONS if name in content] + extra


def _records_from_sections(
    content: Any, base_dir: Path, source: Path, confine: bool, sections: Iterable[str] | None
) -> list[dict]:
    if isinstance(content, list):  # a bare MONAI datalist: [{"image": ..., "label": ...}, ...]
        content = {"training": content}
    if not isinstance(content, dict):
        raise InputError(source, "expected a JSON object with 'training' / 'validation' / 'test' lists, or a list")
    sections = _section_names(content) if sections is None else list(sections)
    records = []
    for section in sections:
        entries = content.get(section)
        if entries is None:
            continue
        if not isinstance(entries, list):
            raise InputError(source, f"'{section}' should be a list of entries, got {type(entries).__name__}")
        for index, entry in enumerate(entries):
            record = _resolve_entry(entry, base_dir, source, confine, f"{section}[{index}]")
            record.setdefault("section", section)
            records.append(record)
    if not records:
        raise InputError(source, f"no entries in any of the sections {sections or list(SECTIONS)}")
    check_unique(records, source)
    return records


def read_msd(task_dir: str | os.PathLike, sections: Sequence[str] | None = None) -> list[dict]:
    """Records of a Medical Segmentation Decathlon task folder (``dataset.json`` + ``imagesTr/labelsTr/imagesTs``).

    Every path ``dataset.json`` names must exist and stay inside ``task_dir`` (a ``../`` or absolute path elsewhere
    is refused: a data folder must be self-contained to be shared or moved). Records get ``section`` (training /
    validation / test) and keep extra fields such as the phantom's ``organs`` and ``patient``. Files present in the
    folder but not listed (e.g. macOS ``._*`` files in the real Task07 archive) are ignored. ``sections`` picks
    which lists to read (default: :data:`SECTIONS` present, then any other list of entries with an ``image``).
    """
    task_dir = Path(os.path.abspath(task_dir))
    source = task_dir / "dataset.json"
    if not task_dir.is_dir():
        raise InputError(task_dir, "not a directory (expected an MSD task folder with dataset.json)")
    return _records_from_sections(_load_json(source), task_dir, source, confine=True, sections=sections)


def read_monai_datalist(path: str | os.PathLike, sections: Sequence[str] | None = None) -> list[dict]:
    """Records of a MONAI datalist JSON (a list, or an object with section lists), paths relative to its folder.

    Unlike :func:`read_msd`, paths may lead outside the JSON's folder (datalists often point at a shared data
    disk), but each must exist. ``sections`` as in :func:`read_msd`.
    """
    path = Path(os.path.abspath(path))
    return _records_from_sections(_load_json(path), path.parent, path, confine=False, sections=sections)


def _nifti_files(folder: Path, pattern: str) -> list[Path]:
    return sorted(p for p in folder.glob(pattern) if p.is_file() and is_nifti(p))


def read_nifti_folder(
    folder: str | os.PathLike,
    image_glob: str = "*.nii*",
    label_dir: str | os.PathLike | None = None,
    label_suffix: str = "",
    require_labels: bool = False,
) -> list[dict]:
    """Records of a folder of NIfTI images, each paired with the label of the same name.

    The label of ``<case>.nii.gz`` is ``<case><label_suffix>.nii[.gz]`` in ``label_dir`` (default: ``folder``
    itself, which then needs a ``label_suffix`` such as ``_seg``), or nnU-Net's ``<case>.nii.gz`` for an image
    ``<case>_0000.nii.gz``. Images without a label are kept without ``label`` (a test set) unless
    ``require_labels``; a label no image claims is refused, since it usually means a misnamed training case.
    """
    folder = Path(os.path.abspath(folder))
    if not folder.is_dir():
        raise InputError(folder, "not a directory")
    label_folder = Path(os.path.abspath(label_dir)) if label_dir is not None else folder
    if label_dir is not None and not label_folder.is_dir():
        raise InputError(label_folder, "label folder not found")
    if label_folder == folder and not label_suffix and label_dir is not None:
        raise InputError(folder, "images and labels in one folder need a label_suffix to tell them apart")

    def is_label_name(path: Path) -> bool:
        return bool(label_suffix) and case_name(path).endswith(label_suffix)

    images = [p for p in _nifti_files(folder, image_glob) if not (label_folder == folder and is_label_name(p))]
    if not images:
        raise InputError(folder, f"no NIfTI images matching {image_glob!r}")
    labels: dict[str, Path] = {}
    if label_dir is not None or label_suffix:
        for path in _nifti_files(label_folder, "*"):
            if label_folder != folder or is_label_name(path):
                stem = case_name(path)
                key = stem[: -len(label_suffix)] if label_suffix and stem.endswith(label_suffix) else stem
                if key in labels:
                    raise InputError(path, f"second label for case {key} (first: {labels[key]})")
                labels[key] = path

    records, claimed = [], set()
    for image in images:
        case = case_name(image)
        key = case
        if key not in labels and case.endswith(NNUNET_CHANNEL_SUFFIX) and case[:-5] in labels:
            key = case = case[:-5]
        record = {"image": str(image)}
        if key in labels:
            if key in claimed:
                raise InputError(labels[key], f"label claimed by two images (the second is {image})")
            record["label"] = str(labels[key])
            claimed.add(key)
        elif require_labels:
            raise InputError(image, f"no label {case}{label_suffix}.nii[.gz] in {label_folder}")
        records.append({**record, "patient": case, "case": case})
    orphans = sorted(set(labels) - claimed)
    if orphans:
        raise InputError(labels[orphans[0]], f"label has no image named {orphans[0]}* in {folder}")
    check_unique(records, folder)
    return records


_UNSAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


def _dicom_fingerprint(files: Sequence[str]) -> list:
    """What a cached conversion depends on: each file's name, size and modification time."""
    return [[os.path.basename(f), os.stat(f).st_size, os.stat(f).st_mtime_ns] for f in sorted(files)]


def read_dicom_folder(
    root: str | os.PathLike,
    label_dir: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> list[dict]:
    """Records of every CT series under ``root``; non-CT series (SEG, RTSTRUCT, PT, MR...) are skipped.

    ``patient`` is the series' PatientID; an anonymised series without one falls back to the first folder under
    ``root`` (the usual ``<patient>/<study>/<series>`` layout). ``case`` is the series folder relative to ``root``.

    With ``cache_dir``, each series is converted once to ``<cache_dir>/<case>.nii.gz`` by
    :func:`tools.dicom.convert_dicom_series` (checked, atomic) and reconverted only when its files change; records
    point at the NIfTI. Without it nothing is written: ``image`` is the series folder (which MONAI's ``LoadImage``
    with ``ITKReader`` reads as a volume) and the series is checked when :func:`validate_records` opens it; a
    folder holding several series then needs ``cache_dir``, since a reader cannot be told which one per record.

    Labels in ``label_dir`` are NIfTI files named after the case or, when a patient has one series, the patient.
    """
    root = Path(os.path.abspath(root))
    found = list_series(root)
    ct_series = [s for s in found if not s.modality or s.modality == "CT"]
    for skipped in sorted(set(found) - set(ct_series), key=lambda s: str(s.directory)):
        logger.info("skipping %s series %s in %s", skipped.modality, skipped.series_id, skipped.directory)
    if not ct_series:
        others = sorted({s.modality for s in found})
        raise InputError(root, f"no CT series found{f' (only {others})' if others else ''}")

    per_directory: dict[Path, int] = {}
    for series in ct_series:
        per_directory[series.directory] = per_directory.get(series.directory, 0) + 1
    records, seen_in_directory = [], {}
    for series in ct_series:
        relative = series.directory.relative_to(root)
        case = _UNSAFE_NAME.sub("_", "_".join(relative.parts) or root.name).strip("_") or "series"
        if per_directory[series.directory] > 1:
            seen_in_directory[series.directory] = seen_in_directory.get(series.directory, 0) + 1
            case = f"{case}_s{seen_in_directory[series.directory]}"
        patient = series.patient_id
        if not patient:
            patient = relative.parts[0] if len(relative.parts) > 1 else case
            logger.warning("%s has no PatientID; using %r as the patient id", series.directory, patient)
        record = {"image": str(series.directory), "patient": patient, "case": case, "series_uid": series.series_id}
        if cache_dir is None and per_directory[series.directory] > 1:
            raise InputError(
                series.directory,
                f"holds {per_directory[series.directory]} series; pass cache_dir to convert each to NIfTI",
            )
        records.append(record)
    # one image per record is guaranteed by (folder, series id); case names must not collide (cache file names)
    check_unique([{**r, "image": f"{r['image']}#{r['series_uid']}"} for r in records], root)

    if label_dir is not None:
        _attach_labels(records, Path(os.path.abspath(label_dir)))
    if cache_dir is not None:
        cache = Path(os.path.abspath(cache_dir))
        for record, series in zip(records, ct_series):
            record["dicom_dir"] = record["image"]
            record["image"] = str(_cached_conversion(series.directory, series.series_id, series.files, cache, record))
    return records


def _attach_labels(records: list[dict], label_dir: Path) -> None:
    if not label_dir.is_dir():
        raise InputError(label_dir, "label folder not found")
    by_case = {r["case"]: r for r in records}
    series_per_patient: dict[str, int] = {}
    for record in records:
        series_per_patient[record["patient"]] = series_per_patient.get(record["patient"], 0) + 1
    for label in _nifti_files(label_dir, "*"):
        name = case_name(label)
        if name in by_case:
            target = by_case[name]
        elif series_per_patient.get(name) == 1:
            target = next(r for r in records if r["patient"] == name)
        elif name in series_per_patient:
            raise InputError(label, f"patient {name} has {series_per_patient[name]} series: name the label by case")
        else:
            raise InputError(label, f"label matches no case or patient id (cases: {sorted(by_case)[:5]}...)")
        if "label" in target:
            raise InputError(label, f"second label for case {target['case']} (first: {target['label']})")
        target["label"] = str(label)


def _cached_conversion(series_dir: Path, series_id: str, files: Sequence[str], cache: Path, record: dict) -> Path:
    out = cache / f"{record['case']}.nii.gz"
    sidecar = cache / f"{record['case']}.source.json"
    fingerprint = {"series_dir": str(series_dir), "series_id": series_id, "files": _dicom_fingerprint(files)}
    if out.is_file() and sidecar.is_file():
        try:
            if json.loads(sidecar.read_text()) == fingerprint:
                return out
        except json.JSONDecodeError:
            pass
    convert_dicom_series(series_dir, out, series_uid=series_id)
    write_json(sidecar, fingerprint)  # written last: a conversion without it is redone next time
    return out


def read_datalist(path_or_dir: str | os.PathLike, **options) -> list[dict]:
    """Records of any supported source, chosen by what ``path_or_dir`` is.

    * a ``.json`` file: an MSD ``dataset.json`` (it has a ``training`` list and sits next to ``imagesTr``) or a
      MONAI datalist;
    * a folder with ``dataset.json``: an MSD task (an nnU-Net v2 ``dataset.json`` without file lists falls back to
      pairing ``imagesTr`` / ``labelsTr`` and ``imagesTs`` by name);
    * a folder with ``datalist.json`` (written by ``tools synthesize``, images and labels side by side): that list;
    * a folder with ``images/`` (+ ``labels/``) or NIfTI files: a NIfTI folder;
    * a folder tree with DICOM files: a DICOM folder.

    ``options`` go to the reader chosen (e.g. ``cache_dir`` for DICOM, ``label_suffix`` for NIfTI).
    """
    path = Path(os.path.abspath(path_or_dir))
    if path.is_file():
        if path.suffix != ".json":
            raise InputError(path, "expected a datalist .json file or a data folder")
        content = _load_json(path)
        if path.name == "dataset.json" and (path.parent / "imagesTr").is_dir():
            return _read_task_folder(path.parent, content, **options)
        return read_monai_datalist(path, **options)
    if not path.is_dir():
        raise InputError(path, "not found")
    if (path / "dataset.json").is_file():
        return _read_task_folder(path, _load_json(path / "dataset.json"), **options)
    if (path / SYNTHETIC_DATALIST).is_file():  # a folder written by `tools synthesize`: its cases are image + label
        return read_monai_datalist(path / SYNTHETIC_DATALIST, **options)
    if (path / "images").is_dir():
        labels = path / "labels"
        return read_nifti_folder(path / "images", label_dir=labels if labels.is_dir() else None, **options)
    if any(is_nifti(p) for p in path.iterdir()):
        labels = path / "labels"
        return read_nifti_folder(path, label_dir=labels if labels.is_dir() else None, **options)
    if any(looks_like_dicom(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files[:3]):
        return read_dicom_folder(path, **options)
    raise InputError(path, "no dataset.json, datalist, NIfTI images or DICOM series found here")


def _read_task_folder(task_dir: Path, content: Any, **options) -> list[dict]:
    if isinstance(content, dict) and any(section in content for section in SECTIONS):
        return read_msd(task_dir, **options)
    # nnU-Net v2 dataset.json: channel names and labels, but no file lists
    records = read_nifti_folder(task_dir / "imagesTr", label_dir=task_dir / "labelsTr", require_labels=True)
    for record in records:
        record["section"] = "training"
    if (task_dir / "imagesTs").is_dir() and _nifti_files(task_dir / "imagesTs", "*"):
        test = read_nifti_folder(task_dir / "imagesTs")
        records += [{**record, "section": "test"} for record in test]
    check_unique(records, task_dir)
    return records


def validate_records(
    records: Sequence[dict],
    check_ct: bool = True,
    allowed_labels: Sequence[int] | None = None,
    label_keys: Sequence[str] = LABEL_KEYS,
) -> Sequence[dict]:
    """Open every image (and label map) and raise :class:`InputError` for the first one that cannot be used.

    Each image must read cleanly (not truncated, finite, 3D, sane spacing) and, with ``check_ct``, look like CT in
    Hounsfield units; an image marked as written in a HU window (``intensity``, see
    :func:`tools.bundle_scripts.validation.intensity_of`) must instead stay inside the range its mark names. Each
    field of ``label_keys`` present must be an integer label map on the image's grid; ``label`` must have some
    foreground and some background and only use ``allowed_labels`` when given, while an organ map (``organs``) may
    be all foreground (a crop inside the body). A DICOM series folder is read with its geometry checks. Volumes are
    opened one at a time, so memory stays at one case. Returns ``records`` unchanged.
    """
    allowed = tuple(allowed_labels) if allowed_labels is not None else None
    for index, record in enumerate(records):
        if not isinstance(record, dict) or "image" not in record:
            raise InputError(None, f"record {index} has no 'image' field: {str(record)[:120]}")
        image_path = record["image"]
        if not isinstance(image_path, (str, os.PathLike)):
            raise InputError(None, f"record {index}: 'image' must be one path (single-channel CT), got {image_path!r}")
        window = None if os.path.isdir(image_path) else parse_intensity(intensity_of(image_path, record), image_path)
        if os.path.isdir(image_path):
            image, affine, _ = read_dicom_series(image_path, record.get("series_uid"))
            if check_ct:
                check_ct_intensity(image_path, image)
        elif window is not None:
            image, affine = load_nifti(image_path)
            check_windowed_intensity(image_path, image, window)
        elif check_ct:
            image, affine = load_ct(image_path)
        else:
            image, affine = load_nifti(image_path)
        shape = image.shape
        del image
        for key in label_keys:
            if record.get(key) is None:
                continue
            label, label_affine = load_label(record[key], allowed if key == "label" else None)
            # an empty segmentation (no pancreas) or one without background is a broken label; an organ map of a
            # crop inside the body has no background
            check_label(
                record[key], label, require_foreground=key == "label", forbid_all_foreground=key not in ORGAN_KEYS
            )
            try:
                check_pair(image_path, record[key], shape, affine, label.shape, label_affine)
            except InputError as err:
                hint = _reorientation_hint(shape, affine, label.shape, label_affine)
                if hint:
                    raise InputError(err.path, f"{err.problem}; {hint}") from None
                raise
        logger.debug("checked %s (%s)", record.get("case", image_path), "x".join(map(str, shape)))
    return records


def load_image_hu(record: dict | str | os.PathLike, check_ct: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The image of a record (or a path) in Hounsfield units as float32, with its affine.

    An image marked as written in a HU window is checked against its mark and mapped back to HU (exact inside the
    window, clipped outside), so that readers measuring HU compare windowed and HU sets alike; ``check_ct`` refuses
    an unmarked image that does not look like CT (:func:`tools.io.load_ct`)."""
    path = record["image"] if isinstance(record, dict) else record
    window = parse_intensity(intensity_of(path, record if isinstance(record, dict) else None), path)
    if window is None:
        return load_ct(path) if check_ct else load_nifti(path, dtype=np.float32)
    image, affine = load_nifti(path, dtype=np.float32)
    check_windowed_intensity(path, image, window)
    return windowed_to_hu(image, window).astype(np.float32, copy=False), affine


def _reorientation_hint(image_shape, image_affine, label_shape, label_affine, atol_mm: float = 1e-3) -> str | None:
    """When a label is the image's grid stored in another axis order / direction (e.g. LAS vs LPS from two DICOM
    converters), say so: the voxels are right, only the orientation differs."""
    transform = nib.orientations.ornt_transform(
        nib.orientations.io_orientation(label_affine), nib.orientations.io_orientation(image_affine)
    )
    reoriented_affine = label_affine @ nib.orientations.inv_ornt_aff(transform, label_shape)
    reoriented_shape = tuple(label_shape[int(axis)] for axis in np.argsort(transform[:, 0]))
    if tuple(image_shape) != reoriented_shape or not np.allclose(reoriented_affine, image_affine, atol=atol_mm):
        return None
    label_codes = "".join(nib.aff2axcodes(label_affine))
    image_codes = "".join(nib.aff2axcodes(image_affine))
    return (
        f"it is the same physical grid stored as {label_codes} while the image is {image_codes}: reorient one of "
        "them (nibabel as_closest_canonical, or MONAI Orientationd in the pipeline)"
    )


def summarize(records: Sequence[dict]) -> dict:
    """Counts of a datalist: records, labelled records, patients, records per section (for logs and reports)."""
    return {
        "records": len(records),
        "labelled": sum(1 for r in records if r.get("label")),
        "patients": len({r["patient"] for r in records}),
        "sections": dict(Counter(r.get("section", "-") for r in records)),
    }
