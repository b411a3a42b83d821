"""The quality gate of `tools synthesize` (issue 14 point 5): seeds of the tries, the loop, the checks, the HU
reference, argument errors, and vae_ct sets made through the gate (a stand-in judge that decides each try, and a
tiny seg_unet3d judge through the bundle)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from tests.test_synthesize import bundle_network
from tools.cli import main
from tools.errors import InputError
from tools.io import load_nifti, save_nifti
from tools.quality_gate import (
    GATE_SEED_STEP,
    KEPT_BEST,
    KEPT_PASSED,
    MAX_TRIES,
    REFERENCE_FILE,
    QualityGate,
    case_checks,
    choose_try,
    hu_reference,
    run_gate,
    try_seed,
)
from tools.synthesize import item_seed, plan_items, synthesize

REPO = Path(__file__).resolve().parents[1]
VAE_TINY = {"roi_size": [16, 16, 16], "strides": [2, 2], "channels": [4, 8], "latent_size": 8}
SEG_TINY = {"pixdim": [6.0, 6.0, 6.0], "roi_size": [32, 32, 32], "network_def#channels": [4, 8, 16, 32, 64],
            "sw_batch_size": 2, "num_classes": 2}  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# seeds, loop, checks (no network)


def test_try_seeds_start_at_the_ungated_seed_and_never_collide_within_a_run():
    assert try_seed(5, 2, 1, 0) == item_seed(5, 2, 1) == 200006
    assert [try_seed(5, 2, 1, t) for t in range(3)] == [200006, 210006, 220006]
    items = plan_items([{"label": f"/x/c{i}.nii.gz"} for i in range(4)], 3, seed=7)
    seeds = [try_seed(7, it["index"], it["sample"], t) for it in items for t in range(MAX_TRIES)]
    assert len(seeds) == len(set(seeds)) == 4 * 3 * MAX_TRIES
    assert {try_seed(7, it["index"], it["sample"], 0) for it in items} == {it["seed"] for it in items}
    # the largest sample with the last try stays inside its record's stride: no collision with the next record
    assert try_seed(0, 0, GATE_SEED_STEP - 1, MAX_TRIES - 1) < item_seed(0, 1, 0)
    with pytest.raises(ValueError, match="at most 10000 samples"):
        try_seed(0, 0, GATE_SEED_STEP, 0)
    with pytest.raises(ValueError, match="outside the gate's 10 tries"):
        try_seed(0, 0, 0, MAX_TRIES)


def scripted(plan: dict[str, list[float]], min_dice: float = 0.5):
    """A make_and_judge whose try t of case n gets the Dice ``plan[n][t]``; it records what it was asked."""
    calls = []

    def make_and_judge(pending, attempt):
        calls.append((attempt, [it["name"] for it in pending]))
        out = []
        for it in pending:
            dice = plan[it["name"]][attempt]
            out.append({"try": attempt + 1, "seed": try_seed(0, it["index"], it["sample"], attempt),
                        "judge_dice": dice, "passed": dice >= min_dice})  # fmt: skip
        return out

    return make_and_judge, calls


def test_gate_loop_passes_retries_and_keeps_the_best_of_a_case_that_never_passes():
    items = plan_items([{"label": f"/x/{n}.nii.gz"} for n in ("first", "second", "never")], 1, seed=0)
    names = [it["name"] for it in items]
    plan = dict(zip(names, ([0.9, 0.0, 0.0], [0.1, 0.7, 0.0], [0.2, 0.4, 0.4])))
    make_and_judge, calls = scripted(plan)
    decided = []
    decisions = run_gate(items, 3, make_and_judge, lambda it, d: decided.append((it["name"], d["kept_try"])))
    # only the failing cases are made again, each try with its own seed
    assert calls == [(0, names), (1, names[1:]), (2, names[2:])]
    first, second, never = (decisions[n] for n in names)
    assert (first["passed"], first["kept_try"], first["kept_because"], len(first["tries"])) == (True, 1, KEPT_PASSED, 1)
    assert (second["passed"], second["kept_try"], len(second["tries"])) == (True, 2, 2)
    assert [t["seed"] for t in second["tries"]] == [100000, 110000]
    # never passed: all three tries recorded, the highest Dice kept (the first of the two 0.4), marked failed
    assert (never["passed"], never["kept_try"], never["kept_because"]) == (False, 2, KEPT_BEST)
    assert [t["seed"] for t in never["tries"]] == [200000, 210000, 220000] and never["max_tries"] == 3
    assert decided == [(names[0], 1), (names[1], 2), (names[2], 2)]  # each case as soon as it is decided
    one_try = run_gate(items, 1, scripted(plan)[0])
    assert [one_try[n]["kept_try"] for n in names] == [1, 1, 1] and not one_try[names[1]]["passed"]


def test_choose_try_and_a_judge_that_lost_a_case():
    assert choose_try([{"passed": False, "judge_dice": 0.3}, {"passed": True, "judge_dice": 0.1}])[:2] == (1, True)
    assert choose_try([{"passed": False, "judge_dice": float("nan")}, {"passed": False, "judge_dice": 0.0}])[0] == 1
    with pytest.raises(ValueError):
        choose_try([])
    items = plan_items([{"label": "/x/a.nii.gz"}], 1, seed=0)
    with pytest.raises(RuntimeError, match="0 results for 1 cases"):
        run_gate(items, 2, lambda pending, attempt: [])


def test_case_checks_by_hand():
    label = np.zeros((8, 8, 8), np.uint8)
    label[2:6, 2:6, 2:6] = 1
    label[2, 2, 2] = 2  # the tumor counts for the Dice (labels 1 + 2), not for the pancreas median
    ct = np.full(label.shape, -100.0, np.float32)
    ct[label == 1] = 50.0
    ct[label == 2] = 500.0
    good = case_checks(label, ct, label, 0.5, (0.0, 100.0))
    assert good["judge_dice"] == 1.0 and good["pancreas_median_hu"] == 50.0 and good["passed"]
    assert good["label_consistency"] == {"passed": True, "min_dice": 0.5}
    too_dark = case_checks(label, ct, label, 0.5, (60.0, 100.0))
    assert not too_dark["passed"] and not too_dark["hu_median"]["passed"] and too_dark["label_consistency"]["passed"]
    half = label.copy()
    half[2:4] = 0  # the judge finds half the pancreas: Dice 2 * 32 / (32 + 64) = 2/3
    assert case_checks(half, ct, label, 0.7, (0.0, 100.0))["judge_dice"] == pytest.approx(2 / 3)
    assert not case_checks(half, ct, label, 0.7, (0.0, 100.0))["passed"]
    tumor_only = (label > 0).astype(np.uint8) * 2  # no pancreas voxel: not HU-checked (MAISI passes it too)
    checks = case_checks(tumor_only, ct, tumor_only, 0.5, (60.0, 100.0))
    assert checks["pancreas_median_hu"] is None and checks["hu_median"] == {"passed": True, "range": [60.0, 100.0],
                                                                            "checked": False}  # fmt: skip
    with pytest.raises(RuntimeError, match="not on one grid"):
        case_checks(label[:4], ct, label, 0.5, (0.0, 100.0))


# ---------------------------------------------------------------------------------------------------------------
# data, weights


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> Path:
    from tools.phantom import make_dataset

    out = tmp_path_factory.mktemp("gate_phantom")
    make_dataset(out, n_cases=4, seed=3, shape=(48, 48, 24), tumor_fraction=0.5, test_fraction=0.2, progress=False)
    return out


def network(bundle: str, configs: list[str], overrides: dict, key: str) -> torch.nn.Module:
    return bundle_network(bundle, configs, overrides, [key])[0]


@pytest.fixture(scope="module")
def vae_weights(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("gate_vae")
    net = network("vae_ct", ["inference.json", "inference_3d.json"], VAE_TINY, "network_def")
    torch.save({"model": net.state_dict()}, folder / "model.pt")
    return folder


@pytest.fixture(scope="module")
def judge(tmp_path_factory) -> Path:
    """A tiny binary seg_unet3d judge with random weights (the inference config's UNet)."""
    folder = tmp_path_factory.mktemp("gate_judge")
    net = network("seg_unet3d", ["inference.json"], SEG_TINY, "network_def")
    torch.save({"model": net.state_dict()}, folder / "model.pt")
    return folder


def test_hu_reference_is_the_spread_of_the_real_per_case_medians(phantom, tmp_path):
    from tools.splits import load_records

    reference = hu_reference(phantom, "training")
    records = load_records(phantom).records("training")
    medians = [float(np.median(load_nifti(r["image"])[0][load_nifti(r["label"])[0] == 1])) for r in records]
    assert reference["n_cases"] == len(records) == 3
    assert sorted(reference["per_case"].values()) == pytest.approx(sorted(medians))
    mean, sd = np.mean(medians), np.std(medians, ddof=1)
    assert (reference["low"], reference["high"]) == pytest.approx((mean - 3 * sd, mean + 3 * sd))
    assert reference["section"] == "training" and reference["label"] == "pancreas (label 1)"
    # a reference whose labels hold no pancreas voxel (tumor only) has no range to give
    entries = []
    for r in records:
        label, affine = load_nifti(r["label"])
        path = tmp_path / Path(r["label"]).name
        save_nifti(path, (label > 0).astype(np.uint8) * 2, affine)
        entries.append({"image": r["image"], "label": str(path)})
    datalist = tmp_path / "tumor_only.json"
    datalist.write_text(json.dumps({"training": entries}))
    with pytest.raises(InputError, match="0 of 3 labelled case.s. have pancreas voxels") as error:
        hu_reference(datalist)
    assert str(error.value).startswith(str(datalist))
    with pytest.raises(InputError, match="no section 'validation'"):
        hu_reference(phantom, "validation")


# ---------------------------------------------------------------------------------------------------------------
# command-line errors: each names the flag or the file, and nothing is written


def refused(phantom, out, *flags):
    return ["synthesize", "vae_ct", str(phantom), str(out), "--overrides", json.dumps(VAE_TINY), *flags]


@pytest.mark.parametrize(
    "flags, error, message",
    [
        (["--gate_tries", "0"], ValueError, "--gate_tries must be a whole number from 1 to 10"),
        (["--gate_tries", "11"], ValueError, "--gate_tries must be a whole number from 1 to 10"),
        (["--gate_tries", "2.5"], ValueError, "--gate_tries must be a whole number"),
        (["--gate_min_dice", "1.5"], ValueError, "--gate_min_dice must be a number from 0 to 1"),
        (["--gate_min_dice", "high"], ValueError, "--gate_min_dice must be a number from 0 to 1"),
        (["--samples_per_item", "10001"], ValueError, "--samples_per_item is at most 10000"),
        (["--gate_reference", "REAL"], None, None),  # no reference: refused (see below)
    ],
)  # fmt: skip
def test_bad_gate_settings_are_refused_before_anything_is_written(phantom, judge, tmp_path, flags, error, message):
    out = tmp_path / "out"
    gate = ["--quality_gate", str(judge), "--gate_overrides", json.dumps(SEG_TINY)]
    if error is None:  # a complete, valid command: the judge loads and the reference is computed; nothing is run
        with pytest.raises(ValueError, match="needs --gate_reference"):
            main(refused(phantom, out, *gate))
        return
    with pytest.raises(error, match=message):
        main(refused(phantom, out, *gate, "--gate_reference", str(phantom), *flags))
    assert not out.exists()


def test_missing_or_unloadable_judges_and_references_are_refused_naming_the_file(phantom, judge, tmp_path):
    out = tmp_path / "out"
    overrides = ["--gate_overrides", json.dumps(SEG_TINY), "--gate_reference", str(phantom)]

    def refuse(judge_path, *flags, error=InputError):
        with pytest.raises(error) as info:
            main(refused(phantom, out, "--quality_gate", str(judge_path), *flags))
        assert not out.exists()
        return str(info.value)

    assert refuse(tmp_path / "nowhere", *overrides).startswith(f"{tmp_path / 'nowhere'}: no such judge")
    (tmp_path / "empty").mkdir()
    assert "no model.pt in the judge folder" in refuse(tmp_path / "empty", *overrides)
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "model.pt").write_bytes(b"not a checkpoint at all")
    message = refuse(garbage, *overrides)
    assert message.startswith(str(garbage / "model.pt")) and "not a plain PyTorch weights file" in message

    class Payload:
        def __reduce__(self):
            return (print, ("a checkpoint that runs code when unpickled",))

    torch.save({"model": Payload()}, garbage / "model.pt")
    assert "Unsupported global" in refuse(garbage, *overrides)
    # the judge's weights with the default (full-size, 3-class) network: the overrides are missing
    message = refuse(judge, "--gate_reference", str(phantom))
    assert message.startswith(str(judge / "model.pt")) and "cannot be loaded as the judge's seg_unet3d" in message
    assert "num_classes" in message
    assert refuse(judge, "--gate_overrides", json.dumps(SEG_TINY), "--gate_reference", str(tmp_path / "no.json"),
                  ).startswith(str(tmp_path / "no.json"))  # fmt: skip
    # gate settings without the gate, and the gate on a generator that edits real scans
    with pytest.raises(ValueError, match="--gate_reference, --gate_tries given without --quality_gate"):
        main(refused(phantom, out, "--gate_reference", str(phantom), "--gate_tries", "2"))
    with pytest.raises(ValueError, match="judges the whole-image generators vae_ct, ldm_abdomen; difftumor edits"):
        main(["synthesize", "difftumor", str(phantom), str(out), "--quality_gate", str(judge), *overrides])
    assert not out.exists()


