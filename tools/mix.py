"""Training datalists that mix real and synthetic cases at a synthetic:real ratio (seed 000, Table 1).

Seed 000 kept the training set size fixed (the number of real training cases) and varied its composition:
100:0 (synthetic only), 50:50 and 25:75, for each generator and for generators combined (VAE + DM share the
synthetic part equally). :func:`mix_datalist` does exactly that; validation and test lists are copied unchanged,
so every arm is evaluated on the same real cases.

Synthetic cases made from a mask of a validation or test patient would leak that patient's anatomy into training:
records carrying ``source_patient`` are checked against the held-out patients and refused.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from tools.errors import InputError
from tools.splits import load_records, write_datalist


def parse_ratio(ratio: str | Sequence[float]) -> tuple[float, float]:
    """``"25:75"`` (synthetic:real) -> (0.25, 0.75); also accepts a pair of numbers."""
    if isinstance(ratio, str):
        parts = ratio.replace("/", ":").split(":")
        if len(parts) != 2:
            raise ValueError(f"ratio must look like 'synthetic:real', e.g. '25:75', got {ratio!r}")
        values = [float(p) for p in parts]
    else:
        values = [float(v) for v in ratio]
    if len(values) != 2 or min(values) < 0 or sum(values) <= 0:
        raise ValueError(f"ratio must be two non-negative numbers, not both zero: {ratio!r}")
    total = sum(values)
    return values[0] / total, values[1] / total


def _sample(records: list[dict], n: int, rng: np.random.Generator, replace: bool, what: str) -> list[dict]:
    if n == 0:
        return []
    if not records:
        raise InputError(None, f"{what}: no records to draw {n} from")
    if n > len(records) and not replace:
        raise InputError(
            None, f"{what}: {n} cases needed but only {len(records)} available; synthesize more or pass replace=True"
        )
    idx = rng.choice(len(records), size=n, replace=n > len(records) and replace)
    return [dict(records[int(i)]) for i in sorted(idx)]


def mix_datalist(
    real: str | os.PathLike | Mapping[str, Any],
    synthetic: Mapping[str, str | os.PathLike | Sequence[Mapping[str, Any]]],
    ratio: str | Sequence[float],
    total: int | None = None,
    seed: int = 0,
    replace: bool = False,
    real_section: str = "training",
    synthetic_section: str | None = "training",
) -> dict[str, Any]:
    """One mixed datalist: ``total`` training cases (default: the real training set's size) at ``ratio``.

    ``synthetic`` maps a generator name (``vae``, ``dm``...) to its data set (datalist JSON, folder or records);
    with several generators the synthetic share is split equally between them. Every training record gets
    ``synthetic`` (bool) and ``generator`` (``real`` for real cases). Deterministic per ``seed``.
    """
    syn_frac, _ = parse_ratio(ratio)
    loaded = load_records(real)
    real_pool = [dict(r) for r in loaded.records(real_section)]
    held_out = {s: [dict(r) for r in recs] for s, recs in loaded.sections.items() if s != real_section}
    held_out_patients = {str(r.get("patient")) for recs in held_out.values() for r in recs if r.get("patient")}
    n_total = int(total) if total is not None else len(real_pool)
    n_syn = int(round(n_total * syn_frac))
    n_real = n_total - n_syn
    rng = np.random.default_rng(seed)
    training = [
        {**r, "synthetic": False, "generator": "real"} for r in _sample(real_pool, n_real, rng, replace, "real")
    ]
    generators = sorted(synthetic)
    if n_syn and not generators:
        raise ValueError(f"ratio {ratio} asks for {n_syn} synthetic cases but no synthetic data set was given")
    counts = {"real": n_real}
    for k, name in enumerate(generators):
        n_gen = n_syn // len(generators) + (1 if k < n_syn % len(generators) else 0)
        pool = [dict(r) for r in load_records(synthetic[name]).records(synthetic_section)]
        for record in pool:
            source = record.get("source_patient")
            if source is not None and str(source) in held_out_patients:
                raise InputError(
                    record.get("image"),
                    f"synthetic case of generator {name!r} was made from held-out patient {source!r}: it would leak "
                    "a validation/test patient into training",
                )
        picked = _sample(pool, n_gen, rng, replace, f"generator {name!r}")
        training += [{**r, "synthetic": True, "generator": name} for r in picked]
        counts[name] = n_gen
    return {
        "training": training,
        **held_out,
        "mix": {"ratio": f"{syn_frac * 100:g}:{(1 - syn_frac) * 100:g}", "total": n_total, "counts": counts,
                "seed": seed, "generators": generators},
    }  # fmt: skip


def write_mix(
    real: str | os.PathLike | Mapping[str, Any],
    synthetic: Mapping[str, Any],
    ratio: str,
    out_json: str | os.PathLike,
    **kwargs: Any,
) -> dict[str, Any]:
    """:func:`mix_datalist` written as a MONAI datalist JSON (absolute paths) and returned."""
    mixed = mix_datalist(real, synthetic, ratio, **kwargs)
    inputs = tuple(p for p in [real, *synthetic.values()] if isinstance(p, (str, os.PathLike)) and Path(p).is_file())
    write_datalist(mixed, out_json, base_dir=None, inputs=inputs)
    return mixed
