"""Geometry and behaviour of tools.prep: every crop, resize and sub-volume keeps voxels where the affine says."""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Resize

from tools import prep
from tools.errors import InputError
from tools.io import load_label, load_nifti, save_nifti, voxel_spacing

# ------------------------------------------------------------------------------------------------------------------
# synthetic abdomen built here (independent of tools.phantom)
# ------------------------------------------------------------------------------------------------------------------

BODY_A_MM, BODY_B_MM = 40.0, 28.0  # semi-axes of the elliptic body cylinder (x, y)


def flip_axes(arrays, affine, axes):
    """Flip arrays along ``axes`` and fix the affine so every voxel keeps its world position (RAS -> LPS etc.)."""
    affine = np.array(affine, dtype=np.float64)
    shape = np.shape(arrays[0])
    for axis in axes:
        affine[:3, 3] = affine[:3, 3] + affine[:3, axis] * (shape[axis] - 1)
        affine[:3, axis] = -affine[:3, axis]
        arrays = [None if a is None else np.flip(a, axis).copy() for a in arrays]
    return arrays, affine


def make_abdomen(shape=(64, 56, 40), spacing=(1.5, 1.5, 2.5), body_slices=(2, -2), table=True, pancreas_z_mm=0.0):
    """CT in HU + MSD label + the true body: elliptic cylinder of muscle (40 HU) in a fat ring (-100 HU) in air,
    an air pocket inside (a lung base: the body mask must fill it), a CT table under the body joined to it by a
    one-voxel bridge, a pancreas ellipsoid (label 1, 90 HU) with a 3 mm tumor sphere (label 2, 30 HU)."""
    nx, ny, nz = shape
    affine = np.diag([*spacing, 1.0])
    centre_index = (np.array(shape) - 1) / 2.0
    affine[:3, 3] = -centre_index * np.array(spacing)  # world (0, 0, 0) at the volume's centre
    i, j, k = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    x, y, z = (prep.voxel_to_world(affine, np.stack([i, j, k], -1).reshape(-1, 3)).T).reshape(3, *shape)
    z_lo, z_hi = body_slices[0], nz + body_slices[1]
    in_z = (k >= z_lo) & (k < z_hi)
    y0 = 4.0  # body centre a little anterior, leaving room for the table posteriorly
    ellipse = (x / BODY_A_MM) ** 2 + ((y - y0) / BODY_B_MM) ** 2
    body = (ellipse <= 1.0) & in_z
    ct = np.full(shape, -1000.0, dtype=np.float32)
    ct[body] = -100.0
    ct[(ellipse <= 0.8) & in_z] = 40.0
    lung = ((x + 15) / 8) ** 2 + ((y - y0 - 5) / 6) ** 2 + ((z - z[0, 0, z_hi - 4]) / 6) ** 2 <= 1.0
    ct[lung & body] = -900.0
    table_mask = np.zeros(shape, dtype=bool)
    if table:
        body_bottom = y0 - BODY_B_MM
        table_mask = (y < body_bottom - 3.0) & (y >= body_bottom - 6.5)
        ct[table_mask] = 200.0
        bridge = (np.abs(x) < 0.8) & (y < body_bottom + 1) & (y >= body_bottom - 3.0) & (k == nz // 2)
        ct[bridge & ~body] = 100.0
    label = np.zeros(shape, dtype=np.uint8)
    pancreas = ((x - 8) / 12) ** 2 + ((y - y0 - 4) / 5) ** 2 + ((z - pancreas_z_mm) / 6) ** 2 <= 1.0
    label[pancreas & body] = 1
    ct[label == 1] = 90.0
    tumor = (x - 12) ** 2 + (y - y0 - 4) ** 2 + (z - pancreas_z_mm) ** 2 <= 9.0
    label[tumor & (label == 1)] = 2
    ct[label == 2] = 30.0
    return ct, label, affine, body, table_mask


def ramp(affine, shape):
    """A linear function of the world position: any correct resampling reproduces it exactly at inner voxels."""
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).reshape(-1, 3)
    xyz = prep.voxel_to_world(affine, idx)
    return (xyz @ np.array([1.0, 0.5, -0.25]) + 3.0).reshape(shape).astype(np.float32)


def ramp_error(image, affine, src_affine, src_shape, margin=0.0):
    """Max |image - ramp| over voxels whose position lies inside the source's voxel-centre hull (minus margin).

    Outside that hull a resampler pads (border values), so only the inside has to reproduce the ramp.
    """
    expected = ramp(affine, image.shape)
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in image.shape], indexing="ij"), -1).reshape(-1, 3)
    src_idx = prep.world_to_voxel(src_affine, prep.voxel_to_world(affine, idx))
    inside = np.all((src_idx >= margin - 1e-6) & (src_idx <= np.array(src_shape) - 1 - margin + 1e-6), axis=1)
    assert inside.sum() > 0.2 * inside.size, "too few inner voxels to check"
    return float(np.abs(image.reshape(-1) - expected.reshape(-1))[inside].max())


def world_centroid(mask, affine):
    return prep.voxel_to_world(affine, np.argwhere(mask).mean(axis=0))


# ------------------------------------------------------------------------------------------------------------------
# affine helpers
# ------------------------------------------------------------------------------------------------------------------


