"""difftumor: tumor mask generator statistics (issue 4, acceptance 3), the cellular automaton's tissue rule
(acceptance 6), the hand-crafted family, label noise and the optional perceptual loss.

The bundle's ``scripts`` package is imported under the alias ``difftumor_scripts`` (as tools do to put the transform
inside seg_unet3d training), which also shows that it has no module-level state tied to the name ``scripts``.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "difftumor"
ALIAS = "difftumor_scripts"


def bundle_module(name: str):
    """``scripts.<name>`` of the difftumor bundle, imported as ``difftumor_scripts.<name>``."""
    if ALIAS not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            ALIAS, BUNDLE / "scripts" / "__init__.py", submodule_search_locations=[str(BUNDLE / "scripts")]
        )
        package = importlib.util.module_from_spec(spec)
        sys.modules[ALIAS] = package
        spec.loader.exec_module(package)
    return importlib.import_module(f"{ALIAS}.{name}")


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Small tensors: one thread is faster than two that wait on each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


masks = bundle_module("masks")
baselines = bundle_module("baselines")
label_noise = bundle_module("label_noise")


def ellipsoid_organ(shape=(120, 90, 60), radii=(50, 20, 18), centre=None) -> np.ndarray:
    centre = np.array(shape) / 2 if centre is None else np.asarray(centre)
    grid = np.indices(shape).astype(np.float64)
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii)) <= 1.0


ORGAN = ellipsoid_organ()
AFFINE_1MM = np.eye(4)


def binomial_ok(count: int, n: int, p: float, sigmas: float = 4.5) -> bool:
    """``count`` successes out of ``n`` are consistent with probability ``p`` (within ``sigmas`` std devs)."""
    return abs(count - n * p) <= sigmas * np.sqrt(n * p * (1 - p)) + 1


# ----------------------------------------------------------------------------------------------------------------
# acceptance 3: the generator's statistics over many draws


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["difftumor", "seed001"])
def test_radius_ranges_counts_and_containment_per_class(preset):
    """Over many draws per class: radii in the class range, tumor counts in the class's range with every value
    drawn, every mask non-empty and inside the organ."""
    generator = masks.TumorMaskGenerator(preset)
    rng = np.random.RandomState(0)
    for name in masks.SIZE_CLASSES:
        spec = masks.PRESETS[preset][name]
        counts, radii, sigmas = [], [], []
        for _ in range(12 if name in ("medium", "large") else 30):
            draw = generator(ORGAN, rng, name, AFFINE_1MM)
            assert draw.tumor_class == name
            assert draw.mask.any() and not (draw.mask & ~ORGAN).any(), f"{name}: a tumor outside the organ"
            counts.append(len(draw.tumors))
            radii += [r for tumor in draw.tumors for r in tumor["radii_mm"]]
            sigmas += [tumor["sigma_mm"] for tumor in draw.tumors]
        assert spec.radius_mm[0] <= min(radii) and max(radii) <= spec.radius_mm[1]
        assert spec.sigma_mm[0] <= min(sigmas) and max(sigmas) <= spec.sigma_mm[1]
        # uniform draws: the range is covered, not only its middle
        width = spec.radius_mm[1] - spec.radius_mm[0]
        assert min(radii) < spec.radius_mm[0] + 0.2 * width and max(radii) > spec.radius_mm[1] - 0.2 * width
        assert set(counts) == set(range(spec.count[0], spec.count[1] + 1)), f"{name}: counts {sorted(set(counts))}"
    assert masks.PRESETS["difftumor"]["tiny"].count == (1, 3) and masks.PRESETS["difftumor"]["large"].count == (1, 1)


def test_tumor_count_distribution_is_uniform_for_early_classes():
    generator = masks.TumorMaskGenerator()
    rng = np.random.RandomState(1)
    counts = [len(generator.draw_parameters(rng, "small")) for _ in range(3000)]
    for value in (1, 2, 3):
        assert binomial_ok(counts.count(value), len(counts), 1 / 3), (value, counts.count(value))


def test_radii_are_millimetres_converted_by_the_voxel_spacing():
    """Without deformation an ellipsoid's extent in mm equals its radii on an anisotropic grid (0.8 x 0.8 x 2.5)."""
    spacing = np.array([0.8, 0.8, 2.5])
    affine = np.diag([*spacing, 1.0])
    organ = ellipsoid_organ(shape=(200, 160, 60), radii=(90, 70, 28))
    rigid = masks.SizeClass("large", (12.0, 12.0), (0.0, 0.0), (1, 1))  # large: centred in the organ, not clipped
    generator = masks.TumorMaskGenerator({"large": rigid})
    for seed in range(3):
        draw = generator(organ, np.random.RandomState(seed), "large", affine)
        coords = np.argwhere(draw.mask)
        extent_mm = (coords.max(0) - coords.min(0) + 1) * spacing
        assert np.all(np.abs(extent_mm - 24.0) <= 2 * spacing + 1e-6), extent_mm
    # the same class on the 1 mm grid has the same physical size
    draw = generator(ORGAN, np.random.RandomState(0), "large", AFFINE_1MM)
    volume_mm3 = draw.mask.sum()
    assert abs(volume_mm3 - 4 / 3 * np.pi * 12**3) / (4 / 3 * np.pi * 12**3) < 0.1


