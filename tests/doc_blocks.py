"""Run the command blocks of the documentation as a user would: the engine of ``tests/test_docs.py``.

Every fenced ```` ```bash ```` block of README.md, docs/*.md and bundles/*/docs/README.md is a test case. A block
runs literally, or with changes declared in an HTML comment (invisible on GitHub) right before its fence::

    <!-- doc-test
    replace: --n_cases 20 ==> --n_cases 4
    setup: python -m tools data phantom --out data/phantom --n_cases 2 --shape 32,32,16
    -->

- ``replace: OLD ==> NEW`` substitutes text in the block (smaller sizes, ``--smoke`` for benchmarks); a ``replace``
  whose OLD text is not in the block is an error, so a marker cannot silently outlive the command it changes;
- ``setup: COMMAND`` runs before the block (e.g. the files a user would have filled by hand);
- ``<!-- doc-test: gpu -->`` and ``<!-- doc-test: user-data -->`` are the only skips: blocks that need a GPU, or
  the user's own data; they are listed by name in the test summary.

The blocks of one document run in order, like a user following it in one terminal: shell variables carry over
from block to block (the working folder does not: each block starts where the document's commands start). The
working copy is a temporary folder with a copy of ``bundles/`` and ``benchmarks/`` (commands write their default
outputs there), ``tools`` linked to this checkout and ``../shared`` linked to the project's shared folder; README.md
and docs/*.md start at its root, a bundle's docs at the bundle's folder. ``python`` is the interpreter running the
tests, and ``$DOC_TEST_REPO`` names the real checkout (for ``make -C``).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

REPO_ROOT = Path(__file__).resolve().parents[1]
SKIP_KINDS = ("gpu", "user-data")
FENCE = re.compile(r"^```(\S*)\s*$")
MARKER = re.compile(r"<!--\s*doc-test\b(.*?)-->", re.S)
#: Name prefixes of the shell variables a block may not carry to the next one (the runner's own and bash's).
_PRIVATE_VARIABLES = re.compile(r"^(__dt_|BASH|FUNCNAME|PIPESTATUS|_$)")


def documents(root: Path = REPO_ROOT) -> list[Path]:
    """The documents whose command blocks must run: README.md, docs/*.md and every bundle's docs/README.md."""
    docs = [root / "README.md", *sorted((root / "docs").glob("*.md")), *sorted(root.glob("bundles/*/docs/README.md"))]
    return [d for d in docs if d.is_file()]


@dataclass
class Block:
    doc: Path
    line: int  # 1-based line of the opening fence
    heading: str
    code: str
    skip: str | None = None  # "gpu" or "user-data"
    replaces: list[tuple[str, str]] = field(default_factory=list)
    setups: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.doc.relative_to(REPO_ROOT) if self.doc.is_relative_to(REPO_ROOT) else self.doc}:{self.line}"

    def script(self) -> str:
        """The commands to run: setup lines, then the block with its substitutions applied."""
        code = self.code
        for old, new in self.replaces:
            if old not in code:
                raise ValueError(f"{self.name}: doc-test replace text not found in the block: {old!r}")
            code = code.replace(old, new)
        return "\n".join([*self.setups, code])


def _parse_marker(body: str, where: str) -> tuple[str | None, list[tuple[str, str]], list[str]]:
    text = body.strip()
    if text.startswith(":"):
        kind = text[1:].strip()
        if kind not in SKIP_KINDS:
            raise ValueError(f"{where}: unknown doc-test marker {kind!r} (allowed skips: {', '.join(SKIP_KINDS)})")
        return kind, [], []
    replaces, setups = [], []
    for raw in text.splitlines():
        line = raw.strip()
        if not line:
            continue
        key, sep, value = line.partition(":")
        if not sep or key.strip() not in ("replace", "setup"):
            raise ValueError(f"{where}: doc-test line must start with 'replace:' or 'setup:', got {line!r}")
        if key.strip() == "setup":
            setups.append(value.strip())
            continue
        old, arrow, new = value.partition("==>")
        if not arrow:
            raise ValueError(f"{where}: doc-test replace needs 'OLD ==> NEW', got {line!r}")
        replaces.append((old.strip(), new.strip()))
    return None, replaces, setups


def extract_blocks(doc: Path) -> list[Block]:
    """The ```bash blocks of a Markdown file, each with the doc-test marker that precedes it (if any)."""
    lines = doc.read_text().splitlines()
    blocks: list[Block] = []
    heading, pending, pending_line = "", None, 0
    i = 0
    while i < len(lines):
        line = lines[i]
        fence = FENCE.match(line)
        if line.startswith("#") and not fence:
            heading = line.lstrip("#").strip()
        if line.lstrip().startswith("<!--") and "doc-test" in line:
            start = i
            text = line
            while "-->" not in text and i + 1 < len(lines):
                i += 1
                text += "\n" + lines[i]
            match = MARKER.search(text)
            if match is None:
                raise ValueError(f"{doc}:{start + 1}: malformed doc-test marker")
            pending, pending_line = match.group(1), start + 1
            i += 1
            continue
        if fence:
            lang = fence.group(1)
            end = i + 1
            while end < len(lines) and not lines[end].startswith("```"):
                end += 1
            if lang in ("bash", "sh", "shell"):
                block = Block(doc, i + 1, heading, "\n".join(lines[i + 1 : end]))
                if pending is not None:
                    block.skip, block.replaces, block.setups = _parse_marker(pending, f"{doc}:{pending_line}")
                blocks.append(block)
            elif pending is not None:
                raise ValueError(f"{doc}:{pending_line}: doc-test marker before a non-bash block")
            pending = None
            i = end + 1
            continue
        if pending is not None and line.strip():
            raise ValueError(f"{doc}:{pending_line}: doc-test marker not directly before a ```bash block")
        i += 1
    if pending is not None:
        raise ValueError(f"{doc}:{pending_line}: doc-test marker at the end of the file, before no block")
    return blocks


