"""Progress bars of the CLI: training iterations and evaluated tasks, on stderr."""

from __future__ import annotations

from typing import Any

from tqdm.auto import tqdm

__all__ = ["progress_bar", "TaskProgress"]


def progress_bar(enabled: bool, **kwargs: Any) -> tqdm:
    """A tqdm bar on stderr: off when ``enabled`` is False (``--no-progress``) or stderr is not a terminal
    (a log file gets no carriage-return updates)."""
    return tqdm(disable=None if enabled else True, dynamic_ncols=True, **kwargs)


class TaskProgress:
    """A bar counting evaluated tasks, to pass as :func:`allmap.engine.evaluate`'s ``progress``; removed when
    closed.

    Example:
        >>> with TaskProgress("test", enabled=False) as bar:
        ...     results = evaluate(learner, tasks, progress=bar)  # doctest: +SKIP
    """

    def __init__(self, desc: str, enabled: bool = True, total: int | None = None) -> None:
        self.bar = progress_bar(enabled, desc=desc, total=total, unit="task", leave=False)

    def __call__(self, done: int, total: int) -> None:
        self.bar.total = total
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        self.bar.close()

    def __enter__(self) -> TaskProgress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
