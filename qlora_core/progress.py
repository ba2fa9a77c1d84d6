"""The live progress display of a sweep: one bar over modes, one over the current mode's training steps."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from qlora_core.modes import Mode


class SweepProgress:
    """Context manager; pass ``update`` as the sweep's ``on_event(mode, event)`` callback."""

    def __init__(self, console: Console, modes: list[Mode], steps: int):
        self.progress = Progress(
            SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(), console=console,
        )
        self.modes_task = self.progress.add_task("modes", total=len(modes))
        self.steps_task = self.progress.add_task("", total=steps, visible=False)
        self.current: str | None = None

    def __enter__(self) -> SweepProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            self.progress.update(self.modes_task, completed=self.progress.tasks[self.modes_task].total)
        self.progress.stop()

    def update(self, mode: Mode, event: dict) -> None:
        if mode.name != self.current:
            if self.current is not None:
                self.progress.advance(self.modes_task)
            self.current = mode.name
            self.progress.reset(self.steps_task, visible=True)
        if "step" in event:
            self.progress.update(self.steps_task, completed=event["step"],
                                 description=f"{mode.name}: training, loss {event['loss']:.3f}")
        else:
            self.progress.update(self.steps_task, description=f"{mode.name}: {event['phase']}")
        self.progress.update(self.modes_task, description=f"modes ({mode.name})")
