"""A quality gate for synthetic cases (issue 14 point 5): judge every case, regenerate a rejected one with the next
seed, keep the best try, and say so.

``tools synthesize --quality_gate JUDGE`` calls :class:`QualityGate` on every case it makes. The gate follows MAISI
(the model zoo's ``maisi_ct_generative``: ``scripts/quality_check.py`` and its sampler, which draws a new image/label
pair while a pair fails), with the label check MAISI lacks:

* **label consistency**: a seg_unet3d model trained on real CT (the judge, ``JUDGE`` = its model folder) segments the
  synthetic image; the Dice between its pancreas (labels 1 + 2) and the conditioning mask's
  (:func:`tools.evaluation.pancreas_found`) must reach ``min_dice`` (default 0.5, the "pancreas found" rule of
  ``tools evaluate synthetic``);
* **HU median** (MAISI's check): the median HU of the synthetic image inside the pancreas label (label 1) must lie in
  ``mean +- 3 sd`` of the per-case medians of the real images the generator trained on (:func:`hu_reference`;
  MAISI's ``sigma_6_low`` / ``sigma_6_high``). The masks of this collection carry the pancreas and the tumor only;
  the pancreas is the organ checked (a few small tumors make a tumor reference too noisy to gate on). A case whose
  label has no pancreas voxel is not HU-checked (``median_hu`` None, as MAISI passes an organ without voxels).

A case passes when both checks pass. Try ``t`` (0-based) of sample ``k`` of the source record at position ``m`` is
drawn with the seed :func:`try_seed` ``= item_seed(seed, m, k + 10000 t)``: try 0 is the ungated run's seed (so a
gated set and an ungated one share their first tries), and the tries of one run never share a seed with another case
of it, because the gate allows at most 10000 samples per record and 10 tries (so ``k + 10000 t < 100000``, the stride
between records). A case that passes no try keeps the try with the highest judge Dice (the first of equal ones) and is
marked ``"passed": false`` in its provenance and its datalist record: it is never dropped silently.

:func:`run_gate` is the loop on its own (what to make and how to judge are functions it is given), so it is tested
without a generator; :class:`QualityGate` judges files (one seg_unet3d inference run per batch of tries).
"""

from __future__ import annotations

import math
import os
import pickle
import re
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from tools.errors import InputError
from tools.synthesize import SEED_STRIDE, item_seed

#: try t of sample k uses the sample slot k + GATE_SEED_STEP * t of its record (see the module docstring)
GATE_SEED_STEP = 10_000
#: most tries per case (GATE_SEED_STEP * MAX_TRIES = SEED_STRIDE: the slots stay inside one record's stride)
MAX_TRIES = SEED_STRIDE // GATE_SEED_STEP
#: half-width of the HU pass range in standard deviations of the real per-case medians (MAISI's sigma_6 range)
HU_SIGMAS = 3.0
#: the reference written next to a gated synthetic set
REFERENCE_FILE = "quality_gate_reference.json"
KEPT_PASSED = "the first try that passed both checks"
KEPT_BEST = "no try passed: the try with the highest judge Dice (the first of equal ones)"


def try_seed(seed: int, index: int, sample: int, attempt: int) -> int:
    """The seed of try ``attempt`` (0 = the first) of sample ``sample`` of the source record at ``index``:
    ``item_seed(seed, index, sample + 10000 * attempt)``; try 0 is the ungated seed."""
    if not 0 <= int(sample) < GATE_SEED_STEP:
        raise ValueError(f"with the quality gate a record has at most {GATE_SEED_STEP} samples, got sample {sample}")
    if not 0 <= int(attempt) < MAX_TRIES:
        raise ValueError(f"try {attempt} is outside the gate's {MAX_TRIES} tries")
    return item_seed(seed, index, int(sample) + GATE_SEED_STEP * int(attempt))


