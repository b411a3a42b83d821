"""Checks of the ``tools`` command line before a command runs, and its help pages.

Fire calls a command first and complains about arguments it could not use only afterwards, so a misspelled flag
(``--n_case 2``) ran the command with its defaults and wrote its output before exiting with an error. Here the
command is resolved from argv (``Cli`` -> group -> method) and every argument is checked against the method's
signature first: flags (``--name value``, ``--name=value``, ``--name`` / ``--noname`` for on/off flags, ``-`` or
``_`` in names), missing values, the number of positional arguments and the required ones. Only a valid command
line goes on to fire, rebuilt as ``path positional... --name=value...`` so that fire runs exactly what was checked
(and still parses the values: ``160,160,80`` -> tuple, ``{"a": 1}`` -> dict).

Help pages (``--help`` / ``-h`` anywhere) are written here from the signature and the Google-style docstring: the
whole text of every argument, the signature's defaults, no banner and no pager.
"""

from __future__ import annotations

import difflib
import inspect
import re
import shutil
import sys
import textwrap
from dataclasses import dataclass, field
from typing import Any, Sequence

HELP_FLAGS = ("-h", "--help")
#: texts that mean on / off for a flag that is on or off (fire itself reads "false" as a true string)
BOOL_TEXTS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


class UsageError(Exception):
    """A command line that names no command, an unknown flag, a flag without value, too many or too few arguments."""


def _is_flag(argument: str) -> bool:
    """Fire's rule (fire.core._IsFlag): ``--x``, ``-x``, ``-x=1``; negative numbers like ``-175,250`` are values."""
    return argument.startswith("--") or re.match("^-[a-zA-Z]", argument) is not None


def _near(name: str, choices: Sequence[str]) -> str | None:
    found = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return found[0] if found else None


# ---------------------------------------------------------------------------------------------------------------
# the command tree: Cli -> groups (public instance attributes) -> commands (public methods)


def subcommands(component: Any) -> dict[str, Any]:
    """Groups and commands of a component, in the order they are defined (groups first): name -> member."""
    groups = {k: v for k, v in vars(component).items() if not k.startswith("_") and not callable(v)}
    methods = {}
    for klass in reversed(type(component).__mro__[:-1]):
        for name, value in vars(klass).items():
            if not name.startswith("_") and callable(value) and not isinstance(value, type):
                methods[name] = getattr(component, name)
    return {**groups, **methods}


@dataclass
class Command:
    """A resolved command line: the command path (e.g. ``["data", "phantom"]``), the member it names (a group or a
    method), the arguments after the path, the flags after an isolated ``--`` (fire's own) and whether help was
    asked for."""

    path: list[str]
    target: Any
    args: list[str] = field(default_factory=list)
    fire_flags: list[str] = field(default_factory=list)
    help: bool = False


def resolve(root: Any, argv: Sequence[str], prog: str) -> Command:
    """Walk argv down the command tree; raise UsageError for a name that is no command of its group."""
    argv = list(argv)
    fire_flags: list[str] = []
    if "--" in argv:  # fire: the arguments after the last isolated -- are fire's flags (--help, --trace, ...)
        cut = len(argv) - 1 - argv[::-1].index("--")
        argv, fire_flags = argv[:cut], argv[cut + 1 :]
    asked_help = any(a in HELP_FLAGS for a in argv + fire_flags)
    fire_flags = [f for f in fire_flags if f not in HELP_FLAGS]
    args = [a for a in argv if a not in HELP_FLAGS]
    path: list[str] = []
    target = root
    while not callable(target):
        members = subcommands(target)
        if not args or _is_flag(args[0]):
            if asked_help or not args:
                return Command(path, target, [], fire_flags, help=True)
            where = " ".join([prog, *path])
            raise UsageError(f"{where}: expected a command before {args[0]}; commands: {', '.join(members)}")
        name = args[0].replace("-", "_")
        if name not in members:
            where = " ".join([prog, *path])
            near = _near(name, members)
            hint = f"; did you mean '{near}'?" if near else ""
            raise UsageError(f"{where}: unknown command '{args[0]}'{hint}\ncommands: {', '.join(members)}")
        path.append(name)
        target = members[name]
        args = args[1:]
    return Command(path, target, args, fire_flags, help=asked_help)


# ---------------------------------------------------------------------------------------------------------------
# checking a command's arguments against its signature