def test_resize_affine_matches_monai_resize_and_keeps_the_field_of_view():
    affine = np.array([[0, 0, 2.5, -30], [-0.8, 0, 0, 40], [0, 1.2, 0, 7], [0, 0, 0, 1]], dtype=np.float64)
    in_shape, out_shape = (30, 20, 8), (15, 48, 13)
    expected = prep.resize_affine(affine, in_shape, out_shape)
    resized = Resize(out_shape, mode="trilinear")(MetaTensor(torch.zeros(1, *in_shape), affine=torch.tensor(affine)))
    np.testing.assert_allclose(resized.affine.numpy(), expected, atol=1e-9)
    np.testing.assert_allclose(voxel_spacing(expected), voxel_spacing(affine) * np.array(in_shape) / out_shape)
    # the outer voxel corners (index -0.5 and n - 0.5) are the same world points before and after
    for corner_in, corner_out in (([-0.5] * 3, [-0.5] * 3), (np.array(in_shape) - 0.5, np.array(out_shape) - 0.5)):
        np.testing.assert_allclose(
            prep.voxel_to_world(affine, corner_in), prep.voxel_to_world(expected, corner_out), atol=1e-9
        )


def test_crop_affine_keeps_world_positions():
    affine = np.array([[-0.7, 0, 0, 100], [0, -0.7, 0, 80], [0, 0, 3.0, -40], [0, 0, 0, 1]])
    start = (11, 5, 3)
    cropped = prep.crop_affine(affine, start)
    np.testing.assert_allclose(
        prep.voxel_to_world(cropped, [2, 4, 1]), prep.voxel_to_world(affine, np.add(start, [2, 4, 1]))
    )
    np.testing.assert_allclose(prep.world_to_voxel(cropped, prep.voxel_to_world(affine, start)), [0, 0, 0], atol=1e-9)


def test_axial_axis_follows_the_affine_not_the_array_order():
    assert prep.axial_axis(np.diag([0.7, 0.7, 3.0, 1])) == 2
    sagittal_stack = np.array([[0, 0, 1.0, 0], [0, 1.0, 0, 0], [1.0, 0, 0, 0], [0, 0, 0, 1]])
    assert prep.axial_axis(sagittal_stack) == 0


# ------------------------------------------------------------------------------------------------------------------
# standardize
# ------------------------------------------------------------------------------------------------------------------


def test_standardize_reorients_to_ras_resamples_and_keeps_geometry():
    ct, label, affine, _, _ = make_abdomen(shape=(40, 36, 20), spacing=(1.5, 1.2, 2.5))
    (ct_lps, label_lps), affine_lps = flip_axes([ct, label], affine, axes=(0, 1))
    assert nib.aff2axcodes(affine_lps) == ("L", "P", "S")
    ramp_lps = ramp(affine_lps, ct_lps.shape)
    out = prep.standardize(ramp_lps, label_lps, affine_lps, spacing=(1.0, 2.0, 1.25), hu_window=None)
    assert nib.aff2axcodes(out.affine) == ("R", "A", "S")
    np.testing.assert_allclose(voxel_spacing(out.affine), [1.0, 2.0, 1.25], atol=1e-6)
    # every inner voxel holds the ramp value of its own world position: image geometry is right
    assert ramp_error(out.image, out.affine, affine_lps, ct_lps.shape) < 1e-3
    # the label (nearest) stays on the same anatomy: pancreas centroid within half a voxel, values kept
    assert set(np.unique(out.label).tolist()) == {0, 1, 2}
    shift = world_centroid(out.label > 0, out.affine) - world_centroid(label_lps > 0, affine_lps)
    assert np.all(np.abs(shift) < 0.5 * np.maximum(voxel_spacing(out.affine), voxel_spacing(affine_lps)))


def test_standardize_hu_window_and_no_resampling():
    ct, label, affine, _, _ = make_abdomen(shape=(24, 20, 10))
    ct[0, 0, 0], ct[1, 0, 0], ct[2, 0, 0] = -175.0, 250.0, 37.5
    out = prep.standardize(ct, label, affine, spacing=None)
    assert out.image.shape == ct.shape and out.image.dtype == np.float32
    np.testing.assert_allclose(out.affine, affine)
    assert out.image.min() == 0.0 and out.image.max() == 1.0
    np.testing.assert_allclose(out.image[:3, 0, 0], [0.0, 1.0, 0.5], atol=1e-6)
    np.testing.assert_array_equal(out.label, label)
    scaled = prep.standardize(ct, None, affine, spacing=None, out_range=(-1, 1))
    assert scaled.label is None and scaled.image.min() == -1.0 and scaled.image.max() == 1.0
    np.testing.assert_allclose(prep.window_hu(ct, (-175, 250), (0, 1)), out.image, atol=1e-6)