def test_label_size_measure_reaches_the_equivalent_radius_a_thin_organ_clips_away():
    """A slab 8 mm thick (a thin pancreas): the reference's ellipsoid radii end clipped far below the class, the
    label measure grows the same deformed ellipsoid until the label's equivalent radius is the drawn target."""
    spacing = np.array([1.5, 1.5, 2.0])
    affine = np.diag([*spacing, 1.0])
    slab = np.zeros((100, 100, 30), dtype=bool)
    slab[10:90, 10:90, 13:17] = True  # 120 x 120 x 8 mm
    medium = masks.SizeClass("medium", (10.0, 12.0), (1.0, 2.0), (1, 1))
    for seed in range(4):
        clipped = masks.TumorMaskGenerator({"medium": medium})(slab, np.random.RandomState(seed), "medium", affine)
        grown = masks.TumorMaskGenerator({"medium": medium}, size_measure="label")(
            slab, np.random.RandomState(seed), "medium", affine
        )
        tumor = grown.tumors[0]
        assert 10.0 <= tumor["target_radius_mm"] <= 12.0
        reached = masks.equivalent_radius_mm(grown.mask, affine)
        assert abs(reached - tumor["target_radius_mm"]) <= 0.05 * tumor["target_radius_mm"], tumor
        assert reached == pytest.approx(tumor["label_radius_mm"]) and tumor["scale"] > 1.0
        assert masks.equivalent_radius_mm(clipped.mask, affine) < 0.9 * reached
        assert not (grown.mask & ~slab).any()
        again = masks.TumorMaskGenerator({"medium": medium}, size_measure="label")(
            slab, np.random.RandomState(seed), "medium", affine
        )
        assert np.array_equal(again.mask, grown.mask)  # seeded, however many sizes were tried
    # an organ too small for the target keeps what the largest scale reaches, and says so
    tiny = np.zeros((20, 20, 20), dtype=bool)
    tiny[8:12, 8:12, 8:12] = True
    draw = masks.TumorMaskGenerator({"medium": medium}, size_measure="label")(tiny, np.random.RandomState(0), "medium")
    assert draw.tumors[0]["scale"] == masks.MAX_LABEL_SCALE and draw.tumors[0]["label_radius_mm"] < 10.0
    with pytest.raises(ValueError, match="size_measure 'volume': expected one of"):
        masks.TumorMaskGenerator(size_measure="volume")