def check_settings(tries: Any, min_dice: Any, samples_per_item: int | None = None) -> tuple[int, float]:
    """``(tries, min_dice)`` as numbers, or a ValueError naming the flag and the allowed values."""
    if isinstance(tries, bool) or not isinstance(tries, (int, np.integer)) or not 1 <= int(tries) <= MAX_TRIES:
        raise ValueError(f"--gate_tries must be a whole number from 1 to {MAX_TRIES} (the first try plus up to "
                         f"{MAX_TRIES - 1} regenerations), got {tries!r}")  # fmt: skip
    try:
        dice = float(min_dice)
    except (TypeError, ValueError):
        raise ValueError(f"--gate_min_dice must be a number from 0 to 1, got {min_dice!r}") from None
    if not 0.0 <= dice <= 1.0:
        raise ValueError(f"--gate_min_dice must be a number from 0 to 1, got {min_dice!r}")
    if samples_per_item is not None and int(samples_per_item) > GATE_SEED_STEP:
        raise ValueError(f"with --quality_gate, --samples_per_item is at most {GATE_SEED_STEP} (the seed rule of "
                         f"the tries), got {samples_per_item}")  # fmt: skip
    return int(tries), dice


# ---------------------------------------------------------------------------------------------------------------
# the HU reference (MAISI: per-organ median statistics of the real training images)


def hu_reference(source: str | os.PathLike, section: str = "training") -> dict[str, Any]:
    """Per-case median HU inside the pancreas label (label 1) of the real cases of ``section`` of ``source`` (a
    datalist JSON or data folder: what the generator trained on), and the pass range ``mean +- 3 sd`` of those medians.

    Raises :class:`InputError` naming ``source`` when the section is missing, has no labelled case, or fewer than two
    cases with pancreas voxels (no spread to take a range from); a bad file is refused by the readers' own checks.
    """
    from tools.datasets import LABEL_SET, load_image_hu, validate_records
    from tools.evaluation import _label_medians
    from tools.io import load_nifti
    from tools.splits import load_records

    path = Path(source)
    if not path.exists():
        raise InputError(path, "no such file or folder (--gate_reference: the real datalist the generator trained on)")
    records = [r for r in load_records(path).records(section) if r.get("label")]
    if not records:
        raise InputError(path, f"section {section!r} has no case with a label: the HU reference needs real images "
                         "with pancreas labels")  # fmt: skip
    validate_records(records, allowed_labels=LABEL_SET)
    per_case: dict[str, float] = {}
    for record in records:
        ct, _ = load_image_hu(record)
        label = load_nifti(record["label"])[0]
        median = _label_medians([(ct, label)])["pancreas"]
        if median is not None:
            per_case[str(record.get("case") or Path(record["image"]).name)] = median
    if len(per_case) < 2:
        raise InputError(path, f"section {section!r}: {len(per_case)} of {len(records)} labelled case(s) have "
                         "pancreas voxels (label 1); the HU reference needs at least 2 to have a spread")  # fmt: skip
    values = np.array(list(per_case.values()), dtype=np.float64)
    mean, sd = float(values.mean()), float(values.std(ddof=1))
    return {
        "source": str(path.resolve()),
        "section": section,
        "label": "pancreas (label 1)",
        "statistic": "median HU of each real case inside the label",
        "n_cases": len(per_case),
        "mean": mean,
        "sd": sd,
        "sigmas": HU_SIGMAS,
        "low": mean - HU_SIGMAS * sd,
        "high": mean + HU_SIGMAS * sd,
        "min_median": float(values.min()),
        "max_median": float(values.max()),
        "percentile_0_5": float(np.percentile(values, 0.5)),
        "percentile_99_5": float(np.percentile(values, 99.5)),
        "rule": f"a synthetic case passes when its median HU inside the pancreas label is within mean +- {HU_SIGMAS:g} "
        "sd of these per-case medians (MAISI's sigma_6 range)",
        "per_case": per_case,
    }


# ---------------------------------------------------------------------------------------------------------------
# one case's checks, the choice among tries, and the loop


def case_checks(prediction: np.ndarray, ct: np.ndarray, label: np.ndarray, min_dice: float,
                hu_range: Sequence[float]) -> dict[str, Any]:  # fmt: skip
    """Both checks of one synthetic case: the judge's ``prediction`` (a label map on the image's grid) against the
    conditioning ``label``, and the median of ``ct`` (HU) inside the label's pancreas against ``hu_range``."""
    from tools.evaluation import _label_medians, pancreas_found

    if prediction.shape != label.shape or ct.shape != label.shape:
        raise RuntimeError(f"the judge's prediction {prediction.shape}, the image {ct.shape} and the label "
                           f"{label.shape} are not on one grid")  # fmt: skip
    dice = pancreas_found([prediction], [label], min_dice)["pancreas_dice_to_synthetic_label"]
    median = _label_medians([(ct, label)])["pancreas"]
    low, high = (float(v) for v in hu_range)
    label_ok = bool(dice >= min_dice)
    hu_ok = bool(median is None or low <= median <= high)
    return {
        "judge_dice": float(dice),
        "pancreas_median_hu": median,
        "label_consistency": {"passed": label_ok, "min_dice": float(min_dice)},
        "hu_median": {"passed": hu_ok, "range": [low, high], "checked": median is not None},
        "passed": label_ok and hu_ok,
    }


