"""What a bundle run checks first and reports last: mistyped overrides refused, input errors named on the last line.

Why this is not plain MONAI: ``python -m monai.bundle run`` accepts any ``--key value``; a key that no config file
defines (``--roi_sizes`` for ``--roi_size``) is added to the config and never read, so the run goes on with the
default without a word. And when a bundle's own input check fails (an :class:`~.validation.InputError`), MONAI
wraps it in ``RuntimeError: Failed to evaluate ConfigExpression ...`` at the end of a traceback of a hundred lines,
which ``StatsHandler`` has already logged, traceback and all, once or twice per engine. Bundles travel one by one
through the model zoo, so every bundle carries an identical copy of this file in ``scripts/`` (the source is
``tools/bundle_scripts`` of the collection's repository; a test keeps the copies equal).

- :func:`initialize`, the first item of every config's ``initialize`` list: under ``python -m monai.bundle run``
  (also started by ``torchrun``) it refuses an override that names no key of the config files given, naming the
  nearest known key, and installs :func:`excepthook`, which prints the usual traceback followed by one last line
  ``ERROR: <file>: <problem>`` for the innermost input error. Elsewhere (a ``ConfigWorkflow`` built in Python,
  MONAI Label) it does nothing: the caller checks its own overrides with :func:`check_overrides`.
- :class:`StatsHandler`: MONAI's, but an exception is logged in one line, once (Python prints its traceback).
- :func:`scans_in`, :func:`datalist_section`, :func:`require_cases`: inference inputs that exist and are not empty,
  failing with the folder or datalist read (MONAI skips a run whose data loader is empty and exits with 0).

Use in a bundle config::

    "imports": ["$import scripts", "$import scripts.config_check"],
    "initialize": ["$scripts.config_check.initialize()", ...],
    "handlers": [{"_target_": "scripts.config_check.StatsHandler", "iteration_log": false}],
    "datalist": "$scripts.config_check.scans_in(@dataset_dir + '/imagesTs')",
"""

from __future__ import annotations

import difflib
import glob
import inspect
import os
import sys
import traceback
from pathlib import Path
from pydoc import locate
from typing import Any, Iterable, Mapping, Sequence

from monai.bundle import ConfigComponent, ConfigParser
from monai.bundle.config_item import ComponentLocator
from monai.handlers import StatsHandler as _MonaiStatsHandler

from .validation import InputError

#: Arguments of ``monai.bundle``'s ``run`` / ``run_workflow`` (and of ``ConfigWorkflow``): never config keys.
RUN_ARGUMENTS = (
    "run_id",
    "init_id",
    "final_id",
    "meta_file",
    "config_file",
    "logging_file",
    "tracking",
    "args_file",
    "workflow_name",
    "workflow_type",
    "properties_path",
)
#: The positional order of ``monai.bundle.scripts.run`` (fire fills positional arguments in this order).
_RUN_POSITIONAL = ("run_id", "init_id", "final_id", "meta_file", "config_file", "logging_file", "tracking", "args_file")
_LOCATOR = ComponentLocator()
#: Set by the first check of a process's command line (a run may build further workflows in-process).
_COMMAND_LINE_CHECKED = False


class UnknownKeyError(ValueError):
    """An override naming no key of the bundle's config files; the message names the key and the nearest known one."""

    def __init__(self, key: str, nearest: str | None, files: Sequence[str]):
        self.key, self.nearest, self.files = key, nearest, list(files)
        hint = f"; did you mean {nearest!r}?" if nearest else ""
        where = ", ".join(self.files) if self.files else "the config"
        super().__init__(f"unknown override {key!r}: no such key in {where}{hint}")

    def __reduce__(self):
        return (type(self), (self.key, self.nearest, self.files))


# ---------------------------------------------------------------------------------------------------------------
# overrides


def _normalise(key: str) -> str:
    return str(key).replace("::", "#")


