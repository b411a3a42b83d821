"""Run the jobs of a study (arms x seeds) in one or several processes, resumably, and aggregate the results.

Each job writes ``<out>/jobs/<arm>/seed<k>/metrics.json`` when it has finished (atomically); a rerun skips every job
whose file exists, so a killed study continues where it stopped. Under ``torchrun`` each process takes every
``world_size``-th job (by a fixed order), then waits for the others; process 0 aggregates. A job's result does not
depend on which process ran it: each job seeds everything from its own seed, runs its data loading in the main
process and uses a fixed number of threads (``threads_per_job``), so one process and several processes give the
same table.
"""

from __future__ import annotations

import json
import os
import re
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from tqdm.auto import tqdm

from tools.io import write_json
from tools.report import mean_std


@dataclass(frozen=True)
class Job:
    """One training + evaluation run: an arm of the study with one seed and the parameters the runner needs."""

    arm: str
    seed: int
    params: Mapping[str, Any] = field(default_factory=dict, hash=False, compare=False)

    @property
    def key(self) -> str:
        return f"{slug(self.arm)}/seed{self.seed}"


def slug(text: str) -> str:
    """A file-name-safe form of an arm name (``VAE 25:75`` -> ``VAE_25-75``)."""
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", text.replace(":", "-")).strip("_")


def distributed_context() -> tuple[int, int]:
    """(rank, world size) from torchrun's environment, (0, 1) otherwise."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def job_dir(out_dir: str | os.PathLike, job: Job) -> Path:
    return Path(out_dir) / "jobs" / job.key


def run_jobs(
    jobs: Sequence[Job],
    out_dir: str | os.PathLike,
    run_job: Callable[[Job, Path], Mapping[str, Any]],
    rank: int | None = None,
    world_size: int | None = None,
    threads_per_job: int = 1,
    poll_s: float = 2.0,
    timeout_s: float | None = None,
    progress: bool = True,
) -> list[dict] | None:
    """Run this process's share of ``jobs``, wait for all of them, and return every job's result on process 0.

    ``run_job(job, folder)`` trains and evaluates one job in ``folder`` and returns its metrics (JSON-able). A job
    that raises writes ``failed.json`` with the traceback and makes every process stop with an error naming it.
    Returns None on processes other than 0.
    """
    import torch

    if rank is None or world_size is None:
        rank, world_size = distributed_context()
    keys = [job.key for job in jobs]
    if len(set(keys)) != len(keys):
        raise ValueError("two jobs share one arm and seed")
    mine = [job for i, job in enumerate(jobs) if i % world_size == rank]
    bar = tqdm(mine, desc=f"study jobs (process {rank + 1}/{world_size})", disable=not progress, unit="job")
    for job in bar:
        folder = job_dir(out_dir, job)
        if (folder / "metrics.json").is_file():
            continue
        bar.set_postfix_str(job.key)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "failed.json").unlink(missing_ok=True)
        torch.set_num_threads(threads_per_job)
        started = time.time()
        try:
            metrics = dict(run_job(job, folder))
        except Exception as error:
            write_json(folder / "failed.json", {"error": repr(error), "traceback": traceback.format_exc()})
            raise RuntimeError(f"study job {job.key} failed: {error!r} (details in {folder / 'failed.json'})")
        write_json(folder / "metrics.json", {"arm": job.arm, "seed": job.seed, "metrics": metrics,
                                             "seconds": round(time.time() - started, 1)})  # fmt: skip
    _wait_for_all(jobs, out_dir, poll_s, timeout_s)
    if rank != 0:
        return None
    return collect(jobs, out_dir)


def _wait_for_all(jobs: Sequence[Job], out_dir, poll_s: float, timeout_s: float | None) -> None:
    start = time.time()
    while True:
        pending = [job for job in jobs if not (job_dir(out_dir, job) / "metrics.json").is_file()]
        if not pending:
            return
        failed = [job for job in pending if (job_dir(out_dir, job) / "failed.json").is_file()]
        if failed:
            raise RuntimeError(f"study job {failed[0].key} failed in another process; see "
                               f"{job_dir(out_dir, failed[0]) / 'failed.json'}")  # fmt: skip
        if timeout_s is not None and time.time() - start > timeout_s:
            raise TimeoutError(f"{len(pending)} study jobs still unfinished after {timeout_s} s: {pending[0].key}...")
        time.sleep(poll_s)


def collect(jobs: Sequence[Job], out_dir: str | os.PathLike) -> list[dict]:
    """Every job's saved result: ``{"arm", "seed", "seconds", **metrics}``, in job order."""
    rows = []
    for job in jobs:
        saved = json.loads((job_dir(out_dir, job) / "metrics.json").read_text())
        rows.append({"arm": job.arm, "seed": job.seed, "seconds": saved.get("seconds"), **saved["metrics"]})
    return rows


def aggregate(
    rows: Sequence[Mapping[str, Any]], metrics: Sequence[str], arms: Sequence[str] | None = None
) -> list[dict]:
    """Per arm: ``<metric>_mean``, ``<metric>_std`` (sample std over seeds), ``<metric>`` as "mean +- std", ``n``."""
    arms = list(arms) if arms is not None else list(dict.fromkeys(r["arm"] for r in rows))
    table = []
    for arm in arms:
        runs = [r for r in rows if r["arm"] == arm]
        entry: dict[str, Any] = {"arm": arm, "n_seeds": len(runs)}
        for metric in metrics:
            values = [r.get(metric) for r in runs]
            values = [float(v) for v in values if v is not None]
            mean, std = mean_std(values)
            entry[f"{metric}_mean"] = mean
            entry[f"{metric}_std"] = std
            entry[metric] = "n/a" if not values else f"{mean:.4f} +- {std:.4f}"
        table.append(entry)
    return table
