"""How the tools call the bundles: through ``monai.bundle`` only, never by re-implementing them.

Every bundle names its code package ``scripts`` (the model-zoo convention), so two bundles' code cannot be imported
under that one name in one process. :func:`import_bundle_scripts` loads a bundle's ``scripts`` under an alias
(``difftumor_scripts``...), which is how a difftumor transform can live inside a seg_unet3d training run;
:func:`run_config` builds and runs a bundle workflow with overrides, with the bundle's own ``scripts`` importable
while it runs.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

REPO_ROOT = Path(__file__).resolve().parents[1]
BUNDLES_ROOT = REPO_ROOT / "bundles"


def bundle_dir(name_or_path: str | os.PathLike) -> Path:
    """A bundle folder from its name (``seg_unet3d``) or a path; raises FileNotFoundError when it has no configs."""
    candidate = Path(name_or_path)
    if not candidate.is_dir():
        candidate = BUNDLES_ROOT / str(name_or_path)
    if not (candidate / "configs").is_dir():
        raise FileNotFoundError(f"{candidate}: not a bundle (no configs/ folder)")
    return candidate.resolve()


def import_bundle_scripts(name_or_path: str | os.PathLike, alias: str | None = None):
    """Import a bundle's ``scripts`` package as ``alias`` (default ``<bundle>_scripts``) and return it.

    The bundle's modules import their siblings relatively, so they work under any package name.
    """
    root = bundle_dir(name_or_path)
    alias = alias or f"{root.name}_scripts"
    if alias in sys.modules:
        return sys.modules[alias]
    init = root / "scripts" / "__init__.py"
    spec = importlib.util.spec_from_file_location(alias, init, submodule_search_locations=[str(init.parent)])
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {init}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[alias] = module
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def bundle_on_path(root: Path) -> Iterator[None]:
    """Make ``import scripts`` resolve to this bundle's package while the block runs, then restore everything."""
    saved_path = list(sys.path)
    saved_modules = {k: v for k, v in sys.modules.items() if k == "scripts" or k.startswith("scripts.")}
    for key in saved_modules:
        del sys.modules[key]
    sys.path.insert(0, str(root))
    try:
        yield
    finally:
        for key in [k for k in sys.modules if k == "scripts" or k.startswith("scripts.")]:
            del sys.modules[key]
        sys.modules.update(saved_modules)
        sys.path[:] = saved_path


def config_files(root: Path, names: Sequence[str] | str) -> list[str]:
    names = [names] if isinstance(names, str) else list(names)
    files = [root / "configs" / n if not Path(n).is_absolute() else Path(n) for n in names]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"bundle {root.name}: missing config files {missing}")
    return [str(f) for f in files]


def run_config(
    bundle: str | os.PathLike,
    configs: Sequence[str] | str,
    overrides: Mapping[str, Any] | None = None,
    workflow_type: str = "train",
    run: bool = True,
):
    """Build a bundle's ``ConfigWorkflow`` from config files with overrides (values may be Python objects, e.g. a
    transform), run it and finalize; return the workflow (its parser holds the results).

    An override naming no key of the config files is refused before anything runs (``UnknownKeyError`` naming the
    nearest key), as ``python -m monai.bundle run`` refuses it in the bundle's own ``initialize``.
    """
    from monai.bundle import ConfigWorkflow

    from tools.bundle_scripts.config_check import check_overrides

    root = bundle_dir(bundle)
    files = config_files(root, configs)
    meta = root / "configs" / "metadata.json"
    logging_conf = root / "configs" / "logging.conf"
    with bundle_on_path(root):
        check_overrides(files, list(overrides or {}))
        workflow = ConfigWorkflow(
            config_file=files,
            meta_file=str(meta),
            logging_file=str(logging_conf) if logging_conf.is_file() else None,
            workflow_type=workflow_type,
            bundle_root=str(root),
        )
        for key, value in (overrides or {}).items():
            workflow.parser[key] = value
        workflow.initialize()
        if run:
            workflow.run()
        workflow.finalize()
    return workflow
