"""The one command-line convention of every script: ``key=value`` arguments, as ``train.py`` takes its overrides.

A script declares a :class:`Command` (each option's default, type and help) and runs it with :func:`run_command`:

- ``key=value`` is the convention, and the form ``--help`` shows;
- ``--key value``, ``--key=value`` and, for a true/false option, a bare ``--key`` are read as the same key (dashes
  become underscores), so older spellings keep working (``--json``, ``--dry-run``, ``--timeout 5``);
- an unknown key is an error that lists the valid ones, and every error the user can fix is one ``error: ...`` line
  on stderr, exit status 2 (or the status the command gives that kind of error), never a traceback.

Nothing heavy is imported here, and a command imports its work only once its arguments are parsed, so ``--help``
answers without loading torch (``tests/test_cli.py`` checks every script).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from metricsearch.utils.console_logging import ConsoleFilter
from metricsearch.utils.errors import error_message

USAGE_ERROR_EXIT = 2
TRUE_WORDS = frozenset({"true", "1", "yes", "on"})
FALSE_WORDS = frozenset({"false", "0", "no", "off"})
NULL_WORDS = frozenset({"null", "none", ""})
HELP_WORDS = ("--help", "-h")


class UsageError(ValueError):
    """The command line is malformed: an unknown key, a value of the wrong type, a required key left out."""


@dataclass(frozen=True)
class Option:
    """One ``key=value`` option of a command.

    Attributes:
        default: the value when the option is not given.
        help: what it does, for ``--help``.
        type: bool, int, float or str; by default the type of ``default`` (str when the default is None).
        required: the command cannot run without it.
    """

    default: Any
    help: str
    type: type | None = None
    required: bool = False

    @property
    def kind(self) -> type:
        return self.type or (str if self.default is None else type(self.default))

    def convert(self, key: str, raw: str) -> Any:
        """``raw`` as this option's type; ``null``, ``none`` and an empty value give None."""
        word = raw.strip().lower()
        if word in NULL_WORDS:
            return None
        kind = self.kind
        if kind is bool:
            if word not in TRUE_WORDS | FALSE_WORDS:
                raise UsageError(f"{key}={raw} is not true or false")
            return word in TRUE_WORDS
        if kind in (int, float):
            try:
                return kind(raw)
            except ValueError:
                raise UsageError(f"{key}={raw} is not a valid {kind.__name__}") from None
        return raw


@dataclass(frozen=True)
class PassedOn:
    """``key=value`` arguments a command hands on unparsed (as Hydra overrides) instead of reading them itself.

    Attributes:
        prefixes: keys starting with one of these are passed on; an empty prefix passes every key the command
            does not define.
        help: ``(pattern, text)`` lines for ``--help``, e.g. ``("trainer.KEY=VALUE", "...")``.
    """

    prefixes: tuple[str, ...]
    help: tuple[tuple[str, str], ...]

    def takes(self, key: str) -> bool:
        return any(key.startswith(prefix) for prefix in self.prefixes)


@dataclass(frozen=True)
class Arguments:
    """A parsed command line: each option's value (``args["k"]``), and the overrides passed on, in order."""

    values: dict[str, Any]
    overrides: list[str] = field(default_factory=list)

    def __getitem__(self, key: str) -> Any:
        return self.values[key]


