"""``ThreadDataLoader`` that re-raises what fails in its thread.

Why this is not plain MONAI: ``monai.data.ThreadDataLoader`` iterates the underlying ``DataLoader`` in a
``ThreadBuffer`` thread; when a transform raises there (a corrupt scan, a NaN voxel refused by
``scripts.validation.ValidateCTd``), the thread dies, Python prints its traceback, and the iteration simply ends
(MONAI 1.5: ``ThreadBuffer.__iter__`` stops once the thread is no longer alive). An epoch, an evaluation or an
inference run then finishes "successfully" on the items before the bad one: ``configs/evaluate.json`` wrote a
summary of 0 cases for a test set whose only scan had NaN voxels. This loader keeps MONAI's behaviour (same
arguments, buffering and ``repeats``) and raises the thread's exception in the consuming thread, where the engine
reports it and stops.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from monai.data import DataLoader
from monai.data import ThreadDataLoader as _MonaiThreadDataLoader
from monai.data.thread_buffer import ThreadBuffer


class RaisingThreadBuffer(ThreadBuffer):
    """A ``ThreadBuffer`` whose iteration raises the exception that ended its source thread."""

    error: BaseException | None = None

    def enqueue_values(self) -> None:
        try:
            super().enqueue_values()
        except BaseException as error:  # handed to the consumer: a thread's exception is otherwise lost
            self.error = error

    def __iter__(self) -> Iterator[Any]:
        self.error = None
        yield from super().__iter__()
        if self.error is not None:
            raise self.error


class ThreadDataLoader(_MonaiThreadDataLoader):
    """``monai.data.ThreadDataLoader`` that raises a failure of its buffer thread instead of ending the epoch."""

    def __iter__(self) -> Iterator[Any]:
        buffer = RaisingThreadBuffer(DataLoader.__iter__(self), self.buffer_size, self.buffer_timeout)
        for batch in buffer:
            for _ in range(self.repeats):
                yield batch
