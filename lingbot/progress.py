"""Progress of the long stages, for a terminal and for a log file alike.

On a terminal: tqdm's bar, redrawn in place. Anywhere else (`dvc repro > log`, a Prefect worker, CI): the
same tqdm line, with its count, rate, ETA and the stage's own figures (loss, PSNR), printed as a whole
line at most every `LOG_INTERVAL_S` seconds and once at the end, never with carriage returns.
"""

from __future__ import annotations

import sys

LOG_INTERVAL_S = 30.0


class _Lines:
    """A stderr stand-in that turns tqdm's in-place redraws into whole lines."""

    def write(self, text: str) -> None:
        text = text.replace("\r", "").strip()
        if text:
            sys.stderr.write(text + "\n")

    def flush(self) -> None:
        sys.stderr.flush()


def progress_bar(enabled: bool = True, **kwargs):
    """tqdm(**kwargs) that reads well where it is written; `enabled` False: silent."""
    from tqdm import tqdm

    if not enabled or sys.stderr.isatty():
        return tqdm(disable=not enabled, **kwargs)

    class LogBar(tqdm):
        def set_postfix(self, ordered_dict=None, refresh=False, **values):
            # tqdm redraws on every set_postfix: in a log that is a line per step; the figures
            # show at the next timed report instead
            super().set_postfix(ordered_dict, refresh=False, **values)

    return LogBar(file=_Lines(), mininterval=LOG_INTERVAL_S, maxinterval=LOG_INTERVAL_S, ascii=True, ncols=100,
                  **kwargs)
