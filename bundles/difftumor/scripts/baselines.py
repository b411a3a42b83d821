"""Modeling-based tumor synthesis (seed 003): hand-crafted (SyntheticTumors) and cellular automaton (Pixel2Cancer).

Why this is not plain MONAI: MONAI has neither. Both follow their reference implementations (SPEC 3.4) with the
interface of :class:`~.synthesis.DiffTumorSynthesis` (``family(hu, organ, affine, rng, tumor_type)`` ->
``SynthesisResult``), so :class:`~.transforms.TumorSynthesisd` runs any of the three families on the same data, and
with the same guarantee: only voxels near the tumor change.

**Hand-crafted** (Hu et al., SyntheticTumors): the tumor mask of :class:`~.masks.TumorMaskGenerator`; a texture of
Gaussian-blurred uniform noise, thresholded against fresh noise, blurred again and scaled (sigma_a in 3-15 mm,
sigma_b in 4-7 mm); the HU drop ``texture * blurred_mask * U(65, 145)`` with the mask blurred by ``U(1, 2)`` mm,
inside the organ and the dilated tumor mask.

**Cellular automaton** (Lai et al., Pixel2Cancer), on the organ's bounding box resampled to ``grid_spacing_mm`` (1
mm, the reference's grid: a step grows one voxel, so steps mean millimetres on any scan): each voxel is a cell;
organ voxels are quantised by HU into three density levels (``organ_hu = (100, 160)``: below 120, 120-140, 140-160
HU); voxels outside the organ or above 160 HU (vessels) are boundary. Seeds (1-9 attempts, sometimes with 3-9
satellites within 10 voxels) start at state 5; each step a cell below 10 grows by one (proliferation), a cell of 5
or more tries up to three random neighbours in its 3 x 3 x 3 kernel and grows one of them by one (invasion): only
into organ cells below 10, and only with the probability of the neighbour's density level (``tissue_probabilities =
1, 0.3, 0.1``: the tissue rule). A saturated cell (10) pushing against boundary adds pressure there; after three
pushes the boundary voxel becomes organ of the lowest density (mass effect: the tumor displaces a vessel or the
organ edge). After more than 30 steps the tumor dies in its core with probability 0.5 (necrosis: dead cells stop,
spread randomly around the seeds, and the tumor keeps growing around them for ``steps / 7 + 1`` steps). The state
maps to HU with the reference's pancreas rules: vessel and dense-tissue attenuation, fat brightening, the drop
``texture * U(65, 145) * state / 10``, and a darker necrotic core (``+ texture * U(90, 110) * dead``, dead < 0).

**The reference's tissue rule never fires.** Its CUDA kernel declares the uniform draw as ``const int
density_probability``: the float in (0, 1] is truncated to 0, and ``0 <= 1``, ``0 < 0.3`` and ``0 < 0.1`` all hold,
so a cell always grows into any organ tissue and density plays no part. Here the draw stays a float, so dense
tissue slows invasion as intended; ``tissue_rule=False`` reproduces the reference's behaviour for comparison
(:func:`reference_tissue_check` is the truncated rule, ``tests/test_bundle_difftumor_masks.py`` shows both).

Departures from the reference, each a bug fix: dead cells stay dead (the kernel's proliferation rule turned a dead
cell, -1, into healthy tissue on the next step), the necrotic core is labelled tumor (the reference's ``> 0`` left
it out of the label), growth conflicts in one step add up like the kernel's ``atomicAdd`` but states are capped at
the threshold every step, and all randomness comes from the given ``RandomState``.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
from scipy import ndimage

from .masks import TumorMaskGenerator, axial_axis, equivalent_radius_mm, voxel_spacing
from .synthesis import SynthesisResult, bounding_box, dilate_mm

#: Upper radius (mm) of each reference class, to name the class of a grown tumor by its equivalent radius.
_CLASS_UPPER_MM = (("tiny", 5.0), ("small", 10.0), ("medium", 20.0))


def size_class_of_radius(radius_mm: float) -> str:
    """``tiny`` / ``small`` / ``medium`` / ``large`` by the reference's class radii (5, 10, 20 mm upper bounds)."""
    for name, upper in _CLASS_UPPER_MM:
        if radius_mm <= upper:
            return name
    return "large"


