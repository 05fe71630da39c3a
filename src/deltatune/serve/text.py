"""A sequence's text as it grows token by token: only complete characters are sent, and text that
may be the start of a stop string is held back until it is known not to be one."""

from __future__ import annotations

from typing import Optional


class TextStream:
    """Decodes a growing list of token ids; ``push`` returns the text now safe to send."""

    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.tokens: list[int] = []
        self.sent = 0  # characters of the decoded text already handed out
        self.text = ""
        self.stopped = False  # a stop string was found; nothing more is sent

    def push(self, token: int) -> str:
        """Add ``token``; the new text that can be sent (possibly empty)."""
        self.tokens.append(token)
        self.text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        at = self._stop_at()
        if at is not None:
            self.stopped = True
            return self._take(at)
        safe = len(self.text)
        while safe > self.sent and self.text[safe - 1] == "\ufffd":  # a character still being spelled out
            safe -= 1
        return self._take(safe - self._held_back(safe))

    def finish(self) -> str:
        """The rest of the text at the end of the sequence."""
        return "" if self.stopped else self._take(len(self.text))

    def _take(self, end: int) -> str:
        delta = self.text[self.sent:end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return delta

    def _stop_at(self) -> Optional[int]:
        longest = max((len(s) for s in self.stop), default=0)
        start = max(0, self.sent - longest)
        found = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        return min(found) if found else None

    def _held_back(self, end: int) -> int:
        """Characters at the end of ``text[:end]`` that begin some stop string."""
        held = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, end - self.sent), held, -1):
                if self.text[end - n:end] == s[:n]:
                    held = n
                    break
        return held
