"""Synthetic:real training mixes (seed 000 Table 1 semantics)."""

from __future__ import annotations

import json

import pytest

from tools.errors import InputError
from tools.mix import mix_datalist, parse_ratio, write_mix


def _real():
    training = [{"image": f"/r/img{i}.nii.gz", "label": f"/r/lab{i}.nii.gz", "patient": f"p{i}"} for i in range(8)]
    test = [{"image": f"/r/t{i}.nii.gz", "label": f"/r/tl{i}.nii.gz", "patient": f"t{i}"} for i in range(2)]
    return {"training": training, "test": test}


def _synthetic(name, n=10, source="p0"):
    return {"training": [{"image": f"/{name}/s{i}.nii.gz", "label": f"/{name}/m{i}.nii.gz", "patient": f"{name}{i}",
                          "source_patient": source} for i in range(n)]}  # fmt: skip


def test_parse_ratio():
    assert parse_ratio("25:75") == (0.25, 0.75)
    assert parse_ratio((1, 1)) == (0.5, 0.5)
    assert parse_ratio("100:0") == (1.0, 0.0)
    for bad in ("25", "0:0", "-1:2"):
        with pytest.raises(ValueError):
            parse_ratio(bad)


@pytest.mark.parametrize(
    "ratio, generators, expected",
    [
        ("0:100", [], {"real": 8}),
        ("25:75", ["vae"], {"real": 6, "vae": 2}),
        ("50:50", ["vae", "dm"], {"real": 4, "dm": 2, "vae": 2}),
        ("100:0", ["vae", "dm"], {"real": 0, "dm": 4, "vae": 4}),
        ("25:75", ["vae", "dm"], {"real": 6, "dm": 1, "vae": 1}),
    ],
)
def test_total_is_the_real_training_size_and_shares_follow_the_ratio(ratio, generators, expected):
    mixed = mix_datalist(_real(), {g: _synthetic(g) for g in generators}, ratio, seed=1)
    counts = {}
    for record in mixed["training"]:
        counts[record["generator"]] = counts.get(record["generator"], 0) + 1
        assert record["synthetic"] == (record["generator"] != "real")
        assert record["image"].startswith("/r/" if record["generator"] == "real" else f"/{record['generator']}/")
    assert {k: v for k, v in expected.items() if v} == counts
    assert mixed["mix"]["counts"] == expected
    assert mixed["test"] == _real()["test"], "held-out sets are copied unchanged"


def test_deterministic_per_seed():
    a = mix_datalist(_real(), {"vae": _synthetic("vae")}, "50:50", seed=4)
    b = mix_datalist(_real(), {"vae": _synthetic("vae")}, "50:50", seed=4)
    c = mix_datalist(_real(), {"vae": _synthetic("vae")}, "50:50", seed=5)
    assert a == b and a["training"] != c["training"]


def test_synthetic_from_a_held_out_patient_is_refused():
    with pytest.raises(InputError, match="held-out patient 't1'"):
        mix_datalist(_real(), {"vae": _synthetic("vae", source="t1")}, "25:75")


def test_too_few_synthetic_cases_is_an_error_unless_replace():
    with pytest.raises(InputError, match="only 3 available"):
        mix_datalist(_real(), {"vae": _synthetic("vae", n=3)}, "100:0")
    mixed = mix_datalist(_real(), {"vae": _synthetic("vae", n=3)}, "100:0", replace=True)
    assert len(mixed["training"]) == 8


def test_write_mix_round_trip(tmp_path):
    out = tmp_path / "mix.json"
    write_mix(_real(), {"vae": _synthetic("vae")}, "25:75", out, seed=2)
    saved = json.loads(out.read_text())
    assert len(saved["training"]) == 8 and saved["mix"]["counts"] == {"real": 6, "vae": 2}
    assert sum(r["synthetic"] for r in saved["training"]) == 2
