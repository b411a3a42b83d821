"""`tools evaluate` (issue 7): Fréchet distance, synthetic-set metrics with hand-checkable cases, seg wrapper, CLI;
(issue 13) the pancreas "found" check tells pure noise from real crops, and the montage names, windows, orients and
outlines each case through its tumor."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from tools.evaluation import (
    evaluate_segmentation,
    evaluate_synthetic,
    frechet_distance,
    pancreas_found,
    sample_diversity,
)
from tools.io import load_nifti, save_nifti

REPO = Path(__file__).resolve().parents[1]
SEG_TINY = {"pixdim": [6.0, 6.0, 6.0], "roi_size": [32, 32, 32], "network_def#channels": [4, 8, 16, 32, 64],
            "sw_batch_size": 2}  # fmt: skip


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> Path:
    from tools.phantom import make_dataset

    out = tmp_path_factory.mktemp("eval_phantom")
    make_dataset(out, n_cases=5, seed=11, shape=(40, 40, 20), tumor_fraction=0.6, test_fraction=0.4, progress=False)
    return out


@pytest.fixture(scope="module")
def records(phantom) -> dict[str, list[dict]]:
    from tools.splits import load_records

    return load_records(phantom).sections


@pytest.fixture(scope="module")
def seg_weights(tmp_path_factory) -> Path:
    """Tiny seg_unet3d weights (random values, the inference config's UNet)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(REPO / "bundles" / "seg_unet3d" / "configs" / "inference.json"))
    for key, value in SEG_TINY.items():
        parser[key] = value
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("seg_weights")
    torch.save({"model": parser.get_parsed_content("network_def").state_dict()}, folder / "model.pt")
    return folder


def shifted_copies(records: list[dict], folder: Path, shift_hu: float) -> list[dict]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for r in records:
        image = nib.load(r["image"])
        data = np.asarray(image.dataobj, dtype=np.int16) + np.int16(shift_hu)
        path = folder / Path(r["image"]).name
        nib.save(nib.Nifti1Image(data, image.affine), str(path))
        out.append({**r, "image": str(path)})
    return out


def test_frechet_distance_is_zero_on_itself_symmetric_and_grows_with_a_shift():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(40, 5))
    b = rng.normal(size=(30, 5)) * 1.5 + 0.3
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-6)
    # hand-checkable: equal covariances, means 2 apart in every one of 5 dimensions -> 5 * 2^2 = 20
    assert frechet_distance(a, a + 2.0) == pytest.approx(20.0, rel=1e-6)
    assert frechet_distance(a, a + 1.0) < frechet_distance(a, a + 2.0)
    # 1D Gaussians: (mu1 - mu2)^2 + (s1 - s2)^2
    x = np.array([[-1.0], [1.0]])  # mean 0, sample variance 2
    y = np.array([[1.0], [5.0]])  # mean 3, sample variance 8
    assert frechet_distance(x, y) == pytest.approx(9.0 + (np.sqrt(2) - np.sqrt(8)) ** 2, rel=1e-6)
    with pytest.raises(ValueError):
        frechet_distance(a, a[:, :3])


def test_sample_diversity_by_hand():
    zero = np.zeros((8, 8, 8), dtype=np.float32)
    ten = zero + 10.0
    result = sample_diversity({"m0": [zero, zero.copy()], "m1": [zero, ten, zero], "single": [ten]})
    assert result["diversity_pairs"] == 4  # 1 pair + 3 pairs; a single sample has none
    assert result["diversity_mean_abs_diff_hu"] == pytest.approx((0 + 10 + 0 + 10) / 4)
    assert sample_diversity({"a": [zero]})["diversity_mean_abs_diff_hu"] is None
    same = sample_diversity({"a": [ten, ten.copy()]})
    assert same["diversity_mean_abs_diff_hu"] == 0.0 and same["diversity_mean_ssim"] == pytest.approx(1.0)


