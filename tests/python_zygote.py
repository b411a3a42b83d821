"""A fork server for the docs test: ``python`` commands start from an interpreter that has already imported torch
and MONAI.

Why: a documentation page runs dozens of ``python -m monai.bundle run`` / ``python -m tools`` commands, each a few
seconds of work after about 7 s of importing torch, MONAI and their optional packages on this 2-core machine; the
imports were two thirds of the docs test's time. Here one server process imports them once per document; the
``python`` that the blocks find first on their PATH is a small client (``-S``: no site packages, no imports) that
hands the server its argv, working folder, environment and its stdin/stdout/stderr file descriptors; the server
forks, the child takes those over and runs the command exactly as the interpreter would (``-m`` module, ``-c``
code, or a script, with the same ``sys.argv`` and ``sys.path[0]``), runs the exit handlers and threads down like a
normal exit, and the client exits with the child's status. Anything else (other interpreter options, no
arguments) is run by the real interpreter. Processes that the commands start themselves (``torchrun`` workers,
``make``, ``sys.executable`` subprocesses) are ordinary interpreters.
"""

from __future__ import annotations

import atexit
import json
import os
import runpy
import signal
import socket
import struct
import sys
import threading
import traceback
import types
from pathlib import Path

#: Imported once by the server (the packages every documented command pays for).
PRELOAD = ("numpy", "torch", "monai", "monai.bundle", "ignite.engine", "nibabel", "scipy.ndimage", "fire")

CLIENT = '''#!{python} -S
"""`python` for the docs test: hands the command to the fork server (tests/python_zygote.py), or runs it."""
import json, os, socket, struct, sys

argv = sys.argv[1:]
served = len(argv) >= 1 and (argv[0] in ("-m", "-c") and len(argv) >= 2 or not argv[0].startswith("-"))
if not served:
    os.execv({python!r}, [{python!r}, *argv])
conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
conn.connect({address!r})
request = json.dumps({{"argv": argv, "cwd": os.getcwd(), "env": dict(os.environ)}}).encode()
socket.send_fds(conn, [struct.pack("!I", len(request)) + request], [0, 1, 2])
status = b""
while len(status) < 4:
    chunk = conn.recv(4 - len(status))
    if not chunk:
        sys.exit(1)
    status += chunk
sys.exit(struct.unpack("!i", status)[0])
'''


def _run_command(argv: list[str]) -> int:
    """Run ``python ARGV`` in this (forked) process as the interpreter would; return the exit status."""
    try:
        if argv[0] == "-m":
            sys.argv = [argv[1], *argv[2:]]  # runpy replaces argv[0] by the module's file
            sys.path.insert(0, os.getcwd())
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        elif argv[0] == "-c":
            sys.argv = ["-c", *argv[2:]]
            sys.path.insert(0, "")
            main = types.ModuleType("__main__")
            sys.modules["__main__"] = main
            exec(compile(argv[1], "<string>", "exec"), main.__dict__)
        else:
            sys.argv = list(argv)
            sys.path.insert(0, os.path.dirname(os.path.abspath(argv[0])))
            runpy.run_path(argv[0], run_name="__main__")
        return 0
    except SystemExit as done:
        code = done.code
        if code is None:
            return 0
        if isinstance(code, int):
            return code
        print(code, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        traceback.print_exc()
        return 130
    except BaseException:
        traceback.print_exc()
        return 1


def _child(conn: socket.socket, request: dict, fds: list[int]) -> None:
    """In the forked child: take over the client's stdio, folder and environment, run, exit like an interpreter."""
    status = 1
    try:
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        conn.close()
        signal.signal(signal.SIGINT, signal.default_int_handler)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        status = _run_command(request["argv"])
        threading._shutdown()  # wait for the command's non-daemon threads, as interpreter shutdown does
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(status & 0xFF if status >= 0 else 1)


def _serve_one(conn: socket.socket) -> None:
    header_and_body, fds, _, _ = socket.recv_fds(conn, 1 << 22, 3)
    (length,) = struct.unpack("!I", header_and_body[:4])
    body = header_and_body[4:]
    while len(body) < length:
        body += conn.recv(length - len(body))
    request = json.loads(body)
    pid = os.fork()
    if pid == 0:
        _child(conn, request, fds)
    for fd in fds:
        os.close(fd)

    def wait() -> None:
        _, wait_status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(wait_status)
        code = 128 - code if code < 0 else code  # killed by a signal: the shell's 128 + signal number
        try:
            conn.sendall(struct.pack("!i", code))
        finally:
            conn.close()

    threading.Thread(target=wait, daemon=True).start()


def serve(address: str) -> None:
    for name in PRELOAD:
        __import__(name)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(address)
    server.listen(16)
    Path(address + ".ready").touch()
    while True:
        conn, _ = server.accept()
        _serve_one(conn)


def write_client(bin_dir: Path, address: str, python: str = sys.executable) -> Path:
    """Write the ``python`` client into ``bin_dir`` (put it first on the blocks' PATH)."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    client = bin_dir / "python"
    client.write_text(CLIENT.format(python=python, address=address))
    client.chmod(0o755)
    return client


if __name__ == "__main__":
    serve(sys.argv[1])
