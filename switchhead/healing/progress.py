"""A rich progress bar for healing: step, loss, tokens/s, elapsed and ETA; silent when disabled."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.progress import Progress as RichProgress


class Progress:
    def __init__(self, total: int, enabled: bool = True, description: str = "healing"):
        self.enabled = enabled
        self._bar = RichProgress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[tps]} tok/s"),
            TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
            console=Console(stderr=True),  # progress on stderr: stdout stays for results (and --json)
        ) if enabled else None
        self._task = self._bar.add_task(description, total=total, loss="-", tps="-") if enabled else None

    def __enter__(self) -> "Progress":
        if self._bar is not None:
            self._bar.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.stop()

    def advance_to(self, step: int) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=step)

    def update(self, step: int, loss: float, tokens_per_s: float) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=step, loss=f"{loss:.4g}", tps=f"{tokens_per_s:,.0f}")
