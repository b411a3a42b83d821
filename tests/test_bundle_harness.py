"""Tests of the bundle check harness (tools/bundle_check.py) on a tiny but real bundle, tests/fixtures/tiny_bundle.

Positive tests show that every check passes on a bundle that follows the conventions (and that a one-epoch training
run writes a checkpoint that evaluation, inference and TorchScript export use); negative tests break one convention
at a time and show that the matching check fails with a message naming the bundle, the config and the problem.
The fixture is always copied to a temporary folder first: checks and runs write into the bundle they are given.
"""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from tools import bundle_check
from tools.bundle_check import (
    BundleCheckError,
    bundles_without_harness_test,
    check_bundle,
    check_bundle_cli,
    check_bundle_layout,
    check_metadata_fields,
    check_workflow_properties,
    discover_bundles,
    export_torchscript_and_compare,
    run_workflow,
    verify_bundle_metadata,
    verify_network_in_out,
)

FIXTURE_BUNDLE = Path(__file__).parent / "fixtures" / "tiny_bundle"
CASE_SHAPE = (16, 16, 16)
N_CASES = 3  # train.json trains on cases 0 and 1 and validates on case 2


def write_blob_cases(folder: Path, n_cases: int = N_CASES, shape: tuple[int, int, int] = CASE_SHAPE) -> Path:
    """``case_XXX_image.nii.gz`` (noise around 0 HU with one bright sphere) and ``case_XXX_label.nii.gz`` (sphere=1)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    grid = np.stack(np.meshgrid(*[np.arange(size) for size in shape], indexing="ij"), axis=-1)
    affine = np.diag([1.5, 1.5, 2.0, 1.0])
    for case in range(n_cases):
        centre = rng.uniform(5, np.array(shape) - 5)
        label = (np.linalg.norm(grid - centre, axis=-1) < rng.uniform(3, 5)).astype(np.uint8)
        image = rng.normal(0, 20, shape) + 150.0 * label
        nib.save(nib.Nifti1Image(image.astype(np.float32), affine), folder / f"case_{case:03d}_image.nii.gz")
        nib.save(nib.Nifti1Image(label, affine), folder / f"case_{case:03d}_label.nii.gz")
    return folder


def copy_fixture(destination: Path) -> Path:
    """A writable copy of the fixture bundle (checks and runs write checkpoints and outputs into the bundle)."""
    return Path(shutil.copytree(FIXTURE_BUNDLE, destination / "tiny_bundle"))


def edit_json(path: Path, edit) -> None:
    """Apply ``edit(content)`` (which changes the dict in place) to a JSON file."""
    content = json.loads(path.read_text())
    edit(content)
    path.write_text(json.dumps(content, indent=1))


@pytest.fixture(scope="module")
def blob_dataset(tmp_path_factory) -> Path:
    return write_blob_cases(tmp_path_factory.mktemp("blob_dataset"))


@pytest.fixture(scope="module")
def shared_bundle(tmp_path_factory) -> Path:
    """One copy of the fixture for the tests that only read it (they must not change it)."""
    return copy_fixture(tmp_path_factory.mktemp("shared_bundle"))


@pytest.fixture()
def bundle(tmp_path) -> Path:
    """A fresh copy of the fixture for a test that breaks something in it."""
    return copy_fixture(tmp_path)


@pytest.fixture(scope="module")
def trained_bundle(tmp_path_factory, blob_dataset) -> tuple[Path, object]:
    """The fixture trained for one epoch on the blob data set: (bundle folder, finished train workflow)."""
    bundle_dir = copy_fixture(tmp_path_factory.mktemp("trained_bundle"))
    workflow = run_workflow(
        bundle_dir,
        "configs/train.json",
        "train",
        overrides={"dataset_dir": str(blob_dataset), "train#trainer#max_epochs": 1},
    )
    return bundle_dir, workflow


@pytest.fixture()
def offline(monkeypatch):
    """Any attempt to open a network connection fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


# ----------------------------------------------------------------------------------------------------------------
# discovery and the guard that every bundle has its harness test


