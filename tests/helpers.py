"""Test helpers: run the real CLI, tiny config overrides, free ports, Ray's log files to scan for leaks."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CLI_TIMEOUT = 600  # seconds; an end-to-end run that hangs (e.g. a resource deadlock) fails instead
# The session's AWS secret key (tests/conftest.py sets it before Ray starts): fake, and unique enough
# that finding it anywhere in a log or a written object means it leaked.
FAKE_SECRET = "mmray-test-SECRET-9f86d081884c7d65"


def tiny_overrides(data: dict, storage_path: Path | str, **extra: object) -> list[str]:
    """Overrides that make ``configs/demo.yaml`` fast enough for tests."""
    base = {
        "data.train": data["train"]["path"],
        "data.val": data["val"]["path"],
        "train.storage_path": str(storage_path),
        "train.epochs": 3,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def run_cli(
    args: list[str],
    ray_address: str | None = None,
    timeout: int = CLI_TIMEOUT,
    env: dict | None = None,
    check: bool = True,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess:
    """Runs the real ``mmray`` CLI (in ``cwd``, default the repository); ``.json`` on the result is its
    last stdout line, parsed."""
    full_env = {**os.environ, **(env or {})}
    if ray_address:
        full_env["RAY_ADDRESS"] = ray_address
    proc = subprocess.run(
        [sys.executable, "-m", "mmray.cli", *args],
        cwd=cwd or REPO,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return _finished(proc, args, check)


def _finished(proc: subprocess.CompletedProcess, args: list[str], check: bool) -> subprocess.CompletedProcess:
    """Fails a run that should have passed; ``.json`` on the result is its last stdout line, parsed."""
    if check and proc.returncode != 0:
        raise AssertionError(f"mmray {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    proc.json = json.loads(lines[-1]) if proc.returncode == 0 and lines else None
    return proc


def run_cli_here(
    args: list[str], env: dict | None = None, check: bool = True, cwd: Path | None = None
) -> subprocess.CompletedProcess:
    """``run_cli`` without the new process: the real CLI (``cli.main``: its parser, commands, output and
    exit codes) in this process, on the session's Ray, which ``init_ray`` then joins as it is. A new
    ``mmray`` process pays ~8 s here before it does anything (imports, a Ray connection, a new job's
    worker processes); tests that only need the CLI's behaviour use this, and those that need its
    process (kills, signals, another Ray, what Ray's own output prints) use ``run_cli``. The
    environment and working directory are restored afterwards."""
    import io

    import ray

    from mmray import cli

    assert ray.is_initialized(), "run_cli_here runs on the session's Ray: take the ray_address fixture"
    saved_env, saved_cwd = dict(os.environ), os.getcwd()
    out, err = io.StringIO(), io.StringIO()
    os.environ.update(env or {})
    os.chdir(cwd or REPO)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = cli.main(args)
            except SystemExit as e:  # argparse's usage errors
                code = e.code if isinstance(e.code, int) else 2
    finally:
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
    proc = subprocess.CompletedProcess(["mmray", *args], code, out.getvalue(), err.getvalue())
    return _finished(proc, args, check)


def kill_cli_when(args: list[str], env: dict, ready, log: Path, timeout: float = CLI_TIMEOUT) -> str:
    """Runs the real CLI and SIGKILLs it (no cleanup, as when the driver's node is lost) as soon as
    ``ready()`` holds; returns its output. Fails when the run ends first or ``ready()`` never holds."""
    with open(log, "w") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mmray.cli", *args], cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT
        )
        try:
            deadline = time.monotonic() + timeout
            while not ready():
                assert proc.poll() is None, f"the run ended before it could be killed:\n{log.read_text()[-3000:]}"
                assert time.monotonic() < deadline, f"not ready after {timeout} s:\n{log.read_text()[-3000:]}"
                time.sleep(0.2)
        finally:
            proc.kill()
            proc.wait()
    return log.read_text()


def free_port() -> int:
    """A port that was free a moment ago. Another process may take it before the caller binds it:
    prefer letting the server bind port 0 and report its port, as the S3 fixture does."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_log_files(ray) -> dict[Path, int]:
    """Every file in this session's Ray log directory, with its size now: the raylet's, the GCS's and each
    worker's (an actor or task writes its output to ``worker-*.out`` / ``.err`` there, never to the CLI
    run that started it). Two snapshots tell which files a step wrote."""
    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    sizes = {}
    for path in logs.rglob("*"):
        with contextlib.suppress(FileNotFoundError):  # a file removed since the listing wrote nothing to scan
            if path.is_file():
                sizes[path] = path.stat().st_size
    return sizes


def leaks(paths: Iterable[Path], *secrets: str) -> list[tuple[str, str]]:
    """(file, secret) for each of ``secrets`` found in each file: what a no-leak check asserts is empty."""
    found = []
    for path in paths:
        data = path.read_bytes()
        found += [(str(path), s) for s in secrets if s.encode() in data]
    return found