def _parameters(method: Any) -> tuple[list[inspect.Parameter], inspect.Parameter | None]:
    """The named parameters of a bound method and its ``**kwargs`` parameter (or None)."""
    params = list(inspect.signature(method).parameters.values())
    named = [p for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    varkw = next((p for p in params if p.kind == p.VAR_KEYWORD), None)
    return named, varkw


def is_on_off(param: inspect.Parameter) -> bool:
    """A flag that is on or off: annotated ``bool`` or with a bool default."""
    return param.annotation in (bool, "bool") or isinstance(param.default, bool)


def check_arguments(method: Any, args: Sequence[str], where: str) -> list[str]:
    """Check ``args`` (what follows the command path) against the method's signature, the way fire would read them;
    return them rebuilt for fire as positional arguments then ``--name=value`` flags. Raise UsageError naming the
    command, the bad argument, the nearest valid flag and all valid flags."""
    named, varkw = _parameters(method)
    by_name = {p.name: p for p in named}
    valid = ", ".join(f"--{p.name}" for p in named) + (", --KEY VALUE (any other key)" if varkw else "")

    def refuse(problem: str) -> UsageError:
        return UsageError(f"{where}: {problem}\nvalid flags: {valid or '(none)'}\nsee: {where} --help")

    flags: dict[str, str] = {}
    positional: list[str] = []
    index = 0
    while index < len(args):
        argument = args[index]
        index += 1
        if not _is_flag(argument):
            positional.append(argument)
            continue
        if not argument.startswith("--"):  # fire's one-letter shortcuts: refused, one letter is too easy to mistype
            starting = [f"--{p.name}" for p in named if p.name.startswith(argument[1])]
            raise refuse(f"unknown flag {argument}: write flags in full ({', '.join(starting) or 'no flag starts so'})")
        key, has_equals, value = argument[2:].partition("=")
        key = key.replace("-", "_")
        bare = not has_equals and (index == len(args) or _is_flag(args[index]))
        if key in by_name:
            name = key
        elif bare and key.startswith("no") and key[2:] in by_name and is_on_off(by_name[key[2:]]):
            name, has_equals, value = key[2:], True, "False"  # fire's --noflag
        elif varkw is not None and key.isidentifier():
            name = key
            if bare and key.startswith("no"):  # fire: a bare --nokey of **kwargs sets key to False
                name, has_equals, value = key[2:], True, "False"
        else:
            near = _near(key, list(by_name) + [f"no{p.name}" for p in named if is_on_off(p)])
            hint = f"; did you mean --{near}?" if near else ""
            raise refuse(f"unknown flag --{key}{hint}")
        param = by_name.get(name)
        if not has_equals and bare:
            if param is not None and not is_on_off(param):
                raise refuse(f"flag --{name} needs a value: --{name} VALUE or --{name}=VALUE")
            value = "True"
        elif not has_equals:
            value = args[index]
            index += 1
        if param is not None and is_on_off(param):
            if value.lower() not in BOOL_TEXTS:
                raise refuse(f"flag --{name} is on or off (--{name} / --no{name}, --{name}=True/False): got {value!r}")
            value = str(BOOL_TEXTS[value.lower()])
        if name in flags:
            raise refuse(f"flag --{name} is given twice")
        flags[name] = value
    open_params = [p for p in named if p.name not in flags]
    if len(positional) > len(open_params):
        extra = " ".join(positional[len(open_params) :])
        takes = " ".join(p.name.upper() for p in open_params) or "no positional argument"
        raise refuse(f"too many arguments: {extra!r} (it takes {takes})")
    missing = [p for p in open_params[len(positional) :] if p.default is inspect.Parameter.empty]
    if missing:
        names = ", ".join(f"{p.name.upper()} (or --{p.name})" for p in missing)
        raise refuse(f"missing required argument{'s' if len(missing) > 1 else ''}: {names}")
    for k, (param, value) in enumerate(zip(open_params, positional)):
        if is_on_off(param):
            if value.lower() not in BOOL_TEXTS:
                raise refuse(f"{param.name.upper()} is on or off (True/False): got {value!r}")
            positional[k] = str(BOOL_TEXTS[value.lower()])
    return positional + [f"--{name}={value}" for name, value in flags.items()]


# ---------------------------------------------------------------------------------------------------------------
# help pages


@dataclass
class Docstring:
    """A Google-style docstring: the summary (first paragraph), the description (the rest before ``Args:``) and the
    whole text of each argument (continuation lines joined)."""

    summary: str
    description: list[str]
    args: dict[str, str]


def parse_docstring(obj: Any) -> Docstring:
    text = inspect.getdoc(obj) or ""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip() == "Args:"), len(lines))
    paragraphs = [" ".join(p.split()) for p in "\n".join(lines[:start]).split("\n\n") if p.strip()]
    args: dict[str, str] = {}
    indent = None
    current = None
    for line in lines[start + 1 :]:
        if not line.strip():
            continue
        depth = len(line) - len(line.lstrip())
        if indent is None:
            indent = depth
        if depth < indent:  # the next section (Returns:, Raises:, ...)
            break
        match = re.match(r"\*{0,2}(\w+)(?: \([^)]*\))?:\s*(.*)$", line.strip())
        if depth == indent and match:
            current = match.group(1)
            args[current] = match.group(2)
        elif current is not None:
            args[current] += " " + line.strip()
    return Docstring(paragraphs[0] if paragraphs else "", paragraphs[1:], args)


