"""The study runner: resumable jobs, sharding across processes, failure reporting, aggregation."""

from __future__ import annotations

import json
import threading

import pytest

from tools.study_runner import Job, aggregate, collect, job_dir, run_jobs, slug


def _fake_run(job, folder):
    # a deterministic "training": the metric depends only on the job
    return {"dice": 0.5 + 0.1 * (job.arm == "b") + 0.01 * job.seed, "nsd": 0.4}


JOBS = [Job(arm, seed) for arm in ("a", "b") for seed in (0, 1, 2)]


def test_slug():
    assert slug("VAE 25:75") == "VAE_25-75" and slug("VAE+DM 100:0") == "VAE+DM_100-0"


def test_single_process_runs_every_job_and_resumes(tmp_path):
    calls = []

    def counting(job, folder):
        calls.append(job.key)
        return _fake_run(job, folder)

    rows = run_jobs(JOBS, tmp_path, counting, rank=0, world_size=1, progress=False)
    assert len(rows) == 6 and len(calls) == 6
    (job_dir(tmp_path, JOBS[1]) / "metrics.json").unlink()  # as if killed during that job
    calls.clear()
    assert run_jobs(JOBS, tmp_path, counting, rank=0, world_size=1, progress=False) == rows
    assert calls == [JOBS[1].key], "a rerun only redoes the unfinished job"


def test_two_processes_give_the_same_results_as_one(tmp_path):
    single = run_jobs(JOBS, tmp_path / "one", _fake_run, rank=0, world_size=1, progress=False)
    results = {}

    def worker(rank):
        results[rank] = run_jobs(
            JOBS, tmp_path / "two", _fake_run, rank=rank, world_size=2, poll_s=0.05, timeout_s=30, progress=False
        )

    threads = [threading.Thread(target=worker, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results[1] is None
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in single]
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in results[0]] == strip


def test_a_failing_job_is_reported_with_its_traceback(tmp_path):
    def broken(job, folder):
        if job.arm == "b" and job.seed == 1:
            raise ValueError("boom")
        return _fake_run(job, folder)

    with pytest.raises(RuntimeError, match=r"b/seed1 failed.*boom"):
        run_jobs(JOBS, tmp_path, broken, rank=0, world_size=1, progress=False)
    failed = json.loads((job_dir(tmp_path, Job("b", 1)) / "failed.json").read_text())
    assert "ValueError" in failed["traceback"]


def test_aggregate_mean_and_std_over_seeds(tmp_path):
    run_jobs(JOBS, tmp_path, _fake_run, rank=0, world_size=1, progress=False)
    table = aggregate(collect(JOBS, tmp_path), ["dice", "nsd"])
    a, b = table
    assert a["arm"] == "a" and a["n_seeds"] == 3
    assert a["dice_mean"] == pytest.approx(0.51) and a["dice_std"] == pytest.approx(0.01)
    assert b["dice_mean"] == pytest.approx(0.61) and b["dice"] == "0.6100 +- 0.0100"
