"""A phantom case rendered again with other scanner noise: the phantom's own noise floor for reconstruction errors.

Two renderings of one case differ only by the scanner-noise draw (same anatomy, tissue values, contrast timing and
texture), so the mean absolute difference between them is what a perfect reconstruction of a noisy scan can be
expected to miss. Used by ``benchmarks/generator_quality.py`` (ldm_abdomen's autoencoder) and
``benchmarks/difftumor_quality.py`` (DiffTumor's VQ autoencoder).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def phantom_label(phantom: Path, scan: str) -> Path:
    """The label file of case ``scan`` of the phantom data set in ``phantom`` (training or test section)."""
    meta = json.loads((Path(phantom) / "dataset.json").read_text())
    entry = next(e for e in meta["training"] + meta["test"] if Path(e["image"]).name.split(".nii")[0] == scan)
    return Path(phantom) / entry["label"]


def render_with_other_noise(phantom: Path, scan: str, noise_seed: int):
    """Phantom case ``scan`` of the data set in ``phantom`` made again with the same parameters (``make_case`` as
    ``tools.phantom.dataset`` calls it, the plan from ``plan_cases``), except that the scanner-noise draw of
    ``appearance.render`` comes from ``noise_seed``: the phantom has no noise-seed argument, so its ``render`` is
    given a random stream whose ``standard_normal`` (the noise field, its only use there) comes from another
    generator; every other draw (tissue values, contrast timing) stays the case's own. Returns (case, original
    label) so that the caller can check that the anatomy did not move."""
    import tools.phantom.case as phantom_case
    from tools.io import load_nifti
    from tools.phantom import make_case, plan_cases

    params = json.loads((Path(phantom) / "dataset.json").read_text())["generator"]["params"]
    plan = plan_cases(params["n_cases"], params["seed"], params["phase"], params["tumor_fraction"],
                      params["test_fraction"], params["orientation"])  # fmt: skip
    item = next(p for p in plan if p["case"] == scan)
    noise = np.random.Generator(np.random.PCG64(noise_seed))

    class OtherNoise:
        def __init__(self, stream):
            self.stream = stream

        def standard_normal(self, *args, **kwargs):
            return noise.standard_normal(*args, **kwargs)

        def __getattr__(self, name):
            return getattr(self.stream, name)

    original_render = phantom_case.render
    phantom_case.render = lambda tissue, spacing, phase, rng, *rest: original_render(
        tissue, spacing, phase, OtherNoise(rng), *rest
    )
    try:
        case = make_case(seed=(params["seed"], item["patient_index"]), shape=params["shape"],
                         spacing=params["spacing"], phase=item["phase"], tumor=item["tumor"],
                         tumor_radius_mm=params["tumor_radius_mm"], orientation=item["orientation"])  # fmt: skip
    finally:
        phantom_case.render = original_render
    return case, load_nifti(phantom_label(phantom, scan))[0].astype(np.uint8)
