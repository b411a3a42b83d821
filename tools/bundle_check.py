"""Checks that every bundle of the collection must pass, shared by the tests of all bundles and by ``check-bundle``.

A bundle here is a MONAI model-zoo style folder (SPEC section 3): ``configs/metadata.json``, ``configs/train.json``,
``configs/inference.json``, ``configs/evaluate.json`` (overlay of train.json), ``configs/multi_gpu_train.json`` (DDP
overlay), ``configs/logging.conf``, ``docs/README.md``, ``docs/data_license.txt``, ``LICENSE``. The checks wrap the
MONAI ones the model zoo runs in its CI (``verify_metadata``, ``ConfigWorkflow.check_properties``,
``verify_net_in_out``, ``ckpt_export``) and add what the SPEC asks beyond them (changelog entry for the version,
package versions, ``train#dataset#data`` a list, ...). Each check raises :class:`BundleCheckError` (an
``AssertionError``) whose message names the bundle, the config file(s) and the problem, so a failing test of any
bundle says at once what to fix.

Every check runs offline and on CPU: the metadata schema is read from a local file (MONAI's ``download_url``
returns early when the target file exists, so nothing is fetched), and the tests of each bundle pass overrides
(small channels, tiny data) to the same configs a GPU user runs at full scale.
"""

from __future__ import annotations

import configparser
import contextlib
import json
import os
import re
import sys
import tempfile
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
SCHEMA_NAME = "meta_schema_20240725.json"

# Files every bundle has (SPEC section 3, model-zoo layout).
REQUIRED_FILES = (
    "configs/metadata.json",
    "configs/train.json",
    "configs/inference.json",
    "configs/evaluate.json",
    "configs/multi_gpu_train.json",
    "configs/logging.conf",
    "docs/README.md",
    "docs/data_license.txt",
    "LICENSE",
)
# Config ids every train.json / inference.json defines (SPEC section 3 "Keys"), beyond MONAI's required properties.
TRAIN_REQUIRED_KEYS = (
    "bundle_root",
    "device",
    "dataset_dir",
    "ckpt_dir",
    "output_dir",
    "network_def",
    "network",
    "train#trainer",
    "train#trainer#max_epochs",
    "train#dataset#data",
    "train#handlers",
    "validate#evaluator",
    "val_interval",
    "initialize",
    "run",
    "finalize",
)
INFER_REQUIRED_KEYS = (
    "bundle_root",
    "device",
    "dataset_dir",
    "output_dir",
    "network_def",
    "network",
    "inferer",
    "initialize",
    "run",
)
# Config ids whose raw value must be a JSON list, not an expression, so MONAI Label can replace it.
TRAIN_LIST_KEYS = ("train#dataset#data",)
# Metadata fields the SPEC requires to be non-empty version strings (the schema only asks for strings).
VERSION_FIELDS = ("monai_version", "pytorch_version", "numpy_version")
MAX_COMMITTED_FILE_MB = 25
# Names a bundle's own test file must call (the guard test greps for them).
HARNESS_FUNCTIONS = (
    "check_bundle",
    "verify_bundle_metadata",
    "check_workflow_properties",
    "verify_network_in_out",
    "export_torchscript_and_compare",
    "run_workflow",
)
WORKFLOW_TYPES = ("train", "training", "infer", "inference", "eval", "evaluation")
_OVERLAY_NAME = "harness_overrides.json"
_SEMVER = re.compile(r"^\d+\.\d+\.\d+$")
_PACKAGE_VERSION = re.compile(r"^\d+(\.\d+)+")


class BundleCheckError(AssertionError):
    """A bundle fails a check. The message reads ``bundle '<name>' (<config files>): <problem>``.

    It is an ``AssertionError`` so that pytest reports it as a failed check of the bundle, not as a crash.
    """

    def __init__(self, bundle_dir: str | os.PathLike, config: str, problem: str):
        self.bundle = Path(bundle_dir).name
        self.config = config
        self.problem = problem
        super().__init__(f"bundle '{self.bundle}' ({config}): {problem}")


# ----------------------------------------------------------------------------------------------------------------
# paths, configs, overrides


def _bundle_path(bundle_dir: str | os.PathLike) -> Path:
    path = Path(bundle_dir).resolve()
    if not (path / "configs").is_dir():
        raise BundleCheckError(path, "configs/", f"{path} is not a bundle: it has no configs/ folder")
    return path