def test_discover_bundles_lists_only_folders_with_metadata(tmp_path):
    (tmp_path / "alpha" / "configs").mkdir(parents=True)
    (tmp_path / "alpha" / "configs" / "metadata.json").write_text("{}")
    (tmp_path / "beta" / "configs").mkdir(parents=True)  # configs but no metadata: not a bundle (yet)
    (tmp_path / "gamma").mkdir()
    (tmp_path / "notes.txt").write_text("not a folder")
    assert discover_bundles(tmp_path) == [tmp_path / "alpha"]
    assert discover_bundles(tmp_path / "absent") == []


def test_discover_bundles_default_root_is_the_repository_bundles_folder():
    found = discover_bundles()
    assert all(path.parent == bundle_check.REPO_ROOT / "bundles" for path in found)
    assert all((path / "configs" / "metadata.json").is_file() for path in found)


def test_bundles_without_harness_test_names_each_uncovered_bundle(tmp_path):
    for name in ("alpha", "beta", "gamma"):
        (tmp_path / "bundles" / name / "configs").mkdir(parents=True)
        (tmp_path / "bundles" / name / "configs" / "metadata.json").write_text("{}")
    tests_dir = tmp_path / "tests"
    tests_dir.mkdir()
    (tests_dir / "test_bundle_alpha.py").write_text("def test_it():\n    check_bundle(BUNDLE, overrides=OVERRIDES)\n")
    (tests_dir / "test_bundle_gamma.py").write_text("def test_it():\n    assert True  # mentions check_bundle only\n")
    uncovered = bundles_without_harness_test(tmp_path / "bundles", tests_dir)
    assert sorted(uncovered) == ["beta", "gamma"]
    assert "test_bundle_beta.py does not exist" in uncovered["beta"]
    assert "calls none of" in uncovered["gamma"]


def test_every_bundle_has_its_harness_test():
    """Each bundle under bundles/ needs tests/test_bundle_<name>.py calling the harness (passes while none exist)."""
    uncovered = bundles_without_harness_test()
    assert not uncovered, "bundles without a harness test:\n" + "\n".join(
        f"  {name}: {reason}" for name, reason in uncovered.items()
    )


# ----------------------------------------------------------------------------------------------------------------
# layout and metadata


def test_layout_passes_on_the_fixture(shared_bundle):
    seen = check_bundle_layout(shared_bundle)
    assert set(bundle_check.REQUIRED_FILES) <= set(seen)


def test_layout_names_the_missing_file(bundle):
    (bundle / "docs" / "data_license.txt").unlink()
    with pytest.raises(BundleCheckError, match=r"bundle 'tiny_bundle' \(layout\): .*docs/data_license.txt"):
        check_bundle_layout(bundle)


def test_layout_rejects_a_broken_logging_conf(bundle):
    (bundle / "configs" / "logging.conf").write_text("[loggers]\nkeys=root\n")
    with pytest.raises(BundleCheckError, match=r"configs/logging.conf.*handlers"):
        check_bundle_layout(bundle)


def test_layout_allows_a_large_file_only_when_large_files_yml_lists_it(bundle):
    weights = bundle / "models" / "model.pt"
    weights.parent.mkdir(exist_ok=True)
    with weights.open("wb") as sparse:
        sparse.truncate((bundle_check.MAX_COMMITTED_FILE_MB + 1) * 2**20)
    with pytest.raises(BundleCheckError, match=r"over 25 MB that large_files.yml does not list: models/model.pt"):
        check_bundle_layout(bundle)
    (bundle / "large_files.yml").write_text(
        'large_files:\n  - path: "models/model.pt"\n    url: "https://example.org/model.pt"\n'
        '    hash_val: "0123456789abcdef"\n    hash_type: "md5"\n'
    )
    assert "models/model.pt" in check_bundle_layout(bundle)