@dataclass(frozen=True)
class Command:
    """A script's command line.

    Attributes:
        name: the script, ``scripts/NAME.py``.
        summary: what it does, for ``--help``.
        options: key -> :class:`Option`.
        passed_on: the ``key=value`` arguments handed on unparsed, if any.
        log_level: level of the project's own log messages (progress lines); other libraries' stay at WARNING.
    """

    name: str
    summary: str
    options: Mapping[str, Option]
    passed_on: PassedOn | None = None
    log_level: int = logging.INFO

    def usage(self) -> str:
        lines = [f"usage: python scripts/{self.name}.py key=value ...", "", self.summary, ""]
        lines.append("options (--key value, --key=value and, for true/false options, --key mean the same):")
        for key, option in self.options.items():
            if option.required:
                shown = "(required)"
            elif option.kind is bool:
                shown = f"(default: {_shown(option.default)}; --{key.replace('_', '-')} sets it)"
            else:
                shown = f"(default: {_shown(option.default)})"
            lines.append(f"  {key + '=':<20} {option.help} {shown}")
        for pattern, text in self.passed_on.help if self.passed_on else ():
            lines.append(f"  {pattern:<20} {text}")
        lines.append(f"  {'--help':<20} show this message")
        return "\n".join(lines)

    def parse(self, argv: Sequence[str]) -> Arguments:
        """The values of ``argv``'s options (defaults for the others) and the overrides it passes on.

        Raises:
            UsageError: an unknown key, a value of the wrong type, a required option left out.
        """
        values = {key: option.default for key, option in self.options.items()}
        overrides: list[str] = []
        tokens = list(argv)
        position = 0
        while position < len(tokens):
            arg = tokens[position]
            position += 1
            if arg.startswith("--"):
                name, sep, raw = arg[2:].partition("=")
                key = name.replace("-", "_")
                option = self._option(key)
                if not sep:
                    if option.kind is bool:
                        raw = "true"
                    elif position < len(tokens):
                        raw, position = tokens[position], position + 1
                    else:
                        raise UsageError(f"--{name} needs a value: --{name} VALUE or {key}=VALUE")
            else:
                key, sep, raw = arg.partition("=")
                if not sep:
                    raise UsageError(f"arguments are key=value, got {arg!r}")
                if key not in self.options and self.passed_on and self.passed_on.takes(key):
                    overrides.append(arg)
                    continue
                option = self._option(key)
            values[key] = option.convert(key, raw)
        missing = [key for key, option in self.options.items() if option.required and values[key] in (None, "")]
        if missing:
            raise UsageError(f"{self.name} needs {', '.join(key + '=' for key in missing)}")
        return Arguments(values, overrides)

    def _option(self, key: str) -> Option:
        if key in self.options:
            return self.options[key]
        valid = ", ".join(self.options) or "none"
        if self.passed_on:
            valid += ", " + ", ".join(pattern for pattern, _ in self.passed_on.help)
        raise UsageError(f"unknown option {key!r} for {self.name}; valid: {valid}")


def run_command(
    command: Command,
    argv: Sequence[str] | None,
    body: Callable[[Arguments], int | None],
    errors: Mapping[type[BaseException], int] | None = None,
) -> int:
    """Parses ``argv`` (``sys.argv[1:]`` when None), runs ``body`` and returns the exit status.

    ``--help`` prints the usage and returns 0 before anything else runs. A malformed command line, and an
    exception of one of the kinds in ``errors`` (kind -> exit status; the first matching kind counts), are
    printed as one ``error: ...`` line on stderr instead of a traceback.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(arg in HELP_WORDS for arg in argv):
        print(command.usage())
        return 0
    # The project's own progress messages; third-party INFO chatter (faiss's loader, matplotlib's font cache, ...)
    # stays hidden (see metricsearch.utils.console_logging).
    existing = list(logging.getLogger().handlers)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("metricsearch").setLevel(command.log_level)
    for handler in logging.getLogger().handlers:
        if handler not in existing:  # only the console handler set up here (a caller's own stay as they are)
            handler.addFilter(ConsoleFilter())
    try:
        return body(command.parse(argv)) or 0
    except UsageError as err:
        return _report(f"{err} (python scripts/{command.name}.py --help lists the options)", USAGE_ERROR_EXIT)
    except Exception as err:
        status = next((status for kind, status in (errors or {}).items() if isinstance(err, kind)), None)
        if status is None:
            raise
        return _report(error_message(err), status)


def one_line(text: str) -> str:
    """``text`` with every run of whitespace, newlines included, as one space."""
    return " ".join(text.split())


def _report(message: str, status: int) -> int:
    print(f"error: {one_line(message)}", file=sys.stderr)
    return status


def _shown(value: Any) -> str:
    if value is None:
        return "none"
    if value == "":
        return '""'
    return str(value).lower() if isinstance(value, bool) else str(value)
