"""Reader-study kit: a blinded set of real and synthetic cases, ratings read back, per-reader statistics, kappa.

Seeds 002, 003 and 004 asked clinicians whether scans were real and how realistic they looked. This builds the same
study for any set of scans: cases are shuffled and renamed (``case_001`` ...), rendered as PNG views in the abdomen
window (readers see pictures only, so nothing in a file header or name gives a case away), a key maps each name back
to its source, and a ratings CSV template goes to the readers. Scoring reads the filled CSVs back.

Layout of a study folder: ``readers/`` is the folder handed to the readers (``views/``, ``INSTRUCTIONS.txt``,
``ratings_template.csv``); ``key.json``, the answer, lies beside it, outside what the readers receive.

Conventions: the positive class is "synthetic" (sensitivity = synthetic cases called synthetic, specificity = real
cases called real). Cohen's kappa compares two readers' real/synthetic calls case by case; with ``weights`` it can
compare 0-5 realism ratings (linear or quadratic weights). A statistic whose denominator is zero (no synthetic case,
two readers who each gave one single answer to everything) is undefined and reported as ``None``, never as 0 or 1.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from itertools import combinations
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

from tools.datasets import LABEL_SET, load_image_hu, validate_records
from tools.errors import InputError
from tools.io import atomic_path, write_json

CALLS = ("real", "synthetic")
RATING_RANGE = (0, 5)
RATING_COLUMNS = ("reader", "case_id", "call", "realism")


# ----------------------------------------------------------------------------------------------------------------
# statistics
# ----------------------------------------------------------------------------------------------------------------


def _ratio(num: float, den: float) -> float | None:
    return None if den == 0 else num / den


def confusion(truth: Sequence[str], calls: Sequence[str]) -> dict[str, int]:
    """Counts with "synthetic" as the positive class: tp, fn (synthetic called real), tn, fp (real called synthetic)."""
    if len(truth) != len(calls):
        raise ValueError("truth and calls differ in length")
    counts = {"tp": 0, "fn": 0, "tn": 0, "fp": 0}
    for t, c in zip(truth, calls):
        if t not in CALLS or c not in CALLS:
            raise ValueError(f"values must be one of {CALLS}, got {t!r} / {c!r}")
        if t == "synthetic":
            counts["tp" if c == "synthetic" else "fn"] += 1
        else:
            counts["tn" if c == "real" else "fp"] += 1
    return counts


def reader_metrics(truth: Sequence[str], calls: Sequence[str]) -> dict[str, float | int | None]:
    """Sensitivity, specificity and accuracy of one reader's real/synthetic calls (None when undefined)."""
    c = confusion(truth, calls)
    n = sum(c.values())
    return {
        **c,
        "n": n,
        "sensitivity": _ratio(c["tp"], c["tp"] + c["fn"]),
        "specificity": _ratio(c["tn"], c["tn"] + c["fp"]),
        "accuracy": _ratio(c["tp"] + c["tn"], n),
    }


def cohen_kappa(
    a: Sequence, b: Sequence, categories: Sequence | None = None, weights: str | None = None
) -> float | None:
    """Cohen's kappa between two raters of the same items.

    ``weights`` None (nominal agreement), "linear" or "quadratic" (ordinal ratings such as 0-5 realism, the
    categories' order is their order in ``categories``). Returns None when the expected disagreement is zero (both
    raters used one single category for every item: kappa = 0/0 is undefined).
    """
    if len(a) != len(b):
        raise ValueError("the two raters must rate the same items")
    if len(a) == 0:
        return None
    cats = list(categories) if categories is not None else sorted(set(a) | set(b), key=str)
    index = {c: i for i, c in enumerate(cats)}
    k = len(cats)
    observed = np.zeros((k, k))
    for x, y in zip(a, b):
        if x not in index or y not in index:
            raise ValueError(f"rating outside the categories {cats}: {x!r} / {y!r}")
        observed[index[x], index[y]] += 1
    observed /= observed.sum()
    expected = np.outer(observed.sum(axis=1), observed.sum(axis=0))
    i, j = np.indices((k, k))
    if weights is None:
        w = (i != j).astype(float)
    elif weights == "linear":
        w = np.abs(i - j) / max(k - 1, 1)
    elif weights == "quadratic":
        w = ((i - j) / max(k - 1, 1)) ** 2
    else:
        raise ValueError("weights must be None, 'linear' or 'quadratic'")
    expected_disagreement = float((w * expected).sum())
    if expected_disagreement == 0:
        return None
    return 1.0 - float((w * observed).sum()) / expected_disagreement


