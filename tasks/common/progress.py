"""Progress bars that suit where the output goes: a live bar on a terminal; in a log (DVC, a Prefect worker,
CI: no terminal) one plain line every ``LOG_INTERVAL`` seconds and one at the end, not carriage-return frames."""

from __future__ import annotations

import sys
from typing import IO, Any

from tqdm import tqdm

LOG_INTERVAL = 10.0  # seconds between two progress lines in a log


class _Lines:
    """A file for tqdm that writes each refresh as one line (tqdm starts each with a carriage return)."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream

    def write(self, text: str) -> None:
        line = text.replace("\r", "").strip()
        if line:  # tqdm clears a finished bar with blanks: nothing to log
            self.stream.write(line + "\n")

    def flush(self) -> None:
        self.stream.flush()


def progress_bar(iterable: Any = None, **kwargs: Any) -> tqdm:
    """``tqdm(iterable, **kwargs)`` on a terminal; otherwise the same bar as log lines, at most one per
    ``LOG_INTERVAL`` seconds."""
    stream = kwargs.pop("file", None) or sys.stderr
    if stream.isatty():
        return tqdm(iterable, file=stream, **kwargs)
    return tqdm(iterable, file=_Lines(stream), mininterval=LOG_INTERVAL, ascii=True, ncols=100, **kwargs)