def predefined_texture(
    shape: Sequence[int], rng: np.random.RandomState, sigma_a: Sequence[float], sigma_b: Sequence[float]
) -> np.ndarray:
    """SyntheticTumors' texture in [0, 1] (sigmas in voxels per axis): blurred noise, thresholded, blurred, scaled."""
    a = ndimage.gaussian_filter(rng.uniform(0, 1, size=shape), sigma=sigma_a)
    scale, base = rng.uniform(0.19, 0.21), rng.uniform(0.04, 0.06)
    a = scale * (a - a.min()) / max(float(a.max() - a.min()), 1e-12) + base
    b = ndimage.gaussian_filter((a > rng.uniform(0, 1, size=shape)).astype(np.float64), sigma=sigma_b)
    u0 = rng.uniform(0.5, 0.55)
    above = b > 0.12
    beta = u0 / float(b[above].mean()) if above.any() else 1.0
    return np.clip(beta * b, 0.0, 1.0)


class HandcraftedSynthesis:
    """SyntheticTumors-style synthesis (see the module docstring). Sigmas / radii in mm, converted by spacing."""

    name = "handcrafted"

    def __init__(
        self,
        mask_generator: TumorMaskGenerator | Mapping[str, Any] | None = None,
        texture_sigma_a_mm: Sequence[float] = (3, 6, 9, 12, 15),
        texture_sigma_b_mm: Sequence[float] = (4, 7),
        blur_sigma_mm: Sequence[float] = (1.0, 2.0),
        difference_hu: Sequence[float] = (65.0, 145.0),
    ):
        if isinstance(mask_generator, TumorMaskGenerator):
            self.mask_generator = mask_generator
        else:
            self.mask_generator = TumorMaskGenerator(**dict(mask_generator or {}))
        self.texture_sigma_a_mm = tuple(float(v) for v in texture_sigma_a_mm)
        self.texture_sigma_b_mm = tuple(float(v) for v in texture_sigma_b_mm)
        self.blur_sigma_mm = tuple(float(v) for v in blur_sigma_mm)
        self.difference_hu = tuple(float(v) for v in difference_hu)

    def __call__(
        self,
        hu: np.ndarray,
        organ: np.ndarray,
        affine: np.ndarray | None,
        rng: np.random.RandomState,
        tumor_type: str = "mixed",
    ) -> SynthesisResult:
        organ = np.asarray(organ, dtype=bool)
        draw = self.mask_generator(organ, rng, tumor_type, affine)
        spacing = voxel_spacing(affine)
        sigma = float(rng.uniform(*self.blur_sigma_mm))
        difference = float(rng.uniform(*self.difference_hu))
        sigma_a = self.texture_sigma_a_mm[rng.randint(len(self.texture_sigma_a_mm))]
        sigma_b = self.texture_sigma_b_mm[rng.randint(len(self.texture_sigma_b_mm))]
        region = dilate_mm(draw.mask, affine, 2.0 * self.blur_sigma_mm[1]) & organ
        box = bounding_box(region, 1)
        shape = tuple(s.stop - s.start for s in box)
        texture = predefined_texture(shape, rng, sigma_a / spacing, sigma_b / spacing)
        blurred = ndimage.gaussian_filter(draw.mask[box].astype(np.float64), sigma=sigma / spacing, mode="constant")
        new = hu[box].astype(np.float64) - texture * blurred * difference
        local = region[box] & (texture * blurred > 0)
        out_region = np.zeros_like(region)
        out_region[box] = local
        info = {
            "family": self.name,
            "tumors": draw.tumors,
            "blur_sigma_mm": sigma,
            "difference_hu": difference,
            "texture_sigma_mm": [sigma_a, sigma_b],
        }
        return SynthesisResult(draw.mask, out_region, new[local].astype(np.float32), draw.tumor_class, info)


def reference_tissue_check(level: int, probability: float) -> bool:
    """Pixel2Cancer's ``check_tissue`` as compiled: the uniform draw is truncated to an ``int`` (0 for any draw
    below 1), so the comparisons ``<= 1``, ``< 0.3``, ``< 0.1`` always pass: growth is never refused."""
    truncated = int(probability)  # `const int density_probability` in the kernel's signature
    return {0: truncated <= 1, 1: truncated < 0.3, 2: truncated < 0.1}[level]