def _resolve_in_bundle(bundle: Path, files: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """Absolute paths of one or several config files given relative to the bundle (or absolute)."""
    items = [files] if isinstance(files, (str, os.PathLike)) else list(files)
    if not items:
        raise ValueError(f"bundle '{bundle.name}': no config file given")
    paths = [(bundle / item) if not Path(item).is_absolute() else Path(item) for item in items]
    for path in paths:
        if not path.is_file():
            raise BundleCheckError(bundle, _label(bundle, paths), f"config file {path} does not exist")
    return paths


def _label(bundle: Path, paths: Sequence[Path]) -> str:
    """``configs/train.json + configs/evaluate.json``: how messages name the config files of a check."""
    names = []
    for path in paths:
        try:
            names.append(path.resolve().relative_to(bundle).as_posix())
        except ValueError:
            names.append(str(path))
    return " + ".join(names)


def _meta_path(bundle: Path, meta_file: str | os.PathLike | None) -> Path:
    path = bundle / "configs" / "metadata.json" if meta_file is None else bundle / meta_file
    if not path.is_file():
        raise BundleCheckError(bundle, _label(bundle, [path]), f"metadata file {path} does not exist")
    return path


def _merged_overrides(bundle: Path, overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    """The caller's overrides plus ``bundle_root`` pointing at the bundle, so relative paths in configs resolve."""
    merged = {"bundle_root": str(bundle)}
    merged.update(dict(overrides or {}))
    return merged


def _apply_overrides(parser: Any, overrides: Mapping[str, Any], bundle: Path, label: str) -> None:
    """Set ``id -> value`` pairs on a ConfigParser; an id whose parent is not in the config is a clear error."""
    for key, value in overrides.items():
        try:
            parser[key] = value
        except (KeyError, TypeError, IndexError) as error:
            raise BundleCheckError(
                bundle, label, f"cannot override '{key}': its parent is not in the config ({error})"
            ) from error


def _load_parser(bundle: Path, config_paths: Sequence[Path], meta_path: Path, overrides: Mapping[str, Any]) -> Any:
    """A ConfigParser of the configs + metadata with the overrides applied (what MONAI's scripts build)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(f=[str(path) for path in config_paths])
    parser.read_meta(f=str(meta_path))
    _apply_overrides(parser, overrides, bundle, _label(bundle, config_paths))
    return parser


@contextlib.contextmanager
def _overrides_as_files(
    overrides: Mapping[str, Any], bundle: Path, meta_path: Path, label: str
) -> Iterator[tuple[Path, Path]]:
    """The overrides written as files for MONAI scripts that take files: ``(config overlay, metadata file)``.

    ``verify_net_in_out`` and ``ckpt_export`` read config overrides from ``**kwargs``, where a config key such as
    ``device`` or ``input_shape`` would collide with their own arguments. A last config file merges exactly like an
    override (MONAI sets each of its ``id: value`` pairs on the parser in turn), without the collision. Both scripts
    read the metadata *after* the configs, replacing ``_meta_`` as a whole, so ``_meta_#...`` overrides go into a
    copy of the metadata instead (the original metadata file when there are none).
    """
    from monai.bundle import ConfigParser

    meta_prefixes = ("_meta_#", "_meta_::")
    config_overrides = {key: value for key, value in overrides.items() if not key.startswith(meta_prefixes)}
    meta_overrides = {key: value for key, value in overrides.items() if key.startswith(meta_prefixes)}
    with tempfile.TemporaryDirectory(prefix="bundle_check_") as tmp:
        overlay = Path(tmp) / _OVERLAY_NAME
        metadata_file = meta_path
        try:
            overlay.write_text(json.dumps(config_overrides, indent=1))
            if meta_overrides:
                metadata = ConfigParser(config=json.loads(meta_path.read_text()))
                for key, value in meta_overrides.items():
                    try:
                        metadata[re.sub(r"^_meta_(#|::)", "", key)] = value
                    except (KeyError, TypeError, IndexError) as error:
                        raise BundleCheckError(
                            bundle, label, f"cannot override '{key}': its parent is not in the metadata ({error})"
                        ) from error
                metadata_file = Path(tmp) / "metadata.json"
                metadata_file.write_text(json.dumps(metadata.get(), indent=1))
        except TypeError as error:
            raise ValueError(
                f"bundle '{bundle.name}' ({label}): overrides must be JSON values (use '$...' expressions for "
                f"Python objects): {error}"
            ) from error
        yield overlay, metadata_file


@contextlib.contextmanager
def _bundle_imports(bundle: Path) -> Iterator[None]:
    """Make ``$import scripts...`` / ``scripts.x`` targets of *this* bundle importable, and forget them afterwards.

    Every bundle names its package ``scripts``; in one test process the first bundle's ``scripts`` would otherwise
    stay in ``sys.modules`` and shadow the next bundle's. ``ConfigWorkflow.run`` also inserts the bundle root into
    ``sys.path`` on every call; the previous ``sys.path`` is restored on exit.
    """

    def forget_scripts() -> None:
        for name in [name for name in sys.modules if name == "scripts" or name.startswith("scripts.")]:
            del sys.modules[name]

    saved_path = list(sys.path)
    forget_scripts()
    sys.path.insert(0, str(bundle))
    try:
        yield
    finally:
        sys.path[:] = saved_path
        forget_scripts()


def _normalise_workflow_type(workflow_type: str, bundle: Path, label: str) -> str:
    if workflow_type.lower() not in WORKFLOW_TYPES:
        raise ValueError(
            f"bundle '{bundle.name}' ({label}): workflow_type '{workflow_type}' is not one of {WORKFLOW_TYPES}"
        )
    return "train" if workflow_type.lower() in ("train", "training") else "infer"


def _make_workflow(
    bundle: Path,
    config_paths: Sequence[Path],
    workflow_type: str,
    meta_path: Path,
    logging_file: str | os.PathLike | bool | None,
    overrides: Mapping[str, Any] | None,
) -> Any:
    """A ConfigWorkflow with ``bundle_root`` and the overrides set on its parser.

    The overrides are set after construction (not passed as ``**override``) so that a config key can never collide
    with a ConfigWorkflow argument, and so a bad key gets a message that names the bundle.
    """
    from monai.bundle import ConfigWorkflow

    label = _label(bundle, config_paths)
    workflow = ConfigWorkflow(
        config_file=[str(path) for path in config_paths],
        meta_file=str(meta_path),
        logging_file=str(logging_file) if isinstance(logging_file, os.PathLike) else logging_file,
        workflow_type=_normalise_workflow_type(workflow_type, bundle, label),
    )
    _apply_overrides(workflow.parser, _merged_overrides(bundle, overrides), bundle, label)
    return workflow


def _fake_spatial_shape(shape: Sequence[str | int], p: int, n: int, any: int) -> tuple[int, ...]:
    """Evaluate a metadata ``spatial_shape`` such as ``["16*n", "2**p", "*", 8]`` (MONAI's conventions)."""
    sizes = []
    for item in shape:
        if isinstance(item, int):
            sizes.append(item)
        elif item == "*":
            sizes.append(any)
        elif isinstance(item, str) and re.fullmatch(r"[0-9np\s*+()-]+", item):
            sizes.append(int(eval(item, {"__builtins__": {}}, {"p": p, "n": n})))  # only digits, n, p, operators
        else:
            raise ValueError(f"spatial_shape item {item!r}: only ints and expressions of 'n', 'p' or '*' are allowed")
    return tuple(sizes)


def _input_shape_from_metadata(parser: Any, data_format: str, p: int = 1, n: int = 1, any: int = 1) -> tuple:
    image = parser.get(f"_meta_#{data_format}#inputs#image")
    if not isinstance(image, Mapping):
        raise KeyError(f"metadata has no `{data_format}#inputs#image`")
    return (1, int(image["num_channels"]), *_fake_spatial_shape(image["spatial_shape"], p=p, n=n, any=any))


def _describe(error: BaseException) -> str:
    """``Type: message`` of an error plus its root cause: MONAI wraps instantiation errors in a generic one."""
    root = error
    while root.__cause__ is not None and root.__cause__ is not root:
        root = root.__cause__
    text = f"{type(error).__name__}: {' '.join(str(error).split())}"
    return text if root is error else f"{text} (caused by {type(root).__name__}: {' '.join(str(root).split())})"


def _tensors(output: Any) -> list:
    """The tensors of a network output (a tensor, or nested tuples / lists / dicts of them), in a fixed order."""
    import torch

    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, Mapping):
        return [tensor for key in sorted(output) for tensor in _tensors(output[key])]
    if isinstance(output, (tuple, list)):
        return [tensor for item in output for tensor in _tensors(item)]
    return []


# ----------------------------------------------------------------------------------------------------------------
# the checks


def _read_text_or_empty(path: Path) -> str:
    return path.read_text() if path.is_file() else ""


def check_bundle_layout(bundle_dir: str | os.PathLike) -> list[str]:
    """The model-zoo files exist, JSON configs parse, ``logging.conf`` is a logging config, no file over 25 MB.

    Large weights are downloaded through ``large_files.yml`` (model-zoo convention); a file over the limit that
    ``large_files.yml`` lists (by its path in the bundle) is allowed: it is downloaded, not committed. Returns the
    files seen.
    """
    bundle = _bundle_path(bundle_dir)
    missing = [name for name in REQUIRED_FILES if not (bundle / name).is_file()]
    if missing:
        raise BundleCheckError(bundle, "layout", f"missing files of the model-zoo layout: {', '.join(missing)}")
    for config in sorted((bundle / "configs").glob("*.json")):
        try:
            json.loads(config.read_text())
        except json.JSONDecodeError as error:
            raise BundleCheckError(bundle, _label(bundle, [config]), f"not valid JSON: {error}") from error
    logging_conf = configparser.ConfigParser()
    try:
        logging_conf.read(bundle / "configs" / "logging.conf")
    except configparser.Error as error:
        raise BundleCheckError(bundle, "configs/logging.conf", f"not an INI file: {error}") from error
    absent_sections = {"loggers", "handlers", "formatters"} - set(logging_conf.sections())
    if absent_sections:
        raise BundleCheckError(
            bundle, "configs/logging.conf", f"not a logging.config file: no section(s) {sorted(absent_sections)}"
        )
    listed = "".join(
        _read_text_or_empty(folder / f"large_files.{suffix}")
        for folder in (bundle, bundle / "models")
        for suffix in ("yml", "yaml", "json")
    )
    too_large = []
    seen = []
    for path in sorted(bundle.rglob("*")):
        if not path.is_file() or "__pycache__" in path.parts:
            continue
        relative = path.relative_to(bundle).as_posix()
        seen.append(relative)
        if path.stat().st_size > MAX_COMMITTED_FILE_MB * 2**20 and relative not in listed:
            too_large.append(f"{relative} ({path.stat().st_size / 2**20:.0f} MB)")
    if too_large:
        raise BundleCheckError(
            bundle,
            "layout",
            f"files over {MAX_COMMITTED_FILE_MB} MB that large_files.yml does not list: {', '.join(too_large)}",
        )
    return seen


def check_metadata_fields(bundle_dir: str | os.PathLike, meta_file: str | os.PathLike | None = None) -> dict:
    """The metadata fields the SPEC requires beyond the schema; returns the metadata.

    - ``version`` is semantic (``X.Y.Z``) and ``changelog`` has an entry for it, and no newer entry;
    - ``monai_version``, ``pytorch_version``, ``numpy_version`` are version strings;
    - ``required_packages_version`` maps each extra package to a version string;
    - ``network_data_format`` has ``inputs#image`` and ``outputs#pred`` tensors with channels, shape and dtype;
    - every further ``<name>_data_format`` block has inputs and outputs.
    """
    bundle = _bundle_path(bundle_dir)
    meta_path = _meta_path(bundle, meta_file)
    label = _label(bundle, [meta_path])
    try:
        metadata = json.loads(meta_path.read_text())
    except json.JSONDecodeError as error:
        raise BundleCheckError(bundle, label, f"not valid JSON: {error}") from error
    problems = []

    version = metadata.get("version")
    changelog = metadata.get("changelog")
    if not isinstance(version, str) or not _SEMVER.match(version):
        problems.append(f"`version` must be a 'X.Y.Z' string, got {version!r}")
    elif not isinstance(changelog, Mapping) or version not in changelog:
        problems.append(f"`changelog` must have an entry for version {version!r}")
    else:
        versions = [key for key in changelog if _SEMVER.match(str(key))]
        if len(versions) != len(changelog):
            problems.append(f"`changelog` keys must be 'X.Y.Z' versions, got {sorted(set(changelog) - set(versions))}")
        newer = [key for key in versions if _version_tuple(key) > _version_tuple(version)]
        if newer:
            problems.append(f"`changelog` has entries newer than version {version!r}: {newer}")
        if not str(changelog.get(version, "")).strip():
            problems.append(f"`changelog` entry for {version!r} is empty")

    for name in VERSION_FIELDS:
        value = metadata.get(name)
        if not isinstance(value, str) or not _PACKAGE_VERSION.match(value):
            problems.append(f"`{name}` must be a version string such as '1.5.2', got {value!r}")

    packages = metadata.get("required_packages_version")
    if not isinstance(packages, Mapping):
        problems.append(f"`required_packages_version` must map package names to versions, got {packages!r}")
    else:
        bad = {name: value for name, value in packages.items() if not isinstance(value, str) or not value.strip()}
        if bad:
            problems.append(f"`required_packages_version` has packages without a version: {bad}")

    formats = {key: value for key, value in metadata.items() if key.endswith("_data_format")}
    if "network_data_format" not in formats:
        problems.append("no `network_data_format`")
    for key, block in formats.items():
        if not isinstance(block, Mapping) or not block.get("inputs") or not block.get("outputs"):
            problems.append(f"`{key}` must have non-empty `inputs` and `outputs`")
    main_format = formats.get("network_data_format")
    if isinstance(main_format, Mapping):
        for where in ("inputs#image", "outputs#pred"):
            section, name = where.split("#")
            tensor = (main_format.get(section) or {}).get(name)
            if not isinstance(tensor, Mapping):
                problems.append(f"`network_data_format#{where}` is missing")
                continue
            for required in ("num_channels", "spatial_shape", "dtype"):
                if required not in tensor:
                    problems.append(f"`network_data_format#{where}` has no `{required}`")
    if problems:
        raise BundleCheckError(bundle, label, "; ".join(problems))
    return metadata


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("."))


def default_schema_path() -> Path | None:
    """The local copy of the metadata schema in ``../shared/reference`` (or ``$PCT_SHARED_DIR``), if present."""
    shared = Path(os.environ.get("PCT_SHARED_DIR", REPO_ROOT.parent / "shared"))
    path = shared / "reference" / SCHEMA_NAME
    return path if path.is_file() else None


def verify_bundle_metadata(
    bundle_dir: str | os.PathLike, schema_path: str | os.PathLike, meta_file: str | os.PathLike | None = None
) -> dict:
    """``monai.bundle.verify_metadata`` against a local schema file, offline, plus :func:`check_metadata_fields`.

    MONAI's ``verify_metadata`` "downloads" the schema URL of the metadata to ``filepath``; ``download_url`` returns
    before any network access when that file exists, so the local schema is passed as ``filepath`` (it is only read,
    never written). The metadata's ``schema`` URL must name the same schema file, so the bundle does not claim a
    schema it was not checked against. Returns the metadata.
    """
    from monai.bundle import verify_metadata

    bundle = _bundle_path(bundle_dir)
    meta_path = _meta_path(bundle, meta_file)
    label = _label(bundle, [meta_path])
    schema = Path(schema_path).resolve()
    if not schema.is_file():
        raise FileNotFoundError(f"bundle '{bundle.name}': schema file {schema} does not exist (it is never downloaded)")
    metadata = json.loads(meta_path.read_text())
    url = metadata.get("schema")
    if not isinstance(url, str) or url.rstrip("/").rsplit("/", 1)[-1] != schema.name:
        raise BundleCheckError(bundle, label, f"`schema` must be the URL of {schema.name}, got {url!r}")
    try:
        verify_metadata(meta_file=str(meta_path), filepath=str(schema), create_dir=False)
    except ValueError as error:
        raise BundleCheckError(bundle, label, f"does not validate against {schema.name}: {error}") from error
    return check_metadata_fields(bundle, meta_file)


def check_config_keys(
    bundle_dir: str | os.PathLike,
    config_file: str | os.PathLike | Sequence[str | os.PathLike],
    required_keys: Sequence[str],
    list_keys: Sequence[str] = (),
) -> None:
    """Every id of ``required_keys`` is in the (merged) config; every id of ``list_keys`` is a plain JSON list.

    This reads the raw config (nothing is instantiated), so it names every missing key at once.
    """
    from monai.bundle import ConfigParser

    bundle = _bundle_path(bundle_dir)
    config_paths = _resolve_in_bundle(bundle, config_file)
    parser = ConfigParser()
    parser.read_config(f=[str(path) for path in config_paths])
    missing = [key for key in required_keys if key not in parser]
    problems = [f"missing keys {missing}"] if missing else []
    for key in list_keys:
        # a literal list, or an expression / reference that yields one (like the model-zoo bundles); MONAI Label
        # replaces the value with its own list, which the bundle tests exercise
        value = parser[key] if key in parser else None
        if key in parser and not (isinstance(value, list) or (isinstance(value, str) and value[:1] in ("$", "@"))):
            problems.append(
                f"`{key}` must be a list or an expression giving one (MONAI Label replaces it), " f"got {value!r:.80}"
            )
    if problems:
        raise BundleCheckError(bundle, _label(bundle, config_paths), "; ".join(problems))


def check_config_conventions(bundle_dir: str | os.PathLike) -> None:
    """The SPEC's keys in ``train.json`` (+ ``train#dataset#data`` a list or a list expression) and
    ``inference.json``."""
    check_config_keys(bundle_dir, "configs/train.json", TRAIN_REQUIRED_KEYS, TRAIN_LIST_KEYS)
    check_config_keys(bundle_dir, "configs/inference.json", INFER_REQUIRED_KEYS)


def check_workflow_properties(
    bundle_dir: str | os.PathLike,
    config_file: str | os.PathLike | Sequence[str | os.PathLike],
    workflow_type: str,
    meta_file: str | os.PathLike | None = None,
    overrides: Mapping[str, Any] | None = None,
    instantiate: bool = True,
) -> list[str]:
    """``ConfigWorkflow(...).check_properties()`` of a train or inference workflow returns an empty list.

    ``config_file`` may be several files merged in order (``["configs/train.json", "configs/evaluate.json"]``).
    First every required property's config id must be present and every optional property that the config refers
    to must use MONAI's id (all problems are listed at once). Then, with ``instantiate=True``, the workflow is
    initialised and each required property is built, as MONAI Label does: a property that fails to build is named
    with its error, and ``check_properties()`` itself must return ``[]``. ``instantiate=False`` is for overlays that
    cannot be built on this machine (the DDP overlay needs an initialised process group). Instantiating builds the
    trainer with its data loader and dataset; a ``CacheDataset`` loads its data then, so pass ``dataset_dir`` (or
    ``train#dataset#data``) in ``overrides`` where the default data is absent.

    Returns the names of the properties checked.
    """
    from monai.bundle.properties import BundleProperty, BundlePropertyConfig

    bundle = _bundle_path(bundle_dir)
    config_paths = _resolve_in_bundle(bundle, config_file)
    label = _label(bundle, config_paths)
    meta_path = _meta_path(bundle, meta_file)
    with _bundle_imports(bundle):
        workflow = _make_workflow(bundle, config_paths, workflow_type, meta_path, False, overrides)
        # resolve macros and relative / `#` ids (nothing is instantiated) so references compare as MONAI compares them
        workflow.parser.parse(reset=True)
        properties = dict(workflow.properties or {})
        missing = [
            f"{name} (id '{prop[BundlePropertyConfig.ID]}')"
            for name, prop in properties.items()
            if prop.get(BundleProperty.REQUIRED, False) and prop[BundlePropertyConfig.ID] not in workflow.parser
        ]
        wrong_ids = [
            name
            for name, prop in properties.items()
            if not prop.get(BundleProperty.REQUIRED, False) and not workflow._check_optional_id(name, prop)
        ]
        problems = []
        if missing:
            problems.append(f"{workflow.workflow_type} workflow lacks required properties: {', '.join(missing)}")
        if wrong_ids:
            problems.append(
                f"optional properties referred to with an id other than MONAI's: {wrong_ids} (e.g. the trainer's "
                "train_handlers must be '@train#handlers')"
            )
        if problems:
            raise BundleCheckError(bundle, label, "; ".join(problems))
        if instantiate:
            workflow.initialize()
            for name, prop in properties.items():
                if not prop.get(BundleProperty.REQUIRED, False):
                    continue
                try:
                    getattr(workflow, name)
                except Exception as error:
                    raise BundleCheckError(
                        bundle,
                        label,
                        f"required property '{name}' (id '{prop[BundlePropertyConfig.ID]}') fails to build: "
                        f"{_describe(error)}",
                    ) from error
            not_found = workflow.check_properties()
            if not_found:
                raise BundleCheckError(bundle, label, f"check_properties() returned {not_found}")
    return sorted(properties)


def verify_network_in_out(
    bundle_dir: str | os.PathLike,
    net_id: str = "network_def",
    config_file: str | os.PathLike | Sequence[str | os.PathLike] = "configs/inference.json",
    overrides: Mapping[str, Any] | None = None,
    meta_file: str | os.PathLike | None = None,
    data_format: str = "network_data_format",
    p: int | None = None,
    n: int | None = None,
    any: int | None = None,
    extra_forward_args: Mapping[str, Any] | None = None,
    device: str | None = None,
    check_spatial_shape: bool = True,
) -> tuple[int, ...]:
    """``monai.bundle.verify_net_in_out`` for ``net_id``, plus the output's spatial shape; returns the output shape.

    MONAI's check feeds a random input of the metadata's ``inputs#image`` shape (``"16*n"`` evaluated with ``n``,
    ``"2**p"`` with ``p``, ``"*"`` with ``any``) and compares only the output's channel count and dtype with
    ``outputs#pred``. With ``check_spatial_shape`` the output's spatial shape must also equal ``outputs#pred``'s
    ``spatial_shape`` evaluated with the same ``p``/``n``/``any`` (a segmentation net keeps the input's size; a
    latent-space net declares its own). ``data_format`` selects a further network's ``<name>_data_format`` block.
    """
    import torch
    from monai.bundle import verify_net_in_out

    bundle = _bundle_path(bundle_dir)
    config_paths = _resolve_in_bundle(bundle, config_file)
    label = _label(bundle, config_paths)
    meta_path = _meta_path(bundle, meta_file)
    overrides = _merged_overrides(bundle, overrides)
    device = device or "cpu"
    with _bundle_imports(bundle):
        parser = _load_parser(bundle, config_paths, meta_path, overrides)
        io_format = parser.get(f"_meta_#{data_format}")
        if not isinstance(io_format, Mapping):
            raise BundleCheckError(bundle, label, f"metadata has no `{data_format}` for network '{net_id}'")
        if net_id not in parser:
            raise BundleCheckError(bundle, label, f"no network '{net_id}' in the config")
        if data_format != "network_data_format":
            # MONAI reads `network_data_format` only: describe the further network there for this check.
            overrides = {**overrides, "_meta_#network_data_format": dict(io_format)}
        with _overrides_as_files(overrides, bundle, meta_path, label) as (overlay, metadata_file):
            try:
                verify_net_in_out(
                    net_id=net_id,
                    meta_file=str(metadata_file),
                    config_file=[*(str(path) for path in config_paths), str(overlay)],
                    device=device,
                    p=p,
                    n=n,
                    any=any,
                    extra_forward_args=dict(extra_forward_args or {}),
                )
            except Exception as error:
                raise BundleCheckError(
                    bundle, label, f"verify_net_in_out('{net_id}', `{data_format}`) failed: {error}"
                ) from error

        sizes = {"p": 1 if p is None else p, "n": 1 if n is None else n, "any": 1 if any is None else any}
        input_shape = _input_shape_from_metadata(parser, data_format, **sizes)
        input_dtype = getattr(torch, str(io_format["inputs"]["image"]["dtype"]).replace("torch.", ""))
        network = parser.get_parsed_content(net_id).to(device).eval()
        with torch.no_grad():
            output = network(torch.rand(input_shape, dtype=input_dtype, device=device), **(extra_forward_args or {}))
    output_tensor = _tensors(output)[0]
    if check_spatial_shape:
        pred = io_format["outputs"]["pred"]
        expected = _fake_spatial_shape(pred["spatial_shape"], **sizes)
        if tuple(output_tensor.shape[2:]) != expected:
            raise BundleCheckError(
                bundle,
                label,
                f"network '{net_id}' maps an input {tuple(input_shape)} to spatial shape "
                f"{tuple(output_tensor.shape[2:])}, but `{data_format}#outputs#pred#spatial_shape` "
                f"{pred['spatial_shape']} gives {expected} with {sizes}",
            )
    return tuple(output_tensor.shape)


@dataclass
class ExportResult:
    """What :func:`export_torchscript_and_compare` measured."""

    input_shape: tuple[int, ...]
    output_shapes: list[tuple[int, ...]]
    max_abs_diff: float
    ts_file: Path | None  # None when the export went to a temporary folder that is gone now
    exported_metadata: dict = field(default_factory=dict)


def export_torchscript_and_compare(
    bundle_dir: str | os.PathLike,
    net_id: str = "network_def",
    config_file: str | os.PathLike | Sequence[str | os.PathLike] = "configs/inference.json",
    ckpt_file: str | os.PathLike | None = None,
    input_shape: Sequence[int] | None = None,
    overrides: Mapping[str, Any] | None = None,
    atol: float = 1e-5,
    rtol: float = 1e-4,
    meta_file: str | os.PathLike | None = None,
    key_in_ckpt: str = "",
    use_trace: bool = False,
    filepath: str | os.PathLike | None = None,
    extra_forward_args: Mapping[str, Any] | None = None,
) -> ExportResult:
    """``monai.bundle.ckpt_export`` to TorchScript, then the ``.ts`` must compute what the eager network computes.

    Without ``ckpt_file`` the freshly initialised network's ``state_dict`` is saved to a temporary checkpoint first
    (plain tensors, so MONAI's ``torch.load(..., weights_only=True)`` accepts it). A given checkpoint must load with
    ``weights_only=True`` (SPEC: no numpy objects in checkpoints); MONAI exports from a CPU copy of it, because its
    loader has no ``map_location``. The eager network is built from the same config and loads the same weights
    (``key_in_ckpt`` selects the model in a nested checkpoint); both run on one random input of the
    metadata's ``inputs#image`` shape (``n = p = any = 1``) or ``input_shape``, and every output tensor must match
    within ``atol``/``rtol``. The exported file must carry the bundle's metadata (its ``version``). ``use_trace``
    exports with ``torch.jit.trace`` for networks that ``torch.jit.script`` cannot compile. ``filepath`` keeps the
    ``.ts`` file; otherwise it is written to a temporary folder and deleted.
    """
    import torch
    from monai.bundle import ckpt_export
    from monai.data import load_net_with_metadata

    bundle = _bundle_path(bundle_dir)
    config_paths = _resolve_in_bundle(bundle, config_file)
    label = _label(bundle, config_paths)
    meta_path = _meta_path(bundle, meta_file)
    overrides = _merged_overrides(bundle, overrides)
    with _bundle_imports(bundle), tempfile.TemporaryDirectory(prefix="bundle_export_") as tmp:
        parser = _load_parser(bundle, config_paths, meta_path, overrides)
        if net_id not in parser:
            raise BundleCheckError(bundle, label, f"no network '{net_id}' in the config")
        if ckpt_file is None:
            ckpt_file = Path(tmp) / "initial_weights.pt"
            torch.save(parser.get_parsed_content(net_id, instantiate=True).state_dict(), ckpt_file)
        ckpt_file = Path(ckpt_file)
        if not ckpt_file.is_file():
            raise BundleCheckError(bundle, label, f"checkpoint {ckpt_file} does not exist")
        try:
            state = torch.load(ckpt_file, map_location="cpu", weights_only=True)
        except Exception as error:
            raise BundleCheckError(
                bundle, label, f"checkpoint {ckpt_file} does not load with weights_only=True: {_describe(error)}"
            ) from error
        # MONAI's export loads the checkpoint without map_location: give it a CPU copy (a GPU-trained model.pt
        # would not load on a CPU-only machine otherwise).
        cpu_ckpt_file = Path(tmp) / "weights_on_cpu.pt"
        torch.save(state, cpu_ckpt_file)
        if input_shape is None:
            try:
                input_shape = _input_shape_from_metadata(parser, "network_data_format")
            except (KeyError, ValueError) as error:
                raise BundleCheckError(bundle, label, f"no input shape for the export: {error}") from error
        input_shape = tuple(int(size) for size in input_shape)
        ts_file = Path(filepath) if filepath is not None else Path(tmp) / "model.ts"
        files = _overrides_as_files(overrides, bundle, meta_path, label)
        with files as (overlay, metadata_file), warnings.catch_warnings():
            # torch >= 2.9 deprecates TorchScript; the export must still work, the warning is not the bundle's fault.
            warnings.filterwarnings("ignore", message=r".*(TorchScript|torch\.jit).*deprecat", category=Warning)
            try:
                ckpt_export(
                    net_id=net_id,
                    filepath=str(ts_file),
                    ckpt_file=str(cpu_ckpt_file),
                    meta_file=str(metadata_file),
                    config_file=[*(str(path) for path in config_paths), str(overlay)],
                    key_in_ckpt=key_in_ckpt,
                    use_trace=use_trace,
                    input_shape=list(input_shape) if use_trace else None,
                )
            except Exception as error:
                hint = "" if use_trace else " (networks that torch.jit.script cannot compile need use_trace=True)"
                raise BundleCheckError(bundle, label, f"ckpt_export('{net_id}') failed{hint}: {error}") from error
            scripted, exported_metadata, _ = load_net_with_metadata(str(ts_file), map_location="cpu")
            bundle_version = json.loads(metadata_file.read_text()).get("version")

        eager = parser.get_parsed_content(net_id, instantiate=True)
        eager.load_state_dict(state[key_in_ckpt] if key_in_ckpt else state)
        eager.eval()
        scripted.eval()
        example = torch.rand(input_shape, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            expected = _tensors(eager(example, **(extra_forward_args or {})))
            actual = _tensors(scripted(example, **(extra_forward_args or {})))
    if len(expected) != len(actual) or not expected:
        raise BundleCheckError(
            bundle, label, f"TorchScript '{net_id}' returns {len(actual)} tensors, the eager network {len(expected)}"
        )
    max_abs_diff = 0.0
    for index, (want, got) in enumerate(zip(expected, actual)):
        if want.shape != got.shape:
            raise BundleCheckError(
                bundle, label, f"TorchScript '{net_id}' output {index} has shape {tuple(got.shape)}, eager {want.shape}"
            )
        max_abs_diff = max(max_abs_diff, float((want - got).abs().max()))
        if not torch.allclose(want, got, atol=atol, rtol=rtol):
            raise BundleCheckError(
                bundle,
                label,
                f"TorchScript '{net_id}' output {index} differs from the eager network by up to "
                f"{float((want - got).abs().max()):.3g} (atol {atol}, rtol {rtol})",
            )
    if exported_metadata.get("version") != bundle_version:
        raise BundleCheckError(
            bundle,
            label,
            f"the exported file carries metadata version {exported_metadata.get('version')!r}, "
            f"the bundle {bundle_version!r}",
        )
    return ExportResult(
        input_shape=input_shape,
        output_shapes=[tuple(tensor.shape) for tensor in expected],
        max_abs_diff=max_abs_diff,
        ts_file=ts_file if filepath is not None else None,
        exported_metadata=exported_metadata,
    )


def run_workflow(
    bundle_dir: str | os.PathLike,
    config_files: str | os.PathLike | Sequence[str | os.PathLike],
    workflow_type: str,
    meta_file: str | os.PathLike | None = None,
    logging_file: str | os.PathLike | bool | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Any:
    """Run a bundle workflow (initialize, run, finalize) as ``python -m monai.bundle run`` does; return it.

    ``bundle_root`` is always set to the bundle folder, so checkpoints and outputs land inside it (tests run on a
    copy in a temporary folder). ``logging_file=None`` uses ``configs/logging.conf`` when it exists, ``False``
    leaves logging alone. The returned ``ConfigWorkflow`` gives access to what ran, e.g. ``workflow.trainer`` or
    ``workflow.parser.get_parsed_content("validate#evaluator").state.metrics``. An error in the workflow is
    re-raised unchanged with a note naming the bundle and config files.
    """
    bundle = _bundle_path(bundle_dir)
    config_paths = _resolve_in_bundle(bundle, config_files)
    label = _label(bundle, config_paths)
    meta_path = _meta_path(bundle, meta_file)
    if logging_file is None:
        default_logging = bundle / "configs" / "logging.conf"
        logging_file = str(default_logging) if default_logging.is_file() else False
    with _bundle_imports(bundle):
        workflow = _make_workflow(bundle, config_paths, workflow_type, meta_path, logging_file, overrides)
        try:
            workflow.initialize()
            workflow.run()
            workflow.finalize()
        except Exception as error:
            error.add_note(f"while running bundle '{bundle.name}' ({label}) as a {workflow.workflow_type} workflow")
            raise
    return workflow


# ----------------------------------------------------------------------------------------------------------------
# all checks of one bundle, discovery, command line


@dataclass
class CheckResult:
    """One check of :func:`check_bundle`: ``status`` is ``"pass"``, ``"fail"`` or ``"skip"``."""

    name: str
    status: str
    detail: str = ""


@dataclass
class BundleCheckSummary:
    """The results of :func:`check_bundle` for one bundle, in the order the checks ran."""

    bundle_dir: Path
    results: list[CheckResult] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(result.status != "fail" for result in self.results)

    @property
    def failures(self) -> list[CheckResult]:
        return [result for result in self.results if result.status == "fail"]

    def counts(self) -> dict[str, int]:
        return {status: sum(result.status == status for result in self.results) for status in ("pass", "fail", "skip")}

    def report(self) -> str:
        """A readable report: one line per check, failures with their message."""
        counts = self.counts()
        lines = [
            f"bundle {self.bundle_dir.name} ({self.bundle_dir}): {counts['pass']} passed, {counts['fail']} failed, "
            f"{counts['skip']} skipped"
        ]
        for result in self.results:
            line = f"  {result.status.upper():4}  {result.name}"
            if result.detail:
                line += ": " + result.detail.strip().replace("\n", "\n        ")
            lines.append(line)
        return "\n".join(lines)


def _further_networks(metadata: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """``<name>_def`` for each ``<name>_data_format`` of the metadata (the collection's naming convention)."""
    return {
        f"{key[: -len('_data_format')]}_def": {"data_format": key}
        for key in metadata
        if key.endswith("_data_format") and key != "network_data_format"
    }


def check_bundle(
    bundle_dir: str | os.PathLike,
    schema_path: str | os.PathLike | None = None,
    overrides: Mapping[str, Any] | None = None,
    train_overrides: Mapping[str, Any] | None = None,
    infer_overrides: Mapping[str, Any] | None = None,
    nets: Mapping[str, Mapping[str, Any] | None] | None = None,
    export: bool | Mapping[str, Any] = True,
    raise_on_failure: bool = True,
) -> BundleCheckSummary:
    """Run every applicable check on one bundle and return the summary (raise if any failed, by default).

    Checks, in order: layout; metadata (schema + SPEC fields; without a schema file only the SPEC fields, noted as
    such); config keys; ``check_properties`` of train (``train.json``), evaluate (``train.json`` + ``evaluate.json``,
    a train workflow), multi-GPU (``train.json`` + ``multi_gpu_train.json``, ids only: DDP cannot be built here) and
    inference (``inference.json``); ``verify_net_in_out`` for each network; TorchScript export of ``network_def``.

    Args:
        schema_path: the local ``meta_schema_20240725.json``; ``None`` looks in ``../shared/reference`` (or
            ``$PCT_SHARED_DIR/reference``) and checks only the SPEC fields when it is not there.
        overrides: config overrides for every workflow (top-level keys such as ``dataset_dir`` or ``network_def#...``
            present in both train.json and inference.json); ``train_overrides`` / ``infer_overrides`` add to them
            for the train-side (train, evaluate, multi-GPU) and the inference-side (inference, networks, export)
            configs.
        nets: net id -> keyword arguments of :func:`verify_network_in_out` (``data_format``, ``config_file``,
            ``extra_forward_args``, ``p``/``n``/``any``...), or ``None`` to skip that network. By default
            ``network_def`` against ``network_data_format`` and ``<name>_def`` against each ``<name>_data_format``;
            the given entries update that default.
        export: keyword arguments of :func:`export_torchscript_and_compare` (``net_id``, ``use_trace``,
            ``input_shape``, ``ckpt_file``...), ``True`` for the defaults, ``False`` to skip (a bundle whose main
            network needs a documented wrapper passes the wrapper's ``net_id``).
        raise_on_failure: raise :class:`BundleCheckError` with the whole report when a check failed.
    """
    with tempfile.TemporaryDirectory(prefix="bundle_check_") as scratch:
        # the checks build the workflows: keep the folders they create (checkpoints, outputs) out of the bundle,
        # unless the caller points them somewhere on purpose
        sandbox = {"ckpt_dir": os.path.join(scratch, "models"), "output_dir": os.path.join(scratch, "eval")}
        return _check_bundle(
            bundle_dir, schema_path, {**sandbox, **(overrides or {})}, train_overrides, infer_overrides, nets, export,
            raise_on_failure,
        )  # fmt: skip


def _check_bundle(
    bundle_dir, schema_path, overrides, train_overrides, infer_overrides, nets, export, raise_on_failure
) -> BundleCheckSummary:
    bundle = _bundle_path(bundle_dir)
    summary = BundleCheckSummary(bundle)
    train_side = {**(overrides or {}), **(train_overrides or {})}
    infer_side = {**(overrides or {}), **(infer_overrides or {})}

    def attempt(name: str, check: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            value = check(*args, **kwargs)
        except Exception as error:  # a report names every failing check, not only the first
            detail = str(error) if isinstance(error, BundleCheckError) else _describe(error)
            summary.results.append(CheckResult(name, "fail", detail))
            return None
        summary.results.append(CheckResult(name, "pass"))
        return value

    attempt("layout", check_bundle_layout, bundle)
    schema = Path(schema_path) if schema_path is not None else default_schema_path()
    if schema is not None:
        metadata = attempt(f"metadata ({schema.name} + SPEC fields)", verify_bundle_metadata, bundle, schema)
    else:
        metadata = attempt("metadata (SPEC fields)", check_metadata_fields, bundle)
        summary.results.append(
            CheckResult("metadata schema", "skip", f"no {SCHEMA_NAME}: pass schema_path or provide ../shared")
        )
    attempt("config keys", check_config_conventions, bundle)

    configs = bundle / "configs"
    workflows = [
        ("train", ["configs/train.json"], "train", train_side, True),
        ("evaluate", ["configs/train.json", "configs/evaluate.json"], "train", train_side, True),
        ("multi_gpu_train", ["configs/train.json", "configs/multi_gpu_train.json"], "train", train_side, False),
        ("inference", ["configs/inference.json"], "infer", infer_side, True),
    ]
    for name, files, workflow_type, workflow_overrides, instantiate in workflows:
        title = f"properties: {name}" + ("" if instantiate else " (ids only)")
        if not all((bundle / file).is_file() for file in files):
            summary.results.append(CheckResult(title, "skip", f"no {' or '.join(files)}"))
            continue
        attempt(title, check_workflow_properties, bundle, files, workflow_type, None, workflow_overrides, instantiate)

    if not (configs / "inference.json").is_file():
        summary.results.append(CheckResult("networks and export", "skip", "no configs/inference.json"))
        return _finish(summary, raise_on_failure)
    try:
        metadata = metadata or json.loads((configs / "metadata.json").read_text())
    except (OSError, json.JSONDecodeError):
        metadata = {}
    net_checks: dict[str, Mapping[str, Any] | None] = {"network_def": {}, **_further_networks(metadata)}
    net_checks.update(nets or {})
    for net_id, net_kwargs in net_checks.items():
        if net_kwargs is None:
            summary.results.append(CheckResult(f"net in/out: {net_id}", "skip", "skipped by the caller"))
            continue
        net_kwargs = dict(net_kwargs)
        data_format = metadata.get(net_kwargs.get("data_format", "network_data_format"), {})
        if "timesteps" in (data_format.get("inputs") or {}) and "extra_forward_args" not in net_kwargs:
            # a diffusion U-Net also takes the timestep: give it one so its image in/out can be checked
            import torch

            net_kwargs["extra_forward_args"] = {"timesteps": torch.ones(1, dtype=torch.long)}
        config_file = net_kwargs.pop("config_file", "configs/inference.json")
        if nets is None or net_id not in nets:
            if not _config_has(bundle, config_file, net_id):
                summary.results.append(CheckResult(f"net in/out: {net_id}", "skip", f"no '{net_id}' in {config_file}"))
                continue
        net_overrides = {**infer_side, **net_kwargs.pop("overrides", {})}
        attempt(
            f"net in/out: {net_id}", verify_network_in_out, bundle, net_id, config_file, net_overrides, **net_kwargs
        )

    if export is False:
        summary.results.append(CheckResult("TorchScript export", "skip", "skipped by the caller"))
    else:
        export_kwargs = dict(export) if isinstance(export, Mapping) else {}
        export_kwargs["overrides"] = {**infer_side, **export_kwargs.get("overrides", {})}
        title = f"TorchScript export: {export_kwargs.get('net_id', 'network_def')}"
        if isinstance(export, Mapping) or export_kwargs.get("use_trace"):
            attempt(title, export_torchscript_and_compare, bundle, **export_kwargs)
        else:
            # scripting first; a network that cannot be scripted (e.g. it calls torch.distributed) is traced
            try:
                export_torchscript_and_compare(bundle, **export_kwargs)
                summary.results.append(CheckResult(title, "pass"))
            except Exception:
                title += " (traced: the network cannot be scripted)"
                attempt(title, export_torchscript_and_compare, bundle, **{**export_kwargs, "use_trace": True})
    return _finish(summary, raise_on_failure)


def _config_has(bundle: Path, config_file: str | os.PathLike, key: str) -> bool:
    from monai.bundle import ConfigParser

    path = bundle / config_file
    if not path.is_file():
        return False
    parser = ConfigParser()
    parser.read_config(f=str(path))
    return key in parser


def _finish(summary: BundleCheckSummary, raise_on_failure: bool) -> BundleCheckSummary:
    if raise_on_failure and not summary.passed:
        raise BundleCheckError(summary.bundle_dir, "check_bundle", "\n" + summary.report())
    return summary


def check_bundle_cli(bundle_dir: str, schema: str | None = None, **overrides: Any) -> None:
    """``check-bundle <bundle_dir> [--schema meta_schema_20240725.json] [--<config id> <value> ...]``.

    Prints one line per check and exits with status 1 when a check fails. Extra ``--key value`` flags are config
    overrides for every workflow (e.g. ``--dataset_dir /data/tiny`` where the bundle's default data is absent).
    """
    summary = check_bundle(bundle_dir, schema_path=schema, overrides=overrides, raise_on_failure=False)
    print(summary.report())
    if not summary.passed:
        raise SystemExit(1)


def discover_bundles(root: str | os.PathLike = "bundles") -> list[Path]:
    """The bundle folders under ``root`` (those with ``configs/metadata.json``), sorted by name.

    A relative ``root`` is taken from the repository root, so tests and the command line agree whatever the
    current directory is.
    """
    root_path = Path(root)
    if not root_path.is_absolute():
        root_path = REPO_ROOT / root_path
    if not root_path.is_dir():
        return []
    return sorted(path for path in root_path.iterdir() if (path / "configs" / "metadata.json").is_file())


def bundles_without_harness_test(
    root: str | os.PathLike = "bundles", tests_dir: str | os.PathLike = "tests"
) -> dict[str, str]:
    """Bundle name -> why it is not covered: ``tests/test_bundle_<name>.py`` is absent or calls no harness check.

    A relative ``tests_dir`` is taken from the repository root.
    """
    tests_path = Path(tests_dir) if Path(tests_dir).is_absolute() else REPO_ROOT / tests_dir
    uncovered = {}
    for bundle in discover_bundles(root):
        test_file = tests_path / f"test_bundle_{bundle.name}.py"
        if not test_file.is_file():
            uncovered[bundle.name] = f"{test_file} does not exist"
        elif not any(re.search(rf"\b{name}\(", test_file.read_text()) for name in HARNESS_FUNCTIONS):
            uncovered[bundle.name] = f"{test_file} calls none of {', '.join(HARNESS_FUNCTIONS)}"
    return uncovered
