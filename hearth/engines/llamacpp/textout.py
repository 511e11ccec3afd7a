"""Turn token bytes into text safely: whole UTF-8 characters, stop strings held back.

Pure logic, no llama.cpp: unit-tested on its own.
"""

from __future__ import annotations

import codecs


class TextOut:
    """Accumulates token pieces; `push` returns text safe to emit now.

    A stop string may span tokens, so any tail that could be the start of a
    stop string is held back until it is ruled out. When a stop string is
    found, `stopped` is set and the text before it is the last emitted.
    """

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text = ""
        self.sent = 0
        self.stopped = False

    def _held(self) -> int:
        """Length of the longest tail of `text` that is a proper prefix of a stop."""
        best = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(self.text)), best, -1):
                if self.text.endswith(stop[:n]):
                    best = n
                    break
        return best

    def push(self, piece: bytes) -> str:
        """Add a token's bytes; return the text that can be emitted now."""
        if self.stopped:
            return ""
        self.text += self.decoder.decode(piece)
        window = max((len(s) for s in self.stops), default=0)
        start = max(0, self.sent - window)
        cut = -1
        for stop in self.stops:
            i = self.text.find(stop, start)
            if i >= 0 and (cut < 0 or i < cut):
                cut = i
        if cut >= 0:
            self.stopped = True
            out = self.text[self.sent:cut]
            self.sent = cut
            self.text = self.text[:cut]
            return out
        safe = len(self.text) - self._held()
        if safe <= self.sent:
            return ""
        out = self.text[self.sent:safe]
        self.sent = safe
        return out

    def flush(self) -> str:
        """At the end of generation: everything not yet emitted."""
        if self.stopped:
            return ""
        self.text += self.decoder.decode(b"", final=True)
        out = self.text[self.sent:]
        self.sent = len(self.text)
        return out