def test_standardize_transforms_are_the_same_pipeline_for_configs():
    ct, label, affine, _, _ = make_abdomen(shape=(24, 20, 10))
    data = {"image": MetaTensor(torch.from_numpy(ct)[None], affine=torch.tensor(affine))}
    data["label"] = MetaTensor(torch.from_numpy(label)[None], affine=torch.tensor(affine))
    from monai.transforms import Compose

    out = Compose(prep.standardize_transforms(spacing=(2.0, 2.0, 2.0)))(data)
    direct = prep.standardize(ct, label, affine, spacing=(2.0, 2.0, 2.0))
    np.testing.assert_allclose(out["image"][0].numpy(), direct.image, atol=1e-6)
    np.testing.assert_array_equal(out["label"][0].numpy().astype(np.uint8), direct.label)
    np.testing.assert_allclose(out["image"].affine.numpy(), direct.affine)


# ------------------------------------------------------------------------------------------------------------------
# body mask
# ------------------------------------------------------------------------------------------------------------------


def test_body_mask_fills_air_pockets_and_leaves_out_the_table():
    ct, label, affine, body, table = make_abdomen()
    mask = prep.body_mask(ct, affine)
    assert mask[body].all(), "body voxels (including the air pocket) missing from the mask"
    assert not mask[table].any(), "the CT table was taken as body"
    extra = mask & ~body
    assert extra.sum() <= 0.002 * body.sum(), "only the bridge's first millimetres may join the body"
    no_body_slices = ~body.any(axis=(0, 1))
    assert not mask[:, :, no_body_slices].any()


def test_body_mask_refuses_a_ct_without_body():
    with pytest.raises(InputError, match="no body"):
        prep.body_mask(np.full((8, 8, 4), -1000.0), np.eye(4))


@pytest.mark.shared
def test_body_mask_on_real_ct(real_ct_dir):
    from tools.io import load_ct

    ct, affine = load_ct(real_ct_dir / "example_ct_sm.nii.gz")
    seg, _ = load_label(real_ct_dir / "example_seg.nii.gz")
    fat, _ = load_label(real_ct_dir / "subcutaneous_fat.nii.gz")
    mask = prep.body_mask(ct, affine)
    assert mask[seg > 0].all(), "an organ of TotalSegmentator's map lies outside the body mask"
    assert mask[fat > 0].mean() > 0.99
    # what is above -500 HU but outside the body is the table and the pad under the back: posterior, in the lowest
    # 20 of 101 rows (low y = posterior in RAS; the table's edges curve up to row 18)
    outside = (ct > -500) & ~mask
    assert outside.sum() > 1000
    assert np.mean(np.argwhere(outside)[:, 1] < 20) > 0.99
    assert not mask[0, 0].any() and not mask[-1, -1].any()


# ------------------------------------------------------------------------------------------------------------------
# crops
# ------------------------------------------------------------------------------------------------------------------


def brute_force_best_side(mask, spacing):
    """Largest min(rows * sp0, cols * sp1) over every all-True window, by exhaustive search."""
    best = 0.0
    n0, n1 = mask.shape
    for r0 in range(n0):
        for c0 in range(n1):
            for r1 in range(r0 + 1, n0 + 1):
                if not mask[r0:r1, c0].all():
                    break
                for c1 in range(c0 + 1, n1 + 1):
                    if not mask[r0:r1, c0:c1].all():
                        break
                    best = max(best, min((r1 - r0) * spacing[0], (c1 - c0) * spacing[1]))
    return best


@pytest.mark.parametrize("spacing", [(1.0, 1.0), (1.0, 2.0), (1.5, 0.75)])
def test_largest_square_is_inside_square_in_mm_and_maximal(spacing):
    rng = np.random.default_rng(3)
    from scipy import ndimage

    for _ in range(5):
        mask = ndimage.gaussian_filter(rng.random((18, 14)), 2.0) > 0.48
        if not mask.any():
            continue
        (r0, r1), (c0, c1), side = prep.largest_square(mask, spacing)
        assert mask[r0:r1, c0:c1].all()
        rows_mm, cols_mm = (r1 - r0) * spacing[0], (c1 - c0) * spacing[1]
        assert abs(rows_mm - cols_mm) <= max(spacing) / 2 + 1e-9, "not square in mm"
        assert side == pytest.approx(min(rows_mm, cols_mm))
        assert side >= brute_force_best_side(mask, spacing) - max(spacing) - 1e-9
        if spacing[0] == spacing[1]:
            assert side == pytest.approx(brute_force_best_side(mask, spacing))


def test_semi_crop_is_the_largest_square_cube_inside_the_body():
    spacing = (1.5, 1.0, 2.5)
    ct, label, affine, body, _ = make_abdomen(shape=(64, 80, 60), spacing=spacing, pancreas_z_mm=10.0)
    out = prep.crop(ct, label, affine, "semi")
    (x0, x1), (y0, y1), (z0, z1) = out.box
    side_x, side_y, length_z = (x1 - x0) * spacing[0], (y1 - y0) * spacing[1], (z1 - z0) * spacing[2]
    assert abs(side_x - side_y) <= max(spacing[:2]) / 2 + 1e-9, "the axial square is not square in mm"
    # the largest axis-aligned square in an ellipse with semi-axes a, b has side 2ab / sqrt(a^2 + b^2)
    exact = 2 * BODY_A_MM * BODY_B_MM / np.hypot(BODY_A_MM, BODY_B_MM)
    # whole voxels whose centres are inside may overhang the continuous ellipse by up to one voxel
    assert exact - 2 * max(spacing[:2]) <= min(side_x, side_y) <= exact + max(spacing[:2])
    assert body[x0:x1, y0:y1, z0:z1].all(), "the semi crop leaves the body"
    assert min(side_x, side_y) - spacing[2] < length_z <= min(side_x, side_y), "not an approximate cube"
    pancreas_z = prep.world_to_voxel(affine, world_centroid(label > 0, affine))[2]
    assert abs((z0 + z1 - 1) / 2 - pancreas_z) <= 1.0, "the cube is not centred on the pancreas along z"
    assert (out.label > 0).sum() == (label > 0).sum()