def test_mixed_follows_its_distribution():
    """``mixed`` class frequencies over 4000 draws match the default weights and custom ones."""
    rng = np.random.RandomState(2)
    n = 4000
    for weights in (masks.DEFAULT_MIXED_WEIGHTS, {"tiny": 0.1, "small": 0.2, "medium": 0.3, "large": 0.4}):
        drawn = [masks.choose_class(rng, "mixed", weights) for _ in range(n)]
        total = sum(weights.values())
        for name, weight in weights.items():
            assert binomial_ok(drawn.count(name), n, weight / total), (name, drawn.count(name), weight)
    early = [masks.choose_class(rng, "early") for _ in range(n)]
    assert set(early) == {"tiny", "small"} and binomial_ok(early.count("tiny"), n, 0.5)
    # whole masks: the class recorded in each draw follows the weights too
    generator = masks.TumorMaskGenerator(mixed_weights={"tiny": 0.5, "medium": 0.5})
    classes = [generator(ORGAN, rng, "mixed", AFFINE_1MM).tumor_class for _ in range(60)]
    assert set(classes) <= {"tiny", "medium"} and binomial_ok(classes.count("tiny"), 60, 0.5)


def test_tumor_centres_follow_the_reference_location_rule():
    """Non-large tumors are centred in slices at 30-70 % of the organ's axial extent; large ones at its box centre."""
    generator = masks.TumorMaskGenerator()
    rng = np.random.RandomState(3)
    z = np.flatnonzero(ORGAN.any(axis=(0, 1)))
    low, high = z[0] + 0.3 * (z[-1] - z[0]) - 1, z[0] + 0.7 * (z[-1] - z[0]) + 1
    for _ in range(30):
        for tumor in generator(ORGAN, rng, "small", AFFINE_1MM).tumors:
            assert low <= tumor["centre_voxel"][2] <= high and ORGAN[tuple(tumor["centre_voxel"])]
    large = generator(ORGAN, rng, "large", AFFINE_1MM).tumors[0]["centre_voxel"]
    coords = np.argwhere(ORGAN)
    assert np.allclose(large, np.round((coords.min(0) + coords.max(0)) / 2), atol=1)


def test_ranges_from_a_data_sets_own_tumors(tmp_path, phantom_set):
    """The quartile classes of ``tools.tumor_stats`` (a JSON file or a dict) and ``radius_ranges`` drive the
    generator: its radii stay in the data set's ranges."""
    from tools.tumor_stats import dataset_tumor_stats, radius_ranges

    stats = dataset_tumor_stats(phantom_set, section=None)
    stats_file = tmp_path / "tumor_sizes.json"
    stats_file.write_text(json.dumps(stats))
    expected = radius_ranges(stats)
    for source in (str(stats_file), stats, {k: list(v) for k, v in expected.items()}):
        generator = masks.TumorMaskGenerator(source)
        assert set(generator.classes) == set(expected)
        rng = np.random.RandomState(4)
        for name, (lo, hi) in expected.items():
            radii = [r for _ in range(20) for t in generator.draw_parameters(rng, name) for r in t["radii_mm"]]
            assert max(lo, 0.5) <= min(radii) and max(radii) <= max(hi, lo, 0.5), (name, lo, hi)
            assert generator.classes[name].sigma_mm == masks.PRESETS["difftumor"][name].sigma_mm
    with pytest.raises(ValueError, match="not a preset"):
        masks.TumorMaskGenerator("no_such_preset")


def test_empty_organ_is_an_error():
    with pytest.raises(ValueError, match="empty"):
        masks.TumorMaskGenerator()(np.zeros((10, 10, 10), bool), np.random.RandomState(0), "tiny")


# ----------------------------------------------------------------------------------------------------------------
# acceptance 6: the cellular automaton's tissue rule


