"""The `instantid` command as a test runs it: in-process (`main(argv)`, fast) or as the installed console script in
a subprocess (what a user runs, imports and warnings included)."""

from __future__ import annotations

import contextlib
import io
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

INSTANTID = Path(sys.executable).parent / "instantid"  # the console script `pip install -e .` puts next to python


@dataclass(frozen=True)
class CliResult:
    returncode: int
    stdout: str
    stderr: str

    def error_line(self) -> str:
        """The single `error:` line of a failed run; asserts exit code 2 and no traceback."""
        assert self.returncode == 2, f"exit {self.returncode}\nstdout: {self.stdout}\nstderr: {self.stderr}"
        assert "Traceback" not in self.stderr, self.stderr
        errors = [line for line in self.stderr.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1, self.stderr
        return errors[0]


def run_cli(*args: str | Path) -> CliResult:
    """`instantid ARGS` in this process: `instantid_cli.main(argv)`, its exit code (a usage error's SystemExit
    included) and what it printed."""
    from instantid_cli import main

    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            code = main([str(arg) for arg in args])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
    return CliResult(code, stdout.getvalue(), stderr.getvalue())


def run_cli_subprocess(*args: str | Path, cwd: Path) -> CliResult:
    """`instantid ARGS` as a user runs it: the installed console script in a fresh process."""
    assert INSTANTID.exists(), f"{INSTANTID} missing: install the project (`make setup` or `pip install -e .`)"
    done = subprocess.run([str(INSTANTID), *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=600)
    return CliResult(done.returncode, done.stdout, done.stderr)


def uri_path(uri: str) -> Path:
    """The local path of a file:// URI the command printed."""
    parsed = urlparse(uri)
    assert parsed.scheme == "file", uri
    return Path(parsed.path)
