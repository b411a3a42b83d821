"""The one exception type for bad input: it always names the file and the problem.

It is the class of the vendored :mod:`tools.bundle_scripts.validation` (which every bundle carries as
``scripts/validation.py``), so an error raised by a ``tools`` reader and one raised by the same check inside a
bundle look alike: a ``ValueError`` whose message starts with the offending path, with ``.path`` and ``.problem``.
"""

from __future__ import annotations

from tools.bundle_scripts.validation import InputError

__all__ = ["InputError"]