# ---------------------------------------------------------------------------------------------------------------
# vae_ct sets made through the gate


class ScriptedJudge:
    """Stand-in for seg_unet3d's inference (``tools.evaluation.predict_pancreas``): try ``t`` (0-based) of case
    ``name`` gets the conditioning mask itself (Dice 1) from ``t >= plan[name]`` on, an empty map (Dice 0) before.
    ``stop_at``: the judge breaks down when asked for that try."""

    def __init__(self, plan: dict[str, int], stop_at: int | None = None):
        self.plan, self.stop_at, self.calls = plan, stop_at, []

    def __call__(self, records, out, *args):
        attempts = [int(Path(r["image"]).parent.name[len("try") :]) - 1 for r in records]
        names = [Path(r["image"]).name[: -len("_image.nii.gz")] for r in records]
        self.calls.append(list(zip(names, attempts)))
        if self.stop_at is not None and self.stop_at in attempts:
            raise RuntimeError("the judge stopped")
        predictions = []
        for record, name, attempt in zip(records, names, attempts):
            label = load_nifti(record["label"])[0]
            predictions.append(label if attempt >= self.plan[name] else np.zeros_like(label))
        return predictions


def stamps(folder: Path, prefix: str) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.iterdir() if p.name.startswith(prefix)}


