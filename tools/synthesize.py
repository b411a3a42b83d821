"""Write a synthetic data set with a generative bundle: resumable, shardable across processes, seeded per item.

:func:`synthesize` runs a generative bundle's own inference workflow through ``monai.bundle``
(:func:`tools.bundles.run_config`) over a list of source records and writes every case into one folder with the
bundle's provenance marks (NIfTI description ``SYNTHETIC <bundle> <version> seed=...`` + a sidecar JSON per file),
then ``datalist.json`` listing the cases. What this module adds to the bundles' inference configs:

* **Per-item seeds.** Sample ``k`` of the source record at position ``m`` gets the seed
  :func:`item_seed` ``(seed, m, k) = seed + 100000 * m + k`` (the vae_ct bundle's ``sample_seed`` rule), whatever
  else a run processes, so a rerun that makes only the missing cases writes the same bytes as a run that made all.
  vae_ct and ldm_abdomen read an item's seed from the item (one workflow for all missing items); difftumor draws its
  tumor from the workflow's random state, so it runs one workflow per item with that item's seed.
* **Resumable.** A case is finished when its image, its label and both sidecars exist (the bundles write the label's
  sidecar last, each file atomically). Finished cases are never rewritten; a rerun makes only what is missing. A
  ``synthesize.json`` manifest refuses a rerun into the same folder with another bundle, seed or source.
* **Shardable.** Under ``torchrun --nproc_per_node=N`` process ``r`` makes the items ``m`` with ``m % N == r``
  (:func:`tools.study_runner.distributed_context`); no process group is needed. Each process rebuilds
  ``datalist.json`` from the finished cases when it ends; with several processes each then waits for the others
  and rewrites it, so the list is complete once all are done.

* **Quality gate** (``quality_gate``, :mod:`tools.quality_gate`; vae_ct and ldm_abdomen). Each case is made in
  ``out/.gate/try<t>/``, judged (a seg_unet3d judge's pancreas Dice to the mask; the median HU inside the pancreas
  against the real training set's range), and made again with the next seed while it fails, up to ``gate_tries``
  tries; the kept try's files are then moved into ``out`` with its sidecars recording every try, and the others
  removed. A case finishes as above, so a rerun keeps finished gated cases and reuses the judged tries of
  unfinished ones. ``datalist.json`` marks each gated case (``"quality_gate": {"passed": ...}``); a case that
  passed no try keeps its best one and is marked ``"passed": false``, never dropped.

Output names are ``<case>_s<kkk>_image.nii.gz`` / ``..._label.nii.gz`` (+ ``.json`` sidecars). difftumor writes
nothing for a source scan it cannot use (a tumor already labelled, no organ voxel): ``<name>.skipped.json`` records
that, so a rerun does not try again, and the case is left out of the datalist.
"""

from __future__ import annotations

import copy
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from tools.errors import InputError
from tools.io import write_json

#: Seeds of different source records never collide while fewer samples than this are drawn per record.
SEED_STRIDE = 100_000


@dataclass(frozen=True)
class GeneratorSpec:
    """How :func:`synthesize` drives one generative bundle."""

    configs: tuple[str, ...]
    family_key: str | None  # config key naming the generator family (vae / vae_gan / gan; difftumor families)
    per_item_workflow: bool  # True: one workflow per item (the bundle has no per-item seed)
    source_kind: str  # "mask": records need a label; "healthy": image + organ mask, tumor cases skipped


GENERATORS: dict[str, GeneratorSpec] = {
    "vae_ct": GeneratorSpec(("inference.json", "inference_3d.json"), "generator_family", False, "mask"),
    "ldm_abdomen": GeneratorSpec(("inference.json", "inference_controlnet.json"), None, False, "mask"),
    "difftumor": GeneratorSpec(("inference.json",), "family_name", True, "healthy"),
}


def item_seed(seed: int, index: int, sample: int) -> int:
    """The seed of sample ``sample`` of the source record at position ``index``: ``seed + 100000 * index + sample``."""
    if not 0 <= int(sample) < SEED_STRIDE:
        raise ValueError(f"sample index {sample} must be in [0, {SEED_STRIDE})")
    return int(seed) + SEED_STRIDE * int(index) + int(sample)