def test_semi_crop_of_a_short_scan_uses_every_body_slice():
    ct, label, affine, body, _ = make_abdomen(shape=(64, 56, 12), spacing=(1.5, 1.5, 2.5), body_slices=(1, -1))
    out = prep.crop(ct, label, affine, "semi")
    assert out.box[2] == (1, 11)
    assert body[prep._slices(out.box)].all()


@pytest.mark.parametrize("mode", ["full", "semi", "pancreas"])
@pytest.mark.parametrize("flip", [(), (0, 1)])
def test_crop_keeps_landmarks_and_every_voxel_in_place(mode, flip):
    ct, label, affine, _, _ = make_abdomen(shape=(48, 44, 30), spacing=(1.5, 1.25, 2.5))
    (ct, label), affine = flip_axes([ct, label], affine, flip)
    out = prep.crop(ct, label, affine, mode)
    # no resize: the pancreas centroid in mm is the same number before and after, and the voxels are copies
    np.testing.assert_allclose(world_centroid(out.label > 0, out.affine), world_centroid(label > 0, affine))
    assert (out.label > 0).sum() == (label > 0).sum()
    np.testing.assert_array_equal(out.image, ct[prep._slices(out.box)])
    ramp_ct = ramp(affine, ct.shape)
    moved = prep.crop(ramp_ct, label, affine, mode, body=prep.body_mask(ct, affine))
    assert ramp_error(moved.image, moved.affine, affine, ct.shape) < 1e-4


@pytest.mark.parametrize("mode", ["full", "semi", "pancreas"])
def test_crop_with_resize_updates_spacing_and_keeps_geometry(mode):
    ct, label, affine, _, _ = make_abdomen(shape=(48, 44, 30), spacing=(1.5, 1.25, 2.5))
    out_shape = (40, 36, 24)
    body = prep.body_mask(ct, affine)
    out = prep.crop(ct, label, affine, mode, out_shape=out_shape, body=body)
    assert out.image.shape == out_shape and out.label.shape == out_shape
    extent = np.array([stop - start for start, stop in out.box])
    np.testing.assert_allclose(voxel_spacing(out.affine), voxel_spacing(affine) * extent / np.array(out_shape))
    # a linear ramp survives trilinear resizing exactly wherever the new voxel lies between the crop's voxel centres
    crop_affine = prep.crop_affine(affine, [start for start, _ in out.box])
    exact = prep.crop(ramp(affine, ct.shape), label, affine, mode, out_shape=out_shape, body=body, anti_aliasing=False)
    assert ramp_error(exact.image, exact.affine, crop_affine, extent) < 1e-3
    smooth = prep.crop(ramp(affine, ct.shape), label, affine, mode, out_shape=out_shape, body=body)
    assert ramp_error(smooth.image, smooth.affine, crop_affine, extent, margin=1) < 1e-3
    # the pancreas (nearest-exact) stays where it was: centroid within half a voxel of the coarser grid
    shift = world_centroid(out.label > 0, out.affine) - world_centroid(label > 0, affine)
    assert np.all(np.abs(shift) <= 0.5 * np.maximum(voxel_spacing(out.affine), voxel_spacing(affine)))
    assert set(np.unique(out.label).tolist()) <= {0, 1, 2} and (out.label == 2).any()


def test_pancreas_crop_margin_in_mm_and_clipping():
    spacing = (1.5, 1.25, 2.5)
    ct, label, affine, _, _ = make_abdomen(shape=(48, 44, 30), spacing=spacing)
    tight = prep.bounding_box(label > 0)
    out = prep.crop(ct, label, affine, "pancreas", margin_mm=5.0)
    for (start, stop), (t_start, t_stop), sp in zip(out.box, tight, spacing):
        pad = int(np.ceil(5.0 / sp))
        assert start == max(0, t_start - pad) and stop == min(stop, t_stop + pad)
    wide = prep.crop(ct, label, affine, "pancreas", margin_mm=1000.0)
    assert wide.box == ((0, 48), (0, 44), (0, 30))


def test_full_crop_is_the_body_box_without_the_table():
    ct, label, affine, body, table = make_abdomen()
    out = prep.crop(ct, label, affine, "full", margin_mm=0.0)
    body_box = prep.bounding_box(body)
    # the one-voxel bridge to the table may add its first 3 mm (2 voxels) below the body, nothing else
    assert out.box[0] == body_box[0] and out.box[2] == body_box[2] and out.box[1][1] == body_box[1][1]
    assert body_box[1][0] - 2 <= out.box[1][0] <= body_box[1][0]
    assert not table[prep._slices(out.box)].any()
    organs = np.where(body, 3, 0).astype(np.uint8)  # an organ map (0 outside the body) defines the body exactly
    with_organs = prep.crop(ct, label, affine, "full", organs=organs, margin_mm=0.0)
    assert with_organs.box == body_box and with_organs.organs.shape == with_organs.image.shape