@pytest.mark.shared
def test_verify_bundle_metadata_passes_offline_and_leaves_the_schema_alone(shared_bundle, meta_schema, offline):
    schema_before = meta_schema.read_bytes()
    metadata = verify_bundle_metadata(shared_bundle, meta_schema)
    assert metadata["version"] in metadata["changelog"]
    assert meta_schema.read_bytes() == schema_before


@pytest.mark.shared
@pytest.mark.parametrize(
    "edit, problem",
    [
        (lambda meta: meta.pop("authors"), "'authors' is a required property"),
        (lambda meta: meta.pop("numpy_version"), "numpy_version"),
        (lambda meta: meta["changelog"].pop(meta["version"]), "changelog"),
        (lambda meta: meta["changelog"].update({"9.0.0": "from the future"}), "newer than version"),
        (lambda meta: meta.update(version="1.0"), "X.Y.Z"),
        (lambda meta: meta.update(required_packages_version={"nibabel": ""}), "required_packages_version"),
        (lambda meta: meta["network_data_format"]["outputs"].pop("pred"), "outputs#pred"),
        (lambda meta: meta.update(schema="https://example.org/meta_schema_20220324.json"), "`schema` must be"),
    ],
    ids=["schema-field", "numpy_version", "changelog-entry", "newer-changelog", "version", "package", "pred", "url"],
)
def test_verify_bundle_metadata_fails_without_a_required_field(bundle, meta_schema, offline, edit, problem):
    edit_json(bundle / "configs" / "metadata.json", edit)
    with pytest.raises(BundleCheckError) as failure:
        verify_bundle_metadata(bundle, meta_schema)
    assert "bundle 'tiny_bundle' (configs/metadata.json)" in str(failure.value)
    assert problem in str(failure.value)


def test_verify_bundle_metadata_never_downloads_a_missing_schema(shared_bundle, tmp_path, offline):
    with pytest.raises(FileNotFoundError, match="never downloaded"):
        verify_bundle_metadata(shared_bundle, tmp_path / "meta_schema_20240725.json")


def test_metadata_fields_are_checked_without_a_schema(bundle):
    assert check_metadata_fields(bundle)["monai_version"] == "1.5.2"
    edit_json(bundle / "configs" / "metadata.json", lambda meta: meta.update(pytorch_version=""))
    with pytest.raises(BundleCheckError, match="pytorch_version"):
        check_metadata_fields(bundle)


# ----------------------------------------------------------------------------------------------------------------
# workflow properties


@pytest.mark.parametrize(
    "config_files, workflow_type, instantiate",
    [
        ("configs/train.json", "train", True),
        (["configs/train.json", "configs/evaluate.json"], "train", True),
        (["configs/train.json", "configs/multi_gpu_train.json"], "train", False),
        ("configs/inference.json", "inference", True),
    ],
    ids=["train", "train+evaluate", "train+multi_gpu(ids)", "inference"],
)
def test_check_workflow_properties_passes(shared_bundle, config_files, workflow_type, instantiate):
    checked = check_workflow_properties(shared_bundle, config_files, workflow_type, instantiate=instantiate)
    expected = {"trainer", "max_epochs", "train_dataset"} if workflow_type == "train" else {"evaluator", "inferer"}
    assert expected <= set(checked)


def test_check_workflow_properties_fails_without_train_trainer(bundle):
    edit_json(bundle / "configs" / "train.json", lambda config: config["train"].pop("trainer"))
    with pytest.raises(BundleCheckError) as failure:
        check_workflow_properties(bundle, "configs/train.json", "train")
    message = str(failure.value)
    assert "bundle 'tiny_bundle' (configs/train.json)" in message
    assert "trainer (id 'train::trainer')" in message and "max_epochs" in message


def test_check_workflow_properties_fails_on_an_optional_property_with_the_wrong_id(bundle):
    def refer_to_validation_handlers(config):
        config["train"]["trainer"]["train_handlers"] = "@validate#handlers"

    edit_json(bundle / "configs" / "train.json", refer_to_validation_handlers)
    with pytest.raises(BundleCheckError, match=r"other than MONAI's: \['train_handlers'\]"):
        check_workflow_properties(bundle, "configs/train.json", "train")