def _default_text(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        return ",".join(str(v) for v in value)
    return str(value)


def _metavar(param: inspect.Parameter) -> str:
    annotation = str(param.annotation).replace(" | None", "").replace("None | ", "")
    if annotation in ("int", "float"):
        return "NUMBER" if annotation == "float" else "INT"
    if isinstance(param.default, (tuple, list)):
        return "LIST"
    return param.name.upper() if annotation == "str" else "VALUE"


def _width() -> int:
    return max(60, min(120, shutil.get_terminal_size((100, 24)).columns))


def _wrap(text: str, indent: int) -> list[str]:
    margin = " " * indent
    return textwrap.wrap(text, _width(), initial_indent=margin, subsequent_indent=margin, break_on_hyphens=False) or [
        ""
    ]


def help_page(path: Sequence[str], target: Any, prog: str) -> str:
    """The help of a group (its commands with their summaries) or a command (usage, description, arguments)."""
    where = " ".join([prog, *path])
    if not callable(target):
        doc = parse_docstring(type(target))
        lines = [*_wrap(doc.summary, 0), "", f"usage: {where} <command> [arguments]   ({where} <command> --help)"]
        for paragraph in doc.description:
            lines += ["", *_wrap(paragraph, 0)]
        members = subcommands(target)
        column = max(len(n) for n in members) + 4
        for title, is_group in (("groups", True), ("commands", False)):
            names = [n for n, m in members.items() if callable(m) != is_group]
            if names:
                lines += ["", f"{title}:"]
                for name in names:
                    member = members[name]
                    summary = parse_docstring(type(member) if is_group else member).summary
                    wrapped = _wrap(summary, column + 2)
                    lines += [f"  {name:<{column}}{wrapped[0][column + 2:]}", *wrapped[1:]]
        return "\n".join(lines) + "\n"
    doc = parse_docstring(target)
    named, varkw = _parameters(target)
    required = [p for p in named if p.default is inspect.Parameter.empty]
    optional = [p for p in named if p.default is not inspect.Parameter.empty]
    usage = " ".join([where, *(p.name.upper() for p in required), "[flags]" if optional or varkw else ""])
    lines = [*_wrap(doc.summary, 0), "", f"usage: {usage.rstrip()}"]
    for paragraph in doc.description:
        lines += ["", *_wrap(paragraph, 0)]
    if required:
        lines += ["", "positional arguments (or as flags: --name VALUE):"]
        for param in required:
            lines += [f"  {param.name.upper()}", *_wrap(doc.args.get(param.name, ""), 6)]
    if optional or varkw:
        lines += ["", "flags (--name VALUE or --name=VALUE; - or _ in names):"]
    for param in optional:
        if is_on_off(param):
            head = f"  --{param.name} / --no{param.name}   (default: {'--' if param.default else '--no'}{param.name})"
        else:
            head = f"  --{param.name} {_metavar(param)}"
            if param.default is not None:  # None: the text says what happens without the flag
                head += f"   (default: {_default_text(param.default)})"
        lines += [head, *_wrap(doc.args.get(param.name, ""), 6)]
    if varkw is not None:
        lines += ["  --KEY VALUE", *_wrap(doc.args.get(varkw.name, ""), 6)]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------------


def prepare(root: Any, argv: Sequence[str], prog: str) -> list[str] | None:
    """What ``main`` hands to fire: the checked command line rebuilt, or None when a help page was printed.
    A bad command line prints its error to stderr and exits with status 2 before anything runs."""
    try:
        command = resolve(root, argv, prog)
        if command.help:
            sys.stdout.write(help_page(command.path, command.target, prog))
            return None
        rebuilt = check_arguments(command.target, command.args, " ".join([prog, *command.path]))
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    return [*command.path, *rebuilt, *(["--", *command.fire_flags] if command.fire_flags else [])]