def test_crop_refuses_bad_input():
    ct, label, affine, _, _ = make_abdomen(shape=(24, 20, 10))
    with pytest.raises(InputError, match="unknown crop mode"):
        prep.crop(ct, label, affine, "brain")
    with pytest.raises(InputError, match="no voxel with value"):
        prep.crop(ct, np.zeros_like(label), affine, "pancreas")
    with pytest.raises(InputError, match="shape"):
        prep.crop(ct, label[:-1], affine, "full")


@pytest.mark.shared
@pytest.mark.parametrize("mode", ["full", "semi", "pancreas"])
def test_real_ct_crops_contain_the_whole_pancreas(real_ct_dir, mode):
    from tools.io import load_pair

    ct, seg, affine = load_pair(real_ct_dir / "example_ct_sm.nii.gz", real_ct_dir / "example_seg.nii.gz")
    pancreas = seg == 7
    out = prep.crop(ct, seg, affine, mode, pancreas_values=(7,))
    assert (out.label == 7).sum() == pancreas.sum() == 644, "a pancreas voxel was cut off"
    np.testing.assert_allclose(world_centroid(out.label == 7, out.affine), world_centroid(pancreas, affine))
    # seed 002's resize: the pancreas stays where it was (nearest-exact: within one voxel of the coarser grid)
    resized = prep.crop(ct, seg, affine, mode, pancreas_values=(7,), out_shape=(240, 240, 155))
    shift = world_centroid(resized.label == 7, resized.affine) - world_centroid(pancreas, affine)
    assert np.all(np.abs(shift) <= voxel_spacing(affine))
    if mode == "pancreas":
        box = prep.bounding_box(pancreas)
        assert all(s <= b0 and e >= b1 for (s, e), (b0, b1) in zip(out.box, box))


# ------------------------------------------------------------------------------------------------------------------
# seed 000 sub-volumes
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flip", [(), (0, 1)])
def test_subvolumes_without_resize_are_exact_slices(flip):
    ct, label, affine, _, _ = make_abdomen(shape=(32, 28, 30), spacing=(1.5, 1.5, 2.5))
    (ct, label), affine = flip_axes([ct, label], affine, flip)
    subs = prep.subvolumes(ct, label, affine, n_slices=4, size=ct.shape[:2], drop_empty=False)
    assert [s.first_slice for s in subs] == [0, 4, 8, 12, 16, 20, 24]  # 30 slices: the last 2 cannot fill a stack
    for sub in subs:
        assert sub.image.shape == (4, 32, 28)
        for s in range(4):  # seed 000 layout: image[s, r, c] == ct[r, c, first + s]
            np.testing.assert_array_equal(sub.image[s], ct[:, :, sub.first_slice + s])
            np.testing.assert_array_equal(sub.label[s], label[:, :, sub.first_slice + s])
        np.testing.assert_allclose(sub.affine, prep.crop_affine(affine, (0, 0, sub.first_slice)))


def test_subvolumes_resize_in_plane_drop_empty_and_keep_geometry():
    ct, label, affine, _, _ = make_abdomen(shape=(40, 36, 32), spacing=(1.5, 1.25, 2.5))
    subs = prep.subvolumes(ramp(affine, ct.shape), label, affine, n_slices=4, size=(64, 48))
    expected = [z for z in range(0, 32, 4) if (label[:, :, z : z + 4] > 0).any()]
    assert 0 < len(subs) and [s.first_slice for s in subs] == expected
    for sub in subs:
        assert sub.image.shape == (4, 64, 48) and sub.label.shape == (4, 64, 48)
        assert (sub.label > 0).any()
        np.testing.assert_allclose(voxel_spacing(sub.affine), [1.5 * 40 / 64, 1.25 * 36 / 48, 2.5])
        nifti = prep.stack_to_nifti(sub.image)
        assert nifti.shape == (64, 48, 4)
        np.testing.assert_array_equal(prep.nifti_to_stack(nifti), sub.image)
        assert ramp_error(nifti, sub.affine, affine, ct.shape, margin=1) < 1e-3


def test_subvolumes_default_is_seed_000_shape():
    ct, label, affine, _, _ = make_abdomen(shape=(40, 36, 32))
    subs = prep.subvolumes(ct, label, affine)
    assert subs and all(s.image.shape == (4, 256, 256) and s.label.dtype == label.dtype for s in subs)
    with pytest.raises(InputError, match="need a label"):
        prep.subvolumes(ct, None, affine)


@pytest.mark.shared
def test_real_ct_subvolumes(real_ct_dir):
    from tools.io import load_pair

    ct, seg, affine = load_pair(real_ct_dir / "example_ct_sm.nii.gz", real_ct_dir / "example_seg.nii.gz")
    subs = prep.subvolumes(ct, seg, affine, pancreas_values=(7,))
    with_pancreas = [z for z in range(0, 28, 4) if (seg[:, :, z : z + 4] == 7).any()]
    assert [s.first_slice for s in subs] == with_pancreas
    assert all(s.image.shape == (4, 256, 256) for s in subs)
    np.testing.assert_allclose(voxel_spacing(subs[0].affine), [3.0 * 122 / 256, 3.0 * 101 / 256, 3.0])