def choose_try(tries: Sequence[Mapping[str, Any]]) -> tuple[int, bool, str]:
    """``(index of the kept try, passed, why)``: the first try that passed, else the highest judge Dice (the first of
    equal ones)."""
    if not tries:
        raise ValueError("no try to choose from")
    for index, checks in enumerate(tries):
        if checks["passed"]:
            return index, True, KEPT_PASSED
    dices = [c["judge_dice"] if c["judge_dice"] is not None and math.isfinite(c["judge_dice"]) else -1.0
             for c in tries]  # fmt: skip
    return int(np.argmax(dices)), False, KEPT_BEST


def run_gate(
    items: Sequence[Mapping[str, Any]],
    tries: int,
    make_and_judge: Callable[[list[Mapping[str, Any]], int], list[Mapping[str, Any]]],
    on_decided: Callable[[Mapping[str, Any], dict[str, Any]], None] | None = None,
) -> dict[str, dict[str, Any]]:
    """The gate's loop: every item gets try 0; those that fail get try 1, and so on up to ``tries``.

    ``make_and_judge(pending, attempt)`` makes try ``attempt`` of every pending item and returns its checks (one
    :func:`case_checks`-like dict per item, in order, with ``passed`` and ``judge_dice``). ``on_decided(item,
    decision)`` is called as soon as an item is decided (passed, or its last try failed). Returns, per item name,
    the decision: ``{"passed", "kept_try" (1-based), "kept_because", "tries": [checks...], "max_tries"}``.
    """
    tries = int(tries)
    history: dict[str, list[dict[str, Any]]] = {str(it["name"]): [] for it in items}
    decisions: dict[str, dict[str, Any]] = {}
    pending = list(items)
    for attempt in range(tries):
        if not pending:
            break
        results = make_and_judge(pending, attempt)
        if len(results) != len(pending):
            raise RuntimeError(f"try {attempt + 1}: {len(results)} results for {len(pending)} cases")
        still = []
        for item, checks in zip(pending, results):
            name = str(item["name"])
            history[name].append(dict(checks))
            if checks["passed"] or attempt == tries - 1:
                index, passed, why = choose_try(history[name])
                decisions[name] = {"passed": passed, "kept_try": index + 1, "kept_because": why,
                                   "tries": history[name], "max_tries": tries}  # fmt: skip
                if on_decided is not None:
                    on_decided(item, decisions[name])
            else:
                still.append(item)
        pending = still
    return decisions


# ---------------------------------------------------------------------------------------------------------------
# the judge


def judge_weights(judge: str | os.PathLike) -> Path:
    """The judge's ``model.pt`` (``judge`` is the model folder or the file), or an InputError naming what is missing."""
    path = Path(judge)
    weights = path / "model.pt" if path.is_dir() else path
    if not path.exists():
        raise InputError(path, "no such judge (--quality_gate: a seg_unet3d model folder holding model.pt)")
    if not weights.is_file():
        raise InputError(weights, "no model.pt in the judge folder (--quality_gate: a seg_unet3d model folder)")
    return weights.resolve()


