"""What the failure tests share: run the real CLI, read its one error line, plant a payload."""

from __future__ import annotations

from pathlib import Path

from campar_ray.cli import main


def run_campar(capsys, *argv: str) -> tuple[int, str, str]:
    """``campar ARGV`` in this process: exit code, stdout and stderr."""
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_line(err: str) -> str:
    """The command's error line, asserting there is exactly one."""
    errors = [line for line in err.splitlines() if line.startswith("campar ")]
    assert len(errors) == 1, err
    return errors[0]


class Payload:
    """Unpickling this creates ``marker``: what an attacker plants in a run directory."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))
