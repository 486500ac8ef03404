"""What the commands of `switchhead-rewrite` share: exit codes, one-line usage errors, progress."""

from __future__ import annotations

import enum
import sys
import time
from typing import Any

import click
from rich.console import Console

PROG = "switchhead-rewrite"


class ExitCode(enum.IntEnum):
    OK = 0
    MODEL = 1  # the model file, the model or its capture failed
    USAGE = 2  # bad or contradictory options (also: --filter matches no attention)
    NO_ATTENTION = 3  # the model has no attention to rewrite
    OUTPUT = 4  # the output directory is refused, or writing failed
    VERIFY = 5  # the converted model does not compute what the original does
    INTERNAL = 70  # a bug of ours
    INTERRUPTED = 130


class CliError(Exception):
    def __init__(self, message: str, code: ExitCode, details: dict[str, Any] | None = None):
        super().__init__(message)
        self.code = code
        self.details = details or {}


STEP_LABELS = {
    "load": "Loading {file}",
    "analyze": "Capturing with torch.export and finding attention",
    "capture": "Capturing with torch.export",
    "detect": "Finding attention",
    "rewrite": "Rewriting into SwitchHead attention",
    "verify": "Verifying against the original model",
    "save": "Saving to {output} and checking the saved program",
    "onnx": "Exporting ONNX to {onnx} and checking it in onnxruntime",
}


SAVE_PARTS = {"write": "writing the graph and weights", "check": "loading them back and comparing outputs"}


class Command(click.Command):
    """Click command whose usage errors are one line with exit code 2, like every other error."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):  # noqa: ANN001
        try:
            code = super().main(args, prog_name or PROG, complete_var, standalone_mode=False, **extra)
        except click.UsageError as exc:
            click.echo(f"{PROG}: error: {exc.format_message()} (see --help)", err=True)
            code = ExitCode.USAGE
        except click.Abort:
            code = ExitCode.INTERRUPTED
        code = int(code or 0)
        if standalone_mode:
            sys.exit(code)
        return code


class Steps:
    """Progress on stderr: one spinner for the running step, a check mark and its time when done."""

    def __init__(self, console: Console | None, names: dict[str, str]):
        self.console, self.names = console, names
        self.timings: dict[str, float] = {}
        self._current: tuple[str, float] | None = None
        self._status = None

    def start(self, key: str) -> None:
        self.done()
        self._current = (key, time.perf_counter())
        if self.console is not None:
            self._status = self.console.status(STEP_LABELS.get(key, key).format(**self.names) + " ...")
            self._status.start()

    def detail(self, text: str) -> None:
        """Say which part of the running step is under way (long steps: save, ONNX)."""
        if self._status is not None and self._current is not None:
            label = STEP_LABELS.get(self._current[0], self._current[0]).format(**self.names)
            self._status.update(f"{label}: {text} ...")

    def done(self, ok: bool = True) -> None:
        if self._current is None:
            return
        key, started = self._current
        self._current = None
        if self._status is not None:
            self._status.stop()
            self._status = None
        if ok:
            self.timings[key] = time.perf_counter() - started
            if self.console is not None:
                label = STEP_LABELS.get(key, key).format(**self.names)
                self.console.print(f"[green]✓[/] {label} [dim]({self.timings[key]:.2f} s)[/]")