@pytest.mark.slow
def test_identical_shifted_and_copied_sets(records, tmp_path):
    training, test = records["training"], records["test"]
    # identical: every real training case twice, as two "samples" of its own mask
    twins = [{**r, "source_index": i} for i, r in enumerate(training) for _ in range(2)]
    same = evaluate_synthetic(twins, training, tmp_path / "same", training=training)
    assert same["hist_wasserstein_hu"] == pytest.approx(0.0, abs=1e-9)
    assert same["hist_jensen_shannon"] == pytest.approx(0.0, abs=1e-9)
    assert same["hist_intersection"] == pytest.approx(1.0)
    assert same["frechet_distance"] < 1e-6
    assert same["diversity_mean_abs_diff_hu"] == 0.0 and same["diversity_pairs"] == len(training)
    assert same["median_hu_pancreas_synthetic"] == same["median_hu_pancreas_real"]
    assert same["memorization_n_near_copies"] == len(twins)  # copies of training images are flagged
    assert "random-weight" in same["feature_network"]
    for name in ("metrics.json", "metrics.csv", "montage.png", "histogram.png", "memorization.json"):
        assert (tmp_path / "same" / name).is_file()
    csv_rows = dict(line.split(",", 1) for line in (tmp_path / "same" / "metrics.csv").read_text().splitlines())
    assert float(csv_rows["hist_wasserstein_hu"]) == pytest.approx(0.0, abs=1e-9)

    # shifted by +150 HU: larger histogram and feature distances, medians 150 HU apart
    shifted = evaluate_synthetic(shifted_copies(training, tmp_path / "shifted_set", 150), training,
                                 tmp_path / "shifted", figures=False)  # fmt: skip
    assert shifted["hist_wasserstein_hu"] > 100.0 and shifted["hist_jensen_shannon"] > 0.1
    assert shifted["frechet_distance"] > same["frechet_distance"] + 1e-6
    assert shifted["median_hu_pancreas_synthetic"] - shifted["median_hu_pancreas_real"] == pytest.approx(150.0)
    assert shifted["memorization_n_near_copies"] is None  # no training set given

    # other patients (the test set) are not near-copies; one copied training image among them is
    mixed = test + [training[0]]
    memo = evaluate_synthetic(mixed, training, tmp_path / "memo", training=training, figures=False)
    assert memo["memorization_n_near_copies"] == 1
    report = json.loads((tmp_path / "memo" / "memorization.json").read_text())
    flagged = [r for r in report["results"] if r["near_copy"]]
    assert flagged[0]["sample"] == training[0]["image"] and flagged[0]["nearest"] == training[0]["image"]


@pytest.mark.slow
def test_seg_weights_give_the_pancreas_check_and_trained_features(records, seg_weights, tmp_path):
    training = records["training"]
    metrics = evaluate_synthetic(training, training, tmp_path / "seg", seg_ckpt=seg_weights,
                                 seg_overrides=SEG_TINY, figures=False)  # fmt: skip
    assert metrics["feature_network"].startswith("seg_unet3d bottleneck")
    assert metrics["frechet_distance"] < 1e-6
    assert 0.0 <= metrics["pancreas_found_fraction"] <= 1.0
    assert 0.0 <= metrics["pancreas_dice_to_synthetic_label"] <= 1.0
    assert metrics["pancreas_n_judged"] == len(training) and metrics["pancreas_found_min_dice"] == 0.5
    predictions = sorted((tmp_path / "seg" / "seg_predictions").glob("*_seg.nii.gz"))
    assert len(predictions) == len(training)
    assert nib.load(predictions[0]).shape == nib.load(training[0]["image"]).shape