class QualityGate:
    """The gate's settings and its judge: checks synthetic files, describes itself for the manifest and provenance.

    Args:
        judge: seg_unet3d model folder (holding ``model.pt``) or the file itself.
        reference: :func:`hu_reference`'s dict (the HU pass range ``low`` / ``high``).
        judge_overrides: seg_unet3d inference overrides the judge's weights need (network size, ``pixdim``,
            ``roi_size``, ``num_classes``), as ``tools evaluate synthetic --seg_overrides``.
        tries: the first try plus up to ``tries - 1`` regenerations (1 to 10).
        min_dice: the judge's pancreas Dice to the conditioning mask from which a case is consistent.
        seg_bundle: the seg_unet3d bundle (name or folder).

    The judge is loaded once here (``weights_only``, strict): a missing file, a file that is no checkpoint or one
    that does not fit the network the overrides describe is refused with an :class:`InputError` naming the file.
    """

    def __init__(
        self,
        judge: str | os.PathLike,
        reference: Mapping[str, Any],
        judge_overrides: Mapping[str, Any] | None = None,
        tries: int = 3,
        min_dice: float = 0.5,
        seg_bundle: str | os.PathLike = "seg_unet3d",
    ):
        from tools.bundle_scripts.provenance import sha256_file

        self.tries, self.min_dice = check_settings(tries, min_dice)
        self.weights = judge_weights(judge)
        self.judge_overrides = dict(judge_overrides or {})
        self.seg_bundle = seg_bundle
        self.reference = dict(reference)
        self.hu_range = (float(self.reference["low"]), float(self.reference["high"]))
        self._load_judge()
        self.judge_sha256 = sha256_file(self.weights)

    def _load_judge(self) -> None:
        from tools.evaluation import load_seg_network

        try:
            load_seg_network(self.seg_bundle, self.weights, self.judge_overrides)
        except pickle.UnpicklingError as error:  # weights_only refuses anything but tensors and plain containers
            found = re.search(r"WeightsUnpickler error:\s*([^.\n]+)", str(error))
            why = f": {found.group(1).strip()}" if found else ""
            raise InputError(self.weights, "not a plain PyTorch weights file: torch.load(weights_only=True) refuses "
                             f"it (a pickle payload, or no checkpoint at all){why}") from error  # fmt: skip
        except (EOFError, RuntimeError) as error:  # a truncated or foreign file, or weights of another network size
            lines = [line.strip() for line in str(error).splitlines() if line.strip()]
            lines = lines or [f"{type(error).__name__}: the file is empty or cut short"]
            raise InputError(self.weights, "cannot be loaded as the judge's seg_unet3d network with --gate_overrides "
                             f"{self.judge_overrides}: {' '.join(lines[:3])[:400]} (give the network size, pixdim, "
                             "roi_size and num_classes the judge was trained with)") from error  # fmt: skip

    def describe(self) -> dict[str, Any]:
        """The settings that decide a case (for the manifest: a rerun with other ones is refused)."""
        return {
            "judge": str(self.weights),
            "judge_sha256": self.judge_sha256,
            "judge_overrides": self.judge_overrides,
            "tries": self.tries,
            "min_dice": self.min_dice,
            "hu_label": self.reference.get("label"),
            "hu_range": [round(v, 6) for v in self.hu_range],
            "reference": self.reference.get("source"),
            "reference_section": self.reference.get("section"),
            "seed_rule": f"try t (0-based) of sample k of record m: item_seed(seed, m, k + {GATE_SEED_STEP} t)",
        }

    def judge(self, records: Sequence[Mapping[str, Any]], work_dir: str | os.PathLike) -> list[dict[str, Any]]:
        """:func:`case_checks` of every record (``image`` and ``label`` files) with one seg_unet3d inference run
        (its predictions under ``work_dir/seg_predictions``)."""
        from tools.datasets import load_image_hu
        from tools.evaluation import predict_pancreas
        from tools.io import load_nifti

        if not records:
            return []
        predictions = predict_pancreas(records, Path(work_dir), self.seg_bundle, self.weights, self.judge_overrides)
        results = []
        for record, prediction in zip(records, predictions):
            ct, _ = load_image_hu(dict(record))
            label = load_nifti(record["label"])[0]
            results.append(case_checks(prediction, ct, label, self.min_dice, self.hu_range))
        return results

    def provenance(self, decision: Mapping[str, Any]) -> dict[str, Any]:
        """What a case's sidecars record: every try (seed, Dice, median HU, each check), the kept try and why."""
        return {**decision, "judge": str(self.weights), "judge_sha256": self.judge_sha256,
                "hu_range": list(self.hu_range), "min_dice": self.min_dice}  # fmt: skip


def datalist_mark(gate_block: Mapping[str, Any]) -> dict[str, Any]:
    """The short form of a case's gate record for its datalist entry."""
    kept = gate_block["tries"][gate_block["kept_try"] - 1]
    return {"passed": bool(gate_block["passed"]), "tries": len(gate_block["tries"]), "kept_try": gate_block["kept_try"],
            "judge_dice": kept.get("judge_dice"), "pancreas_median_hu": kept.get("pancreas_median_hu")}  # fmt: skip
