"""A training setting's command-line flag, declared next to the setting it sets.

`train`'s generic flags are declared in cli.py; each strategy declares its own beside its
Options (multitower/parallel/<strategy>.py), so that adding a strategy adds its flags.
A flag's value is absent from the parsed arguments unless typed (argparse.SUPPRESS), so
that a resume or a config file can tell what the command line changed.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any, Callable


def whole_number(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None


@dataclass(frozen=True)
class Flag:
    name: str
    """The flag, e.g. "--sync-every"."""
    path: str
    """The setting it sets, as a Config path: "parallel.options.sync_every", "optim.lr"."""
    help: str
    """What it does, with its unit; "(default: ...)" is added from the setting's default."""
    type: Callable[[str], Any] | None = None
    choices: tuple | None = None
    boolean: bool = False
    """A switch: --name / --no-name (argparse.BooleanOptionalAction)."""
    metavar: str | None = None

    @property
    def dest(self) -> str:
        return self.path.replace(".", "__")


def shown(default) -> str:
    """A default as --help shows it."""
    if isinstance(default, bool):
        return "on" if default else "off"
    if default is None:
        return "auto"
    if isinstance(default, list):
        return ",".join(map(str, default)) or "none"
    return str(default) if default != "" else "none"


def add_flags(group, flags: tuple[Flag, ...], default_of: Callable[[str], Any]) -> None:
    """Add `flags` to an argparse group; default_of(path) is shown in each help text."""
    for flag in flags:
        kwargs: dict[str, Any] = {"dest": flag.dest, "default": argparse.SUPPRESS,
                                  "help": f"{flag.help} (default: {shown(default_of(flag.path))})"}
        if flag.boolean:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs.update({key: value for key, value in (("type", flag.type), ("choices", flag.choices),
                                                          ("metavar", flag.metavar)) if value is not None})
        group.add_argument(flag.name, **kwargs)


def typed_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The settings the flags typed, by Config path ({"optim.lr": 0.05, ...})."""
    return {dest.replace("__", "."): value for dest, value in vars(args).items() if "__" in dest}