def test_check_workflow_properties_names_a_property_that_fails_to_build(bundle, tmp_path):
    overrides = {"dataset_dir": str(tmp_path / "no_data"), "train#dataset#_target_": "CacheDataset"}
    with pytest.raises(BundleCheckError, match=r"required property '\w+' .* fails to build"):
        check_workflow_properties(bundle, "configs/train.json", "train", overrides=overrides)


def test_check_workflow_properties_rejects_an_override_without_a_parent(shared_bundle):
    with pytest.raises(BundleCheckError, match="cannot override 'train#trainer#max_epochs'"):
        check_workflow_properties(
            shared_bundle, "configs/inference.json", "infer", overrides={"train#trainer#max_epochs": 1}
        )


def test_check_workflow_properties_rejects_an_unknown_workflow_type(shared_bundle):
    with pytest.raises(ValueError, match="workflow_type 'deploy'"):
        check_workflow_properties(shared_bundle, "configs/train.json", "deploy")


# ----------------------------------------------------------------------------------------------------------------
# network input / output


@pytest.mark.parametrize("n, spatial", [(1, 16), (2, 32)])
def test_verify_network_in_out_passes(shared_bundle, n, spatial):
    assert verify_network_in_out(shared_bundle, n=n) == (1, 2, spatial, spatial, spatial)


def test_verify_network_in_out_fails_when_the_channels_do_not_match(shared_bundle):
    with pytest.raises(BundleCheckError) as failure:
        verify_network_in_out(shared_bundle, overrides={"network_def#out_channels": 3})
    assert "bundle 'tiny_bundle' (configs/inference.json)" in str(failure.value)
    assert "output channel number `3` doesn't match: `2`" in str(failure.value)


def test_verify_network_in_out_fails_when_the_spatial_shape_does_not_match(shared_bundle):
    half_size = {"_meta_#network_data_format#outputs#pred#spatial_shape": ["8*n", "8*n", "8*n"]}
    with pytest.raises(BundleCheckError, match=r"spatial shape \(16, 16, 16\).*gives \(8, 8, 8\)"):
        verify_network_in_out(shared_bundle, overrides=half_size)


def test_verify_network_in_out_checks_a_further_network_against_its_data_format(bundle):
    """A ``<name>_data_format`` block describes ``<name>_def``: here a 3-class head next to the main network."""

    def add_head_format(meta):
        head = json.loads(json.dumps(meta["network_data_format"]))
        head["outputs"]["pred"]["num_channels"] = 3
        meta["head_data_format"] = head

    def add_head(config):
        config["head_def"] = {**config["network_def"], "out_channels": 3}

    edit_json(bundle / "configs" / "metadata.json", add_head_format)
    edit_json(bundle / "configs" / "inference.json", add_head)
    assert verify_network_in_out(bundle, "head_def", data_format="head_data_format") == (1, 3, 16, 16, 16)
    with pytest.raises(BundleCheckError, match="doesn't match"):
        verify_network_in_out(bundle, "network_def", data_format="head_data_format")
    summary = check_bundle(bundle, schema_path=None, export=False, raise_on_failure=False)
    assert [result.status for result in summary.results if result.name == "net in/out: head_def"] == ["pass"]


# ----------------------------------------------------------------------------------------------------------------
# TorchScript export


@pytest.mark.parametrize("use_trace", [False, True], ids=["script", "trace"])
def test_export_torchscript_matches_the_eager_network(shared_bundle, tmp_path, use_trace):
    ts_file = tmp_path / "model.ts"
    result = export_torchscript_and_compare(shared_bundle, use_trace=use_trace, filepath=ts_file)
    assert result.input_shape == (1, 1, 16, 16, 16)
    assert result.output_shapes == [(1, 2, 16, 16, 16)]
    assert result.max_abs_diff <= 1e-5
    assert result.ts_file == ts_file and ts_file.is_file()
    assert result.exported_metadata["version"] == "0.1.1"


