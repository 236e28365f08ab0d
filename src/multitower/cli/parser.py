"""The argparse parser every multitower command line goes through: one line per mistake."""

from __future__ import annotations

import argparse
import difflib
import re


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line on stderr (argparse prints the usage too), an
    unknown one with the nearest known flag, and no prefix of a flag stands for it
    (`--batch 64` is refused, not taken for --batch-size)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    subcommands: dict[str, argparse.ArgumentParser] | None = None  # name -> parser, set by build_parser

    def parse_args(self, args=None, namespace=None):
        # argparse reports a subcommand's unknown flags from the top-level parser, which
        # knows none of the subcommand's: let the subcommand's own parser say it.
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            parser = (self.subcommands or {}).get(getattr(parsed, "command", None), self)
            parser.error(f"unrecognized arguments: {' '.join(extras)}")
        return parsed

    def error(self, message: str):
        where = self.prog.removeprefix("multitower").strip()
        unknown = re.match(r"unrecognized arguments: (\S+)", message)
        if unknown and unknown.group(1).startswith("-"):
            flag = unknown.group(1).split("=")[0]
            known = [option for action in self._actions for option in action.option_strings]
            close = [option for option in known if option.startswith(flag)][:3] or \
                difflib.get_close_matches(flag, known, n=1, cutoff=0.6)
            if close:
                message += f"; did you mean {' or '.join(close)}?"
        self.exit(2, f"multitower: error: {where + ': ' if where else ''}{message} (see --help)\n")