def _stem(path: str | os.PathLike) -> str:
    name = Path(str(path)).name
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _jsonable(value: Any) -> Any:
    try:
        json.dumps(value)
        return value
    except TypeError:
        return repr(value)


def _source_records(spec: GeneratorSpec, source, section: str, max_items: int | None) -> list[dict]:
    from tools.splits import load_records

    records = [dict(r) for r in load_records(source).records(section)]
    if spec.source_kind == "healthy":
        records = [r for r in records if not r.get("has_tumor", False)]
        for r in records:
            if not r.get("image") or not (r.get("organ") or r.get("label")):
                raise InputError(r.get("image"), "difftumor needs healthy scans with an organ mask (image + label)")
    else:
        for r in records:
            if not r.get("label"):
                raise InputError(r.get("image"), f"record has no 'label' (the mask to generate from): {r}")
    if max_items is not None:
        records = records[: int(max_items)]
    if not records:
        raise InputError(source, f"no usable records in section {section!r}")
    return records


def plan_items(records: Sequence[Mapping[str, Any]], samples_per_item: int, seed: int) -> list[dict[str, Any]]:
    """Every (record, sample) to make, in a fixed order: ``{"index", "sample", "seed", "name", "record"}``."""
    if samples_per_item < 1:
        raise ValueError(f"samples_per_item must be at least 1, got {samples_per_item}")
    cases = [str(r.get("case") or _stem(r.get("label") or r["image"])) for r in records]
    unique = len(set(cases)) == len(cases)
    items = []
    for m, (record, case) in enumerate(zip(records, cases)):
        base = case if unique else f"m{m:05d}_{case}"
        for k in range(int(samples_per_item)):
            items.append({"index": m, "sample": k, "seed": item_seed(seed, m, k), "name": f"{base}_s{k:03d}",
                          "record": dict(record)})  # fmt: skip
    return items


def case_files(out: Path, name: str) -> dict[str, Path]:
    """The four files of a finished case (the label's sidecar is written last)."""
    return {
        "image": out / f"{name}_image.nii.gz",
        "label": out / f"{name}_label.nii.gz",
        "image_sidecar": out / f"{name}_image.json",
        "label_sidecar": out / f"{name}_label.json",
    }


def is_finished(out: Path, name: str) -> bool:
    return all(p.is_file() for p in case_files(out, name).values())


def _skipped(out: Path, name: str) -> Path:
    return out / f"{name}.skipped.json"


def _provenance(item: Mapping[str, Any], generator: str, seed: int) -> dict[str, Any]:
    record = item["record"]
    return {
        "seed": item["seed"],
        "item_seed": item.get("planned_seed", item["seed"]),  # a gated try's seed differs from its case's
        "sample": item["sample"],
        "source_index": item["index"],
        "source_patient": str(record.get("patient") or record.get("case") or _stem(record.get("label") or "")),
        "source_image": record.get("image"),
        "source_label": record.get("organ") or record.get("label"),
        "generator": generator,
        "synthesize_seed": int(seed),
    }


def _generator_name(root: Path, spec: GeneratorSpec, configs: Sequence[str], overrides: Mapping[str, Any]) -> str:
    if spec.family_key is None:
        return root.name
    family = overrides.get(spec.family_key)
    if family is None:
        from monai.bundle import ConfigParser

        from tools.bundles import config_files

        parser = ConfigParser()
        parser.read_config(config_files(root, configs))
        family = parser.get(spec.family_key)
    return f"{root.name}/{family}"


def _data_root(source, items: Sequence[Mapping[str, Any]]) -> str:
    """The bundle's ``dataset_dir``: the source folder (or the datalist's), widened to the folder holding every
    input file when a datalist points elsewhere (the bundles refuse inputs outside ``dataset_dir``)."""
    paths = [os.path.abspath(str(v)) for it in items for k, v in it["record"].items()
             if k in ("image", "label", "organ") and isinstance(v, str)]  # fmt: skip
    if isinstance(source, (str, os.PathLike)):
        src = Path(source).resolve()
        paths.append(str(src.parent if src.is_file() else src))
    root = os.path.commonpath(paths) if paths else os.getcwd()
    return root if os.path.isdir(root) else os.path.dirname(root)