# ----------------------------------------------------------------------------------------------------------------
# building the study
# ----------------------------------------------------------------------------------------------------------------


def _entries(items: Iterable, truth: str) -> list[dict]:
    out = []
    for item in items:
        record = {"image": str(item)} if isinstance(item, (str, os.PathLike)) else dict(item)
        record["truth"] = truth
        out.append(record)
    return out


#: The folder of a study that goes to the readers, and the answer key beside it (never inside it).
READERS_DIR = "readers"
KEY_FILE = "key.json"


def build_reader_study(
    real: Iterable,
    synthetic: Iterable,
    out_dir: str | os.PathLike,
    seed: int = 0,
    readers: Sequence[str] = ("reader1", "reader2"),
) -> dict:
    """Write the blinded study into ``out_dir``: ``readers/`` (``views/case_XXX.png``, ``ratings_template.csv``,
    ``INSTRUCTIONS.txt``), the folder to hand out, and ``key.json`` beside it, the answer to keep.

    ``real`` and ``synthetic`` are image paths or records ``{"image": ..., "label": ...}``; a label puts the views
    through the tumor's largest cross-section (the pancreas's when there is no tumor). The views carry no outlines:
    readers judge the image itself. Returns a summary with the two paths.
    """
    import matplotlib.pyplot as plt

    from tools.figures import save_figure, show_views, window_name
    from tools.io import load_label

    cases = _entries(real, "real") + _entries(synthetic, "synthetic")
    if not cases:
        raise ValueError("no cases given")
    # every file is checked before the first view is written; a synthetic image need not look like CT (a poor
    # generator's output is what the readers judge), a real one must
    validate_records([c for c in cases if c["truth"] == "real"], allowed_labels=LABEL_SET)
    validate_records([c for c in cases if c["truth"] == "synthetic"], check_ct=False, allowed_labels=LABEL_SET)
    order = np.random.default_rng(seed).permutation(len(cases))
    out = Path(out_dir)
    hand_out = out / READERS_DIR
    key = {}
    for number, idx in enumerate(order, start=1):
        case = cases[int(idx)]
        case_id = f"case_{number:03d}"
        image, affine = load_image_hu(case)  # views are shown in a HU window, also for a windowed set
        label = load_label(case["label"])[0] if case.get("label") else None
        fig, axes = plt.subplots(1, 3, figsize=(10, 3.8), layout="constrained")
        show_views(axes, image, affine, focus=label, title=case_id)
        save_figure(fig, hand_out / "views" / f"{case_id}.png", dpi=90)
        key[case_id] = {"truth": case["truth"], "image": str(case["image"])}
    with atomic_path(hand_out / "ratings_template.csv") as tmp:
        with open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(RATING_COLUMNS)
            for reader in readers:
                for case_id in key:
                    writer.writerow([reader, case_id, "", ""])
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    write_json(out / KEY_FILE, {"seed": seed, "sha256": digest, "cases": key})
    instructions = (
        "Reader study (blinded). For each case in views/, fill one row per reader in ratings_template.csv:\n"
        "  call    = real | synthetic   (is this a real patient scan?)\n"
        "  realism = 0..5               (0 clearly artificial, 5 indistinguishable from a real scan)\n"
        f"Views: axial, coronal and sagittal, window {window_name()}, radiological convention (the patient's right\n"
        "on your left; the letters on the image edges give the patient's directions), through the tumor's largest\n"
        "cross-section, or through the pancreas when the case has no tumor.\n"
        "Return the filled ratings_template.csv.\n"
    )
    with atomic_path(hand_out / "INSTRUCTIONS.txt") as tmp:
        Path(tmp).write_text(instructions)
    return {
        "n_cases": len(key),
        "n_real": sum(v["truth"] == "real" for v in key.values()),
        "key_sha256": digest,
        "hand_out": str(hand_out),
        "key": str(out / KEY_FILE),
    }


def load_key(study: str | os.PathLike) -> dict[str, dict]:
    """The answer key of a study: ``study`` is the folder made by :func:`build_reader_study` (holding ``key.json``
    beside ``readers/``) or the ``key.json`` file itself."""
    path = Path(study)
    key_file = path if path.is_file() else path / KEY_FILE
    if not key_file.is_file():
        hint = (
            " (this is the readers' folder: give the study folder above it, which holds key.json)"
            if path.name == READERS_DIR
            else " (give the folder made by `reader_study build`, or its key.json)"
        )
        raise InputError(study, f"no {KEY_FILE} found{hint}")
    try:
        cases = json.loads(key_file.read_text())["cases"]
    except (ValueError, KeyError, TypeError) as error:
        raise InputError(key_file, f"not a reader-study key ({error})") from None
    return cases