# ------------------------------------------------------------------------------------------------------------------
# MONAI dictionary transforms
# ------------------------------------------------------------------------------------------------------------------


def meta_case(ct, label, affine):
    return {
        "image": MetaTensor(torch.from_numpy(ct)[None], affine=torch.tensor(affine)),
        "label": MetaTensor(torch.from_numpy(label)[None], affine=torch.tensor(affine)),
    }


@pytest.mark.parametrize("mode", ["full", "semi", "pancreas"])
def test_crop_mode_dict_transform_matches_crop(mode):
    ct, label, affine, _, _ = make_abdomen(shape=(48, 44, 30), spacing=(1.5, 1.25, 2.5))
    out = prep.CropModed(["image", "label"], crop_mode=mode, spatial_size=(32, 32, 20))(meta_case(ct, label, affine))
    direct = prep.crop(ct, label, affine, mode, out_shape=(32, 32, 20))
    np.testing.assert_allclose(out["image"][0].numpy(), direct.image, atol=1e-5)
    np.testing.assert_array_equal(out["label"][0].numpy(), direct.label)
    assert out["label"].dtype == torch.uint8
    for key in ("image", "label"):
        np.testing.assert_allclose(out[key].affine.numpy(), direct.affine)


def test_axial_stacks_dict_transform_matches_subvolumes():
    ct, label, affine, _, _ = make_abdomen(shape=(40, 36, 32))
    samples = prep.AxialStacksd(["image", "label"], spatial_size=(64, 48))(meta_case(ct, label, affine))
    direct = prep.subvolumes(ct, label, affine, size=(64, 48))
    assert [s["first_slice"] for s in samples] == [d.first_slice for d in direct]
    for sample, sub in zip(samples, direct):
        assert sample["image"].shape == (1, 64, 48, 4)
        np.testing.assert_allclose(sample["image"][0].numpy(), prep.stack_to_nifti(sub.image), atol=1e-5)
        np.testing.assert_array_equal(sample["label"][0].numpy(), prep.stack_to_nifti(sub.label))
        np.testing.assert_allclose(sample["image"].affine.numpy(), sub.affine)


# ------------------------------------------------------------------------------------------------------------------
# file level
# ------------------------------------------------------------------------------------------------------------------


def write_msd(root: Path, shape=(48, 40, 24)):
    """A tiny MSD folder: patient p0 with two scans (shifted pancreas), p1 with one, plus an unlabelled test scan."""
    training = []
    for case, patient, z_mm in (("case_000", "p0", 0.0), ("case_001", "p0", 8.0), ("case_002", "p1", -5.0)):
        ct, label, affine, _, _ = make_abdomen(shape=shape, spacing=(1.5, 1.5, 2.5), pancreas_z_mm=z_mm)
        save_nifti(root / "imagesTr" / f"{case}.nii.gz", ct.astype(np.int16), affine)
        save_nifti(root / "labelsTr" / f"{case}.nii.gz", label, affine)
        training.append(
            {"image": f"./imagesTr/{case}.nii.gz", "label": f"./labelsTr/{case}.nii.gz", "patient": patient}
        )
    ct, _, affine, _, _ = make_abdomen(shape=shape, spacing=(1.5, 1.5, 2.5))
    save_nifti(root / "imagesTs" / "case_100.nii.gz", ct.astype(np.int16), affine)
    (root / "dataset.json").write_text(
        json.dumps(
            {
                "name": "tiny",
                "labels": {"0": "background"},
                "training": training,
                "test": ["./imagesTs/case_100.nii.gz"],
            }
        )
    )
    return root


def test_prepare_dataset_pancreas_crops_with_resume(tmp_path):
    src = write_msd(tmp_path / "src")
    out = tmp_path / "out"
    report = prep.prepare_dataset(src, out, mode="pancreas", out_shape=(32, 24, 16))
    assert sorted(report["made"]) == ["case_000", "case_001", "case_002"] and report["no_label"] == ["case_100"]
    datalist = json.loads((out / "dataset.json").read_text())
    assert [e["patient"] for e in datalist["training"]] == ["p0", "p0", "p1"]
    assert datalist["test"] == [] and datalist["prep"]["mode"] == "pancreas"
    for entry in datalist["training"]:
        image, image_affine = load_nifti(out / entry["image"])
        label, label_affine = load_label(out / entry["label"])
        assert image.shape == (32, 24, 16) and image.dtype == np.float32
        assert 0.0 <= image.min() and image.max() <= 1.0
        np.testing.assert_allclose(image_affine, label_affine)
        src_label, src_affine = load_label(src / "labelsTr" / Path(entry["label"]).name)
        shift = world_centroid(label > 0, label_affine) - world_centroid(src_label > 0, src_affine)
        assert np.all(np.abs(shift) <= 0.5 * voxel_spacing(label_affine))
    # a second run with the same parameters reuses every output, a changed parameter remakes them
    stamp = os.stat(out / datalist["training"][0]["image"]).st_mtime_ns
    again = prep.prepare_dataset(src, out, mode="pancreas", out_shape=(32, 24, 16))
    assert again["made"] == [] and sorted(again["reused"]) == ["case_000", "case_001", "case_002"]
    assert os.stat(out / datalist["training"][0]["image"]).st_mtime_ns == stamp
    changed = prep.prepare_dataset(src, out, mode="pancreas", out_shape=(24, 24, 16))
    assert sorted(changed["made"]) == ["case_000", "case_001", "case_002"]
    assert load_nifti(out / datalist["training"][0]["image"])[0].shape == (24, 24, 16)