def _bundle_overrides(
    name: str, items: list[dict], out: Path, ckpt_dir, source, seed: int, generator: str
) -> dict[str, Any]:
    """The config overrides that make the bundle write ``items`` into ``out`` with their seeds and names."""
    if name == "vae_ct":
        data = [{"label": it["record"]["label"], "sample": it["sample"], "seed": it["seed"], "name": it["name"],
                 "provenance": _provenance(it, generator, seed)} for it in items]  # fmt: skip
        extra: dict[str, Any] = {"dataset#data": data, "seed": int(seed), "run": ["$@evaluator.run()"]}
        if ckpt_dir is not None:
            extra["ckpt_dir"] = str(Path(ckpt_dir))
    elif name == "ldm_abdomen":
        data = [{"label": it["record"]["label"], "seed": it["seed"], "name": it["name"],
                 "provenance": _provenance(it, generator, seed)} for it in items]  # fmt: skip
        extra = {"dataset#data": data, "first_seed": int(seed)}
        src = Path(source) if isinstance(source, (str, os.PathLike)) else None
        if src is not None:  # the prepared folder (or datalist) the masks come from must be the crop asked for
            folder, datalist = (src.parent, src) if src.is_file() else (src, None)
            extra["check_data"] = (
                f"$scripts.data.check_prepared({str(folder.resolve())!r}, @crop_mode, @prep_out_shape, "
                f"{str(datalist.resolve()) if datalist else None!r})"
            )
        else:
            extra["check_data"] = None  # in-memory records: no prepared folder to check
        if ckpt_dir is not None:
            extra["ckpt_dir"] = str(Path(ckpt_dir))
    elif name == "difftumor":
        (it,) = items
        record = it["record"]
        data = [{"image": record["image"], "organ": record.get("organ") or record["label"], "name": it["name"],
                 "provenance": _provenance(it, generator, seed)}]  # fmt: skip
        extra = {"datalist": data, "seed": it["seed"], "postprocessing#transforms#0#name_key": "name",
                 "postprocessing#transforms#0#postfixes": {"image": "image", "label": "label"}}  # fmt: skip
        if ckpt_dir is not None:
            extra["ckpt_dir"] = str(Path(ckpt_dir))
    else:  # pragma: no cover - GENERATORS is checked first
        raise ValueError(name)
    extra["output_dir"] = str(out)
    extra["dataset_dir"] = _data_root(source, items)
    return extra


def check_sources(
    root: Path,
    configs: Sequence[str],
    overrides: Mapping[str, Any],
    items: Sequence[Mapping[str, Any]],
    out: Path,
    source,
    seed: int,
    generator: str,
) -> None:
    """Run the bundle's own input checks on every source record before anything is written.

    The checks are the bundle's: its ``check_data`` step when it has one, and the head of its ``preprocessing``
    up to the last ``ValidateCTd`` (the checks on the paths, ``LoadImaged``, the checks on the voxels), built by
    ``monai.bundle`` from the same configs and overrides as the run, so they follow the user's settings
    (``allowed_labels``, ``max_spacing_mm``...). The bundle would refuse the same file, but only when its workflow
    reaches it: after the output folder and its manifest exist, and, when several workflows run (difftumor, one
    per item), after the cases before it were written. Raises :class:`InputError` naming the file.
    """
    from monai.bundle import ConfigParser

    from tools.bundles import bundle_on_path, config_files

    spec = GENERATORS[root.name]
    batches = [[it] for it in items] if spec.per_item_workflow else [list(items)]
    seen: set[str] = set()
    with bundle_on_path(root):
        parser = ConfigParser()
        parser.read_config(config_files(root, configs))
        for batch in batches:
            batch = [it for it in batch if it["sample"] == 0]  # the samples of a record read the same files
            if not batch:
                continue
            settings = {**overrides, **_bundle_overrides(root.name, batch, out, None, source, seed, generator)}
            settings["bundle_root"] = str(root)
            case_parser = ConfigParser(copy.deepcopy(parser.get()))
            for key, value in settings.items():
                case_parser[key] = value
            if "check_data" in case_parser and str(case_parser["check_data"]) not in seen:
                seen.add(str(case_parser["check_data"]))
                case_parser.get_parsed_content("check_data")
            raw = case_parser["preprocessing#transforms"]
            validators = [i for i, t in enumerate(raw) if str(t.get("_target_", "")).endswith("ValidateCTd")]
            if not validators:
                raise RuntimeError(f"{root.name}: its preprocessing has no ValidateCTd step to check the sources with")
            # only the head is built: later steps may build networks (difftumor's synthesis transform)
            checks = [
                case_parser.get_parsed_content(f"preprocessing#transforms#{i}") for i in range(validators[-1] + 1)
            ]
            data_key = "datalist" if "datalist" in settings else "dataset#data"
            for entry in settings[data_key]:
                entry = dict(entry)
                try:
                    for check in checks:  # called directly: MONAI's Compose would wrap the error in a RuntimeError
                        entry = check(entry)
                except ValueError as error:  # the bundle's vendored InputError class: give callers tools' one
                    if type(error).__name__ != "InputError":
                        raise
                    raise InputError(getattr(error, "path", None), getattr(error, "problem", str(error))) from error


