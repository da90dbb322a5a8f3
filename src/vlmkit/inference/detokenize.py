"""Incremental detokenisation that never splits a multi-byte character, with stop-string handling."""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text pieces whose concatenation is the full decoded text.

    A piece is released only when the decoded text no longer ends in an incomplete UTF-8 sequence. Text that
    could still become the start of a stop string is held back until it can't.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: tuple[str, ...] = (), incremental: bool = True):
        """``incremental=False`` (nobody reads the pieces, no stop strings) decodes once, in :meth:`finish`."""
        self.tokenizer = tokenizer
        self.stop = stop
        self.incremental = incremental or bool(stop)
        self.ids: list[int] = []
        self._prefix = 0  # ids[_prefix:_read] decode to the context of the next piece
        self._read = 0
        self.text = ""  # everything decoded so far (stop string excluded once found)
        self._emitted = 0  # characters of self.text already handed out
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False))

    def add(self, token_id: int) -> str:
        """Add one token; returns the text that can be released now (possibly empty)."""
        if self.stopped:
            return ""
        self.ids.append(token_id)
        if not self.incremental:
            return ""
        before = self._decode(self.ids[self._prefix : self._read])
        after = self._decode(self.ids[self._prefix :])
        if len(after) > len(before) and not after.endswith(REPLACEMENT):
            self.text += after[len(before) :]
            self._prefix, self._read = self._read, len(self.ids)
            self._check_stop()
        return self._release(final=False)

    def _check_stop(self) -> None:
        for stop in self.stop:
            at = self.text.find(stop, max(0, self._emitted - len(stop)))
            if at != -1:
                self.text = self.text[:at]
                self.stopped = True

    def _release(self, final: bool) -> str:
        end = len(self.text)
        if not final and not self.stopped and self.stop:
            # hold back a tail that is a prefix of some stop string
            hold = 0
            for stop in self.stop:
                for k in range(min(len(stop) - 1, len(self.text)), 0, -1):
                    if self.text.endswith(stop[:k]):
                        hold = max(hold, k)
                        break
            end -= hold
        piece = self.text[self._emitted : end]
        self._emitted = max(self._emitted, end)
        return piece

    def finish(self) -> str:
        """Flush everything left (an incomplete trailing character decodes as U+FFFD, as a full decode would)."""
        if not self.stopped:
            tail = self._decode(self.ids[self._prefix :])
            before = self._decode(self.ids[self._prefix : self._read])
            if len(tail) > len(before):
                self.text += tail[len(before) :]
                self._check_stop()
        return self._release(final=True)