def make_checkout(tmp: Path, shared: Path | None) -> Path:
    """A throw-away working copy: ``tmp/repo`` (bundles/ and benchmarks/ copied, tools linked) and ``tmp/shared``."""
    repo = tmp / "repo"
    repo.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pt", "*.ts", "eval", "runs")
    for name in ("bundles", "benchmarks"):
        shutil.copytree(REPO_ROOT / name, repo / name, ignore=ignore)
    (repo / "tools").symlink_to(REPO_ROOT / "tools", target_is_directory=True)
    if shared is not None and shared.is_dir():
        (tmp / "shared").symlink_to(shared.resolve(), target_is_directory=True)
    return repo


def start_folder(doc: Path, repo: Path) -> Path:
    """Where a document's commands start: a bundle's folder for its docs, the repository root otherwise."""
    relative = doc.resolve().relative_to(REPO_ROOT)
    if relative.parts[0] == "bundles":
        return repo / "bundles" / relative.parts[1]
    return repo


@dataclass
class BlockResult:
    block: Block
    status: str  # passed, failed, skipped
    seconds: float = 0.0
    output: str = ""


def block_environment(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    python_bin = str(Path(sys.executable).parent)
    env["PATH"] = python_bin + os.pathsep + env.get("PATH", "")
    env["DOC_TEST_REPO"] = str(REPO_ROOT)
    env["OMP_NUM_THREADS"] = env.get("OMP_NUM_THREADS", "1")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    env.update(extra or {})
    return env


def _wrapped(script: str, state_in: Path, state_out: Path) -> str:
    """The block between a prologue that restores the previous blocks' variables and an epilogue that saves them."""
    return "\n".join(
        [
            "__dt_before=$(compgen -v)",
            f"[ -f '{state_in}' ] && source '{state_in}'",
            "set -eo pipefail",
            script,
            "set +e",
            f": > '{state_out}'",
            "for __dt_v in $(compgen -v); do",
            '  case " $(echo $__dt_before) " in *" $__dt_v "*) continue;; esac',
            f"  [[ $__dt_v =~ {_PRIVATE_VARIABLES.pattern} ]] && continue",
            f"  declare -p \"$__dt_v\" >> '{state_out}' 2>/dev/null",
            "done",
            "exit 0",
        ]
    )


@contextlib.contextmanager
def python_server(env: dict[str, str], folder: Path) -> Iterator[dict[str, str]]:
    """Start :mod:`tests.python_zygote` for one document; yield the environment whose ``python`` uses it."""
    from tests.python_zygote import write_client

    address = os.path.join(tempfile.mkdtemp(prefix="doczygote_"), "socket")  # AF_UNIX paths are short
    server = subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("python_zygote.py")), address],
        cwd=folder,
        env=env,
        stdin=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 300
        while not os.path.exists(address + ".ready"):
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the python fork server for the docs test did not start (exit {server.poll()})")
            time.sleep(0.1)
        client = write_client(Path(address).parent / "bin", address)
        yield {**env, "PATH": str(client.parent) + os.pathsep + env["PATH"]}
    finally:
        server.kill()
        server.wait()
        shutil.rmtree(Path(address).parent, ignore_errors=True)


def run_blocks(
    blocks: list[Block],
    repo: Path,
    timeout: float = 600,
    env: dict[str, str] | None = None,
    log=None,
    fork_server: bool = True,
) -> list[BlockResult]:
    """Run one document's blocks in order; stop at the first failure (later blocks may depend on it).

    With ``fork_server``, ``python`` commands start from a process that imported torch and MONAI once
    (:mod:`tests.python_zygote`): the same commands, without paying 7 s of imports each."""
    environment = block_environment(env)
    if not fork_server or all(b.skip for b in blocks):
        return _run_blocks(blocks, repo, timeout, environment, log)
    with python_server(environment, repo) as served:
        return _run_blocks(blocks, repo, timeout, served, log)


def _run_blocks(blocks, repo, timeout, environment, log) -> list[BlockResult]:
    results: list[BlockResult] = []
    state = repo.parent / "doc_test_state"
    state.mkdir(exist_ok=True)
    previous = state / "none.sh"
    failed = False
    for n, block in enumerate(blocks):
        if block.skip:
            results.append(BlockResult(block, "skipped", output=block.skip))
            continue
        if failed:
            results.append(BlockResult(block, "not run", output="an earlier block of this document failed"))
            continue
        saved = state / f"{block.doc.stem}_{n}.sh"
        script = _wrapped(block.script(), previous, saved)
        started = time.monotonic()
        try:
            proc = subprocess.run(
                ["bash", "-c", script],
                cwd=start_folder(block.doc, repo),
                env=environment,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                timeout=timeout,
            )
            status, output = ("passed" if proc.returncode == 0 else "failed"), proc.stdout
            if proc.returncode != 0:
                output += f"\n[exit code {proc.returncode}]"
        except subprocess.TimeoutExpired as err:
            status, output = "failed", f"{err.stdout or ''}\n[timed out after {timeout:.0f} s]"
        result = BlockResult(block, status, time.monotonic() - started, output)
        results.append(result)
        if log is not None:
            log(f"{block.name} ({block.heading}): {status} in {result.seconds:.1f} s")
        if status != "passed":
            failed = True
        else:
            previous = saved
    return results