def test_vae_gate_retries_resumes_and_marks_the_case_that_never_passed(
    phantom, vae_weights, judge, tmp_path, monkeypatch
):
    from tools import bundles, evaluation

    wide = {"low": -5000.0, "high": 5000.0, "source": "hand-made", "section": "training", "label": "pancreas"}
    gate = QualityGate(judge, wide, SEG_TINY, tries=3, min_dice=0.5)
    items = plan_items(json.loads((phantom / "dataset.json").read_text())["training"], 1, seed=4)
    first, second, never = (it["name"] for it in items)
    plan = {first: 0, second: 1, never: 99}
    args = dict(ckpt_dir=vae_weights, overrides=VAE_TINY, seed=4, progress=False, quality_gate=gate)
    out = tmp_path / "gated"
    # a run whose judge breaks down at the second try: the first case is finished, the others judged once
    monkeypatch.setattr(evaluation, "predict_pancreas", ScriptedJudge(plan, stop_at=1))
    with pytest.raises(RuntimeError, match="the judge stopped"):
        synthesize("vae_ct", phantom, out, **args)
    assert (out / f"{first}_label.json").is_file() and not (out / f"{second}_label.json").is_file()
    kept_first = stamps(out, first)
    assert len(kept_first) == 4 and (out / ".gate" / "try1" / f"{never}.gate.json").is_file()
    # the rerun keeps the finished case, reuses the judged first tries and goes on from the second
    judge_calls = ScriptedJudge(plan)
    monkeypatch.setattr(evaluation, "predict_pancreas", judge_calls)
    path = synthesize("vae_ct", phantom, out, **args)
    assert judge_calls.calls == [[(second, 1), (never, 1)], [(never, 2)]]
    assert stamps(out, first) == kept_first
    datalist = json.loads(path.read_text())
    marks = {e["case"]: e["quality_gate"] for e in datalist["training"]}
    assert {n: (m["passed"], m["tries"], m["kept_try"], m["judge_dice"]) for n, m in marks.items()} == {
        first: (True, 1, 1, 1.0), second: (True, 2, 2, 1.0), never: (False, 3, 1, 0.0)}  # fmt: skip
    assert datalist["quality_gate"] == {"n_gated": 3, "n_passed": 2, "n_failed": 1, "mean_tries": 2.0}
    seeds = {e["case"]: e["seed"] for e in datalist["training"]}
    planned = {it["name"]: it["seed"] for it in items}
    assert seeds == {first: planned[first], second: planned[second] + GATE_SEED_STEP, never: planned[never]}
    for entry in datalist["training"]:
        image = nib.load(out / entry["image"])
        assert image.header["descrip"].tobytes().decode().rstrip("\x00").endswith(f"seed={entry['seed']}")
        for key in ("image", "label"):
            sidecar = json.loads((out / entry[key].replace(".nii.gz", ".json")).read_text())
            block = sidecar["quality_gate"]
            assert sidecar["item_seed"] == planned[entry["case"]] and sidecar["seed"] == entry["seed"]
            assert block["kept_try"] == marks[entry["case"]]["kept_try"] and block["judge_sha256"] == gate.judge_sha256
            assert [t["seed"] for t in block["tries"]] == [planned[entry["case"]] + GATE_SEED_STEP * t
                                                           for t in range(len(block["tries"]))]  # fmt: skip
            assert all({"judge_dice", "pancreas_median_hu", "label_consistency", "hu_median", "passed"} <= set(t)
                       for t in block["tries"])  # fmt: skip
    never_block = json.loads((out / f"{never}_image.json").read_text())["quality_gate"]
    assert never_block["kept_because"] == KEPT_BEST and [t["passed"] for t in never_block["tries"]] == [False] * 3
    assert not (out / ".gate").exists()
    manifest = json.loads((out / "synthesize.json").read_text())
    assert manifest["quality_gate"]["tries"] == 3 and manifest["quality_gate"]["hu_range"] == [-5000.0, 5000.0]
    assert json.loads((out / REFERENCE_FILE).read_text()) == wide
    # the first try is the ungated seed: a case that passed at once is the ungated run's case, byte for byte
    plain = synthesize("vae_ct", phantom, tmp_path / "plain", ckpt_dir=vae_weights, overrides=VAE_TINY, seed=4,
                       progress=False, max_items=1)  # fmt: skip
    assert (plain.parent / f"{first}_image.nii.gz").read_bytes() == (out / f"{first}_image.nii.gz").read_bytes()
    # a finished gated set: a rerun makes nothing; the same folder without the gate is refused
    monkeypatch.setattr(bundles, "run_config", lambda *a, **k: pytest.fail("a finished case was made again"))
    before = stamps(out, "")
    synthesize("vae_ct", phantom, out, **args)
    assert {k: v for k, v in stamps(out, "").items() if k != "datalist.json"} == {
        k: v for k, v in before.items() if k != "datalist.json"}  # fmt: skip
    with pytest.raises(InputError, match="quality_gate"):
        synthesize("vae_ct", phantom, out, ckpt_dir=vae_weights, overrides=VAE_TINY, seed=4, progress=False)


