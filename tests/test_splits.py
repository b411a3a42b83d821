"""Patient-level splits: no patient in two sets, ever; deterministic per seed; datalists MONAI can read."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
from monai.data import load_decathlon_datalist

from tools.errors import InputError
from tools.splits import (
    PatientLeakError,
    _allocate,
    assert_no_patient_leak,
    fold_datalist,
    load_records,
    make_splits,
    split_by_patient,
    write_datalist,
)


def make_records(n_patients=30, seed=0, tumor_share=0.5):
    """Records of ``n_patients`` patients with 1 to 4 scans each (phases, follow-ups), some with tumors."""
    rng = np.random.default_rng(seed)
    records = []
    for p in range(n_patients):
        has_tumor = bool(p < tumor_share * n_patients)
        for s in range(int(rng.integers(1, 5))):
            records.append(
                {
                    "image": f"/data/imagesTr/pat{p:03d}_scan{s}.nii.gz",
                    "label": f"/data/labelsTr/pat{p:03d}_scan{s}.nii.gz",
                    "patient": f"pat{p:03d}",
                    "has_tumor": has_tumor,
                }
            )
    return records


def patients_of(records):
    return {r["patient"] for r in records}


@pytest.mark.parametrize("seed", range(40))
def test_fraction_split_never_leaks_and_keeps_every_scan(seed):
    records = make_records(30, seed=seed)
    split = split_by_patient(records, (0.7, 0.1, 0.2), seed=seed)
    assert_no_patient_leak(split)
    train, val, test = (patients_of(split[k]) for k in ("training", "validation", "test"))
    assert not (train & val or train & test or val & test)
    assert (len(train), len(val), len(test)) == (21, 3, 6)
    images = sorted(r["image"] for k in split for r in split[k])
    assert images == sorted(r["image"] for r in records), "a scan was lost or duplicated"
    for name in split:  # every scan of a patient went with it
        for patient in patients_of(split[name]):
            assert sum(r["patient"] == patient for r in split[name]) == sum(r["patient"] == patient for r in records)


@pytest.mark.parametrize("seed", range(20))
def test_k_fold_split_never_leaks(seed):
    records = make_records(23, seed=seed)
    split = split_by_patient(records, n_folds=5, seed=seed, test_fraction=0.2)
    sets = assert_no_patient_leak(split)
    assert set(sets) == {"test"} | {f"training/fold{f}" for f in range(5)}
    fold_sizes = [len(sets[f"training/fold{f}"]) for f in range(5)]
    assert max(fold_sizes) - min(fold_sizes) <= 1 and sum(fold_sizes) + len(sets["test"]) == 23
    assert len(sets["test"]) == 5  # round(0.2 * 23)
    for fold in range(5):
        one = fold_datalist(split, fold)
        assert_no_patient_leak(one)
        assert patients_of(one["validation"]) == sets[f"training/fold{fold}"]
        assert len(one["training"]) + len(one["validation"]) == len(split["training"])


def test_split_is_deterministic_per_seed_and_independent_of_input_order():
    records = make_records(30)
    first = split_by_patient(records, seed=5)
    assert split_by_patient(records, seed=5) == first
    shuffled = [records[i] for i in np.random.default_rng(1).permutation(len(records))]
    again = split_by_patient(shuffled, seed=5)
    for name in first:
        assert patients_of(again[name]) == patients_of(first[name])
    others = [split_by_patient(records, seed=s) for s in range(6, 12)]
    assert any(patients_of(o["test"]) != patients_of(first["test"]) for o in others), "the seed changes nothing"
    assert all("fold" not in r for r in records), "the input records were modified"


def test_stratified_split_keeps_tumor_share_in_every_set_and_fold():
    records = make_records(40, tumor_share=0.25)  # 10 tumor patients, 30 healthy
    tumor_patients = {r["patient"] for r in records if r["has_tumor"]}
    split = split_by_patient(records, (0.5, 0.25, 0.25), seed=3, stratify_key="has_tumor")
    counts = [len(patients_of(split[name]) & tumor_patients) for name in ("training", "validation", "test")]
    assert counts[0] == 5 and sorted(counts[1:]) == [2, 3]
    folds = split_by_patient(records, n_folds=5, seed=3, stratify_key="has_tumor")
    per_fold = [len({r["patient"] for r in folds["training"] if r["fold"] == f} & tumor_patients) for f in range(5)]
    assert per_fold == [2, 2, 2, 2, 2]
    # without stratification some seed puts the tumor patients unevenly: stratification is doing the work
    uneven = [split_by_patient(records, n_folds=5, seed=s)["training"] for s in range(10)]
    assert any(len({r["patient"] for r in t if r["fold"] == f} & tumor_patients) != 2 for t in uneven for f in range(5))


def test_leak_check_catches_a_shared_patient_and_needs_patient_ids():
    records = make_records(6)
    split = split_by_patient(records, (0.5, 0.0, 0.5), seed=0)
    moved = dict(split)
    moved["test"] = split["test"] + [split["training"][0]]
    with pytest.raises(PatientLeakError, match=split["training"][0]["patient"]):
        assert_no_patient_leak(moved)
    folds = split_by_patient(records, n_folds=2, seed=0)
    broken = {"training": [dict(r) for r in folds["training"]]}
    first = broken["training"][0]
    broken["training"].append({**first, "image": "/other.nii.gz", "fold": 1 - first["fold"]})
    with pytest.raises(PatientLeakError, match="fold"):
        assert_no_patient_leak(broken)
    with pytest.raises(InputError, match="patient"):
        assert_no_patient_leak({"training": [{"image": "/a.nii.gz"}]})
    with pytest.raises(InputError, match="patient_key='image'"):
        split_by_patient([{"image": "/a.nii.gz"}, {"image": "/b.nii.gz"}])
    alone = split_by_patient([{"image": f"/{i}.nii.gz"} for i in range(10)], seed=0, patient_key="image")
    assert_no_patient_leak(alone, patient_key="image")


def test_bad_split_arguments():
    records = make_records(5)
    with pytest.raises(InputError, match="sum to 1"):
        split_by_patient(records, (0.5, 0.2, 0.2))
    with pytest.raises(InputError, match="n_folds"):
        split_by_patient(records, n_folds=6)
    with pytest.raises(InputError, match="no records"):
        split_by_patient([])


def test_allocate_gives_every_share_a_patient_when_it_can():
    assert _allocate(10, (0.7, 0.1, 0.2)) == [7, 1, 2]
    assert _allocate(3, (0.8, 0.1, 0.1)) == [1, 1, 1]
    two = _allocate(2, (0.7, 0.1, 0.2))  # fewer patients than sets: the counts still add up
    assert sum(two) == 2 and two[0] >= 1
    assert _allocate(7, (1.0, 0.0, 0.0)) == [7, 0, 0]


def test_datalist_round_trip_through_monai(tmp_path):
    (tmp_path / "imagesTr").mkdir()
    records = []
    for p in range(6):
        for s in range(2):
            path = tmp_path / "imagesTr" / f"p{p}_s{s}.nii.gz"
            path.write_bytes(b"")
            records.append({"image": str(path), "label": str(path), "patient": f"p{p}"})
    split = split_by_patient(records, (0.5, 0.17, 0.33), seed=1)
    out = write_datalist(split, tmp_path / "splits" / "datalist.json")
    written = json.loads(out.read_text())
    assert all(not r["image"].startswith("/") for r in written["training"]), "paths should be relative"
    assert written["training"][0]["image"].startswith("../imagesTr/")
    monai_train = load_decathlon_datalist(out, data_list_key="training", base_dir=tmp_path / "splits")
    assert sorted(str((tmp_path / "splits" / r["image"]).resolve()) for r in monai_train) == sorted(
        str((tmp_path / "imagesTr" / r["image"].split("/")[-1]).resolve()) for r in monai_train
    )
    assert_no_patient_leak(out)
    absolute = write_datalist(split, tmp_path / "abs.json", base_dir=None)
    assert json.loads(absolute.read_text())["test"][0]["image"].startswith(str(tmp_path))


def test_make_splits_from_an_msd_folder(tmp_path):
    training = [
        {"image": f"./imagesTr/pancreas_{i:03d}.nii.gz", "label": f"./labelsTr/pancreas_{i:03d}.nii.gz"}
        for i in range(12)
    ]
    msd = {"name": "Pancreas", "training": training, "test": ["./imagesTs/pancreas_900.nii.gz"]}
    (tmp_path / "dataset.json").write_text(json.dumps(msd))
    for folder in ("imagesTr", "labelsTr", "imagesTs"):  # the reader checks that every named file exists
        (tmp_path / folder).mkdir()
    for entry in training:
        (tmp_path / entry["image"]).touch()
        (tmp_path / entry["label"]).touch()
    (tmp_path / "imagesTs" / "pancreas_900.nii.gz").touch()
    loaded = load_records(tmp_path)
    (test_record,) = loaded.records("test")
    assert test_record["image"] == str(tmp_path / "imagesTs" / "pancreas_900.nii.gz") and "label" not in test_record
    assert test_record["patient"] == test_record["case"] == "pancreas_900", "MSD: one scan per patient"
    assert loaded.extras["name"] == "Pancreas"
    split = make_splits(tmp_path, tmp_path / "folds.json", n_folds=3, seed=2, patient_key="image")
    written = json.loads((tmp_path / "folds.json").read_text())
    assert (
        written["seed"] == 2
        and len(written["training"]) == 12
        and written["training"][0]["image"].startswith("imagesTr/")
    )
    assert sorted(Counter(r["fold"] for r in split["training"]).values()) == [4, 4, 4]
    with pytest.raises(InputError, match="overwrite an input"):
        make_splits(tmp_path, tmp_path / "dataset.json", patient_key="image")
