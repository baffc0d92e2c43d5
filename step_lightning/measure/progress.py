"""Progress of the long measurement commands on stderr: what is measured, for which method, how far, and the
time left (tqdm's estimate from the forward passes done so far)."""

from __future__ import annotations

import sys

from tqdm import tqdm


class Progress:
    """One bar over all of a command's forward passes; ``step`` names what runs now and counts passes done."""

    def __init__(self, command: str, total: int):
        self.command = command
        # A terminal redraws the bar; a log file (SLURM, a pipe) gets a line at most every 30 s.
        self.bar = tqdm(total=total, desc=command, unit="pass", file=sys.stderr, dynamic_ncols=True,
                        mininterval=1.0 if sys.stderr.isatty() else 30.0)

    def step(self, what: str, passes: int = 1) -> None:
        """``passes`` more forward passes of ``what`` (e.g. "timing dcts@6899 packed") are done."""
        self.bar.set_description(f"{self.command}: {what}", refresh=False)
        self.bar.update(passes)

    def close(self) -> None:
        self.bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