def _check_manifest(out: Path, manifest: dict) -> None:
    path = out / "synthesize.json"
    if path.is_file():
        saved = json.loads(path.read_text())
        keys = ("bundle", "generator", "seed", "source", "section", "samples_per_item", "overrides", "configs",
                "quality_gate")  # fmt: skip
        diff = [k for k in keys if saved.get(k) != manifest.get(k)]
        if diff and not any(out.glob("*_label.json")) and not any(out.glob("*.skipped.json")):
            write_json(path, manifest)  # nothing was made with the old settings (e.g. a run that failed at start)
        elif diff:
            raise InputError(
                out,
                f"holds a synthetic set made with other settings ({', '.join(diff)} differ: "
                f"{ {k: saved.get(k) for k in diff} } vs { {k: manifest.get(k) for k in diff} }); "
                "a rerun must use the same settings to resume, or choose another output folder",
            )
    else:
        write_json(path, manifest)


def build_datalist(out: Path, items: Sequence[Mapping[str, Any]], generator: str) -> Path:
    """``out/datalist.json`` from the finished cases of ``items`` (in item order), paths relative to ``out``."""
    from tools.quality_gate import datalist_mark
    from tools.splits import write_datalist

    entries = []
    for it in items:
        if not is_finished(out, it["name"]):
            continue
        files = case_files(out, it["name"])
        sidecar = json.loads(files["image_sidecar"].read_text())
        gate = {"quality_gate": datalist_mark(sidecar["quality_gate"])} if "quality_gate" in sidecar else {}
        entries.append(
            {
                "image": str(files["image"]),
                "label": str(files["label"]),
                "case": it["name"],
                "synthetic": True,
                "generator": generator,
                "source_patient": sidecar.get("source_patient"),
                "patient": sidecar.get("source_patient"),
                "seed": int(sidecar.get("seed", sidecar.get("item_seed", it["seed"]))),  # the seed that made it
                "sample": it["sample"],
                "source_index": it["index"],
                "source_image": it["record"].get("image"),
                "checkpoint_sha256": sidecar.get("checkpoint_sha256"),
                **gate,
            }
        )
    content = {"description": f"synthetic cases written by {generator} (tools.synthesize)", "synthetic": True,
               "generator": generator, "n_expected": len(items), "training": entries}  # fmt: skip
    gated = [e["quality_gate"] for e in entries if "quality_gate" in e]
    if gated:
        content["quality_gate"] = {"n_gated": len(gated), "n_passed": sum(g["passed"] for g in gated),
                                   "n_failed": sum(not g["passed"] for g in gated),
                                   "mean_tries": sum(g["tries"] for g in gated) / len(gated)}  # fmt: skip
    return write_datalist(content, out / "datalist.json")


#: the generators the quality gate judges: they make whole images from a mask (difftumor edits real scans)
GATED = ("vae_ct", "ldm_abdomen")