def split_density_organ(shape=(60, 60, 40)) -> tuple[np.ndarray, np.ndarray]:
    """A box organ whose x < 30 half is low-density tissue (105 HU) and x >= 30 half dense tissue (150 HU)."""
    organ = np.zeros(shape, bool)
    organ[3:-3, 3:-3, 3:-3] = True
    hu = np.where(np.arange(shape[0])[:, None, None] < shape[0] // 2, 105.0, 150.0) * np.ones(shape)
    return hu, organ


def grow_from_centre(automaton, hu, organ, seed: int, steps: int = 14) -> np.ndarray:
    rng = np.random.RandomState(seed)
    levels = automaton.density_levels(hu, organ)
    state = np.zeros(hu.shape, dtype=np.int16)
    state[hu.shape[0] // 2, hu.shape[1] // 2, hu.shape[2] // 2] = automaton.threshold // 2
    pressure = np.zeros(hu.shape, dtype=np.int16)
    for _ in range(steps):
        state = automaton.step(state, levels, pressure, rng)
    return state


def test_reference_tissue_check_never_refuses_and_the_fixed_one_does():
    draws = np.random.RandomState(5).uniform(0, 1, 2000)
    for level in (0, 1, 2):
        assert all(baselines.reference_tissue_check(level, u) for u in draws)  # the truncation bug
    refused = {level: np.mean([not baselines.tissue_check(level, u) for u in draws]) for level in (0, 1, 2)}
    assert refused[0] == 0.0 and 0.6 < refused[1] < 0.8 and 0.85 < refused[2] < 0.95


def test_tissue_rule_changes_growth_near_low_density_tissue():
    """Rule on: the tumor grows mostly into the low-density half; rule off (the reference's effective behaviour):
    both halves alike. Same seeds, same steps; the difference holds for every seed."""
    hu, organ = split_density_organ()
    seed_x = hu.shape[0] // 2  # the seed sits on the first dense plane: compare the sides, not the seed plane
    on = baselines.CellularAutomatonSynthesis(tissue_rule=True)
    off = baselines.CellularAutomatonSynthesis(tissue_rule=False)

    def sides(state):
        tumor = state > 0
        return int(tumor[:seed_x].sum()), int(tumor[seed_x + 1 :].sum())

    totals = np.zeros((2, 2))
    for seed in range(4):
        low_on, dense_on = sides(grow_from_centre(on, hu, organ, seed, steps=20))
        low_off, dense_off = sides(grow_from_centre(off, hu, organ, seed, steps=20))
        assert low_on / (low_on + dense_on) > low_off / (low_off + dense_off), seed  # every seed
        assert low_on != low_off  # the outcome near low-density tissue differs
        totals += [[low_on, dense_on], [low_off, dense_off]]
    share_on, share_off = totals[:, 0] / totals.sum(1)
    assert share_on > 0.8 and 0.35 < share_off < 0.65, (share_on, share_off)


def test_mass_effect_lets_a_saturated_tumor_push_through_a_vessel():
    """A vessel wall (200 HU, boundary) splits the organ; with mass effect the tumor crosses it after pushes."""
    hu, organ = split_density_organ()
    hu[:] = 105.0
    hu[:, 33:35, :] = 200.0  # a vessel plane next to the seed
    crossed = {}
    for pushes in (3, 10**6):
        automaton = baselines.CellularAutomatonSynthesis(mass_effect_pushes=pushes, tissue_rule=True)
        state = grow_from_centre(automaton, hu, organ, seed=0, steps=45)
        crossed[pushes] = int((state[:, 35:, :] > 0).sum())
    assert crossed[10**6] == 0 and crossed[3] > 0


def test_cellular_and_handcrafted_families_change_only_near_the_tumor():
    hu = np.random.RandomState(6).normal(110, 10, ORGAN.shape).astype(np.float32)
    for family in (baselines.CellularAutomatonSynthesis(), baselines.HandcraftedSynthesis()):
        for seed in range(2):
            result = family(hu, ORGAN, AFFINE_1MM, np.random.RandomState(seed), "small")
            assert result.tumor_mask.any() and not (result.tumor_mask & ~ORGAN).any()
            from scipy import ndimage

            near = ndimage.binary_dilation(result.tumor_mask, structure=np.ones((3, 3, 3)), iterations=5)
            assert result.region.any() and not (result.region & ~near).any()
            assert result.values.shape == (int(result.region.sum()),) and np.isfinite(result.values).all()
            assert np.mean(result.values - hu[result.region]) < 0  # hypo-attenuating


def test_necrotic_core_is_labelled_tumor_and_stays_dead():
    hu, organ = split_density_organ((70, 70, 50))
    hu[:] = 105.0
    automaton = baselines.CellularAutomatonSynthesis(steps=(40, 41), death_probability=1.0)
    state, _, info = automaton.grow(hu, organ, np.random.RandomState(7))
    assert info["necrosis"] and (state == -1).any()
    result = automaton(hu, organ, AFFINE_1MM, np.random.RandomState(7))
    assert result.info["necrosis"] and result.tumor_mask.sum() >= (state != 0).sum() * 0.5


# ----------------------------------------------------------------------------------------------------------------
# label noise (seed 001)


def test_label_noise_levels_lower_the_dice_in_order():
    label = np.zeros((80, 80, 60), np.uint8)
    label[ellipsoid_organ((80, 80, 60), (30, 25, 20))] = 1
    label[ellipsoid_organ((80, 80, 60), (10, 9, 8))] = 2
    tumor = label == 2
    rng = np.random.RandomState(8)
    mean_dice = {}
    for level in label_noise.NOISE_LEVELS_MM:
        dice = [label_noise.dice(tumor, label_noise.noisy_tumor_label(label, level, rng) == 2) for _ in range(8)]
        mean_dice[level] = float(np.mean(dice))
    values = [mean_dice[level] for level in ("low", "moderate", "high", "extreme")]
    assert values == sorted(values, reverse=True) and values[0] < 1.0 and values[-1] > 0.0, mean_dice
    noisy = label_noise.noisy_tumor_label(label, "high", np.random.RandomState(0))
    assert set(np.unique(noisy)) <= {0, 1, 2}
    assert np.array_equal(label_noise.noisy_tumor_label(label, 0.0, rng), label)


def test_noisy_label_transform_is_seeded_and_leaves_the_image():
    label = np.zeros((1, 48, 48, 32), np.uint8)
    label[0][ellipsoid_organ((48, 48, 32), (20, 18, 12))] = 1
    label[0][ellipsoid_organ((48, 48, 32), (7, 6, 5))] = 2
    image = np.random.RandomState(0).rand(1, 48, 48, 32).astype(np.float32)
    outputs = []
    for seed in (1, 1, 2):
        transform = label_noise.NoisyTumorLabeld(keys="label", level="extreme")
        transform.set_random_state(seed)
        out = transform({"image": image.copy(), "label": torch.as_tensor(label)})
        assert np.array_equal(out["image"], image)
        outputs.append(np.asarray(out["label"]))
    assert np.array_equal(outputs[0], outputs[1]) and not np.array_equal(outputs[0], outputs[2])


# ----------------------------------------------------------------------------------------------------------------
# optional perceptual term (weights the test makes)


@pytest.mark.slow
def test_perceptual_loss_with_local_weights(tmp_path):
    losses = bundle_module("losses")
    with pytest.raises(FileNotFoundError, match="never downloaded"):
        losses.SlicePerceptualLoss(tmp_path / "absent.pt")
    torch.manual_seed(0)
    features = losses.vgg16_features()
    weights = tmp_path / "vgg16.pth"
    torch.save({f"features.{k}": v for k, v in features.state_dict().items()}, weights)  # torchvision layout
    loss = losses.SlicePerceptualLoss(weights, taps=(3, 8, 15))
    real = torch.rand(1, 1, 24, 24, 24) * 2 - 1
    fake = (real + 0.3 * torch.randn_like(real)).requires_grad_(True)
    assert float(loss(real, real)) == pytest.approx(0.0, abs=1e-6)
    value = loss(fake, real)
    value.backward()
    assert float(value) > 0 and fake.grad is not None and float(fake.grad.abs().sum()) > 0
    assert all(not p.requires_grad for p in loss.features.parameters())