def test_prepare_dataset_subvolumes_keep_patients_and_geometry(tmp_path):
    src = write_msd(tmp_path / "src")
    out = tmp_path / "sub"
    prep.prepare_dataset(src, out, mode="subvolumes", size=(32, 32), sections=["training"])
    datalist = json.loads((out / "dataset.json").read_text())
    entries = datalist["training"]
    assert entries and {e["patient"] for e in entries} == {"p0", "p1"}
    assert {e["scan"] for e in entries} == {"case_000", "case_001", "case_002"}
    for entry in entries:
        image, affine = load_nifti(out / entry["image"])
        label, _ = load_label(out / entry["label"])
        assert image.shape == (32, 32, 4) and (label > 0).any()
        np.testing.assert_allclose(voxel_spacing(affine), [1.5 * 48 / 32, 1.5 * 40 / 32, 2.5])
        assert entry["image"] == f"imagesTr/{entry['scan']}_z{entry['first_slice']:04d}.nii.gz"


def test_prepare_dataset_full_mode_includes_unlabelled_and_organs(tmp_path):
    src = write_msd(tmp_path / "src", shape=(40, 36, 16))
    report = prep.prepare_dataset(src, tmp_path / "full", mode="full", hu_window=None, spacing=(3.0, 3.0, 3.0))
    assert report["no_label"] == [] and "case_100" in report["made"]
    datalist = json.loads((tmp_path / "full" / "dataset.json").read_text())
    (test_entry,) = datalist["test"]
    assert test_entry["image"] == "imagesTs/case_100.nii.gz" and "label" not in test_entry
    image, affine = load_nifti(tmp_path / "full" / test_entry["image"])
    np.testing.assert_allclose(voxel_spacing(affine), [3.0, 3.0, 3.0])
    assert image.min() < -500  # hu_window=None keeps HU


def test_prepare_dataset_never_writes_into_its_source_and_names_bad_files(tmp_path):
    src = write_msd(tmp_path / "src", shape=(24, 20, 12))
    with pytest.raises(InputError, match="source folder"):
        prep.prepare_dataset(src, src, mode="none")
    (src / "imagesTr" / "case_001.nii.gz").write_bytes(b"\x1f\x8b not really a gzip file")
    with pytest.raises(InputError, match="case_001.nii.gz"):
        prep.prepare_dataset(src, tmp_path / "out", mode="none")
    leftovers = [p.name for p in (tmp_path / "out").rglob("*") if ".part" in p.name]
    assert leftovers == []


def test_crop_file_and_standardize_file(tmp_path):
    ct, label, affine, _, _ = make_abdomen(shape=(40, 36, 20))
    save_nifti(tmp_path / "ct.nii.gz", ct.astype(np.int16), affine)
    save_nifti(tmp_path / "lab.nii.gz", label, affine)
    result = prep.crop_file(
        tmp_path / "ct.nii.gz", tmp_path / "lab.nii.gz", tmp_path / "c.nii.gz", tmp_path / "cl.nii.gz"
    )
    image, image_affine = load_nifti(tmp_path / "c.nii.gz")
    np.testing.assert_allclose(image_affine, result.affine)
    np.testing.assert_array_equal(load_label(tmp_path / "cl.nii.gz")[0], result.label)
    with pytest.raises(InputError, match="overwrite an input"):
        prep.standardize_file(tmp_path / "ct.nii.gz", None, tmp_path / "ct.nii.gz")
    volume = prep.standardize_file(
        tmp_path / "ct.nii.gz",
        tmp_path / "lab.nii.gz",
        tmp_path / "s.nii.gz",
        tmp_path / "sl.nii.gz",
        spacing=(2, 2, 2),
    )
    assert load_nifti(tmp_path / "s.nii.gz")[0].shape == volume.image.shape