def test_pancreas_found_by_hand():
    label = np.zeros((4, 4, 4), dtype=np.int16)
    label[:2] = 1  # 32 voxels of pancreas
    label[0, 0, 0] = 2  # a tumor voxel counts as pancreas too
    half = np.zeros_like(label)
    half[:1] = 1  # 16 of the 32: Dice 2 * 16 / 48 = 2/3
    elsewhere = np.zeros_like(label)
    elsewhere[2:] = 1  # as much pancreas, none of it on the label: Dice 0
    result = pancreas_found([label, half, elsewhere, half], [label, label, label, None], min_dice=0.6)
    assert result["pancreas_n_judged"] == 3, "a scan without a label is not judged"
    assert result["pancreas_dice_to_synthetic_label"] == pytest.approx((1 + 2 / 3 + 0) / 3)
    assert result["pancreas_found_fraction"] == pytest.approx(2 / 3)
    empty = np.zeros_like(label)
    assert pancreas_found([empty], [empty])["pancreas_dice_to_synthetic_label"] == 1.0
    assert pancreas_found([label], [None])["pancreas_found_fraction"] is None


@pytest.fixture(scope="module")
def crops(phantom, tmp_path_factory) -> list[dict]:
    """Pancreas crops of the phantom with their organ maps (what the demo's generators learn from), HU kept."""
    from tools.prep import prepare_dataset
    from tools.splits import load_records

    out = tmp_path_factory.mktemp("eval_crops")
    prepare_dataset(phantom, out, mode="pancreas", out_shape=(24, 24, 16), margin_mm=10.0, hu_window=None)
    return load_records(out).records(None)


class StandInJudge:
    """A deterministic stand-in for seg_unet3d trained on the real crops: an image it learned (normalised cross-
    correlation >= 0.9 with one of them) gets that crop's pancreas, any other image what an untrained network paints,
    the voxels in the pancreas's HU range (in noise, many millilitres of false pancreas scattered everywhere)."""

    def __init__(self, records: list[dict]):
        self.known = [(load_nifti(r["image"])[0], load_nifti(r["label"])[0]) for r in records]
        pancreas_hu = np.concatenate([image[label > 0] for image, label in self.known])
        self.band = np.percentile(pancreas_hu, [10, 90])

    def __call__(self, image_path: str) -> np.ndarray:
        image = load_nifti(image_path)[0]
        for known, label in self.known:
            if known.shape == image.shape and np.corrcoef(known.ravel(), image.ravel())[0, 1] >= 0.9:
                return (label > 0).astype(np.uint8)
        return ((image >= self.band[0]) & (image <= self.band[1])).astype(np.uint8)


def test_pancreas_found_tells_pure_noise_from_real_crops(crops, seg_weights, tmp_path, monkeypatch):
    from tools import evaluation
    from tools.io import voxel_spacing

    judge = StandInJudge(crops)
    monkeypatch.setattr(evaluation, "predict_pancreas", lambda records, *_: [judge(r["image"]) for r in records])
    # the feature distance is not under test here: the cheap random-weight network instead of the seg bottleneck
    monkeypatch.setattr(evaluation, "feature_extractor", lambda *_: (evaluation.RandomFeatureNet(), "random"))
    rng = np.random.default_rng(0)
    noise = []  # what a broken generator makes from the real masks: pure noise around 40 HU, the crops' labels
    for r in crops:
        image, affine = load_nifti(r["image"])
        path = tmp_path / "noise" / Path(r["image"]).name
        save_nifti(path, rng.normal(40.0, 300.0, image.shape).astype(np.int16), affine)
        noise.append({**r, "image": str(path)})
    settings = {"seg_ckpt": seg_weights, "seg_overrides": SEG_TINY, "figures": False}
    real = evaluate_synthetic(crops, crops, tmp_path / "real", **settings)
    pure_noise = evaluate_synthetic(noise, crops, tmp_path / "noise_eval", **settings)
    assert real["pancreas_found_fraction"] >= 0.8 and real["pancreas_dice_to_synthetic_label"] >= 0.8
    assert pure_noise["pancreas_found_fraction"] <= 0.1
    assert pure_noise["pancreas_dice_to_synthetic_label"] < 0.2
    # the old rule (at least 1 ml of predicted pancreas) called every noise scan "found"
    volumes_ml = [judge(r["image"]).sum() * np.prod(voxel_spacing(load_nifti(r["image"])[1])) / 1000 for r in noise]
    assert min(volumes_ml) >= 1.0