def test_vae_gate_with_a_seg_unet3d_judge_from_the_command_line(phantom, vae_weights, judge, tmp_path):
    """End to end: `tools synthesize vae_ct ... --quality_gate` with a tiny seg_unet3d judge run by the bundle (random
    weights: it paints pancreas everywhere, so the Dice bar is 0 here and the HU check decides) and the phantom's
    training set as the HU reference; every case is recorded as the rules say."""
    out = tmp_path / "cli"
    main(["synthesize", "vae_ct", str(phantom), str(out), "--ckpt_dir", str(vae_weights), "--overrides",
          json.dumps(VAE_TINY), "--samples_per_item", "2", "--quality_gate", str(judge), "--gate_overrides",
          json.dumps(SEG_TINY), "--gate_reference", str(phantom), "--gate_tries", "2", "--gate_min_dice", "0",
          "--noprogress"])  # fmt: skip
    reference = json.loads((out / REFERENCE_FILE).read_text())
    assert reference == hu_reference(phantom)
    entries = json.loads((out / "datalist.json").read_text())["training"]
    assert len(entries) == 6 and not (out / ".gate").exists()
    outcomes = set()
    for entry in entries:
        block = json.loads((out / entry["image"].replace(".nii.gz", ".json")).read_text())["quality_gate"]
        tries = block["tries"]
        assert 1 <= len(tries) <= 2 and block["max_tries"] == 2
        for t in tries:  # each check recomputed from the recorded numbers
            assert t["label_consistency"]["passed"] == (t["judge_dice"] >= 0.0)
            median = t["pancreas_median_hu"]
            assert t["hu_median"]["passed"] == (median is None or reference["low"] <= median <= reference["high"])
            assert t["passed"] == (t["label_consistency"]["passed"] and t["hu_median"]["passed"])
        assert all(not t["passed"] for t in tries[:-1])  # made again only after a failure
        index, passed, _ = choose_try(tries)
        assert (
            (block["kept_try"], block["passed"])
            == (index + 1, passed)
            == (entry["quality_gate"]["kept_try"], entry["quality_gate"]["passed"])
        )
        assert entry["seed"] == tries[index]["seed"] and entry["quality_gate"]["tries"] == len(tries)
        outcomes.add((len(tries), block["passed"]))
    # with this seed the set holds all three outcomes: passed at once, passed on the second try, never passed
    assert outcomes == {(1, True), (2, True), (2, False)}