def test_export_fails_for_a_missing_checkpoint(shared_bundle, tmp_path):
    with pytest.raises(BundleCheckError, match="checkpoint .*absent.pt does not exist"):
        export_torchscript_and_compare(shared_bundle, ckpt_file=tmp_path / "absent.pt")


def test_export_fails_for_a_checkpoint_that_needs_more_than_weights_only(shared_bundle, tmp_path):
    with_numpy = tmp_path / "with_numpy.pt"
    torch.save({"weight": torch.zeros(2), "best_metric": np.float64(0.5)}, with_numpy)
    with pytest.raises(BundleCheckError, match="does not load with weights_only=True"):
        export_torchscript_and_compare(shared_bundle, ckpt_file=with_numpy)


def test_export_fails_for_a_checkpoint_of_another_network(shared_bundle, tmp_path):
    other = tmp_path / "other.pt"
    torch.save(torch.nn.Conv3d(1, 2, 3).state_dict(), other)
    with pytest.raises(BundleCheckError, match="ckpt_export\\('network_def'\\) failed"):
        export_torchscript_and_compare(shared_bundle, ckpt_file=other)


# ----------------------------------------------------------------------------------------------------------------
# running the workflows: train writes a checkpoint that evaluate, inference and export use


def test_run_workflow_trains_one_epoch_and_writes_a_checkpoint(trained_bundle):
    bundle_dir, workflow = trained_bundle
    assert workflow.trainer.state.epoch == 1
    assert workflow.trainer.state.iteration == 2  # two training cases, batch size 1
    evaluator = workflow.parser.get_parsed_content("validate#evaluator")
    assert 0.0 <= evaluator.state.metrics["val_mean_dice"] <= 1.0
    checkpoint = bundle_dir / "models" / "model.pt"
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    assert set(state) == set(workflow.parser.get_parsed_content("network_def").state_dict())


def test_run_workflow_evaluates_the_checkpoint(trained_bundle, blob_dataset):
    bundle_dir, _ = trained_bundle
    output_dir = bundle_dir / "eval_run"
    workflow = run_workflow(
        bundle_dir,
        ["configs/train.json", "configs/evaluate.json"],
        "train",
        logging_file=False,
        overrides={"dataset_dir": str(blob_dataset), "output_dir": str(output_dir)},
    )
    assert 0.0 <= workflow.parser.get_parsed_content("validate#evaluator").state.metrics["val_mean_dice"] <= 1.0
    assert (output_dir / "val_mean_dice_raw.csv").is_file()
    assert nib.load(output_dir / "case_002_image_seg.nii.gz").shape == CASE_SHAPE


def test_run_workflow_infers_a_segmentation_for_every_image(trained_bundle, blob_dataset):
    bundle_dir, _ = trained_bundle
    output_dir = bundle_dir / "inference_run"
    run_workflow(
        bundle_dir,
        "configs/inference.json",
        "inference",
        overrides={"dataset_dir": str(blob_dataset), "output_dir": str(output_dir)},
    )
    for case in range(N_CASES):
        segmentation = nib.load(output_dir / f"case_{case:03d}_image_seg.nii.gz")
        assert segmentation.shape == CASE_SHAPE
        assert set(np.unique(np.asarray(segmentation.dataobj))) <= {0, 1}
        assert np.allclose(segmentation.affine, nib.load(blob_dataset / f"case_{case:03d}_image.nii.gz").affine)


def test_export_of_the_trained_checkpoint_matches_the_eager_network(trained_bundle):
    bundle_dir, _ = trained_bundle
    result = export_torchscript_and_compare(bundle_dir, ckpt_file=bundle_dir / "models" / "model.pt")
    assert result.max_abs_diff <= 1e-5


def test_run_workflow_names_the_bundle_when_the_run_fails(shared_bundle, tmp_path):
    with pytest.raises(Exception) as failure:  # the workflow's own error type is kept
        run_workflow(shared_bundle, "configs/train.json", "train", logging_file=False, overrides={"dataset_dir": "/x"})
    assert any("bundle 'tiny_bundle' (configs/train.json)" in note for note in failure.value.__notes__)


