"""Progress of long loops, shown where a person watches (the CLI passes a tqdm-based one) and
silent elsewhere (job logs keep their own per-step lines)."""

from __future__ import annotations

from typing import Callable, Iterable, TypeVar

T = TypeVar("T")
Progress = Callable[[Iterable[T], str, "int | None"], Iterable[T]]


def quiet(items: Iterable[T], desc: str = "", total: int | None = None) -> Iterable[T]:
    """No progress display: the items as they are."""
    return items