def test_focus_slices_take_the_tumor_s_largest_cross_section_else_the_pancreas_s():
    from tools.figures import focus_slices

    label = np.zeros((10, 12, 8), dtype=np.int16)
    label[2:8, 3:9, 1:7] = 1  # pancreas, centre (4.5, 5.5, 3.5)
    label[6, 4, 5] = 2  # a one-voxel tumor
    label[7, 4:6, 5] = 2  # its larger part: the largest cross-sections are i=7, j=4, k=5
    assert focus_slices(label, label.shape) == (7, 4, 5)
    healthy = np.where(label == 2, 1, label)
    healthy[3, 3:9, 1:7] = 0  # less pancreas in sagittal slice 3, the others equal: the first largest wins
    assert focus_slices(healthy, label.shape) == (2, 3, 1)
    assert focus_slices(None, label.shape) == (5, 6, 4)
    assert focus_slices(np.zeros_like(label), label.shape) == (5, 6, 4)


def test_montage_names_cases_window_orientation_and_outlines_the_tumor_slice(crops, tmp_path, monkeypatch):
    import matplotlib.colors

    import tools.figures
    from tools.figures import to_ras

    figures = []
    original = tools.figures.save_figure
    monkeypatch.setattr(
        tools.figures, "save_figure", lambda fig, path, **kw: figures.append(fig) or original(fig, path)
    )
    healthy_first = sorted(crops, key=lambda r: r["has_tumor"])
    evaluate_synthetic(healthy_first, crops, tmp_path / "eval")
    assert (tmp_path / "eval" / "montage.png").is_file() and (tmp_path / "eval" / "histogram.png").is_file()
    montage = figures[0]
    panels = [ax for ax in montage.axes if ax.images]
    assert len(panels) == 2 * min(4, len(crops))
    by_case = {}
    for ax in panels:
        title = ax.get_title()
        assert "W400 L40" in title and "axial" in title
        assert {t.get_text() for t in ax.texts} == {"R", "L", "A", "P"}
        by_case.setdefault(title.split(": ")[1].split("\n")[0], []).append(ax)
    tumor_cases = [r for r in crops if r["has_tumor"]]
    assert tumor_cases and [ax.get_title().split("\n")[0] for ax in panels[: len(tumor_cases)]] == [
        f"synthetic: {r['case']}" for r in tumor_cases
    ], "cases with a tumor come first"
    for record in tumor_cases:
        label, affine = load_nifti(record["label"])
        ras = to_ras(label, affine)[0]
        k = int(np.argmax((ras == 2).sum(axis=(0, 1))))
        for ax in by_case[record["case"]]:  # its synthetic and its real panel
            assert f"axial {k + 1}/{ras.shape[2]}, tumor" in ax.get_title()
            colours = {matplotlib.colors.to_hex(c) for col in ax.collections for c in col.get_edgecolor()}
            assert {"#ffff00", "#ff0000"} <= colours, "pancreas yellow and tumor red outlines"


@pytest.mark.slow
def test_evaluate_segmentation_returns_the_bundle_summary(phantom, seg_weights, tmp_path):
    summary = evaluate_segmentation(phantom, seg_weights, tmp_path, overrides={**SEG_TINY, "cache_workers": 1})
    assert {(r["region"], r["metric"]) for r in summary["regions"]} >= {("pancreas", "dice"), ("pancreas", "nsd")}
    assert (tmp_path / "metrics_per_case.csv").is_file() and (tmp_path / "detection_summary.csv").is_file()


def test_every_new_command_has_help(capsys):
    import fire

    from tools.cli import Cli

    for command in (["synthesize"], ["evaluate", "seg"], ["evaluate", "synthetic"]):
        with pytest.raises(fire.core.FireExit) as exit_info:
            fire.Fire(Cli(), command=[*command, "--help"], name="python -m tools")
        assert exit_info.value.code == 0
        captured = capsys.readouterr()
        text = captured.out + captured.err
        assert "SYNOPSIS" in text and "POSITIONAL ARGUMENTS" in text, text
        assert {"synthesize": "provenance", "seg": "Dice", "synthetic": "memorization"}[command[-1]] in text