def tissue_check(level: int, probability: float, tissue_probabilities: Sequence[float] = (1.0, 0.3, 0.1)) -> bool:
    """The tissue rule as intended: grow into density level ``level`` when the uniform draw is below its p."""
    return probability < tissue_probabilities[level]


_KERNEL_OFFSETS = np.array(list(np.ndindex(3, 3, 3))) - 1  # 27 offsets of the 3 x 3 x 3 receptive field


class CellularAutomatonSynthesis:
    """Pixel2Cancer-style cellular automaton (see the module docstring). ``tissue_rule=False`` = the reference's
    effective behaviour (density never refuses growth)."""

    name = "cellular"
    BOUNDARY = 3  # density level of voxels outside the organ or above the organ's HU range (vessels)

    def __init__(
        self,
        organ_hu: Sequence[float] = (100.0, 160.0),
        threshold: int = 10,
        steps: Sequence[int] = (5, 80),
        death_steps: int = 30,
        death_probability: float = 0.5,
        max_try: int = 3,
        tissue_rule: bool = True,
        tissue_probabilities: Sequence[float] = (1.0, 0.3, 0.1),
        mass_effect_pushes: int = 3,
        seed_attempts: Sequence[int] = (1, 9),
        difference_hu: Sequence[float] = (65.0, 145.0),
        necrosis_hu: Sequence[float] = (90.0, 110.0),
        texture_sigma_a_mm: Sequence[float] = (3, 6, 9, 12, 15),
        texture_sigma_b_mm: Sequence[float] = (4, 7),
        grid_spacing_mm: float | None = 1.0,
    ):
        self.grid_spacing_mm = None if grid_spacing_mm is None else float(grid_spacing_mm)
        self.organ_hu = (float(organ_hu[0]), float(organ_hu[1]))
        self.threshold = int(threshold)
        self.steps = (int(steps[0]), int(steps[1]))
        self.death_steps = int(death_steps)
        self.death_probability = float(death_probability)
        self.max_try = int(max_try)
        self.tissue_rule = bool(tissue_rule)
        self.tissue_probabilities = np.asarray(tissue_probabilities, dtype=np.float64)
        self.mass_effect_pushes = int(mass_effect_pushes)
        self.seed_attempts = (int(seed_attempts[0]), int(seed_attempts[1]))
        self.difference_hu = tuple(float(v) for v in difference_hu)
        self.necrosis_hu = tuple(float(v) for v in necrosis_hu)
        self.texture_sigma_a_mm = tuple(float(v) for v in texture_sigma_a_mm)
        self.texture_sigma_b_mm = tuple(float(v) for v in texture_sigma_b_mm)

    # ------------------------------------------------------------------------------------------------------------
    def density_levels(self, hu: np.ndarray, organ: np.ndarray) -> np.ndarray:
        """0 / 1 / 2 for organ voxels by HU thirds of ``organ_hu``; :attr:`BOUNDARY` outside the organ or above."""
        low, high = self.organ_hu
        interval = (high - low) / 3.0
        levels = np.full(hu.shape, self.BOUNDARY, dtype=np.int8)
        levels[organ & (hu < low + interval)] = 0
        levels[organ & (hu >= low + interval) & (hu < low + 2 * interval)] = 1
        levels[organ & (hu >= low + 2 * interval) & (hu < high)] = 2
        return levels

    def seed(self, levels: np.ndarray, rng: np.random.RandomState) -> tuple[np.ndarray, list[np.ndarray]]:
        """Initial states: random organ voxels at ``threshold / 2``, some with satellites (the reference's rule)."""
        state = np.zeros(levels.shape, dtype=np.int16)
        candidates = np.argwhere(levels != self.BOUNDARY)
        cores: list[np.ndarray] = []
        for _ in range(rng.randint(self.seed_attempts[0], self.seed_attempts[1] + 1)):
            start = candidates[rng.randint(len(candidates))]
            state[tuple(start)] = self.threshold // 2
            cores.append(start)
            if rng.randint(0, 3) == 0:
                for _ in range(rng.randint(3, 10)):
                    point = start + rng.randint(-10, 10, size=3)
                    if np.all(point >= 0) and np.all(point < levels.shape) and levels[tuple(point)] != self.BOUNDARY:
                        if state[tuple(point)] == 0:
                            state[tuple(point)] = self.threshold // 2
                            cores.append(point)
        return state, cores

    def step(
        self, state: np.ndarray, levels: np.ndarray, pressure: np.ndarray, rng: np.random.RandomState
    ) -> np.ndarray:
        """One update of every cell from the previous states (``levels`` / ``pressure`` change in place)."""
        threshold = self.threshold
        previous = state
        new = previous.copy()
        alive = np.argwhere(previous > 0)
        if not len(alive):
            return new
        values = previous[tuple(alive.T)]
        grow_self = values < threshold  # proliferation (and extension cells grow themselves too)
        new[tuple(alive[grow_self].T)] += 1
        extending = alive[values >= threshold // 2]
        saturated = previous[tuple(extending.T)] >= threshold
        pending = np.ones(len(extending), dtype=bool)
        shape = np.array(previous.shape)
        for _ in range(self.max_try):
            index = np.flatnonzero(pending)
            if not len(index):
                break
            target = extending[index] + _KERNEL_OFFSETS[rng.randint(len(_KERNEL_OFFSETS), size=len(index))]
            inside = np.all((target >= 0) & (target < shape), axis=1)
            index, target = index[inside], target[inside]
            level = levels[tuple(target.T)]
            # mass effect: a saturated cell pushes boundary voxels; enough pushes turn them into organ tissue
            push = saturated[index] & (level == self.BOUNDARY)
            if push.any():
                pushed = target[push]
                np.add.at(pressure, tuple(pushed.T), 1)
                yielded = pressure[tuple(pushed.T)] >= self.mass_effect_pushes
                levels[tuple(pushed[yielded].T)] = 0
                level = levels[tuple(target.T)]
            draw = rng.uniform(0.0, 1.0, size=len(index))
            can = level != self.BOUNDARY
            if self.tissue_rule:
                can &= draw < self.tissue_probabilities[np.minimum(level, 2)]
            target_state = previous[tuple(target.T)]
            can &= (target_state >= 0) & (target_state < threshold)  # dead cells (-1) and full cells refuse
            grown = target[can]
            np.add.at(new, tuple(grown.T), 1)
            pending[index[can]] = False
        np.clip(new, -1, threshold, out=new)
        return new

    def kill(self, state: np.ndarray, cores: list[np.ndarray], steps: int, rng: np.random.RandomState) -> None:
        """Necrosis in place: some seed points die (-1) and death spreads to random saturated cells around them."""
        chosen = rng.permutation(len(cores))[: rng.randint(1, len(cores) + 1)]
        reach = max(int(steps / 10 - 2), 1)
        shape = np.array(state.shape)
        for point in (cores[i] for i in chosen):
            state[tuple(point)] = -1
            for _ in range(rng.randint(5, 20)):
                other = point + rng.randint(-reach, reach, size=3)
                if np.all(other >= 0) and np.all(other < shape) and state[tuple(other)] == self.threshold:
                    state[tuple(other)] = -1

    def grow(
        self, hu: np.ndarray, organ: np.ndarray, rng: np.random.RandomState, steps: int | None = None
    ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        """Run the automaton on a (cropped) scan: returns (state, initial density levels, info)."""
        levels = self.density_levels(hu, organ)
        initial_levels = levels.copy()
        steps = int(rng.randint(self.steps[0], self.steps[1])) if steps is None else int(steps)
        state, cores = self.seed(levels, rng)
        pressure = np.zeros(levels.shape, dtype=np.int16)
        for _ in range(steps + 1):
            state = self.step(state, levels, pressure, rng)
        died = False
        if steps > self.death_steps and rng.uniform() < self.death_probability:
            died = True
            state = np.minimum(state, self.threshold)
            self.kill(state, cores, steps, rng)
            for _ in range(int(steps / 7 + 1)):
                state = self.step(state, levels, pressure, rng)
        info = {"steps": steps, "seeds": len(cores), "necrosis": died, "tissue_rule": self.tissue_rule}
        return state, initial_levels, info

    def map_to_hu(
        self,
        hu: np.ndarray,
        state: np.ndarray,
        levels: np.ndarray,
        texture: np.ndarray,
        axis: int,
        rng: np.random.RandomState,
    ) -> np.ndarray:
        """The reference's pancreas mapping of tumor states to HU (see the module docstring)."""
        threshold = self.threshold
        low, high = self.organ_hu
        interval = (high - low) / 3.0
        in_plane = [0.8, 0.8, 0.8]
        in_plane[axis] = 0.0  # the reference blurs each axial slice with a 3 x 3 Gaussian (sigma 0.8)
        image = hu.astype(np.float64).copy()
        tumor = state.astype(np.float64)
        tumor[state == -1] = threshold
        tumor = ndimage.gaussian_filter(tumor, sigma=in_plane, truncate=1.25)
        vessel = (levels == self.BOUNDARY) & (tumor >= threshold / 2)
        dense = (levels == 2) & (tumor != 0)
        image[vessel] *= (low + interval / 2) / high
        image[dense] *= (low + 2 * interval) / high
        touched = tumor != 0
        fat = (image <= 65) & touched
        if touched.any():
            mean = float(image[touched].mean())
            image = image + texture * rng.uniform(mean, 2 * mean) * np.where(fat, tumor, 0.0) / threshold
        mapped = image - texture * rng.uniform(*self.difference_hu) * tumor / threshold
        if (state == -1).any():
            dead = ndimage.gaussian_filter(-(state == -1).astype(np.float64), sigma=in_plane, truncate=1.25)
            mapped = mapped + texture * rng.uniform(*self.necrosis_hu) * dead
        smoothed = ndimage.gaussian_filter(np.where(touched, mapped, 0.0), sigma=in_plane, truncate=1.25)
        replace = (tumor >= threshold / 2) & ((levels >= 2) | fat | (mapped < 0))
        mapped[replace] = smoothed[replace]
        return mapped

    def __call__(
        self,
        hu: np.ndarray,
        organ: np.ndarray,
        affine: np.ndarray | None,
        rng: np.random.RandomState,
        tumor_type: str = "mixed",
    ) -> SynthesisResult:
        """Grow a tumor in ``organ`` and map it into ``hu``. ``tumor_type`` is not used: the size comes from the
        number of steps (``info["tumor_class"]`` names the class of the grown tumor by its equivalent radius)."""
        organ = np.asarray(organ, dtype=bool)
        if not organ.any():
            raise ValueError("the organ mask is empty: no place for a tumor")
        box = bounding_box(organ, 2)
        hu_box, organ_box = hu[box].astype(np.float64), organ[box]
        spacing = voxel_spacing(affine)
        if self.grid_spacing_mm is None or np.allclose(spacing, self.grid_spacing_mm, rtol=0.05):
            state, _, info = self.grow(hu_box, organ_box, rng)
        else:  # the automaton's step is one voxel: grow on a grid of grid_spacing_mm, read the states back
            factors = spacing / self.grid_spacing_mm
            iso_hu = ndimage.zoom(hu_box, factors, order=1)
            iso_organ = ndimage.zoom(organ_box.astype(np.float32), factors, order=0) > 0.5
            iso_state, _, info = self.grow(iso_hu, iso_organ, rng)
            coords = [np.arange(n) * (m - 1) / max(n - 1, 1) for n, m in zip(hu_box.shape, iso_state.shape)]
            grid = np.meshgrid(*coords, indexing="ij")
            state = ndimage.map_coordinates(iso_state, grid, order=0, mode="nearest").astype(np.int16)
        levels = self.density_levels(hu_box, organ_box)
        state[~organ_box] = 0  # the reference clips the grown tumor to the organ before mapping
        sigma_a = self.texture_sigma_a_mm[rng.randint(len(self.texture_sigma_a_mm))]
        sigma_b = self.texture_sigma_b_mm[rng.randint(len(self.texture_sigma_b_mm))]
        texture = predefined_texture(hu_box.shape, rng, sigma_a / spacing, sigma_b / spacing)
        mapped = self.map_to_hu(hu_box, state, levels, texture, axial_axis(affine), rng)
        tumor_mask = np.zeros(organ.shape, dtype=bool)
        tumor_mask[box] = state != 0  # living and dead (necrotic) tumor cells
        changed = np.zeros(organ.shape, dtype=bool)
        changed[box] = mapped != hu_box
        region = changed & dilate_mm(tumor_mask, affine, 2.0 * float(np.max(spacing))) if tumor_mask.any() else changed
        values = mapped[region[box]].astype(np.float32)
        radius = equivalent_radius_mm(tumor_mask, affine)
        info.update({"family": self.name, "equivalent_radius_mm": radius, "texture_sigma_mm": [sigma_a, sigma_b]})
        return SynthesisResult(tumor_mask, region, values, size_class_of_radius(radius), info)
