"""Issue 8, acceptance 1: the bad-input suite over every entry point, and the vendored checks it relies on."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from tools.bad_inputs import _kinds, applicable, entry_points, main, run_suite, valid_volumes, write_dataset
from tools.bundle_scripts import validation
from tools.bundle_scripts.validation import InputError, ValidateCTd, check_header, check_inside, validate_datalist
from tools.errors import InputError as ToolsInputError

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_every_bad_input_through_every_entry_point_is_handled(capsys):
    """Each case raises an InputError naming the file and the problem, leaves no output and changes no input; each
    entry point also accepts the valid data set (its control), so a broken pipeline cannot pass for a refusal."""
    assert main([]) == 0, capsys.readouterr().out[-6000:]
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.endswith(" lost")]
    n = int(lines[-1].split()[0])
    assert lines[-1] == f"{n} cases, {n} handled, 0 lost" and n >= 150, out[-3000:]


def test_the_table_covers_every_bundle_config_that_reads_data_and_every_kind():
    entries = entry_points()
    names = " | ".join(e.name for e in entries)
    for needed in ("seg_unet3d train", "seg_unet3d inference", "vae_ct train", "vae_ct inference", "ldm_abdomen train",
                   "ldm_abdomen train_controlnet", "ldm_abdomen inference_controlnet", "difftumor train/",
                   "difftumor train_diffusion", "difftumor inference", "tools data list", "tools data prepare",
                   "tools data split", "tools data quartiles", "tools mix"):  # fmt: skip
        assert needed in names, needed
    # every data-reading config of every bundle validates its inputs before and after loading
    for config in sorted(REPO.glob("bundles/*/configs/*.json")):
        text = config.read_text()
        loads = text.count('"LoadImaged"')
        assert text.count("scripts.validation.ValidateCTd") == 2 * loads, f"{config}: {loads} LoadImaged"
    for kind in _kinds():
        assert any(applicable(e, kind) for e in entries), kind.name


#: tools commands that read no user scan, and where their inputs are tested instead
READS_NO_SCAN = {
    "data phantom": "writes the phantom; reads nothing",
    "data realism": "reads the fixed real CT sample of ../shared (tools.realism, tests/test_realism.py)",
    "data convert_dicom": "DICOM series: missing slices, mixed series, bad geometry in tests/test_dicom.py",
    "reader_study score": "reads a ratings CSV against key.json: bad sheets in tests/test_reader_study.py",
    "adapt_brats": "reads a BraTS checkpoint, no scan: a malicious checkpoint in tests/test_security.py",
    "check_bundle": "reads a bundle's configs",
    "sync_bundle_scripts": "copies tools/bundle_scripts into the bundles",
    "report": "reads the studies' own result tables",
    "demo": "makes its own phantom data set",
}


def _cli_commands() -> list[str]:
    """Every command of ``python -m tools`` (fire exposes the public methods of Cli and of its groups)."""
    import inspect

    from tools.cli import Cli

    cli = Cli()
    commands = []
    for name, member in inspect.getmembers(cli):
        if name.startswith("_"):
            continue
        if inspect.ismethod(member):
            commands.append(name)
        else:  # a group (data, evaluate, study, reader_study)
            commands += [f"{name} {sub}" for sub, m in inspect.getmembers(member, inspect.ismethod)
                         if not sub.startswith("_")]  # fmt: skip
    return commands


def test_every_tools_command_that_reads_scans_is_an_entry_point_of_the_suite():
    names = [e.name for e in entry_points()]
    commands = _cli_commands()
    assert {"synthesize", "evaluate seg", "study ratio", "reader_study build", "mix"} <= set(commands)
    for command in commands:
        if command in READS_NO_SCAN:
            continue
        assert any(name.startswith(f"tools {command}") for name in names), f"`tools {command}` is not in the suite"
    for name in ("tools study ratio --real", "tools study ratio --synthetic", "tools evaluate synthetic (real set)",
                 "tools evaluate synthetic (synthetic set)", "tools evaluate synthetic (training set)",
                 "tools reader_study build (real)", "tools reader_study build (synthetic)"):  # fmt: skip
        assert name in names, name  # each input of a command that reads several sets is a row of its own
    assert set(READS_NO_SCAN) <= set(commands), set(READS_NO_SCAN) - set(commands)


def test_synthesize_checks_every_source_before_it_writes(tmp_path):
    """A bad mask anywhere in the source is refused before the output folder (and its manifest) exists."""
    from tools.synthesize import synthesize

    data = write_dataset(tmp_path / "data", n_training=3)
    label = data / "labelsTr" / "case_002.nii.gz"  # the last record: a bundle would reach it after two cases
    image = nib.load(str(label))
    array = np.asarray(image.dataobj).copy()
    array[array == 2] = 7
    nib.save(nib.Nifti1Image(array, image.affine), str(label))
    with pytest.raises(InputError, match="outside the label set") as info:
        synthesize("vae_ct", data, tmp_path / "out", ckpt_dir=tmp_path, progress=False)
    assert "case_002" in str(info.value)
    assert not (tmp_path / "out").exists()


def test_the_runner_counts_a_pipeline_that_does_not_check_as_lost(monkeypatch):
    """The suite can fail: with the checks switched off, bad voxels go through and are counted as lost."""
    monkeypatch.setattr("tools.datasets.validate_records", lambda records, **kwargs: records)
    report = run_suite(entry_filter="tools data list", kind_filter="nan_voxels")
    assert report.line() == "1 cases, 0 handled, 1 lost" and report.results[0].problem == "no error raised"


def test_tools_and_bundles_raise_one_error_type():
    assert ToolsInputError is InputError and issubclass(InputError, ValueError)
    error = InputError("/data/x.nii.gz", "empty label")
    assert str(error) == "/data/x.nii.gz: empty label" and (error.path, error.problem) == (
        "/data/x.nii.gz",
        "empty label",
    )
    import pickle

    assert str(pickle.loads(pickle.dumps(error))) == str(error)  # survives DataLoader worker processes


def test_header_checks_fail_before_any_voxel_is_read(tmp_path, monkeypatch):
    ct, _ = valid_volumes()
    path = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(ct, np.diag([2.0, 2.0, 3.0, 1.0])), str(path))
    read = []
    monkeypatch.setattr(nib.arrayproxy.ArrayProxy, "__array__", lambda *a, **k: read.append(1))
    assert check_header(path)[0] == ct.shape
    with pytest.raises(InputError, match="memory guard"):
        check_header(path, max_bytes=1000)
    monkeypatch.setenv("PANCREAS_CT_MAX_VOLUME_BYTES", "1000")
    with pytest.raises(InputError, match="memory guard"):
        check_header(path)
    assert not read


def test_a_truncated_gzip_is_caught_from_its_trailer(tmp_path):
    ct, _ = valid_volumes()
    path = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(ct, np.eye(4)), str(path))
    data = path.read_bytes()
    for cut in (len(data) - 1, len(data) - 100, len(data) // 2, 400):
        (tmp_path / "cut.nii.gz").write_bytes(data[:cut])
        with pytest.raises(InputError, match="cut.nii.gz: .*(truncated|corrupt)"):
            check_header(tmp_path / "cut.nii.gz")
    # a valid multi-member gzip (its trailer holds the last member's size only) is confirmed by decompressing
    raw = gzip.decompress(data)
    (tmp_path / "members.nii.gz").write_bytes(gzip.compress(raw[:1000]) + gzip.compress(raw[1000:]))
    assert check_header(tmp_path / "members.nii.gz")[0] == ct.shape


def test_paths_must_stay_inside_the_data_folder(tmp_path):
    data, outside = tmp_path / "data", tmp_path / "outside"
    (data / "imagesTr").mkdir(parents=True)
    outside.mkdir()
    (outside / "x.nii.gz").write_bytes(b"")
    (data / "imagesTr" / "a.nii.gz").write_bytes(b"")
    (data / "imagesTr" / "link.nii.gz").symlink_to(outside / "x.nii.gz")
    os.symlink(data / "imagesTr", data / "inside_link")  # a link that stays inside is fine
    check_inside("imagesTr/a.nii.gz", data)
    check_inside(str(data / "inside_link" / "a.nii.gz"), data)
    for bad in ("../outside/x.nii.gz", str(outside / "x.nii.gz"), "imagesTr/link.nii.gz", "imagesTr/../../x"):
        with pytest.raises(InputError, match="outside the data folder"):
            check_inside(bad, data)


def test_validate_datalist_checks_files_and_grids_without_loading(tmp_path):
    root = write_dataset(tmp_path / "data")
    records = [{"image": str(root / "imagesTr/case_000.nii.gz"), "label": str(root / "labelsTr/case_000.nii.gz")}]
    assert validate_datalist(records, base_dir=root) is records
    label = nib.load(str(root / "labelsTr/case_000.nii.gz"))
    nib.save(nib.Nifti1Image(np.asarray(label.dataobj)[:-1], label.affine), str(root / "labelsTr/case_000.nii.gz"))
    with pytest.raises(InputError, match="labelsTr/case_000.nii.gz: label grid mismatch"):
        validate_datalist(records, base_dir=root)
    with pytest.raises(InputError, match="missing.nii.gz: file not found"):
        validate_datalist([{"image": str(root / "missing.nii.gz")}])


def test_voxel_checks_name_the_file_from_the_metatensor():
    from monai.data import MetaTensor

    ct, label = valid_volumes()
    check = ValidateCTd(keys=["image", "label"], allowed_labels=[0, 1, 2])
    item = {"image": MetaTensor(torch.as_tensor(ct.astype(np.float32)), meta={"filename_or_obj": "/d/ct.nii.gz"}),
            "label": MetaTensor(torch.as_tensor(label), meta={"filename_or_obj": "/d/lab.nii.gz"})}  # fmt: skip
    assert check(item) is item
    item["label"] = MetaTensor(torch.as_tensor(label * 3), meta={"filename_or_obj": "/d/lab.nii.gz"})
    with pytest.raises(InputError, match=r"/d/lab.nii.gz: label values \[3, 6\] are outside the label set"):
        check(item)
    with pytest.raises(InputError, match="/d/mr.nii.gz: does not look like CT"):
        validation.check_ct_intensity("/d/mr.nii.gz", np.abs(ct))


def test_datalist_json_escape_is_refused_by_the_tools_reader(tmp_path):
    from tools.datasets import read_msd

    root = write_dataset(tmp_path / "data")
    content = json.loads((root / "dataset.json").read_text())
    content["training"][0]["image"] = "../../etc/passwd"
    (root / "dataset.json").write_text(json.dumps(content))
    with pytest.raises(InputError, match="outside the data folder"):
        read_msd(root)