def test_prepare_dataset_on_the_phantom_set_keeps_labels_provenance_and_patients(phantom_set, tmp_path):
    from tools.splits import assert_no_patient_leak, make_splits, split_by_patient

    source = json.loads((phantom_set / "dataset.json").read_text())
    report = prep.prepare_dataset(phantom_set, tmp_path / "semi", mode="semi", out_shape=(48, 48, 32))
    datalist = json.loads((tmp_path / "semi" / "dataset.json").read_text())
    assert datalist["organ_labels"] == source["organ_labels"] and not report["no_label"]
    assert len(datalist["training"]) == len(source["training"]) and len(datalist["test"]) == len(source["test"])
    for entry in datalist["training"]:
        image_path = tmp_path / "semi" / entry["image"]
        assert nib.load(str(image_path)).header["descrip"].item().startswith(b"SYNTHETIC"), "synthetic mark lost"
        organs, affine = load_label(tmp_path / "semi" / entry["organs"])
        assert organs.shape == (48, 48, 32) and (organs > 0).all(), "a semi crop lies inside the body"
    subs = prep.prepare_dataset(phantom_set, tmp_path / "sub", mode="subvolumes", size=(64, 64))
    records = json.loads((tmp_path / "sub" / "dataset.json").read_text())["training"]
    assert not subs["empty"] and len({r["scan"] for r in records}) == len(source["training"])
    assert_no_patient_leak(split_by_patient(records, n_folds=2, seed=0))
    # the prepared folder is a self-contained MSD folder that the project's readers take as a source again
    split = make_splits(tmp_path / "sub", tmp_path / "folds.json", n_folds=2, seed=0, stratify_key="has_tumor")
    assert len(split["training"]) == len(records)
    assert_no_patient_leak(tmp_path / "folds.json")


def test_dict_transforms_run_from_a_bundle_config_after_loadimaged(tmp_path):
    from monai.bundle import ConfigParser

    ct, label, affine, _, _ = make_abdomen(shape=(48, 44, 30), spacing=(1.5, 1.25, 2.5))
    (ct, label), affine = flip_axes([ct, label], affine, (0, 1))  # stored LPS, as many scanners write
    save_nifti(tmp_path / "ct.nii.gz", ct.astype(np.int16), affine)
    save_nifti(tmp_path / "label.nii.gz", label, affine)
    config = {
        "preprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "LoadImaged", "keys": ["image", "label"], "image_only": True},
                {"_target_": "EnsureChannelFirstd", "keys": ["image", "label"]},
                {"_target_": "tools.prep.CropModed", "keys": ["image", "label"], "crop_mode": "pancreas",
                 "spatial_size": [32, 32, 16]},
                {"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": -175, "a_max": 250, "b_min": 0.0,
                 "b_max": 1.0, "clip": True},
            ],
        }
    }  # fmt: skip
    parser = ConfigParser(config)
    out = parser.get_parsed_content("preprocessing")(
        {"image": str(tmp_path / "ct.nii.gz"), "label": str(tmp_path / "label.nii.gz")}
    )
    direct = prep.crop(ct, label, affine, "pancreas", out_shape=(32, 32, 16))
    # LoadImaged keeps the file's array order and NIfTI (RAS-world) affine, so the crop lands on the same grid
    np.testing.assert_allclose(out["image"].affine.numpy(), direct.affine, atol=1e-4)
    np.testing.assert_allclose(out["label"].affine.numpy(), direct.affine, atol=1e-4)
    np.testing.assert_array_equal(out["label"][0].numpy(), direct.label)
    np.testing.assert_allclose(out["image"][0].numpy(), prep.window_hu(direct.image), atol=1e-5)
    assert out["image"].dtype == torch.float32 and 0.0 <= float(out["image"].min()) <= float(out["image"].max()) <= 1.0


def test_prepare_dataset_marks_windowed_outputs_and_the_readers_accept_them(tmp_path):
    from tools.datasets import read_datalist, validate_records

    src = write_msd(tmp_path / "src", shape=(24, 20, 12))
    mark = "windowed [-175, 250] HU -> [0, 1]"
    for _ in range(2):  # the second run reuses every case: the entries keep their mark
        prep.prepare_dataset(src, tmp_path / "windowed", mode="pancreas", out_shape=(16, 16, 8))
        entries = json.loads((tmp_path / "windowed" / "dataset.json").read_text())["training"]
        assert entries and all(entry["intensity"] == mark for entry in entries)
    validate_records(read_datalist(tmp_path / "windowed"), allowed_labels=(0, 1, 2))
    prep.prepare_dataset(src, tmp_path / "hu", mode="pancreas", out_shape=(16, 16, 8), hu_window=None)
    entries = json.loads((tmp_path / "hu" / "dataset.json").read_text())["training"]
    assert entries and not any("intensity" in entry for entry in entries)
    # prepare needs HU (its crops find the body by HU): a windowed source is refused by its mark, nothing written
    with pytest.raises(InputError, match="is stored in a HU window .*windowed \\[-175, 250\\]") as caught:
        prep.prepare_dataset(tmp_path / "windowed", tmp_path / "again", mode="pancreas", hu_window=None)
    assert str(caught.value).startswith(str(tmp_path / "windowed" / "imagesTr"))
    assert not (tmp_path / "again").exists()


def test_prepare_dataset_refuses_an_out_shape_whose_voxels_the_readers_would_refuse(tmp_path):
    src = write_msd(tmp_path / "src", shape=(24, 20, 12))  # 1.5 x 1.5 x 2.5 mm: 30 mm of body in one slice
    with pytest.raises(InputError, match=r"voxels of \[.*\] mm, more than the 20 mm every reader") as caught:
        prep.prepare_dataset(src, tmp_path / "out", mode="full", out_shape=(8, 8, 1))
    assert str(caught.value).startswith(str(src / "imagesTr"))
    assert not (tmp_path / "out").exists()