def test_judged_tries_of_other_gate_settings_are_not_reused(phantom, vae_weights, judge, tmp_path, monkeypatch):
    from tools import evaluation

    wide = {"low": -5000.0, "high": 5000.0, "source": "hand-made", "section": "training", "label": "pancreas"}
    items = plan_items(json.loads((phantom / "dataset.json").read_text())["training"][:2], 1, seed=0)
    plan = {it["name"]: 1 for it in items}  # every case fails its first try and passes its second
    out = tmp_path / "gated"
    args = dict(ckpt_dir=vae_weights, overrides=VAE_TINY, progress=False, max_items=2)
    monkeypatch.setattr(evaluation, "predict_pancreas", ScriptedJudge(plan, stop_at=1))
    with pytest.raises(RuntimeError, match="the judge stopped"):
        synthesize("vae_ct", phantom, out, quality_gate=QualityGate(judge, wide, SEG_TINY, 2, 0.5), **args)
    assert not list(out.glob("*_label.json")) and len(list((out / ".gate" / "try1").glob("*.gate.json"))) == 2
    # nothing was finished, so another gate may take the folder over: the first tries are judged again, by it
    calls = ScriptedJudge(plan)
    monkeypatch.setattr(evaluation, "predict_pancreas", calls)
    path = synthesize("vae_ct", phantom, out, quality_gate=QualityGate(judge, wide, SEG_TINY, 2, 0.4), **args)
    assert [[attempt for _, attempt in call] for call in calls.calls] == [[0, 0], [1, 1]]
    assert all(e["quality_gate"]["kept_try"] == 2 for e in json.loads(path.read_text())["training"])
    assert json.loads((out / "synthesize.json").read_text())["quality_gate"]["min_dice"] == 0.4


@pytest.mark.slow
def test_gated_set_with_two_processes_under_torchrun_equals_one_process(phantom, vae_weights, judge, tmp_path):
    import subprocess
    import sys

    def files(folder: Path) -> dict[str, bytes]:
        return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file() and p.name != "synthesize.json"}

    flags = [str(phantom), "--ckpt_dir", str(vae_weights), "--overrides", json.dumps(VAE_TINY), "--samples_per_item",
             "2", "--quality_gate", str(judge), "--gate_overrides", json.dumps(SEG_TINY), "--gate_reference",
             str(phantom), "--gate_tries", "2", "--gate_min_dice", "0"]  # fmt: skip
    one = tmp_path / "one"
    main(["synthesize", "vae_ct", flags[0], str(one), *flags[1:], "--noprogress"])
    two = tmp_path / "two"
    torchrun = str(Path(sys.executable).parent / "torchrun")
    command = [torchrun, "--nproc_per_node=2", "--standalone", "-m", "tools", "synthesize", "vae_ct", flags[0],
               str(two), *flags[1:], "--noprogress"]  # fmt: skip
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert files(two) == files(one) and len(files(one)) == 6 * 4 + 2  # cases, datalist, reference
    assert not (two / ".gate").exists()
