"""Procedural abdominal anatomy: a tissue map (for intensities) and an organ label map (for evaluation).

The layout is written in a reference frame of a supine adult (RAS world mm, origin at the centre of the vertebral
bodies, ``z = 0`` at the L1/L2 disc) and stretched per case to the sampled body size. Structures are painted in an
order where the later one wins, which is how overlaps between neighbouring organs are settled: the pancreas is
painted after the bowel it touches, vessels after the pancreas they cross, bone last.

Organ label ids follow TotalSegmentator's ``total`` task where it has the structure (so ``../shared`` real labels
and phantom labels compare one to one); ids >= 200 are this project's own (tissues TotalSegmentator keeps in a
separate task, and the tumor).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum

import numpy as np

from tools.phantom.shapes import (
    Grid,
    catmull_rom,
    ellipsoid_box,
    ellipsoid_radius,
    resample_radii,
    rotation,
    superellipse_radius,
    tube_box,
    tube_distance,
)


class Tissue(IntEnum):
    """Tissue classes: each has its own HU per contrast phase and texture (see ``appearance.py``)."""

    AIR = 0
    SUBCUT_FAT = 1
    MUSCLE = 2
    VISCERAL_FAT = 3
    LUNG = 4
    LIVER = 5
    SPLEEN = 6
    KIDNEY_CORTEX = 7
    KIDNEY_MEDULLA = 8
    RENAL_PELVIS = 9
    GI_WALL = 10
    GI_FLUID = 11
    GI_AIR = 12
    FECES = 13
    GALLBLADDER = 14
    PANCREAS = 15
    PANCREATIC_DUCT = 16
    TUMOR = 17
    TUMOR_NECROSIS = 18
    ARTERY = 19
    IVC = 20
    PORTAL_VEIN = 21
    HEPATIC_VESSEL = 22
    CORTICAL_BONE = 23
    CANCELLOUS_BONE = 24
    DISC = 25
    SPINAL_CANAL = 26
    CARTILAGE = 27
    HEART = 28


#: Organ label ids of the full organ map (TotalSegmentator ``total`` ids where they exist, own ids >= 200).
ORGAN_LABELS: dict[str, int] = {
    "spleen": 1,
    "kidney_right": 2,
    "kidney_left": 3,
    "gallbladder": 4,
    "liver": 5,
    "stomach": 6,
    "pancreas": 7,
    "lung_lower_lobe_left": 11,
    "lung_lower_lobe_right": 14,
    "small_bowel": 18,
    "duodenum": 19,
    "colon": 20,
    "vertebrae_L5": 27,
    "vertebrae_L4": 28,
    "vertebrae_L3": 29,
    "vertebrae_L2": 30,
    "vertebrae_L1": 31,
    "vertebrae_T12": 32,
    "vertebrae_T11": 33,
    "vertebrae_T10": 34,
    "vertebrae_T9": 35,
    "vertebrae_T8": 36,
    "vertebrae_T7": 37,
    "heart": 51,
    "aorta": 52,
    "inferior_vena_cava": 63,
    "portal_vein_and_splenic_vein": 64,
    "iliac_artery_left": 65,
    "iliac_artery_right": 66,
    "spinal_cord": 79,
    "autochthon_left": 86,
    "autochthon_right": 87,
    "iliopsoas_left": 88,
    "iliopsoas_right": 89,
    **{f"rib_left_{k}": 92 + k - 1 for k in range(7, 13)},
    **{f"rib_right_{k}": 104 + k - 1 for k in range(7, 13)},
    "costal_cartilages": 117,
    "subcutaneous_fat": 200,
    "skeletal_muscle": 201,
    "visceral_fat": 202,
    "pancreatic_tumor": 203,
    "superior_mesenteric_artery": 204,
    "intervertebral_disc": 205,
}

#: Organ ids that make up each tissue mask of TotalSegmentator's ``tissue_types`` task (for realism checks).
SKELETAL_MUSCLE_IDS = (ORGAN_LABELS["skeletal_muscle"], 86, 87, 88, 89)
SUBCUTANEOUS_FAT_IDS = (ORGAN_LABELS["subcutaneous_fat"],)

# Vertebral levels from caudal to cranial; the L1/L2 disc sits at z = 0 of the reference frame.
_VERTEBRAE = ("L5", "L4", "L3", "L2", "L1", "T12", "T11", "T10", "T9", "T8", "T7")
_LEVEL_PERIOD_MM = 36.0
_DISC_MM = 7.0


@dataclass
class Anatomy:
    """What :func:`build_anatomy` made: the two maps, plus facts the dataset records and tests check."""

    tissue: np.ndarray
    organs: np.ndarray
    body: np.ndarray
    info: dict = field(default_factory=dict)


class _Canvas:
    """Tissue and organ maps painted together; a structure is a boolean mask over a box."""

    def __init__(self, grid: Grid):
        self.grid = grid
        self.tissue = np.zeros(grid.shape, dtype=np.uint8)
        self.organs = np.zeros(grid.shape, dtype=np.uint8)

    def paint(self, box, mask, tissue, organ: int | None, only=None):
        """Paint ``tissue`` (an id or an array over the box) and ``organ`` where ``mask`` holds.

        ``only`` restricts painting to voxels whose current tissue is one of the given ids.
        """
        if box is None:
            return
        if only is not None:
            mask = mask & np.isin(self.tissue[box], np.asarray(only, dtype=np.uint8))
        if np.ndim(tissue):
            self.tissue[box][mask] = np.broadcast_to(tissue, mask.shape)[mask]
        else:
            self.tissue[box][mask] = int(tissue)
        if organ is not None:
            self.organs[box][mask] = int(organ)


def _u(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(rng.uniform(lo, hi))


def sample_body(rng: np.random.Generator) -> dict:
    """Per-case body habitus: outline, fat and muscle thickness, organ scale factors (all in mm)."""
    fat = _u(rng, 0.1, 0.9)  # one habitus factor drives all fat layers, as in real patients
    return {
        "half_width": _u(rng, 140, 170) + 25 * fat,
        "anterior": _u(rng, 120, 140) + 40 * fat,
        "posterior": _u(rng, 68, 78) + 15 * fat,
        "power": _u(rng, 2.1, 2.5),
        "power_post": _u(rng, 2.8, 3.6),
        "fat_lateral": 5 + 22 * fat * _u(rng, 0.7, 1.1),
        "fat_anterior": 6 + 28 * fat * _u(rng, 0.7, 1.2),
        "fat_posterior": 5 + 18 * fat * _u(rng, 0.7, 1.1),
        "muscle": _u(rng, 7, 13),
        "organ_scale": _u(rng, 0.9, 1.1),
        "z_shift": _u(rng, -12, 12),
        "visceral_fat": fat,
    }


def build_anatomy(
    grid: Grid,
    rng: np.random.Generator,
    body: dict,
    shape_noise: np.ndarray,
    texture: np.ndarray,
    tumor_rng: np.random.Generator | None = None,
    tumor_radius_mm: float | None = None,
) -> Anatomy:
    """Paint one case's anatomy on ``grid``.

    ``shape_noise`` (about 15 mm correlation) roughens organ surfaces, ``texture`` (about 5 mm) lobulates the
    pancreas and places gas in the bowel. A tumor of equivalent radius ``tumor_radius_mm`` is added to the pancreas
    when both ``tumor_rng`` and the radius are given.
    """
    cv = _Canvas(grid)
    info: dict = {}
    s = body["organ_scale"]
    z0 = body["z_shift"]

    # ---- body wall: skin outline, subcutaneous fat, muscle wall, abdominal cavity -------------------------------
    cy = (body["anterior"] - body["posterior"]) / 2.0
    a = body["half_width"]
    b_ant = (body["anterior"] + body["posterior"]) / 2.0
    b_post = b_ant
    taper = 1.0 + 0.0004 * np.clip(grid.zs - z0, -150, 150)  # the lower thorax is a little wider than the belly
    outline = superellipse_radius(grid, 0.0, cy, a, b_ant, b_post, body["power"], body["power_post"], taper)
    inside_body = outline < 1.0
    full = (slice(None),) * 3
    cv.paint(full, inside_body, Tissue.SUBCUT_FAT, ORGAN_LABELS["subcutaneous_fat"])
    fat_a, fat_ant, fat_post = body["fat_lateral"], body["fat_anterior"], body["fat_posterior"]
    inner_cy = cy + (fat_post - fat_ant) / 2.0
    inner_b = b_ant - (fat_ant + fat_post) / 2.0
    inner = superellipse_radius(
        grid, 0.0, inner_cy, a - fat_a, inner_b, inner_b, body["power"], body["power_post"], taper
    )
    inside_muscle = (inner < 1.0) & inside_body
    cv.paint(full, inside_muscle, Tissue.MUSCLE, ORGAN_LABELS["skeletal_muscle"])
    m = body["muscle"]
    cav_a = a - fat_a - m
    cav_b = inner_b - m
    cavity_r = superellipse_radius(grid, 0.0, inner_cy, cav_a, cav_b, cav_b, body["power"], body["power_post"], taper)
    cavity = (cavity_r < 1.0) & inside_muscle
    cv.paint(full, cavity, Tissue.VISCERAL_FAT, ORGAN_LABELS["visceral_fat"])
    info["body"] = {"half_width_mm": a, "ap_mm": body["anterior"] + body["posterior"], "cavity_half_width_mm": cav_a}

    # Reference-frame layout -> this case: lateral positions follow the cavity width, anterior ones its depth.
    sx = cav_a / 142.0
    sy_ant = (inner_cy + cav_b) / 133.0

    def P(px, py, pz):
        return np.array([px * sx, py * (sy_ant if py > 0 else 1.0), pz * s + z0])

    def jitter(p, sd=5.0):
        return p + rng.normal(0, sd, 3)

    def noisy(r, amp=0.08, box=None):
        return r - amp * shape_noise[box]

    def in_cavity(box):
        return cavity[box]

    # ---- diaphragm, lungs and heart ---------------------------------------------------------------------------
    dome_r = P(0, 0, 112)[2] + _u(rng, -8, 8)
    dome_l = dome_r - _u(rng, 4, 14)
    curvature = _u(rng, 0.005, 0.007)

    def diaphragm(xx, yy):
        top = np.where(xx > 0, dome_r, dome_l)
        return top - curvature * ((np.abs(xx) - 65 * sx) ** 2 + (yy - 35) ** 2)

    lo = np.array([grid.xs[0], grid.ys[0], min(dome_l, dome_r) - 90])
    hi = np.array([grid.xs[-1], grid.ys[-1], grid.zs[-1] + 1])
    box = grid.box(lo, hi)
    if box is not None:
        bx, by, bz = grid.coords(box)
        above = (bz > diaphragm(bx, by)) & in_cavity(box)
        heart_c = P(-15, 70, 150)
        heart = ellipsoid_radius(grid, box, heart_c, np.array([62, 52, 55]) * s) < 1.0
        mediastinum = (np.abs(bx) < 24) & (by > -30)
        cv.paint(box, above & heart, Tissue.HEART, ORGAN_LABELS["heart"])
        lung = above & ~heart & ~mediastinum
        cv.paint(box, lung & (bx < 0), Tissue.LUNG, ORGAN_LABELS["lung_lower_lobe_left"])
        cv.paint(box, lung & (bx >= 0), Tissue.LUNG, ORGAN_LABELS["lung_lower_lobe_right"])

    def below_diaphragm(box):
        bx, by, bz = grid.coords(box)
        return bz < diaphragm(bx, by) - 2

    abdominal = (Tissue.VISCERAL_FAT,)

    # ---- liver (right lobe + left lobe), with intrahepatic vessels -----------------------------------------
    liver_parts = [
        (jitter(P(72, 36, 58)), np.array([76, 84, 82]) * s * rng.uniform(0.92, 1.08, 3)),
        (jitter(P(-18, 84, 84)), np.array([54, 36, 36]) * s * rng.uniform(0.85, 1.15, 3)),
    ]
    for center, semi in liver_parts:
        box = grid.box(*ellipsoid_box(center, semi))
        if box is None:
            continue
        r = noisy(ellipsoid_radius(grid, box, center, semi), 0.06, box)
        cv.paint(box, (r < 1.0) & in_cavity(box) & below_diaphragm(box), Tissue.LIVER, ORGAN_LABELS["liver"], abdominal)

    # ---- spleen -------------------------------------------------------------------------------------------
    spleen_c = jitter(P(-88, 8, 62))
    spleen_semi = np.array([24, 58, 50]) * s * rng.uniform(0.85, 1.15, 3)
    spleen_rot = rotation(yaw_deg=_u(rng, 25, 45))
    box = grid.box(*ellipsoid_box(spleen_c, spleen_semi, spleen_rot))
    if box is not None:
        r = noisy(ellipsoid_radius(grid, box, spleen_c, spleen_semi, spleen_rot), 0.06, box)
        cv.paint(
            box,
            (r < 1.0) & in_cavity(box) & below_diaphragm(box),
            Tissue.SPLEEN,
            ORGAN_LABELS["spleen"],
            abdominal + (Tissue.LIVER,),
        )

    # ---- kidneys: cortex, medulla, renal sinus with pelvis ------------------------------------------------
    for side, sign, name, zc in (("right", 1, "kidney_right", -32), ("left", -1, "kidney_left", -18)):
        center = jitter(P(sign * 74, 10, zc))
        semi = np.array([27, 22, 54]) * s * rng.uniform(0.9, 1.1, 3)
        rot = rotation(yaw_deg=-sign * _u(rng, 20, 40), pitch_deg=sign * _u(rng, 5, 18))
        box = grid.box(*ellipsoid_box(center, semi, rot))
        if box is None:
            continue
        r = noisy(ellipsoid_radius(grid, box, center, semi, rot), 0.03, box)
        kidney = (r < 1.0) & in_cavity(box)
        cortex_depth = _u(rng, 0.68, 0.76)
        cv.paint(box, kidney, Tissue.KIDNEY_CORTEX, ORGAN_LABELS[name], abdominal + (Tissue.LIVER, Tissue.SPLEEN))
        cv.paint(box, kidney & (r < cortex_depth), Tissue.KIDNEY_MEDULLA, ORGAN_LABELS[name])
        hilum = center + np.array([-sign * semi[0] * 0.7, 6, 0])  # the sinus opens medially and a little forward
        sinus = ellipsoid_radius(grid, box, hilum, semi * np.array([0.55, 0.45, 0.55]), rot) < 1.0
        cv.paint(box, sinus & kidney, Tissue.VISCERAL_FAT, ORGAN_LABELS["visceral_fat"])
        pelvis = ellipsoid_radius(grid, box, hilum, semi * np.array([0.3, 0.25, 0.3]), rot) < 1.0
        cv.paint(box, pelvis & kidney, Tissue.RENAL_PELVIS, ORGAN_LABELS[name])
        info[f"kidney_{side}_center_mm"] = center.round(1).tolist()

    # ---- bowel: colon frame, small bowel loops (wall + fluid / gas / faeces) ------------------------------
    gi_under = abdominal + (Tissue.LIVER, Tissue.SPLEEN)

    def paint_gut(curve_ctrl, radius, organ, content, wall_mm=2.5, gas_threshold=1.0):
        curve = catmull_rom(np.asarray(curve_ctrl), 6)
        radii = np.full(len(curve), radius)
        box = grid.box(*tube_box(curve, radii))
        if box is None:
            return
        norm, _, dist = tube_distance(grid, box, curve, radii)
        r = norm - 0.05 * shape_noise[box]
        gut = (r < 1.0) & in_cavity(box)
        cv.paint(box, gut, Tissue.GI_WALL, organ, gi_under)
        lumen = gut & (dist < radius - wall_mm)
        gas = texture[box] > gas_threshold
        cv.paint(box, lumen, np.where(gas, Tissue.GI_AIR, content).astype(np.uint8), organ)

    colon_ctrl = [
        P(104, 58, -160),
        P(102, 60, -40),
        P(84, 98, -18),
        P(30, 106, -48),
        P(-30, 104, -44),
        P(-88, 86, 28),
        P(-104, 46, -8),
        P(-98, 40, -160),
    ]
    colon_ctrl = [jitter(p, 6) for p in colon_ctrl]
    paint_gut(colon_ctrl, _u(rng, 17, 24) * s, ORGAN_LABELS["colon"], Tissue.FECES, 2.5, _u(rng, 0.0, 0.6))
    # small bowel: jejunum in the left upper quadrant (up to the level of the pancreas body), ileum lower down
    n_loops = int(rng.integers(8, 13))
    for loop in range(n_loops):
        jejunum = loop < n_loops // 3
        x_range = (-85, -20) if jejunum else (-80, 80)
        z_range = (-60, 10) if jejunum else (-160, -30)
        start = np.array([_u(rng, *x_range) * sx, _u(rng, 30, 105) * sy_ant, z0 + _u(rng, *z_range)])
        z_top = z0 + (15 if jejunum else -25)
        pts = [start]
        direction = rng.normal(0, 1, 3)
        for _ in range(8):
            direction = 0.6 * direction + 0.4 * rng.normal(0, 1, 3)
            direction /= np.linalg.norm(direction) + 1e-9
            nxt = pts[-1] + 26 * direction
            nxt[0] = np.clip(nxt[0], -85 * sx, 85 * sx)
            nxt[1] = np.clip(nxt[1], 25, 110 * sy_ant)
            nxt[2] = np.clip(nxt[2], z0 - 170, z_top)
            pts.append(nxt)
        paint_gut(pts, _u(rng, 11, 15), ORGAN_LABELS["small_bowel"], Tissue.GI_FLUID, 2.0, _u(rng, 1.0, 1.8))

    # ---- stomach: fundus to pylorus, gas in the non-dependent (anterior) part ------------------------------
    stomach_ctrl = [jitter(p, 6) for p in (P(-52, 28, 112), P(-50, 72, 76), P(-12, 104, 44), P(22, 92, 32))]
    curve = catmull_rom(np.asarray(stomach_ctrl), 6)
    radii = resample_radii(np.array([42, 36, 24, 11]) * s * _u(rng, 0.8, 1.15), len(curve))
    box = grid.box(*tube_box(curve, radii))
    if box is not None:
        norm, _, dist = tube_distance(grid, box, curve, radii)
        r = norm - 0.05 * shape_noise[box]
        stomach = (r < 1.0) & in_cavity(box) & below_diaphragm(box)
        cv.paint(box, stomach, Tissue.GI_WALL, ORGAN_LABELS["stomach"], gi_under)
        lumen = stomach & (r < 1.0 - 4.0 / np.maximum(radii.min(), 8.0))
        gas_level = float(np.mean([p[1] for p in stomach_ctrl[:2]])) + _u(rng, 5, 30)
        _, by, _ = grid.coords(box)
        content = np.where(np.broadcast_to(by > gas_level, lumen.shape), Tissue.GI_AIR, Tissue.GI_FLUID)
        cv.paint(box, lumen, content.astype(np.uint8), ORGAN_LABELS["stomach"])

    # ---- gallbladder (absent after cholecystectomy in ~15 %) ---------------------------------------------
    if rng.uniform() < 0.85:
        gb_c = jitter(P(48, 86, 6), 6)
        gb_semi = np.array([14, 17, 34]) * rng.uniform(0.8, 1.2, 3)
        gb_rot = rotation(pitch_deg=_u(rng, 15, 35), yaw_deg=_u(rng, -20, 20))
        box = grid.box(*ellipsoid_box(gb_c, gb_semi, gb_rot))
        if box is not None:
            r = ellipsoid_radius(grid, box, gb_c, gb_semi, gb_rot)
            cv.paint(
                box,
                (r < 1.0) & in_cavity(box),
                Tissue.GALLBLADDER,
                ORGAN_LABELS["gallbladder"],
                abdominal + (Tissue.LIVER, Tissue.GI_WALL, Tissue.GI_FLUID),
            )

    # ---- pancreas: uncinate, head by the duodenum, neck, body over the vessels, tail toward the spleen ---------
    pan_ctrl = np.array(
        [P(16, 36, -28), P(36, 52, -14), P(10, 62, -2), P(-28, 62, 8), P(-66, 46, 20), P(-84 * 1.0, 30, 28)]
    )
    pan_ctrl = pan_ctrl + rng.normal(0, 4.0, pan_ctrl.shape)
    pan_ctrl[-1] = 0.5 * pan_ctrl[-1] + 0.5 * (spleen_c + np.array([20, 6, -20]))  # the tail reaches the hilum
    pan_scale = s * _u(rng, 0.8, 1.15)
    pan_radii_ctrl = np.array([9, 15, 8, 10, 9.5, 6.5]) * pan_scale
    pan_curve = catmull_rom(pan_ctrl, 5)
    pan_radii = resample_radii(pan_radii_ctrl, len(pan_curve))
    pbox = grid.box(*tube_box(pan_curve, pan_radii, 1.6))
    pancreas_mask = None
    if pbox is not None:
        norm, arc, dist = tube_distance(grid, pbox, pan_curve, pan_radii, scale=(1.0, 0.85, 1.0))
        r = norm - 0.09 * shape_noise[pbox] - 0.07 * texture[pbox]
        pancreas_mask = (r < 1.0) & in_cavity(pbox)
        cv.paint(pbox, pancreas_mask, Tissue.PANCREAS, ORGAN_LABELS["pancreas"], gi_under + (Tissue.GI_WALL,))
        pancreas_mask = cv.tissue[pbox] == Tissue.PANCREAS
        info["pancreas_voxels"] = int(pancreas_mask.sum())
        info["pancreas_curve_mm"] = pan_curve[:: max(1, len(pan_curve) // 8)].round(1).tolist()

    # ---- duodenum: a C-loop around the head ---------------------------------------------------------------
    duo_ctrl = [
        P(24, 92, 32),
        P(54, 76, 22),
        P(60, 56, -4),
        P(56, 50, -38),
        P(24, 42, -50),
        P(-8, 40, -50),
        P(-24, 52, -32),
    ]
    duo_ctrl = [jitter(p, 4) for p in duo_ctrl]
    paint_gut(duo_ctrl, _u(rng, 9, 12), ORGAN_LABELS["duodenum"], Tissue.GI_FLUID, 2.0, _u(rng, 1.2, 2.0))

    # ---- pancreatic tumor (hypo-attenuating, may bulge into the peripancreatic fat) ---------------------------
    tumor_head = False
    if tumor_rng is not None and tumor_radius_mm is not None and pbox is not None and pancreas_mask.any():
        tumor_info, tumor_head = _paint_tumor(
            cv, grid, pbox, pancreas_mask, pan_curve, pan_radii, tumor_rng, float(tumor_radius_mm), shape_noise
        )
        info["tumors"] = [tumor_info] if tumor_info else []
    else:
        info["tumors"] = []

    # ---- main pancreatic duct (dilated upstream of a tumor in the head: the "double duct" sign) -------------
    if pbox is not None:
        duct_radius = _u(rng, 0.9, 1.4)
        duct_radii = np.where(
            np.linspace(0, 1, len(pan_curve)) > 0.35, _u(rng, 2.5, 3.5) if tumor_head else duct_radius, duct_radius
        )
        norm, arc, _ = tube_distance(grid, pbox, pan_curve, duct_radii)
        cv.paint(
            pbox,
            (norm < 1.0) & (arc > 0.12) & (arc < 0.94),
            Tissue.PANCREATIC_DUCT,
            ORGAN_LABELS["pancreas"],
            (Tissue.PANCREAS,),
        )

    # ---- vessels ------------------------------------------------------------------------------------------
    def paint_vessel(ctrl, radii_ctrl, tissue, organ, only=None, scale=(1.0, 1.0, 1.0)):
        curve = catmull_rom(np.asarray(ctrl, dtype=float), 5)
        radii = resample_radii(radii_ctrl, len(curve))
        box = grid.box(*tube_box(curve, radii))
        if box is None:
            return
        norm, _, _ = tube_distance(grid, box, curve, radii, scale)
        cv.paint(box, norm < 1.0, tissue, organ, only)

    soft = tuple(t for t in Tissue if t not in (Tissue.AIR, Tissue.SUBCUT_FAT, Tissue.CORTICAL_BONE))
    top, bottom = grid.zs[-1] + 20, grid.zs[0] - 20
    aorta_r = _u(rng, 9, 13)
    bif_z = P(0, 0, -96)[2]
    ao_x = _u(rng, -18, -8)
    paint_vessel(
        [(ao_x, 32, top), (ao_x, 30, P(0, 0, 0)[2]), (ao_x + 2, 33, bif_z)],
        [aorta_r, aorta_r, aorta_r],
        Tissue.ARTERY,
        ORGAN_LABELS["aorta"],
        soft,
    )
    for sign, name in ((-1, "iliac_artery_left"), (1, "iliac_artery_right")):
        paint_vessel(
            [(ao_x + 2, 33, bif_z), (ao_x + sign * 30, 38, bif_z - 50), (sign * 55 * sx, 40, bottom)],
            [aorta_r * 0.7, aorta_r * 0.65, aorta_r * 0.6],
            Tissue.ARTERY,
            ORGAN_LABELS[name],
            soft,
        )
    ivc_r = _u(rng, 9, 12)
    paint_vessel(
        [(24 * sx, 28, bottom), (25 * sx, 30, P(0, 0, 40)[2]), (30 * sx, 42, top)],
        [ivc_r] * 3,
        Tissue.IVC,
        ORGAN_LABELS["inferior_vena_cava"],
        soft,
        scale=(1.0, 0.75, 1.0),
    )
    confluence = P(6, 50, -2)
    hepatic_hilum = jitter(P(42, 58, 46), 3)
    paint_vessel(
        [jitter(P(-82, 32, 28), 3), P(-30, 50, 8), confluence],
        [4.5, 5, 5.5],
        Tissue.PORTAL_VEIN,
        ORGAN_LABELS["portal_vein_and_splenic_vein"],
        soft,
    )
    paint_vessel(
        [confluence, P(24, 54, 24), hepatic_hilum],
        [7, 7, 6],
        Tissue.PORTAL_VEIN,
        ORGAN_LABELS["portal_vein_and_splenic_vein"],
        soft,
    )
    paint_vessel(
        [P(12, 60, -150), P(9, 58, -60), confluence],
        [5, 5, 5.5],
        Tissue.PORTAL_VEIN,
        ORGAN_LABELS["portal_vein_and_splenic_vein"],
        soft,
    )
    paint_vessel(
        [(ao_x, 40, P(0, 0, 8)[2]), P(-6, 58, -18), P(-4, 62, -150)],
        [4, 3.5, 3],
        Tissue.ARTERY,
        ORGAN_LABELS["superior_mesenteric_artery"],
        soft,
    )
    # mesenteric vessels fanning out from the SMA/SMV into the mesenteric fat: they make the fat "dirty" like real
    # fat, which is never a clean -100 HU (vessels, lymph nodes and fascia at partial volume)
    for _ in range(int(rng.integers(14, 22))):
        root = P(_u(rng, -6, 10), _u(rng, 56, 62), _u(rng, -140, -20))
        tip = root + np.array([_u(rng, -90, 90) * sx, _u(rng, -10, 50), _u(rng, -40, 20)])
        mid = 0.5 * (root + tip) + rng.normal(0, 10, 3)
        tissue = Tissue.PORTAL_VEIN if rng.uniform() < 0.5 else Tissue.ARTERY
        paint_vessel([root, mid, tip], [_u(rng, 1.8, 3.0), 1.8, 1.2], tissue, None, (Tissue.VISCERAL_FAT,))
    # intrahepatic portal branches and hepatic veins, only inside the liver
    for _ in range(5):
        tip = hepatic_hilum + np.array([_u(rng, -10, 80), _u(rng, -50, 40), _u(rng, -10, 60)])
        mid = 0.5 * (hepatic_hilum + tip) + rng.normal(0, 8, 3)
        paint_vessel(
            [hepatic_hilum, mid, tip],
            [_u(rng, 4, 6), 3, 1.8],
            Tissue.HEPATIC_VESSEL,
            ORGAN_LABELS["liver"],
            (Tissue.LIVER,),
        )
    ivc_top = np.array([30 * sx, 42, P(0, 0, 98)[2]])
    for tip_dir in ((70, -10, 10), (20, 60, 5), (-50, 50, 5)):
        tip = ivc_top + np.array(tip_dir) * s + rng.normal(0, 6, 3)
        paint_vessel(
            [ivc_top, 0.5 * (ivc_top + tip), tip],
            [6, 4, 2],
            Tissue.HEPATIC_VESSEL,
            ORGAN_LABELS["liver"],
            (Tissue.LIVER,),
        )

    # ---- back muscles and psoas ---------------------------------------------------------------------------
    mus_under = (Tissue.SUBCUT_FAT, Tissue.MUSCLE, Tissue.VISCERAL_FAT)
    for sign, name in ((-1, "autochthon_left"), (1, "autochthon_right")):
        c = np.array([sign * _u(rng, 28, 36), -50, 0.0])
        semi = np.array([_u(rng, 20, 28), _u(rng, 20, 26), 1e6])
        box = grid.box(
            c - np.array([semi[0] * 1.2, semi[1] * 1.2, 1e9]), c + np.array([semi[0] * 1.2, semi[1] * 1.2, 1e9])
        )
        if box is not None:
            bx, by, _ = grid.coords(box)
            r = np.sqrt(((bx - c[0]) / semi[0]) ** 2 + ((by - c[1]) / semi[1]) ** 2) - 0.05 * shape_noise[box]
            cv.paint(box, (r < 1.0) & inside_muscle[box], Tissue.MUSCLE, ORGAN_LABELS[name], mus_under)
    psoas_top = P(0, 0, 8)[2]
    for sign, name in ((-1, "iliopsoas_left"), (1, "iliopsoas_right")):
        ctrl = [(sign * 26, 6, psoas_top), (sign * 38, 8, psoas_top - 60), (sign * 50, 16, psoas_top - 150)]
        paint_vessel(
            ctrl,
            [3, 16 * s, 24 * s],
            Tissue.MUSCLE,
            ORGAN_LABELS[name],
            (Tissue.VISCERAL_FAT, Tissue.MUSCLE, Tissue.GI_WALL, Tissue.GI_FLUID, Tissue.FECES),
        )

    # ---- spine: vertebral bodies with cortex, discs, canal with cord, posterior elements --------------------
    _paint_spine(cv, grid, rng, z0, s)

    # ---- ribs and costal cartilages in the body wall -----------------------------------------------------------
    rib_shell = inside_muscle & (cavity_r > 0.7)
    _paint_ribs(cv, grid, rng, z0, s, inner_cy, cav_a, cav_b, body, rib_shell)

    cv.organs[~inside_body] = 0
    cv.tissue[~inside_body] = Tissue.AIR
    info["tumor_in_head"] = bool(tumor_head)
    return Anatomy(tissue=cv.tissue, organs=cv.organs, body=inside_body, info=info)


def _paint_tumor(cv, grid, pbox, pancreas_mask, curve, radii, rng, radius_mm, shape_noise):
    """Add one tumor of equivalent radius ``radius_mm`` to the pancreas; return its facts and whether in the head.

    Location follows the clinical distribution of pancreatic ductal adenocarcinoma (head about 65 %, body 20 %,
    tail 15 %); the shape is an irregular ellipsoid that may extend a little into the peripancreatic fat but never
    into vessels, bowel or other organs.
    """
    region = rng.choice(["head", "body", "tail"], p=[0.65, 0.2, 0.15])
    arc_range = {"head": (0.05, 0.35), "body": (0.4, 0.7), "tail": (0.7, 0.95)}[region]
    arc = rng.uniform(*arc_range)
    idx = int(round(arc * (len(curve) - 1)))
    local_r = float(radii[idx])
    center = curve[idx] + rng.normal(0, 0.3 * local_r, 3)
    elong = rng.uniform(0.75, 1.3, 3)
    elong /= np.prod(elong) ** (1 / 3)
    semi = radius_mm * elong
    rot = rotation(_u(rng, 0, 180), _u(rng, -30, 30), _u(rng, -30, 30))
    box = grid.box(*ellipsoid_box(center, semi, rot, margin=1.3))
    if box is None:
        return None, False
    r = ellipsoid_radius(grid, box, center, semi, rot) - 0.12 * shape_noise[box]
    _, _, dist = tube_distance(grid, box, curve, radii, scale=(1.0, 0.85, 1.0), reach=4.0)
    allowed_tissue = np.isin(cv.tissue[box], [Tissue.PANCREAS, Tissue.VISCERAL_FAT])
    near_pancreas = dist < radii.max() + 0.5 * radius_mm
    tumor = (r < 1.0) & allowed_tissue & near_pancreas
    if not tumor.any():
        # a tiny tumor can fall between voxels: keep at least the voxel at its centre inside the pancreas
        ijk = tuple(int(np.argmin(np.abs(ax - c))) for ax, c in zip((grid.xs, grid.ys, grid.zs), center))
        if cv.tissue[ijk] != Tissue.PANCREAS:
            return None, False
        tumor = np.zeros(cv.tissue[box].shape, dtype=bool)
        local = tuple(i - sl.start for i, sl in zip(ijk, box))
        if all(0 <= v < n for v, n in zip(local, tumor.shape)):
            tumor[local] = True
    cv.paint(box, tumor, Tissue.TUMOR, ORGAN_LABELS["pancreatic_tumor"])
    if radius_mm > 14:
        cv.paint(box, tumor & (r < 0.45), Tissue.TUMOR_NECROSIS, ORGAN_LABELS["pancreatic_tumor"])
    voxel_mm3 = float(np.prod(grid.spacing))
    volume = float(tumor.sum()) * voxel_mm3
    facts = {
        "region": str(region),
        "center_mm": np.asarray(center).round(1).tolist(),
        "target_radius_mm": round(radius_mm, 2),
        "volume_mm3": round(volume, 1),
        "equivalent_radius_mm": round((3 * volume / (4 * np.pi)) ** (1 / 3), 2),
    }
    return facts, region == "head"


def _paint_spine(cv: _Canvas, grid: Grid, rng, z0: float, s: float) -> None:
    """Vertebral bodies (cancellous core, cortical shell), discs, canal with cord, arches, spinous/transverse.

    The cortex is a shell at least one voxel thick; its HU is lowered for coarse voxels in ``appearance.py``
    (partial volume of a 1.5 mm cortex).
    """
    body_semi = np.array([_u(rng, 21, 25), _u(rng, 16, 19)])
    period = _LEVEL_PERIOD_MM * s
    shell = max(1.5, 0.9 * float(grid.spacing[:2].min()))
    for k, level in enumerate(_VERTEBRAE):
        zc = z0 + (k - 3.5) * period  # L2 centre half a level below the L1/L2 disc at z0
        half = (period - _DISC_MM * s) / 2.0
        organ = ORGAN_LABELS[f"vertebrae_{level}"]
        lumbar = level.startswith("L")
        box = grid.box(np.array([-60, -80, zc - period / 2]), np.array([60, body_semi[1] + 4, zc + period / 2]))
        if box is None:
            continue
        bx, by, bz = grid.coords(box)
        shape = tuple(sl.stop - sl.start for sl in box)
        dz = np.broadcast_to(bz - zc, shape)
        in_level = np.abs(dz) <= half
        r_body = np.broadcast_to(np.sqrt((bx / body_semi[0]) ** 2 + (by / body_semi[1]) ** 2), shape)
        vb = r_body < 1.0
        cv.paint(box, vb & ~in_level, Tissue.DISC, ORGAN_LABELS["intervertebral_disc"])
        cv.paint(box, vb & in_level, Tissue.CORTICAL_BONE, organ)
        core = (r_body < 1.0 - shell / body_semi.min()) & (np.abs(dz) < half - shell)
        cv.paint(box, core, Tissue.CANCELLOUS_BONE, organ)
        # neural arch (pedicles + laminae) around the canal, spinous process backwards, transverse processes
        canal_c = -body_semi[1] - 10.0
        r_canal = np.broadcast_to(np.sqrt((bx / 9.5) ** 2 + ((by - canal_c) / 8.0) ** 2), shape)
        yy = np.broadcast_to(by, shape)
        xx = np.broadcast_to(bx, shape)
        arch = (r_canal < 1.75) & (r_canal >= 1.0) & (yy < -body_semi[1] + 3) & (np.abs(dz) < half * 0.8)
        spinous_len = 30.0 if lumbar else 24.0
        spinous = (np.abs(xx) < 3.5) & (yy < canal_c - 10) & (yy > canal_c - 10 - spinous_len)
        spinous &= np.abs(dz + 0.25 * (canal_c - 10 - yy)) < half * 0.45  # slopes caudally, like the real ones
        reach = 36.0 if lumbar else 28.0
        transverse = (np.abs(xx) < reach) & (np.abs(yy - canal_c - 3) < 4.0) & (np.abs(dz) < half * 0.35)
        posterior = arch | spinous | transverse
        cv.paint(box, posterior, Tissue.CORTICAL_BONE, organ)
        cv.paint(
            box,
            posterior & (r_canal >= 1.0 + shell / 9.0) & (r_canal < 1.75 - shell / 9.0),
            Tissue.CANCELLOUS_BONE,
            organ,
        )
        cv.paint(box, r_canal < 1.0, Tissue.SPINAL_CANAL, ORGAN_LABELS["spinal_cord"])


def _paint_ribs(cv, grid, rng, z0, s, cav_cy, cav_a, cav_b, body, shell) -> None:
    """Lower ribs (7-12) as tubes in the muscle wall that slope down anteriorly; cartilage at the costal margin."""
    period = _LEVEL_PERIOD_MM * s
    drop = _u(rng, 95, 130)
    ends = {12: 75, 11: 110, 10: 150, 9: 162, 8: 168, 7: 172}
    p_ant, p_post = body["power"], body["power_post"]
    # candidates: the voxels of the body-wall shell (``shell``), evaluated as a point list
    for rib in (12, 11, 10, 9, 8, 7):
        level = _VERTEBRAE.index(f"T{rib}")
        zc = z0 + (level - 3.5) * period
        phis = np.deg2rad(np.linspace(22, ends[rib], 10))
        for sign, side in ((-1, "left"), (1, "right")):
            pts = []
            for phi in phis:
                d = np.array([sign * np.sin(phi), -np.cos(phi)])
                bvert = cav_b
                p = p_ant if d[1] > 0 else p_post
                t = (abs(d[0] / cav_a) ** p + abs(d[1] / bvert) ** p) ** (-1.0 / p)
                xy = np.array([0.0, cav_cy]) + (t + body["muscle"] * 0.5) * d
                zz = zc - drop * (phi / np.pi) ** 1.3
                pts.append([xy[0], xy[1], zz])
            curve = catmull_rom(np.asarray(pts), 4)
            radii = np.full(len(curve), _u(rng, 4.5, 6.0))
            box = grid.box(*tube_box(curve, radii, 1.2))
            if box is None:
                continue
            norm, arc, _ = tube_distance(grid, box, curve, radii)
            hit = (norm < 1.0) & shell[box]
            if not hit.any():
                continue
            norm, arc = norm[hit], arc[hit]
            phi_at = np.deg2rad(22) + arc * (phis[-1] - np.deg2rad(22))
            cartilage = phi_at > np.deg2rad(135)
            marrow = norm < 0.55
            tissue = np.where(
                cartilage, Tissue.CARTILAGE, np.where(marrow, Tissue.CANCELLOUS_BONE, Tissue.CORTICAL_BONE)
            )
            organ = np.where(cartilage, ORGAN_LABELS["costal_cartilages"], ORGAN_LABELS[f"rib_{side}_{rib}"])
            cv.tissue[box][hit] = tissue.astype(np.uint8)
            cv.organs[box][hit] = organ.astype(np.uint8)
