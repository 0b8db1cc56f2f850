"""Plain text out of a driver's log: terminal escape sequences removed.

Ray colours the prefix of every line it forwards from a worker (`ESC[36m(RayTrainWorker
pid=...)ESC[0m`) and parts of its own messages; a log read through the API, a pipe or the
dashboard is not a terminal, and the codes show there as `[36m` litter."""

from __future__ import annotations

import re

# ECMA-48: CSI (ESC [ params intermediates final), OSC (ESC ] ... BEL or ESC \), and the
# two-byte escapes (ESC followed by one of 0 to ~); a lone ESC is dropped too.
_ANSI = re.compile(
    r"\x1b\[[0-?]*[ -/]*[@-~]"  # CSI: colours, cursor moves, erase line
    r"|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)"  # OSC: window titles, hyperlinks
    r"|\x1b[0-~]"  # other two-byte escapes: ESC c (reset), ESC 7 / ESC 8 (save, restore)
    r"|\x1b"  # whatever is left of one
)
# The start of an escape sequence at the end of a chunk, which the next chunk may complete.
_PARTIAL = re.compile(r"\x1b(?:\[[0-?]*[ -/]*|\][^\x07\x1b]*)?\Z")


def strip_ansi(text: str) -> str:
    """`text` without terminal escape sequences."""
    return _ANSI.sub("", text) if "\x1b" in text else text


class AnsiStripper:
    """strip_ansi for a stream of chunks: a sequence cut between two chunks is held back until
    the next one completes it."""

    def __init__(self) -> None:
        self._held = ""

    def feed(self, chunk: str) -> str:
        text = self._held + chunk
        self._held = ""
        if "\x1b" not in text:
            return text
        m = _PARTIAL.search(text)
        if m:
            text, self._held = text[: m.start()], text[m.start() :]
        return strip_ansi(text)

    def close(self) -> str:
        """What is left at the end of the stream (an unfinished sequence is dropped)."""
        held, self._held = self._held, ""
        return strip_ansi(held)
