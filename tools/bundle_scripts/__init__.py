"""Modules every bundle of the collection carries an identical copy of in its ``scripts/`` folder.

A bundle must run on its own (it is shared alone through the MONAI model zoo), so it cannot import ``tools``. These
files are the single source; ``python -m tools sync_bundle_scripts`` copies them into the bundles that use them and
``tests/test_bundle_scripts.py`` fails when a copy differs.
"""

from pathlib import Path

SOURCE_DIR = Path(__file__).resolve().parent
#: Which vendored modules each bundle carries.
VENDORED = {
    "seg_unet3d": ("checkpointing.py", "config_check.py", "precision.py", "validation.py"),
    "vae_ct": ("checkpointing.py", "config_check.py", "precision.py", "provenance.py", "validation.py"),
    "ldm_abdomen": ("checkpointing.py", "config_check.py", "precision.py", "provenance.py", "validation.py"),
    "difftumor": ("checkpointing.py", "config_check.py", "precision.py", "provenance.py", "validation.py"),
}


def sync(bundles_root: str | Path) -> list[Path]:
    """Copy each vendored module into ``<bundle>/scripts/`` of every existing bundle; return the files written."""
    written = []
    for bundle, modules in VENDORED.items():
        scripts = Path(bundles_root) / bundle / "scripts"
        if not scripts.parent.is_dir():
            continue
        scripts.mkdir(exist_ok=True)
        init = scripts / "__init__.py"
        if not init.exists():
            init.write_text("")
        for module in modules:
            target = scripts / module
            text = (SOURCE_DIR / module).read_text()
            if not target.exists() or target.read_text() != text:
                target.write_text(text)
                written.append(target)
    return written
