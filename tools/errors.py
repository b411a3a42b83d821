"""The one exception type for bad input: it always names the file and the problem."""

from __future__ import annotations

import os


class InputError(ValueError):
    """Raised when an input file (image, label, series, datalist) cannot be used.

    The message starts with the offending path so that a user with hundreds of cases sees at once which one is bad.
    """

    def __init__(self, path: str | os.PathLike | None, problem: str):
        self.path = None if path is None else os.fspath(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path else problem)
