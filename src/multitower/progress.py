"""Progress of the long commands that are not training (data download/import/synth, eval):
a tqdm bar on a terminal, a few plain lines anywhere else, as `train --progress` decides.

A tqdm bar redraws itself with carriage returns, which fill a log file with `\\r`; off a
terminal this writes at most PLAIN_LINES lines instead, each a whole line.
"""

from __future__ import annotations

import sys
import time

from tqdm import tqdm

from multitower.errors import UserError

# The choices of every --progress flag: auto = a bar only on a terminal.
MODES = ("auto", "on", "off")
# Plain lines at 25, 50, 75 and 100%: a log shows the command is moving, and stays short.
PLAIN_LINES = 4


def progress_mode(value: str | bool) -> str:
    """A --progress value, or a bool from library callers (True = the bar, False = nothing)."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if value not in MODES:
        raise UserError(f"--progress must be one of {', '.join(MODES)}, got {value!r}")
    return value


class PlainLines:
    """tqdm's update/close/context-manager surface, writing one line per quarter of `total`
    (or one line at the end when the total is unknown); `quiet` writes nothing."""

    def __init__(self, total: int | None, desc: str, unit: str, file, quiet: bool = False,
                 unit_scale: bool = False, unit_divisor: int = 1000):
        self.total, self.desc, self.unit, self.file, self.quiet = total, desc, unit, file, quiet
        self.unit_scale, self.unit_divisor = unit_scale, unit_divisor
        self.n, self.quarters_said, self.start = 0, 0, time.perf_counter()

    def _amounts(self, done: float, total: float | None) -> str:
        """"250 of 1,000 img", "41.0MB of 163MB", or "7 file" without a total."""
        if self.unit_scale:
            sizes = [tqdm.format_sizeof(v, self.unit, self.unit_divisor) for v in (done, total) if v is not None]
            return " of ".join(sizes)
        return f"{done:,.0f}" + (f" of {total:,.0f}" if total is not None else "") + f" {self.unit}"

    def _say(self, text: str) -> None:
        if not self.quiet:
            print(f"{self.desc}: {text}, {time.perf_counter() - self.start:.1f} s", file=self.file, flush=True)

    def update(self, n: int = 1) -> None:
        self.n += n
        if not self.total:
            return
        # The quarter just reached, 1..PLAIN_LINES; say each one once, however big the update.
        reached = min(PLAIN_LINES, PLAIN_LINES * self.n // self.total)
        if reached > self.quarters_said:
            self.quarters_said = reached
            self._say(f"{100 * self.n // self.total}% ({self._amounts(self.n, self.total)})")

    def write(self, line: str) -> None:
        print(line, file=self.file, flush=True)

    def close(self) -> None:
        if not self.total and self.n:
            self._say(f"done ({self._amounts(self.n, None)})")

    def __enter__(self) -> "PlainLines":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress(mode: str | bool, *, total: int | None, desc: str, unit: str, file=None, **options):
    """A bar (tqdm) or PlainLines for `mode` (MODES, or a bool); `options` go to tqdm
    (unit_scale and unit_divisor to the plain lines too)."""
    mode = progress_mode(mode)
    file = file if file is not None else sys.stderr
    if mode == "on" or (mode == "auto" and file.isatty()):
        return tqdm(total=total, desc=desc, unit=unit, file=file, dynamic_ncols=True, **options)
    return PlainLines(total, desc, unit, file, quiet=mode == "off",
                      unit_scale=options.get("unit_scale", False), unit_divisor=options.get("unit_divisor", 1000))
