"""Data lists of this bundle and the check that ``dataset_dir`` holds the crop the config asks for.

The seed-002 crops (``full``: the body, ``semi``: the largest cube inside the body around the pancreas,
``pancreas``: the pancreas box, optionally resized to 240x240x155) are made once, outside the bundle, by the
collection's ``tools`` package::

    python -m tools data prepare <MSD folder> <out> --mode semi --out_shape 240,240,155 --hu_window None

which writes an MSD-layout folder whose ``dataset.json`` records how it was made (``prep``). Why not a transform in
this bundle: the crops need a body mask (thresholding, an opening, the largest component, hole filling) and the
largest-square search; ``tools.prep`` already implements and tests them with correct affines, and a second copy
here would drift. What this module adds is the guard: :func:`check_prepared` fails at start-up when the folder was
made with another mode or shape, or was windowed to [0, 1] (this bundle reads Hounsfield units and applies its own
CT window), instead of training on the wrong crop. ``crop_mode: "none"`` takes any MSD folder as it is.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

from monai.data import load_decathlon_datalist

from .validation import InputError

CROP_MODES = ("full", "semi", "pancreas", "none")


def datalist_path(dataset_dir: str | os.PathLike, datalist_file: str | os.PathLike | None = None) -> Path:
    path = Path(datalist_file) if datalist_file else Path(dataset_dir) / "dataset.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no datalist (dataset_dir must be an MSD-layout folder with dataset.json)")
    return path


def load_datalist(
    dataset_dir: str | os.PathLike,
    sections: Sequence[str] | str = ("training",),
    datalist_file: str | os.PathLike | None = None,
    limit: int | None = None,
) -> list[dict[str, Any]]:
    """The entries of the first of ``sections`` present in the datalist, paths made absolute (MONAI's loader)."""
    path = datalist_path(dataset_dir, datalist_file)
    content = json.loads(path.read_text())
    sections = [sections] if isinstance(sections, str) else list(sections)
    for section in sections:
        if content.get(section):
            items = load_decathlon_datalist(str(path), True, section, base_dir=str(dataset_dir))
            return items if limit is None else items[: int(limit)]
    raise InputError(path, f"no input cases: none of the sections {sections} has entries")


def check_prepared(
    dataset_dir: str | os.PathLike,
    crop_mode: str,
    prep_out_shape: Sequence[int] | None = None,
    datalist_file: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Fail unless ``dataset_dir`` was prepared with ``crop_mode`` (and ``prep_out_shape``) and kept in HU.

    Returns the ``prep`` record of the datalist (empty for ``crop_mode == "none"`` on an unprepared folder).
    """
    if crop_mode not in CROP_MODES:
        raise ValueError(f"crop_mode {crop_mode!r}: choose one of {list(CROP_MODES)}")
    path = datalist_path(dataset_dir, datalist_file)
    prep = json.loads(path.read_text()).get("prep") or {}
    command = f"python -m tools data prepare <MSD folder> <out> --mode {crop_mode} --hu_window None" + (
        f" --out_shape {','.join(str(s) for s in prep_out_shape)}" if prep_out_shape else ""
    )
    problems = []
    if crop_mode == "none":
        if prep and prep.get("mode") not in (None, "none"):
            problems.append(f"it holds {prep.get('mode')!r} crops")
    elif not prep:
        problems.append("it was not made by `tools data prepare` (no `prep` record)")
    else:
        if prep.get("mode") != crop_mode:
            problems.append(f"it was prepared with mode {prep.get('mode')!r}")
        wanted = None if prep_out_shape is None else [int(s) for s in prep_out_shape]
        if prep.get("out_shape") != wanted:
            problems.append(f"its crops were resized to {prep.get('out_shape')}, the config expects {wanted}")
    if prep and prep.get("hu_window") is not None:
        problems.append(f"its images were windowed to [0, 1] with {prep.get('hu_window')} (this bundle reads HU)")
    if problems:
        raise ValueError(f"{path}: crop_mode is {crop_mode!r} but {'; '.join(problems)}. Make it with: {command}")
    return prep
