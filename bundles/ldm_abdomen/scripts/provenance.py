"""Write synthetic volumes that say they are synthetic: NIfTI description + a sidecar JSON with their provenance.

Why this is not plain MONAI: ``SaveImaged`` cannot set the NIfTI description, writes no sidecar and is not atomic.
Every synthetic file of the collection carries ``SYNTHETIC`` in its description and, next to it, ``<name>.json``
with the bundle, its version, the checkpoint's SHA-256, the seed and the file's own SHA-256, so a synthetic scan
can never pass for a patient's and can always be traced to the model that made it. Bundles travel one by one
through the model zoo, so each generative bundle carries an identical copy of this file in ``scripts/`` (the source
is ``tools/bundle_scripts``; a test keeps the copies equal).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Hashable, Mapping, Sequence

import nibabel as nib
import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform

SYNTHETIC_DESCRIP = "SYNTHETIC"
NIFTI_SUFFIXES = (".nii.gz", ".nii")


def sha256_file(path: str | os.PathLike | None) -> str | None:
    """Hex SHA-256 of a file (a checkpoint, an output), or None when there is no file."""
    if path is None or not Path(path).is_file():
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def bundle_identity(bundle_root: str | os.PathLike) -> dict[str, str]:
    """``{"bundle": <folder name>, "version": <metadata version>}`` of a bundle."""
    root = Path(bundle_root)
    version = "unknown"
    meta = root / "configs" / "metadata.json"
    if meta.is_file():
        version = json.loads(meta.read_text()).get("version", "unknown")
    return {"bundle": root.resolve().name, "version": version}


def sidecar_path(nifti_path: str | os.PathLike) -> Path:
    """``x.nii.gz`` -> ``x.json`` (the provenance sidecar of a volume)."""
    path = Path(nifti_path)
    for suffix in NIFTI_SUFFIXES:
        if path.name.endswith(suffix):
            return path.with_name(path.name[: -len(suffix)] + ".json")
    return path.with_suffix(".json")


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name.split('.')[0]}.", suffix=".part" + suffix, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_synthetic_nifti(
    path: str | os.PathLike,
    array: np.ndarray | torch.Tensor,
    affine: np.ndarray | torch.Tensor,
    provenance: Mapping[str, Any],
    is_label: bool = False,
    dtype: Any = None,
) -> tuple[Path, Path]:
    """Write a synthetic volume and its provenance sidecar, both atomically; return both paths.

    ``array`` is 3D (or channel-first with one channel). The description reads ``SYNTHETIC <bundle> <version>
    seed=<seed>``; the sidecar holds ``provenance`` plus ``synthetic: true`` and the written file's SHA-256.
    """
    path = Path(path)
    data = array.detach().cpu().numpy() if torch.is_tensor(array) else np.asarray(array)
    if data.ndim == 4 and data.shape[0] == 1:
        data = data[0]
    if data.ndim != 3:
        raise ValueError(f"{path}: expected a 3D volume, got shape {data.shape}")
    aff = affine.detach().cpu().numpy() if torch.is_tensor(affine) else np.asarray(affine)
    aff = np.asarray(aff, dtype=np.float64)
    if dtype is None:
        dtype = np.uint8 if is_label else np.int16
    if np.issubdtype(np.dtype(dtype), np.integer):
        info = np.iinfo(dtype)
        data = np.clip(np.rint(data), info.min, info.max)
    image = nib.Nifti1Image(data.astype(dtype), aff)
    image.header.set_qform(aff, code=1)
    image.header.set_sform(aff, code=1)
    image.header.set_xyzt_units("mm", "sec")
    if is_label:
        image.header.set_intent("label")
    text = " ".join(
        str(v) for v in (SYNTHETIC_DESCRIP, provenance.get("bundle", ""), provenance.get("version", "")) if v
    )
    if "seed" in provenance:
        text += f" seed={provenance['seed']}"
    image.header["descrip"] = text.encode("ascii", "replace")[:79]
    _atomic_write(path, lambda tmp: nib.save(image, tmp))
    record = {"synthetic": True, **provenance, "file": path.name, "sha256": sha256_file(path)}
    side = sidecar_path(path)
    _atomic_write(side, lambda tmp: Path(tmp).write_text(json.dumps(record, indent=2, default=str) + "\n"))
    return path, side


def _case_name(meta: Mapping[str, Any] | None, fallback: str) -> str:
    source = (meta or {}).get("filename_or_obj")
    if isinstance(source, (list, tuple)):
        source = source[0] if source else None
    if not source:
        return fallback
    name = Path(str(source)).name
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


class SaveSyntheticd(MapTransform):
    """Save synthetic volumes of a data dictionary with :func:`write_synthetic_nifti` (config-friendly).

    Output names are ``<output_dir>/<case>_<postfix>.nii.gz`` where ``case`` comes from the source file named in
    the item's metadata (``filename_or_obj``; ``name_key`` overrides) and ``postfix`` from ``postfixes`` (default the
    key). The affine is the item's own (a ``MetaTensor``) or ``affine_key``'s. ``provenance`` is merged with the
    item's ``provenance_key`` entry (e.g. the sample's seed). Paths written are stored under ``<key>_path``.
    """

    def __init__(
        self,
        keys: KeysCollection,
        output_dir: str | os.PathLike,
        provenance: Mapping[str, Any] | None = None,
        label_keys: Sequence[Hashable] = ("label",),
        postfixes: Mapping[Hashable, str] | None = None,
        name_key: str | None = None,
        affine_key: str | None = None,
        provenance_key: str = "provenance",
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        self.output_dir = Path(output_dir)
        self.provenance = dict(provenance or {})
        self.label_keys = set(label_keys)
        self.postfixes = dict(postfixes or {})
        self.name_key = name_key
        self.affine_key = affine_key
        self.provenance_key = provenance_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            value = d[key]
            meta = getattr(value, "meta", None)
            case = str(d[self.name_key]) if self.name_key else _case_name(meta, "sample")
            if self.affine_key:
                affine = d[self.affine_key]
                affine = getattr(affine, "affine", affine)
            else:
                affine = getattr(value, "affine", None)
            if affine is None:
                raise ValueError(f"no affine for '{key}': give a MetaTensor or affine_key")
            provenance = {**self.provenance, **dict(d.get(self.provenance_key) or {})}
            postfix = self.postfixes.get(key, str(key))
            path = self.output_dir / f"{case}_{postfix}.nii.gz"
            write_synthetic_nifti(path, value, affine, provenance, is_label=key in self.label_keys)
            d[f"{key}_path"] = str(path)
        return d