def _make_gate(root: Path, quality_gate, reference, section: str, overrides, tries, min_dice, samples_per_item: int):
    """The :class:`tools.quality_gate.QualityGate` of a run (None without ``quality_gate``); every setting is checked
    here, before anything is written: a ValueError names the flag, an InputError the file."""
    from tools.quality_gate import QualityGate, check_settings, hu_reference, judge_weights

    if quality_gate is None:
        given = [flag for flag, value, default in (("--gate_reference", reference, None),
                                                   ("--gate_reference_section", section, "training"),
                                                   ("--gate_overrides", overrides or None, None),
                                                   ("--gate_tries", tries, 3), ("--gate_min_dice", min_dice, 0.5))
                 if value != default]  # fmt: skip
        if given:
            raise ValueError(f"{', '.join(given)} given without --quality_gate (the judge's seg_unet3d model folder)")
        return None
    if root.name not in GATED:
        raise ValueError(f"--quality_gate judges the whole-image generators {', '.join(GATED)}; {root.name} edits "
                         "real scans")  # fmt: skip
    if isinstance(quality_gate, QualityGate):
        check_settings(quality_gate.tries, quality_gate.min_dice, samples_per_item)
        return quality_gate
    check_settings(tries, min_dice, samples_per_item)
    judge_weights(quality_gate)
    if reference is None:
        raise ValueError("--quality_gate needs --gate_reference: the real datalist (or data folder) the generator "
                         "trained on, whose pancreas HU medians give the pass range")  # fmt: skip
    return QualityGate(quality_gate, hu_reference(reference, section), dict(overrides or {}), tries, min_dice)


def _gate_dir(out: Path, attempt: int) -> Path:
    """Where try ``attempt`` (0-based) of the gated cases is made and judged."""
    return out / ".gate" / f"try{attempt + 1}"


def _keep_try(out: Path, name: str, block: Mapping[str, Any]) -> None:
    """Move the kept try of a decided case into ``out``, its sidecars recording the gate (``block``); the label's
    sidecar moves last, so the case is finished only when all four files are in place. Its other tries go."""
    src, dst = case_files(_gate_dir(out, block["kept_try"] - 1), name), case_files(out, name)
    for key in ("image_sidecar", "label_sidecar"):
        sidecar = json.loads(src[key].read_text())
        sidecar["quality_gate"] = dict(block)
        write_json(src[key], sidecar)
    for key in ("image", "label", "image_sidecar", "label_sidecar"):
        os.replace(src[key], dst[key])
    for attempt in range(int(block["max_tries"])):
        folder = _gate_dir(out, attempt)
        for path in [*case_files(folder, name).values(), folder / f"{name}.gate.json"]:
            path.unlink(missing_ok=True)


def _run_gated(root: Path, configs, overrides, todo, out: Path, ckpt_dir, source, seed: int, generator: str, gate,
               rank: int, bar) -> None:  # fmt: skip
    """Make, judge and keep every case of ``todo`` through the gate (:func:`tools.quality_gate.run_gate`): one
    bundle workflow and one judge run per try for all cases still failing. A try judged by an earlier, interrupted
    run (its four files and ``<name>.gate.json`` in ``out/.gate/try<t>``) is reused, not made again."""
    from tools.bundles import run_config
    from tools.quality_gate import run_gate, try_seed

    settings = json.loads(json.dumps(gate.describe(), default=str))

    def make_and_judge(pending, attempt):
        folder = _gate_dir(out, attempt)
        tries = [{**it, "seed": try_seed(seed, it["index"], it["sample"], attempt), "planned_seed": it["seed"]}
                 for it in pending]  # fmt: skip
        judged: dict[str, dict] = {}
        for t in tries:  # reuse a verdict of an interrupted run made with this seed and these gate settings
            verdict = folder / f"{t['name']}.gate.json"
            if verdict.is_file() and is_finished(folder, t["name"]):
                saved = json.loads(verdict.read_text())
                if saved.get("settings") == settings and saved.get("checks", {}).get("seed") == t["seed"]:
                    judged[t["name"]] = saved["checks"]
        fresh = [t for t in tries if t["name"] not in judged]
        if fresh:
            run_config(root, configs, {**overrides, **_bundle_overrides(root.name, fresh, folder, ckpt_dir, source,
                                                                        seed, generator)})  # fmt: skip
            missing = [t["name"] for t in fresh if not is_finished(folder, t["name"])]
            if missing:
                raise RuntimeError(f"{generator}: try {attempt + 1} of case(s) {missing} was not written")
            files = [case_files(folder, t["name"]) for t in fresh]
            checks = gate.judge([{"image": str(f["image"]), "label": str(f["label"])} for f in files],
                                folder / f"judge_rank{rank}")  # fmt: skip
            for t, check in zip(fresh, checks):
                judged[t["name"]] = {"try": attempt + 1, "seed": t["seed"], **check}
                write_json(folder / f"{t['name']}.gate.json", {"settings": settings, "checks": judged[t["name"]]})
        return [judged[t["name"]] for t in tries]

    def keep(item, decision):
        _keep_try(out, item["name"], gate.provenance(decision))
        bar.update(1)

    run_gate(todo, gate.tries, make_and_judge, keep)


