"""Intensities of the phantom: Hounsfield units per tissue and contrast phase, texture, partial volume, noise.

Non-contrast values are calibrated to the organ medians of the real scan in ``../shared/data/real_ct`` (a 3 mm
non-contrast abdomen, see its NOTICE.md); portal-venous values follow typical clinical enhancement (liver ~110,
pancreas ~100, aorta ~170, kidney cortex ~175 HU). ``python -m tools data realism`` measures how close they land.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from tools.phantom.anatomy import Tissue

PHASES = ("non_contrast", "portal_venous")

#: (non-contrast HU, portal-venous HU, texture amplitude HU) per tissue.
TISSUE_HU: dict[Tissue, tuple[float, float, float]] = {
    Tissue.AIR: (-1000, -1000, 0),
    Tissue.SUBCUT_FAT: (-104, -104, 7),
    Tissue.MUSCLE: (36, 52, 6),
    Tissue.VISCERAL_FAT: (-98, -96, 8),
    Tissue.LUNG: (-860, -855, 45),
    Tissue.LIVER: (54, 112, 5),
    Tissue.SPLEEN: (44, 118, 4),
    Tissue.KIDNEY_CORTEX: (30, 178, 6),
    Tissue.KIDNEY_MEDULLA: (26, 105, 6),
    Tissue.RENAL_PELVIS: (8, 10, 3),
    Tissue.GI_WALL: (36, 92, 6),
    Tissue.GI_FLUID: (10, 14, 6),
    Tissue.GI_AIR: (-1000, -1000, 0),
    Tissue.FECES: (-90, -90, 160),
    Tissue.GALLBLADDER: (8, 10, 2),
    Tissue.PANCREAS: (40, 104, 7),
    Tissue.PANCREATIC_DUCT: (10, 14, 2),
    Tissue.TUMOR: (26, 56, 8),
    Tissue.TUMOR_NECROSIS: (16, 24, 6),
    Tissue.ARTERY: (44, 172, 3),
    Tissue.IVC: (41, 132, 4),
    Tissue.PORTAL_VEIN: (42, 168, 4),
    Tissue.HEPATIC_VESSEL: (40, 160, 4),
    Tissue.CORTICAL_BONE: (720, 730, 60),
    Tissue.CANCELLOUS_BONE: (185, 195, 35),
    Tissue.DISC: (82, 88, 6),
    Tissue.SPINAL_CANAL: (22, 24, 3),
    Tissue.CARTILAGE: (115, 120, 12),
    Tissue.HEART: (42, 140, 5),
}

#: Tissues that take up iodinated contrast (their enhancement scales with the case's contrast timing).
ENHANCING = {
    Tissue.MUSCLE,
    Tissue.LIVER,
    Tissue.SPLEEN,
    Tissue.KIDNEY_CORTEX,
    Tissue.KIDNEY_MEDULLA,
    Tissue.GI_WALL,
    Tissue.PANCREAS,
    Tissue.TUMOR,
    Tissue.ARTERY,
    Tissue.IVC,
    Tissue.PORTAL_VEIN,
    Tissue.HEPATIC_VESSEL,
    Tissue.HEART,
}

#: Image noise of the real 3 mm scan (HU, measured in the eroded liver minus texture) at its voxel volume (mm^3).
REFERENCE_NOISE_HU = 10.5
REFERENCE_VOXEL_MM3 = 27.0
#: Smallest partial-volume blur (voxels), see ``render``.
PARTIAL_VOLUME_FLOOR_VOX = 0.5
#: Thickness of cortical bone (mm) for its partial-volume HU.
CORTEX_MM = 1.5


def tissue_table(phase: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Per-case look-up tables (mean HU, texture amplitude) indexed by tissue id.

    Each case gets its own organ attenuation (a few HU of biological variation) and, in the portal-venous phase,
    its own contrast timing: enhancement is scaled by a factor drawn per case.
    """
    if phase not in PHASES:
        raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
    n = max(int(t) for t in Tissue) + 1
    means = np.zeros(n, dtype=np.float32)
    amps = np.zeros(n, dtype=np.float32)
    timing = rng.uniform(0.85, 1.15)
    for tissue in Tissue:
        nc, pv, amp = TISSUE_HU[tissue]
        wobble = rng.normal(0.0, 3.0) if tissue not in (Tissue.AIR, Tissue.GI_AIR) else 0.0
        if phase == "non_contrast":
            value = nc + wobble
        else:
            value = nc + wobble + (pv - nc) * (timing if tissue in ENHANCING else 1.0)
        means[int(tissue)] = value
        amps[int(tissue)] = amp
    return means, amps


