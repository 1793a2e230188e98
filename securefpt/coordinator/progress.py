"""Progress bars on the coordinator: one for rounds, one per round for its clients."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

if TYPE_CHECKING:
    from securefpt.coordinator.run_dir import RoundRecord


class _Task:
    def __init__(self, progress: Progress | None, task_id=None) -> None:
        self._progress, self._id = progress, task_id

    def advance(self) -> None:
        if self._progress is not None:
            self._progress.advance(self._id)

    def done(self) -> None:
        if self._progress is not None:
            self._progress.remove_task(self._id)


class RunProgress:
    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.console = Console(stderr=True)
        self._progress: Progress | None = None
        self._rounds = None

    def start(self, rounds: int, label: str = "rounds") -> None:
        if not self.enabled:
            return
        self._progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(), console=self.console, transient=False,
        )
        self._progress.start()
        self._rounds = self._progress.add_task(label, total=rounds)

    def clients(self, description: str, total: int) -> _Task:
        if self._progress is None:
            return _Task(None)
        return _Task(self._progress, self._progress.add_task(description, total=total))

    def round_done(self, record: "RoundRecord") -> None:
        if self._progress is None:
            return
        self._progress.advance(self._rounds)
        accs = "  ".join(f"{k}={v:.3f}" for k, v in record.accuracy.items())
        extra = "  [red]aborted[/red]" if record.aborted else ""
        self._progress.console.print(
            f"round {record.round}: avg={record.avg():.3f}  {accs}  ({record.seconds:.1f}s){extra}"
        )

    def stop(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
