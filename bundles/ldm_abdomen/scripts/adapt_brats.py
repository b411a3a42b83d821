"""BraTS-to-CT adaptation (seed 002's method): reuse the autoencoder of a BraTS LDM bundle for abdominal CT.

Given a local ``brats_mri_generative_diffusion`` bundle folder (nothing is downloaded):

1. read its autoencoder architecture and intensity normalisation from its configs, and its weights from
   ``models/model_autoencoder.pt`` (current MONAI key names, or the old MONAI Generative ones, mapped by
   :func:`scripts.latent.map_autoencoder_state`); the architecture must be this bundle's ``autoencoder_def``;
2. swap the MRI normalisation (``ScaleIntensityRangePercentilesd`` 0-99.5 % -> [0, 1]) for this bundle's CT window
   (``ScaleIntensityRanged`` over ``hu_window`` HU -> [0, 1]); the converted weights are written under current key
   names to ``<ckpt_dir>/model_autoencoder.pt`` with an ``adaptation.json`` record;
3. ``mode="freeze"`` (the seed's method): train the diffusion model (``configs/train.json``) on CT latents of the
   frozen autoencoder, and check by hash that the autoencoder's weights did not change;
   ``mode="finetune"`` (the seed's future work): first fine-tune the autoencoder on CT
   (``configs/train_autoencoder.json`` starting from the BraTS weights), then train the diffusion model on it.

Both trainings are this bundle's own configs run through ``monai.bundle``; the collection's ``tools`` command
``adapt_brats`` only calls ``configs/adapt_brats.json``. From the bundle folder::

    python -m scripts.adapt_brats --brats_dir /path/brats_mri_generative_diffusion --dataset_dir /data/full
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path
from typing import Any, Mapping

from .latent import load_autoencoder_weights, save_weights, state_sha256
from .provenance import sha256_file

BUNDLE_ROOT = Path(__file__).resolve().parents[1]
#: Where a model-zoo bundle keeps its autoencoder weights, in order of preference.
BRATS_WEIGHT_NAMES = ("models/model_autoencoder.pt", "models/autoencoder.pt")
#: Its configs that define ``autoencoder_def`` (the model zoo has both; old versions only train_autoencoder).
BRATS_CONFIG_NAMES = ("configs/inference.json", "configs/train_autoencoder.json", "configs/inference_autoencoder.json")
#: Architecture arguments compared with this bundle's (old configs say ``num_channels`` for ``channels``).
ARCHITECTURE_KEYS = ("latent_channels", "channels", "num_res_blocks", "norm_num_groups", "attention_levels")
MODES = ("freeze", "finetune")


def _as_dict(value: Any) -> dict[str, Any]:
    if value in (None, "", "None"):
        return {}
    if isinstance(value, str):
        value = json.loads(value)
    if not isinstance(value, Mapping):
        raise ValueError(f"overrides must be a mapping (or its JSON text), got {type(value).__name__}")
    return dict(value)


def find_brats_weights(brats_dir: str | os.PathLike) -> Path:
    """The autoencoder weights file of a BraTS bundle folder."""
    root = Path(brats_dir)
    for name in BRATS_WEIGHT_NAMES:
        if (root / name).is_file():
            return root / name
    found = sorted((root / "models").glob("*autoencoder*.pt")) if (root / "models").is_dir() else []
    if found:
        return found[0]
    raise FileNotFoundError(
        f"{root}: no autoencoder weights ({' or '.join(BRATS_WEIGHT_NAMES)}). Download the model-zoo bundle "
        "brats_mri_generative_diffusion with its weights first (this bundle never downloads)"
    )


def read_brats_config(brats_dir: str | os.PathLike) -> dict[str, Any]:
    """Autoencoder architecture and intensity normalisation of a BraTS bundle (references resolved).

    Returns ``{"config": file, "architecture": {...}, "normalisation": {...} or None}``; an empty architecture
    when the bundle has none of the known configs.
    """
    from monai.bundle import ConfigParser

    root = Path(brats_dir)
    for name in BRATS_CONFIG_NAMES:
        path = root / name
        if not path.is_file():
            continue
        parser = ConfigParser()
        parser.read_config(str(path))
        if "autoencoder_def" not in parser:
            continue
        architecture = {}
        for key in ARCHITECTURE_KEYS:
            for candidate in (key, "num_channels") if key == "channels" else (key,):
                if f"autoencoder_def#{candidate}" in parser:
                    architecture[key] = parser.get_parsed_content(f"autoencoder_def#{candidate}", instantiate=False)
                    break
        return {"config": str(path), "architecture": architecture, "normalisation": _find_normalisation(root)}
    return {"config": None, "architecture": {}, "normalisation": _find_normalisation(root)}


def _find_normalisation(root: Path) -> dict[str, Any] | None:
    """The intensity transform of the BraTS preprocessing (``ScaleIntensityRangePercentilesd`` in the zoo)."""

    def walk(node: Any):
        if isinstance(node, Mapping):
            target = str(node.get("_target_", ""))
            if "ScaleIntensity" in target or "NormalizeIntensity" in target:
                yield {k: v for k, v in node.items() if not str(k).startswith("_") or k == "_target_"}
            for value in node.values():
                yield from walk(value)
        elif isinstance(node, list):
            for value in node:
                yield from walk(value)

    for name in BRATS_CONFIG_NAMES:
        path = root / name
        if path.is_file():
            for found in walk(json.loads(path.read_text())):
                return found
    return None


def _parser(bundle_root: Path, config_names: list[str], overrides: Mapping[str, Any]):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(bundle_root / "configs" / name) for name in config_names])
    parser.read_meta(str(bundle_root / "configs" / "metadata.json"))
    for key, value in {"bundle_root": str(bundle_root), **overrides}.items():
        parser[key] = value
    return parser


def _check_architecture(source: Mapping[str, Any], parser: Any) -> None:
    problems = []
    for key, value in source.items():
        ours = parser.get_parsed_content(f"autoencoder_def#{key}", instantiate=False)
        if json.loads(json.dumps(ours)) != json.loads(json.dumps(value)):
            problems.append(f"{key}: BraTS {value} vs this bundle {ours}")
    if problems:
        raise ValueError(
            "the BraTS autoencoder differs from this bundle's autoencoder_def: "
            + "; ".join(problems)
            + " (override autoencoder_def to match, e.g. --overrides '{\"autoencoder_def#channels\": [...]}')"
        )


def _ct_normalisation(parser: Any) -> dict[str, Any]:
    """This bundle's CT intensity transform (and a check that no MRI percentile scaling is left in it)."""
    transforms = parser.get_parsed_content("preprocessing_transforms", instantiate=False)
    names = [str(item.get("_target_", "")) for item in transforms if isinstance(item, Mapping)]
    if any("Percentile" in name for name in names):
        raise ValueError("this bundle's preprocessing still scales by percentiles (MRI); it must use the HU window")
    window = [float(v) for v in parser.get_parsed_content("hu_window")]
    return {"_target_": "ScaleIntensityRanged", "a_min": window[0], "a_max": window[1], "b_min": 0.0, "b_max": 1.0}