def _wait_for_all(out: Path, items: Sequence[Mapping[str, Any]], poll_s: float = 1.0) -> None:
    while True:
        pending = [it for it in items if not is_finished(out, it["name"]) and not _skipped(out, it["name"]).is_file()]
        if not pending:
            return
        failed = sorted(out.glob(".failed_rank*.json"))
        if failed:
            raise RuntimeError(f"synthesize failed in another process: see {failed[0]}")
        time.sleep(poll_s)


def synthesize(
    bundle: str | os.PathLike,
    source: str | os.PathLike | Mapping[str, Any],
    out: str | os.PathLike,
    *,
    ckpt_dir: str | os.PathLike | None = None,
    configs: Sequence[str] | str | None = None,
    overrides: Mapping[str, Any] | None = None,
    samples_per_item: int = 1,
    seed: int = 0,
    section: str = "training",
    max_items: int | None = None,
    progress: bool = True,
    quality_gate: str | os.PathLike | Any | None = None,
    gate_reference: str | os.PathLike | None = None,
    gate_reference_section: str = "training",
    gate_overrides: Mapping[str, Any] | None = None,
    gate_tries: int = 3,
    gate_min_dice: float = 0.5,
) -> Path:
    """Run ``bundle``'s inference over ``source`` and write the synthetic set and ``out/datalist.json``.

    Args:
        bundle: ``vae_ct``, ``ldm_abdomen`` or ``difftumor`` (a name or a bundle folder).
        source: datalist JSON or MSD / prepared folder: masks (vae_ct, ldm_abdomen; ldm_abdomen's default crop_mode
            ``full`` wants a folder made by ``tools data prepare --mode full --hu_window None``) or healthy scans with
            their pancreas label (difftumor; records with ``has_tumor`` are skipped; an ``organ`` field is used in
            place of ``label`` when present).
        out: output folder (cases, sidecars, ``datalist.json``, ``synthesize.json``).
        ckpt_dir: weights folder (default the bundle's ``models/``).
        configs: config files (default vae_ct: inference + inference_3d; ldm_abdomen: inference +
            inference_controlnet; difftumor: inference).
        overrides: config overrides (network sizes, ``tumor_type``, ``family_name``, ``num_inference_steps``...).
        samples_per_item: samples per source record.
        seed: base seed; see :func:`item_seed`.
        section: datalist section of ``source``.
        max_items: use only the first records.
        progress: show a progress bar.
        quality_gate: the quality gate's judge (:mod:`tools.quality_gate`): a seg_unet3d model folder holding
            ``model.pt`` (or a :class:`tools.quality_gate.QualityGate`, whose own settings then replace the
            ``gate_*`` arguments). vae_ct and ldm_abdomen only.
        gate_reference: the real datalist or data folder the generator trained on: per-case median HU inside the
            pancreas label, pass range mean +- 3 sd (written to ``out/quality_gate_reference.json``).
        gate_reference_section: its section.
        gate_overrides: the judge's seg_unet3d overrides (network size, ``pixdim``, ``roi_size``, ``num_classes``).
        gate_tries: the first try plus up to ``gate_tries - 1`` regenerations (1 to 10).
        gate_min_dice: the judge's pancreas Dice to the mask from which a case is label-consistent.

    Returns the path of ``out/datalist.json``: ``{"training": [{"image", "label", "synthetic": True, "generator",
    "source_patient", "seed", ...}]}``.
    """
    from tqdm.auto import tqdm

    from tools.bundles import bundle_dir, run_config
    from tools.study_runner import distributed_context

    root = bundle_dir(bundle)
    if root.name not in GENERATORS:
        raise ValueError(f"{root.name}: not a generative bundle; choose one of {sorted(GENERATORS)}")
    spec = GENERATORS[root.name]
    configs = list(spec.configs) if configs is None else ([configs] if isinstance(configs, str) else list(configs))
    overrides = dict(overrides or {})
    out = Path(out).resolve()
    generator = _generator_name(root, spec, configs, overrides)
    records = _source_records(spec, source, section, max_items)
    items = plan_items(records, samples_per_item, seed)
    gate = _make_gate(root, quality_gate, gate_reference, gate_reference_section, gate_overrides, gate_tries,
                      gate_min_dice, samples_per_item)  # fmt: skip
    rank, world = distributed_context()
    if rank == 0:  # every source file, before anything is written (the other processes wait for the manifest)
        check_sources(root, configs, overrides, items, out, source, seed, generator)
    out.mkdir(parents=True, exist_ok=True)
    manifest = {"bundle": root.name, "generator": generator, "seed": int(seed),
                "source": str(Path(source).resolve()) if isinstance(source, (str, os.PathLike)) else "<records>",
                "section": section, "samples_per_item": int(samples_per_item), "configs": configs,
                "overrides": {k: _jsonable(v) for k, v in sorted(overrides.items())}}  # fmt: skip
    if gate is not None:
        manifest["quality_gate"] = json.loads(json.dumps(gate.describe(), default=str))
    if rank == 0:
        _check_manifest(out, manifest)
        if gate is not None:
            from tools.quality_gate import REFERENCE_FILE

            reference = out / REFERENCE_FILE
            if not reference.is_file() or json.loads(reference.read_text()) != json.loads(json.dumps(gate.reference)):
                write_json(reference, gate.reference)
    else:
        deadline = time.time() + 60
        while not (out / "synthesize.json").is_file() and time.time() < deadline:
            time.sleep(0.2)
        _check_manifest(out, manifest)
    for it in items:  # a finished case must be the one this plan would make
        if is_finished(out, it["name"]):
            saved = json.loads(case_files(out, it["name"])["image_sidecar"].read_text()).get("item_seed")
            if saved is not None and int(saved) != it["seed"]:
                raise InputError(out, f"case {it['name']} was made with seed {saved}, this run gives {it['seed']}")
    mine = [it for it in items if it["index"] % world == rank]
    todo = [it for it in mine if not is_finished(out, it["name"]) and not _skipped(out, it["name"]).is_file()]
    failed_marker = out / f".failed_rank{rank}.json"
    failed_marker.unlink(missing_ok=True)
    try:
        if todo and gate is not None:
            bar = tqdm(total=len(todo), desc=f"synthesize {generator}, gated ({rank + 1}/{world})",
                       disable=not progress)  # fmt: skip
            _run_gated(root, configs, overrides, todo, out, ckpt_dir, source, seed, generator, gate, rank, bar)
            bar.close()
        elif todo:
            batches = [[it] for it in todo] if spec.per_item_workflow else [todo]
            bar = tqdm(total=len(todo), desc=f"synthesize {generator} ({rank + 1}/{world})", disable=not progress)
            for batch in batches:
                run_config(root, configs, {**overrides, **_bundle_overrides(root.name, batch, out, ckpt_dir, source,
                                                                            seed, generator)})  # fmt: skip
                for it in batch:
                    if not is_finished(out, it["name"]):
                        if spec.per_item_workflow:
                            write_json(_skipped(out, it["name"]), {"reason": "the bundle wrote no case (tumor "
                                       "already labelled or no organ voxel)", "record": it["record"]})  # fmt: skip
                        else:
                            raise RuntimeError(f"{generator}: case {it['name']} was not written")
                bar.update(len(batch))
            bar.close()
    except BaseException as error:
        if not isinstance(error, KeyboardInterrupt):
            write_json(failed_marker, {"rank": rank, "error": repr(error)})
        raise
    path = build_datalist(out, items, generator)
    if world > 1:
        _wait_for_all(out, items)
        path = build_datalist(out, items, generator)
    if gate is not None and rank == 0 and all(is_finished(out, it["name"]) for it in items):
        import shutil

        shutil.rmtree(out / ".gate", ignore_errors=True)  # every case kept its try: the rest is scratch
    return path