def _all_ids(node: Any, prefix: str = "") -> Iterable[str]:
    """Every id of a config: top-level keys and their nested ``a#b#0`` paths."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        key_id = f"{prefix}#{key}" if prefix else str(key)
        yield key_id
        yield from _all_ids(value, key_id)


def _accepts_argument(component: Mapping[str, Any], name: str) -> bool:
    """Whether the ``_target_`` of a config component takes an argument ``name`` (True when that cannot be told: a
    target given by an expression or reference, one that does not import, or a ``**kwargs`` signature)."""
    target = component.get("_target_")
    if name in ConfigComponent.non_arg_keys or not isinstance(target, str) or target[:1] in ("$", "@", "%"):
        return True  # _disabled_, _requires_, _mode_...: keys of every component
    try:
        resolved = ConfigComponent(config=dict(component), locator=_LOCATOR).resolve_module_name()
        signature = inspect.signature(locate(resolved) if isinstance(resolved, str) else resolved)
    except (ImportError, AttributeError, ValueError, TypeError):
        return True
    parameters = signature.parameters.values()
    return any(p.kind is p.VAR_KEYWORD for p in parameters) or name in signature.parameters


def _known(config: Mapping[str, Any], key: str) -> bool:
    """Whether ``key`` names an item of ``config``; the last part may also be a new argument of a component (a dict
    with ``_target_``) when its class or function takes an argument of that name."""
    node: Any = config
    parts = key.split("#")
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, dict):
            if part in node:
                node = node[part]
                continue
            return last and "_target_" in node and _accepts_argument(node, part)
        if isinstance(node, list) and part.lstrip("-").isdigit() and -len(node) <= int(part) < len(node):
            node = node[int(part)]
            continue
        return False
    return True


def check_overrides(
    config_files: str | Sequence[str] | Mapping[str, Any],
    keys: Iterable[str],
    extra_keys: Iterable[str] = (),
) -> None:
    """Raise :class:`UnknownKeyError` for the first of ``keys`` that names no item of the merged ``config_files``.

    ``#``-nested ids must exist too, except a new argument of a ``_target_`` component that its class or function
    takes (``network_def#dropout``). ``extra_keys`` are valid as well (e.g. the settings a tracking handler reads),
    and so is ``_meta_``. Run it with the bundle's ``scripts`` importable (its targets are looked up).
    """
    if isinstance(config_files, Mapping):
        config, names = dict(config_files), []
    else:
        config = ConfigParser.load_config_files(config_files)
        files = [config_files] if isinstance(config_files, (str, os.PathLike)) else list(config_files)
        names = [os.fspath(f) for f in files]
    extra = {_normalise(k) for k in extra_keys}
    for raw in keys:
        key = _normalise(raw)
        if key in extra or key.split("#")[0] in ("_meta_", *RUN_ARGUMENTS) or _known(config, key):
            continue
        candidates = sorted(set(_all_ids(config)) | extra)
        if "#" not in key:
            candidates = [c for c in candidates if "#" not in c]
        nearest = difflib.get_close_matches(key, candidates, n=1, cutoff=0.0)
        raise UnknownKeyError(key, nearest[0] if nearest else None, names)


def _tracking_keys(tracking: Any) -> list[str]:
    """The config keys a ``--tracking`` setting reads (MONAI's MLflow defaults, or a settings file / dict)."""
    if not tracking:
        return []
    from monai.bundle.utils import DEFAULT_EXP_MGMT_SETTINGS

    if isinstance(tracking, str) and tracking in DEFAULT_EXP_MGMT_SETTINGS:
        settings = DEFAULT_EXP_MGMT_SETTINGS[tracking]
    else:
        settings = ConfigParser.load_config_files(tracking)
    return list(settings.get("configs", {}))


def _parse_value(text: str) -> Any:
    from fire.parser import DefaultParseValue

    return DefaultParseValue(text)


def _is_flag(token: str) -> bool:
    """fire's rule: ``--name`` or ``-n...``, but not a negative number."""
    return token.startswith("--") or (len(token) > 1 and token[0] == "-" and token[1].isalpha())


def command_line_overrides(argv: Sequence[str] | None = None) -> tuple[Any, dict[str, Any]] | None:
    """``(config files, {key: value})`` of a ``python -m monai.bundle run`` command line (as fire reads it, with
    ``--args_file`` merged in), or None when ``argv`` is not such a command line."""
    argv = list(sys.argv if argv is None else argv)
    if len(argv) < 2 or Path(argv[0]).parts[-3:] != ("monai", "bundle", "__main__.py"):
        return None
    if argv[1] not in ("run", "run_workflow"):
        return None
    args = argv[2:]
    if "--" in args:  # fire: arguments after the last lone "--" are fire's own flags (--help, --trace)
        args = args[: len(args) - 1 - args[::-1].index("--")]
    flags: dict[str, Any] = {}
    positional: list[str] = []
    i = 0
    while i < len(args):
        token = args[i]
        if _is_flag(token):
            name, has_value, value = token.lstrip("-").partition("=")
            name = name.replace("-", "_")
            if not has_value:  # "--key value", or "--key" alone (then True) before another flag or at the end
                if i + 1 < len(args) and not _is_flag(args[i + 1]):
                    value, i = args[i + 1], i + 1
                else:
                    value = "True"
            flags[name] = _parse_value(value)
        else:
            positional.append(token)
        i += 1
    if argv[1] == "run":
        free = [name for name in _RUN_POSITIONAL if name not in flags]
        flags.update(zip(free, (_parse_value(p) for p in positional)))
    merged: dict[str, Any] = {}
    if flags.get("args_file"):
        merged.update(ConfigParser.load_config_file(flags["args_file"]))
    merged.update(flags)
    return merged.get("config_file"), merged


def check_command_line(argv: Sequence[str] | None = None) -> None:
    """Under ``python -m monai.bundle run``: :func:`check_overrides` on the command line's keys."""
    parsed = command_line_overrides(argv)
    if parsed is None:
        return
    config_files, values = parsed
    if not config_files:
        return  # MONAI itself refuses a run without config files
    keys = [k for k in values if k not in RUN_ARGUMENTS]
    check_overrides(config_files, keys, extra_keys=_tracking_keys(values.get("tracking")))


# ---------------------------------------------------------------------------------------------------------------
# errors a user can read


def _chain(error: BaseException) -> list[BaseException]:
    """``error`` and the exceptions it was raised from (or while handling), outermost first."""
    seen: list[BaseException] = []
    current: BaseException | None = error
    while current is not None and all(current is not s for s in seen):
        seen.append(current)
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)
    return seen


def is_input_error(error: BaseException) -> bool:
    """An error that names a bad input: this module's two, or any ``InputError`` (the collection's tools too)."""
    return isinstance(error, (InputError, UnknownKeyError)) or type(error).__name__ == "InputError"


def innermost_input_error(error: BaseException) -> BaseException | None:
    """The innermost :func:`is_input_error` exception of ``error``'s chain, or None."""
    found = [e for e in _chain(error) if is_input_error(e)]
    return found[-1] if found else None


def root_cause(error: BaseException) -> BaseException:
    """The innermost exception ``error`` was raised *from* (MONAI wraps a failing config expression, transform or
    engine in a ``RuntimeError`` raised from the real error)."""
    while error.__cause__ is not None and error.__cause__ is not error:
        error = error.__cause__
    return error


def error_line(error: BaseException) -> str | None:
    """The one-line summary :func:`excepthook` prints last: ``ERROR: <file>: <problem>`` for the innermost input
    error, else ``ERROR: <type>: <message>`` of the root cause when a wrapper hides it, else None."""
    cause = innermost_input_error(error)
    if cause is not None:
        text = str(cause)
    else:
        cause = root_cause(error)
        if cause is error:
            return None  # the traceback's last line already is the error
        text = f"{type(cause).__name__}: {cause}"
    return "ERROR: " + " ".join(text.split())


def excepthook(kind: type[BaseException], error: BaseException, tb: Any) -> None:
    """Print the traceback as Python does, then, last, the :func:`error_line` naming the file and the problem."""
    traceback.print_exception(kind, error, tb)
    line = error_line(error)
    if line is not None:
        print(line, file=sys.stderr, flush=True)


def initialize(argv: Sequence[str] | None = None) -> None:
    """First item of every config's ``initialize``: under ``python -m monai.bundle run``, install
    :func:`excepthook` and refuse unknown overrides; in-process callers are left alone.

    The command line is checked once per process: a run that builds further workflows in-process (``adapt_brats``)
    must not check its own command line against their config files.
    """
    global _COMMAND_LINE_CHECKED
    if _COMMAND_LINE_CHECKED or command_line_overrides(argv) is None:
        return
    sys.excepthook = excepthook
    _COMMAND_LINE_CHECKED = True
    check_command_line(argv)


class StatsHandler(_MonaiStatsHandler):
    """MONAI's ``StatsHandler`` whose exception report is one line, logged once per exception.

    MONAI's logs the whole traceback, and ignite calls it twice per engine (from the iteration loop and from the
    run loop), so a failing validation inside training printed the same traceback four times before Python's own.
    """

    def exception_raised(self, engine: Any, e: Exception) -> None:
        if not getattr(e, "_stats_handler_reported", False):
            try:
                e._stats_handler_reported = True  # type: ignore[attr-defined]
            except AttributeError:  # an exception type with __slots__: report it every time
                pass
            self.logger.error(f"{type(engine).__name__} stopped by {type(e).__name__} (traceback at the end)")
        raise e


# ---------------------------------------------------------------------------------------------------------------
# inference inputs


def scans_in(folder: str | os.PathLike, pattern: str = "*.nii.gz") -> list[str]:
    """The sorted files of ``folder`` matching ``pattern``; an :class:`InputError` naming the folder when it is
    missing or holds none."""
    if not os.path.isdir(folder):
        raise InputError(folder, "folder not found: no input scans to read (set --dataset_dir or --datalist)")
    found = sorted(glob.glob(os.path.join(glob.escape(os.fspath(folder)), pattern)))
    if not found:
        raise InputError(folder, f"no input scans: no {pattern} file in this folder")
    return found


def require_cases(items: Sequence[Any], source: str | os.PathLike | None, what: str = "input cases") -> list[Any]:
    """``items`` as a list when it holds at least one case, else an :class:`InputError` naming ``source``."""
    items = list(items)
    if not items:
        raise InputError(source, f"no {what}: nothing to run on")
    return items


def datalist_section(datalist_file: str | os.PathLike, section: str, base_dir: str | None = None) -> list[dict]:
    """The records of ``section`` of a MONAI datalist (paths made absolute), refused with the file named when the
    file is missing, has no such section or the section is empty."""
    from monai.data import load_decathlon_datalist

    if not os.path.isfile(datalist_file):
        raise InputError(datalist_file, "datalist not found (set --dataset_dir to a folder with a dataset.json)")
    content = ConfigParser.load_config_file(datalist_file)
    if section not in content:
        raise InputError(datalist_file, f"no section {section!r} (sections: {sorted(content)})")
    records = load_decathlon_datalist(os.fspath(datalist_file), True, section, base_dir)
    return require_cases(records, datalist_file, f"cases in its {section!r} section")