def noise_sigma(spacing) -> float:
    """Image noise (HU) at a voxel size, scaled from the real scan's.

    Pure photon statistics would scale with 1/sqrt(voxel volume); reconstruction kernels correlate noise, so
    thin-slice noise grows more slowly; exponent 0.3 keeps 0.7 x 0.7 x 1 mm near the 30 HU of clinical scans.
    """
    volume = float(np.prod(spacing))
    return float(REFERENCE_NOISE_HU * (REFERENCE_VOXEL_MM3 / volume) ** 0.3)


def render(
    tissue: np.ndarray,
    spacing,
    phase: str,
    rng: np.random.Generator,
    texture: np.ndarray,
    texture_fine: np.ndarray,
    pancreas_fat_fraction: float,
) -> np.ndarray:
    """Hounsfield units of a tissue map: mean + texture, fatty infiltration, partial volume, scanner noise.

    Returns int16 HU clipped to the 12-bit CT range [-1024, 3071].
    """
    spacing = np.asarray(spacing, dtype=float)
    means, amps = tissue_table(phase, rng)
    # A cortex about 1.5 mm thick fills only part of a coarse voxel: its HU falls toward the marrow's.
    cortex_fill = min(1.0, CORTEX_MM / float(spacing[:2].mean()))
    cortical, marrow = means[int(Tissue.CORTICAL_BONE)], means[int(Tissue.CANCELLOUS_BONE)]
    means[int(Tissue.CORTICAL_BONE)] = marrow + (cortical - marrow) * cortex_fill
    hu = means[tissue]
    hu += amps[tissue] * texture_fine
    # Fatty infiltration of the pancreas (lobulation with fat clefts, common in older patients) and intramuscular
    # fat: a fraction of their voxels moves toward fat, driven by the coarser texture field.
    fat_hu = means[int(Tissue.VISCERAL_FAT)]
    pancreas = tissue == Tissue.PANCREAS
    if pancreas.any():
        cleft = np.clip((texture[pancreas] - (1.0 - 2.5 * pancreas_fat_fraction)) / 1.2, 0.0, 0.85)
        hu[pancreas] = hu[pancreas] * (1 - cleft) + fat_hu * cleft
    muscle = tissue == Tissue.MUSCLE
    if muscle.any():
        streak = np.clip((texture_fine[muscle] - 1.6) / 1.5, 0.0, 0.7)
        hu[muscle] = hu[muscle] * (1 - streak) + fat_hu * streak
    # Visceral fat is never clean: septa, small vessels and lymph nodes below the voxel size pull part of it
    # toward soft tissue.
    visceral = tissue == Tissue.VISCERAL_FAT
    if visceral.any():
        strand = np.clip((texture_fine[visceral] - 0.8) / 2.0, 0.0, 0.6)
        hu[visceral] = hu[visceral] * (1 - strand) + means[int(Tissue.GI_WALL)] * strand
    # Partial volume: a voxel integrates its own extent (box of width = spacing, std spacing/sqrt(12)) and the
    # scanner's point spread (about 0.7 mm in-plane, 0.4 of the slice thickness along z).
    # Shapes are sampled at voxel centres, so an edge falls on a voxel boundary; a real edge sits anywhere inside
    # a voxel and mixes it. A floor of half a voxel spreads the edge over the neighbours the way that mixing does.
    psf_mm = np.array([0.7, 0.7, 0.4 * spacing[2]])
    sigma_vox = np.maximum(np.sqrt(psf_mm**2 + (spacing / np.sqrt(12.0)) ** 2) / spacing, PARTIAL_VOLUME_FLOOR_VOX)
    hu = ndi.gaussian_filter(hu, sigma=sigma_vox, mode="nearest", truncate=3.0)
    # Scanner noise: white noise correlated by the reconstruction kernel, scaled to the voxel size's sigma.
    noise = rng.standard_normal(tissue.shape, dtype=np.float32)
    noise = ndi.gaussian_filter(noise, sigma=(0.6, 0.6, 0.35), mode="wrap", truncate=3.0)
    noise *= noise_sigma(spacing) / max(float(noise.std()), 1e-6)
    inside = tissue != Tissue.AIR
    hu[inside] += noise[inside]
    hu[~inside] += 0.3 * noise[~inside]  # air outside the body is nearly noise-free after the scanner's clipping
    return np.clip(np.rint(hu), -1024, 3071).astype(np.int16)