# ----------------------------------------------------------------------------------------------------------------
# scoring
# ----------------------------------------------------------------------------------------------------------------


def read_ratings(paths: Sequence[str | os.PathLike], key: Mapping[str, Mapping]) -> dict[str, dict[str, dict]]:
    """``{reader: {case_id: {"call": ..., "realism": ...}}}`` from one or more filled CSVs, validated against the key.

    Empty cells are allowed (a reader may skip the realism score, or the call); unknown case ids, calls other than
    real/synthetic, ratings outside 0-5 and a case rated twice by one reader raise :class:`InputError` naming the
    file and the line.
    """
    ratings: dict[str, dict[str, dict]] = {}
    for path in paths:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            missing = set(RATING_COLUMNS) - set(reader.fieldnames or [])
            if missing:
                raise InputError(path, f"missing columns {sorted(missing)} (expected {list(RATING_COLUMNS)})")
            for line, row in enumerate(reader, start=2):
                who, case_id = row["reader"].strip(), row["case_id"].strip()
                call, realism = row["call"].strip().lower(), row["realism"].strip()
                if not call and not realism:
                    continue
                if case_id not in key:
                    raise InputError(path, f"line {line}: unknown case id {case_id!r}")
                if call and call not in CALLS:
                    raise InputError(path, f"line {line}: call must be 'real' or 'synthetic', got {call!r}")
                value = None
                if realism:
                    try:
                        value = int(realism)
                    except ValueError:
                        raise InputError(path, f"line {line}: realism must be an integer 0-5, got {realism!r}")
                    if not RATING_RANGE[0] <= value <= RATING_RANGE[1]:
                        raise InputError(path, f"line {line}: realism {value} outside 0-5")
                per_reader = ratings.setdefault(who, {})
                if case_id in per_reader:
                    raise InputError(path, f"line {line}: reader {who!r} rated {case_id} twice")
                per_reader[case_id] = {"call": call or None, "realism": value}
    return ratings


def score_reader_study(study_dir: str | os.PathLike, ratings_csv: str | os.PathLike | Sequence) -> dict:
    """Per-reader sensitivity / specificity / accuracy and mean realism (real vs synthetic), kappa between readers.

    ``study_dir``: the study folder (holding ``key.json``) or the key file itself (:func:`load_key`)."""
    key = load_key(study_dir)
    paths = [ratings_csv] if isinstance(ratings_csv, (str, os.PathLike)) else list(ratings_csv)
    ratings = read_ratings(paths, key)
    readers = {}
    for who, per_case in sorted(ratings.items()):
        called = [(key[c]["truth"], r["call"]) for c, r in per_case.items() if r["call"]]
        metrics = reader_metrics([t for t, _ in called], [c for _, c in called]) if called else {"n": 0}
        for truth in CALLS:
            scores = [
                r["realism"] for c, r in per_case.items() if r["realism"] is not None and key[c]["truth"] == truth
            ]
            metrics[f"mean_realism_{truth}"] = float(np.mean(scores)) if scores else None
        readers[who] = metrics
    pairs = {}
    for a, b in combinations(sorted(ratings), 2):
        both_calls = [c for c in ratings[a] if c in ratings[b] and ratings[a][c]["call"] and ratings[b][c]["call"]]
        both_scores = [
            c for c in ratings[a] if c in ratings[b]
            and ratings[a][c]["realism"] is not None and ratings[b][c]["realism"] is not None
        ]  # fmt: skip
        pairs[f"{a} vs {b}"] = {
            "n_calls": len(both_calls),
            "kappa_calls": cohen_kappa(
                [ratings[a][c]["call"] for c in both_calls], [ratings[b][c]["call"] for c in both_calls], CALLS
            ),
            "n_realism": len(both_scores),
            "kappa_realism_quadratic": cohen_kappa(
                [ratings[a][c]["realism"] for c in both_scores],
                [ratings[b][c]["realism"] for c in both_scores],
                list(range(RATING_RANGE[0], RATING_RANGE[1] + 1)),
                weights="quadratic",
            ),
        }
    return {"n_cases": len(key), "readers": readers, "agreement": pairs}
