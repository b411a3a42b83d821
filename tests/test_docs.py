"""Every command block of the documentation runs, literally or with the substitutions declared beside it.

The engine and the marker syntax are in ``tests/doc_blocks.py``. The only blocks not run are those marked ``gpu``
or ``user-data``; the session summary lists them by name (``SKIPPED_DOC_BLOCKS``, printed by conftest.py).
"""

from __future__ import annotations

import pytest

from tests.conftest import SHARED_DIR
from tests.doc_blocks import REPO_ROOT, documents, extract_blocks, make_checkout, run_blocks

#: Blocks a run did not execute because they are marked gpu / user-data: "<doc>:<line> (<kind>)".
SKIPPED_DOC_BLOCKS: list[str] = []


def _report(results) -> str:
    lines = []
    for r in results:
        lines.append(f"{r.block.name} [{r.block.heading}]: {r.status} ({r.seconds:.1f} s)")
    return "\n".join(lines)


def test_every_document_has_its_blocks_found_and_markers_valid():
    """The extraction itself: every document parses, every replace marker matches its block."""
    total = 0
    for doc in documents():
        for block in extract_blocks(doc):
            block.script()  # raises on a replace whose text is not in the block
            total += 1
    assert total >= 30, f"only {total} command blocks found in {[str(d) for d in documents()]}"


#: Documents run two at a time (this machine and CI have 2 cores; each block's commands use one thread), the
#: longest first, so the slowest document sets the wall time rather than the sum of all.
PARALLEL_DOCUMENTS = 2


@pytest.fixture(scope="session")
def documented_runs(request, tmp_path_factory):
    """Start every selected document's blocks (each in its own working copy) and return {doc: future}."""
    from concurrent.futures import ThreadPoolExecutor

    if not SHARED_DIR.is_dir():
        yield {}
        return
    selected = [
        item.callspec.params["doc"]
        for item in request.session.items
        if getattr(item, "originalname", "") == "test_documented_commands_run"
    ]
    by_length = sorted(set(selected), key=lambda d: -len(extract_blocks(d)))
    pool = ThreadPoolExecutor(max_workers=PARALLEL_DOCUMENTS)
    futures = {}
    for doc in by_length:
        repo = make_checkout(tmp_path_factory.mktemp("docs"), SHARED_DIR)
        futures[doc] = pool.submit(run_blocks, extract_blocks(doc), repo)
    yield futures
    pool.shutdown(wait=True, cancel_futures=True)


@pytest.mark.slow
@pytest.mark.parametrize("doc", documents(), ids=lambda d: str(d.relative_to(REPO_ROOT)))
def test_documented_commands_run(doc, documented_runs):
    if not SHARED_DIR.is_dir():
        pytest.skip(f"{SHARED_DIR} is absent: the documented commands read ../shared")
    results = documented_runs[doc].result()
    print(_report(results))
    SKIPPED_DOC_BLOCKS.extend(f"{r.block.name} ({r.output})" for r in results if r.status == "skipped")
    failed = [r for r in results if r.status == "failed"]
    if failed:
        first = failed[0]
        pytest.fail(
            f"{first.block.name} [{first.block.heading}] failed:\n{first.block.script()}\n--- output (tail) ---\n"
            f"{first.output[-6000:]}\n--- all blocks ---\n{_report(results)}",
            pytrace=False,
        )


#: Started in every Python process of a block (``sitecustomize``): puts back the rule the project had before issue
#: 13, which refused any label map without a background voxel, organ maps of crops inside the body included.
OLD_ALL_FOREGROUND_RULE = """
import tools.bundle_scripts.validation as validation

_check_label = validation.check_label


def check_label(path, array, allowed=None, require_foreground=True, forbid_all_foreground=True):
    return _check_label(path, array, allowed, require_foreground, True)


validation.check_label = check_label
"""


@pytest.mark.slow
def test_the_docs_test_reports_the_readme_evaluation_block_failed_under_the_old_all_foreground_rule(tmp_path):
    """The docs test is not a formality: with the old rule back, the README's worked evaluation block fails (its
    crops' organ maps have no background), and the runner says so with the error."""
    if not SHARED_DIR.is_dir():
        pytest.skip(f"{SHARED_DIR} is absent: the documented commands read ../shared")
    patch = tmp_path / "old_rule"
    patch.mkdir()
    (patch / "sitecustomize.py").write_text(OLD_ALL_FOREGROUND_RULE)
    blocks = [
        b for b in extract_blocks(REPO_ROOT / "README.md") if b.heading == "Synthetic data sets and their evaluation"
    ]
    assert len(blocks) == 1 and "evaluate synthetic $X/syn_vae $X/crops" in blocks[0].code
    repo = make_checkout(tmp_path / "checkout", SHARED_DIR)
    results = run_blocks(blocks, repo, env={"PYTHONPATH": str(patch)})
    assert results[0].status == "failed", results[0].output[-3000:]
    assert "all-foreground label: no background voxel" in results[0].output