def test_each_bundle_imports_its_own_scripts_package(tmp_path):
    """Every bundle calls its package ``scripts``; one process must not reuse the first bundle's for the next."""
    for name in ("first", "second"):
        bundle_dir = tmp_path / name
        (bundle_dir / "scripts").mkdir(parents=True)
        (bundle_dir / "configs").mkdir()
        (bundle_dir / "scripts" / "__init__.py").write_text(f"BUNDLE_NAME = {name!r}\n")
        (bundle_dir / "configs" / "metadata.json").write_text(json.dumps({"version": "0.1.0"}))
        marker_config = {
            "imports": ["$import scripts"],
            "bundle_root": ".",
            "run": ["$open(@bundle_root + '/marker.txt', 'w').write(scripts.BUNDLE_NAME)"],
        }
        (bundle_dir / "configs" / "marker.json").write_text(json.dumps(marker_config))
    for name in ("first", "second"):
        run_workflow(tmp_path / name, "configs/marker.json", "infer", logging_file=False)
        assert (tmp_path / name / "marker.txt").read_text() == name


# ----------------------------------------------------------------------------------------------------------------
# all checks of a bundle, and the command line


@pytest.mark.shared
def test_check_bundle_passes_every_check_on_the_fixture(shared_bundle, meta_schema):
    summary = check_bundle(shared_bundle, schema_path=meta_schema)
    assert summary.passed and not summary.failures
    assert [result.name for result in summary.results] == [
        "layout",
        "metadata (meta_schema_20240725.json + SPEC fields)",
        "config keys",
        "properties: train",
        "properties: evaluate",
        "properties: multi_gpu_train (ids only)",
        "properties: inference",
        "net in/out: network_def",
        "TorchScript export: network_def",
    ]
    assert all(result.status == "pass" for result in summary.results)


def test_check_bundle_without_a_schema_checks_the_fields_and_says_the_schema_was_skipped(
    shared_bundle, tmp_path, monkeypatch
):
    monkeypatch.setenv("PCT_SHARED_DIR", str(tmp_path / "no_shared"))
    summary = check_bundle(shared_bundle, export=False)
    statuses = {result.name: result.status for result in summary.results}
    assert statuses["metadata (SPEC fields)"] == "pass"
    assert statuses["metadata schema"] == "skip"
    assert statuses["TorchScript export"] == "skip"


def test_check_bundle_reports_every_failure(bundle):
    (bundle / "docs" / "README.md").unlink()
    not_a_list = {"image": "a.nii.gz", "label": "b.nii.gz"}  # neither a list nor an expression giving one
    edit_json(bundle / "configs" / "train.json", lambda config: config["train"]["dataset"].update(data=not_a_list))
    edit_json(bundle / "configs" / "inference.json", lambda config: config["network_def"].update(out_channels=3))
    with pytest.raises(BundleCheckError) as failure:
        check_bundle(bundle, export=False)
    report = str(failure.value)
    assert "FAIL  layout" in report and "docs/README.md" in report
    assert "FAIL  config keys" in report and "`train#dataset#data` must be a list" in report
    assert "FAIL  net in/out: network_def" in report and "doesn't match" in report
    assert "PASS  properties: train" in report


@pytest.mark.shared
def test_check_bundle_cli_prints_a_report_and_exits_1_on_failure(bundle, meta_schema, capsys):
    check_bundle_cli(str(bundle), schema=str(meta_schema))
    assert "9 passed, 0 failed, 0 skipped" in capsys.readouterr().out
    edit_json(bundle / "configs" / "metadata.json", lambda meta: meta.pop("copyright"))
    with pytest.raises(SystemExit) as exit_info:
        check_bundle_cli(str(bundle), schema=str(meta_schema), dataset_dir="/nowhere")
    assert exit_info.value.code == 1
    output = capsys.readouterr().out
    assert "FAIL  metadata" in output and "'copyright' is a required property" in output