def convert_brats_autoencoder(
    brats_dir: str | os.PathLike,
    out_path: str | os.PathLike,
    bundle_root: str | os.PathLike | None = None,
    overrides: Mapping[str, Any] | str | None = None,
) -> dict[str, Any]:
    """Load a BraTS bundle's autoencoder into this bundle's ``autoencoder_def`` and save it (current key names).

    Returns the record also written next to ``out_path`` as ``adaptation.json``: source file and SHA-256, key
    style, renamed keys, architecture, the MRI normalisation replaced and the CT one used, the converted file's
    SHA-256 and the weights' state hash.
    """
    root = Path(bundle_root) if bundle_root else BUNDLE_ROOT
    parser = _parser(root, ["train.json"], _as_dict(overrides))
    source = read_brats_config(brats_dir)
    if source["architecture"]:
        _check_architecture(source["architecture"], parser)
    autoencoder = parser.get_parsed_content("autoencoder_def")
    weights = find_brats_weights(brats_dir)
    report = load_autoencoder_weights(autoencoder, weights)
    out_path = Path(out_path)
    save_weights(autoencoder, out_path)
    record = {
        "source_bundle": str(Path(brats_dir).resolve()),
        "source_weights": report["path"],
        "source_sha256": report["sha256"],
        "key_style": report["key_style"],
        "renamed_keys": len(report["renamed"]),
        "source_config": source["config"],
        "architecture": source["architecture"],
        "mri_normalisation_replaced": source["normalisation"],
        "ct_normalisation": _ct_normalisation(parser),
        "autoencoder_weights": str(out_path),
        "autoencoder_sha256": sha256_file(out_path),
        "autoencoder_state_sha256": state_sha256(autoencoder),
    }
    (out_path.parent / "adaptation.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def _run(bundle_root: Path, config_names: list[str], overrides: Mapping[str, Any]):
    """Run one of this bundle's workflows through ``monai.bundle`` (initialize, run, finalize)."""
    from monai.bundle import ConfigWorkflow

    from .config_check import check_overrides

    files = [str(bundle_root / "configs" / name) for name in config_names]
    check_overrides(files, list(overrides))  # a mistyped key of --overrides would otherwise be ignored
    workflow = ConfigWorkflow(
        config_file=files,
        meta_file=str(bundle_root / "configs" / "metadata.json"),
        logging_file=False,
        workflow_type="train",
    )
    for key, value in {"bundle_root": str(bundle_root), **overrides}.items():
        workflow.parser[key] = value
    workflow.initialize()
    workflow.run()
    workflow.finalize()
    return workflow


def adapt(
    brats_dir: str | os.PathLike,
    dataset_dir: str | os.PathLike,
    bundle_root: str | os.PathLike | None = None,
    ckpt_dir: str | os.PathLike | None = None,
    mode: str = "freeze",
    overrides: Mapping[str, Any] | str | None = None,
    autoencoder_overrides: Mapping[str, Any] | str | None = None,
) -> dict[str, Any]:
    """Convert the BraTS autoencoder, then train on CT (``freeze``: diffusion only; ``finetune``: autoencoder first).

    ``overrides`` go to every run (``train.json`` keys: network sizes, epochs, crop mode...), ``autoencoder_overrides``
    to the fine-tuning run only (``train_autoencoder.json`` keys). Returns (and writes to
    ``<ckpt_dir>/adaptation.json``) the conversion record plus the hashes of the autoencoder before and after the
    diffusion training; in ``freeze`` mode they must be equal, or this raises.
    """
    if mode not in MODES:
        raise ValueError(f"mode {mode!r}: choose one of {list(MODES)}")
    root = Path(bundle_root).resolve() if bundle_root else BUNDLE_ROOT
    ckpt = Path(ckpt_dir) if ckpt_dir else root / "models"
    ckpt.mkdir(parents=True, exist_ok=True)
    common = {**_as_dict(overrides), "dataset_dir": str(dataset_dir), "ckpt_dir": str(ckpt)}
    converted = ckpt / "model_brats_autoencoder.pt"
    record = convert_brats_autoencoder(brats_dir, converted, root, common)
    autoencoder_path = ckpt / "model_autoencoder.pt"
    if mode == "freeze":
        shutil.copyfile(converted, autoencoder_path)
    else:
        ae_overrides = {**common, **_as_dict(autoencoder_overrides), "autoencoder_init_path": str(converted)}
        _run(root, ["train.json", "train_autoencoder.json"], ae_overrides)
    file_before = sha256_file(autoencoder_path)
    workflow = _run(root, ["train.json"], {**common, "autoencoder_path": str(autoencoder_path)})
    autoencoder = workflow.parser.get_parsed_content("autoencoder")
    record.update(
        mode=mode,
        dataset_dir=str(dataset_dir),
        autoencoder_weights=str(autoencoder_path),
        autoencoder_sha256_before_diffusion=file_before,
        autoencoder_sha256_after_diffusion=sha256_file(autoencoder_path),
        autoencoder_state_sha256_after_diffusion=state_sha256(autoencoder),
        autoencoder_state_sha256_loaded=state_sha256(_load_state(autoencoder_path, autoencoder)),
        diffusion_weights=str(ckpt / workflow.parser.get_parsed_content("final_model_name")),
        diffusion_epochs=int(workflow.trainer.state.epoch),
    )
    unchanged = (
        record["autoencoder_sha256_before_diffusion"] == record["autoencoder_sha256_after_diffusion"]
        and record["autoencoder_state_sha256_after_diffusion"] == record["autoencoder_state_sha256_loaded"]
    )
    record["autoencoder_unchanged_by_diffusion_training"] = unchanged
    (ckpt / "adaptation.json").write_text(json.dumps(record, indent=2) + "\n")
    if not unchanged:
        raise RuntimeError(f"the autoencoder changed during the diffusion training: {ckpt / 'adaptation.json'}")
    return record


def _load_state(path: Path, like: Any) -> dict:
    """The state dict in ``path`` under ``like``'s key names (to hash what is on disk the same way)."""
    import copy

    clone = copy.deepcopy(getattr(like, "module", like))
    load_autoencoder_weights(clone, path)
    return clone.state_dict()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m scripts.adapt_brats", description=__doc__.split("\n\n")[0])
    parser.add_argument("--brats_dir", required=True, help="local brats_mri_generative_diffusion bundle folder")
    parser.add_argument("--dataset_dir", required=True, help="CT data prepared for the crop mode (dataset.json)")
    parser.add_argument("--ckpt_dir", default=None, help="where the weights go (default <bundle>/models)")
    parser.add_argument("--mode", default="freeze", choices=MODES)
    parser.add_argument("--overrides", default=None, help="JSON of train.json overrides for every run")
    parser.add_argument("--autoencoder_overrides", default=None, help="JSON of train_autoencoder.json overrides")
    args = parser.parse_args(argv)
    record = adapt(
        args.brats_dir, args.dataset_dir, BUNDLE_ROOT, args.ckpt_dir, args.mode, args.overrides,
        args.autoencoder_overrides,
    )  # fmt: skip
    print(json.dumps(record, indent=2))
    return record


if __name__ == "__main__":
    main()
