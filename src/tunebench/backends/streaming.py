"""Streaming generated text: each streamed row of a batch receives the text it adds while ``generate`` runs.

Hugging Face's ``TextIteratorStreamer`` follows one sequence; a served micro-batch generates many at once, so
:class:`RowStreamer` takes the whole batch's new token ids at each step and hands each streamed row its new text
through that row's own callback (called in the generating thread). A row's generated ids are decoded whole at
every step, and its text is passed on only as far as it can no longer change:

* an unfinished UTF-8 character (the decoder's trailing U+FFFD) waits for its remaining bytes;
* text that could be the beginning of a stop string waits until it is not; nothing from a stop string on is
  ever passed on (the finished text is cut there);
* with a tokenizer that cleans up spaces when decoding (``" ."`` becomes ``"."``), the text from the last
  whitespace on waits for the next word.

At the end the caller passes each row's finished text to :meth:`RowStreamer.close`, which sends what was held
back: a row's pieces add up to exactly the text ``generate`` returns. A callback that returns False (nobody
reads the row any more) ends that row's generation at the next step; the other rows go on.
"""

from __future__ import annotations

import logging
import re
from typing import Callable

import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

log = logging.getLogger(__name__)

Send = Callable[[str], bool]  # a row's new text -> whether its reader still wants more

_LAST_WORD = re.compile(r"\s\S*\Z")


def cleans_spaces(tokenizer) -> bool:
    """Whether decoding drops spaces before punctuation (``"do n't ."`` as ``"don't."``), which lets a later token
    change the text before it. (Transformers 5 ignores the setting for BPE tokenizers unless forced.)"""
    if not getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return False
    ids = tokenizer("do n't , a .", add_special_tokens=False)["input_ids"]
    return tokenizer.decode(ids) != tokenizer.decode(ids, clean_up_tokenization_spaces=False)


class _Row:
    __slots__ = ("send", "ids", "sent", "done", "dropped")

    def __init__(self, send: Send):
        self.send = send
        self.ids: list[int] = []
        self.sent = ""  # the text passed on so far
        self.done = False  # nothing more is passed on before close (EOS, a stop string, or the reader left)
        self.dropped = False  # the reader left: generation of this row may stop


class RowStreamer(BaseStreamer):
    """A ``generate(streamer=...)`` streamer for a batch: ``sends[r]`` receives row ``r``'s text (None: row ``r``
    is not streamed). ``finish(ids)`` is the backend's finished text of a row's generated ids (used at EOS);
    :meth:`criteria` stops the rows whose reader left."""

    def __init__(self, tokenizer, sends: list[Send | None], stop: list[str], eos_id: int | None,
                 finish: Callable[[list[int]], str]):
        self.tok, self.stop, self.eos, self.finish = tokenizer, list(stop), eos_id, finish
        self.rows = [None if s is None else _Row(s) for s in sends]
        self.cleans_spaces = cleans_spaces(tokenizer)
        self._prompt = True

    def criteria(self) -> StoppingCriteriaList:
        return StoppingCriteriaList([_ReaderLeft(self.rows)])

    # ---- called by generate ------------------------------------------------------------------------------
    def put(self, value: torch.Tensor) -> None:
        if self._prompt:  # generate() first passes the prompt ids
            self._prompt = False
            return
        steps = value.reshape(len(self.rows), -1).tolist()  # (batch,) per step; (batch, k) when k steps come at once
        for row, ids in zip(self.rows, steps):
            if row is None or row.done:
                continue
            for t in ids:
                row.ids.append(t)
                if t == self.eos:  # the row is finished: its whole text is known
                    self._pass(row, self.finish(row.ids))
                    row.done = True
                else:
                    self._advance(row)
                if row.done:
                    break

    def end(self) -> None:
        """Nothing to do: the finished texts come through :meth:`close`."""

    # ---- called by the backend after generate ----------------------------------------------------------
    def close(self, r: int, text: str) -> None:
        """Row ``r`` finished as ``text``: pass on what has not been passed on yet."""
        row = self.rows[r]
        if row is None or row.dropped:
            return
        if not text.startswith(row.sent):  # would be a decoder whose text of a prefix is not a prefix of the text
            log.warning("a streamed row's text changed after it was sent (%r, finished as %r)", row.sent[-40:],
                        text[-40:])
            return
        self._pass(row, text)
        row.done = True

    # ---- a row's text ------------------------------------------------------------------------------------
    def _advance(self, row: _Row) -> None:
        text = self.tok.decode(row.ids, skip_special_tokens=True)
        n = len(row.sent)
        hold = len(text)
        for s in self.stop:
            i = text.find(s, n)  # (an occurrence starting before n would have been held back)
            if i >= 0 and i < hold:
                hold = i
                row.done = True  # the finished text ends here; the rest (held back, if any) comes with close()
            for j in range(max(n, len(text) - len(s) + 1), min(hold, len(text))):  # a stop string may begin at j
                if s.startswith(text[j:]):
                    hold, row.done = j, False
                    break
        safe = text[:hold].rstrip("\ufffd")  # an unfinished character
        if self.cleans_spaces and (m := _LAST_WORD.search(safe)) is not None:
            safe = safe[: m.start()]
        if len(safe) > n:
            if safe.startswith(row.sent):
                self._pass(row, safe)
            else:
                row.done = True  # the decoded text changed under what was sent: the rest comes with close()

    def _pass(self, row: _Row, text: str) -> None:
        """Send ``text[len(row.sent):]`` (``text`` extends what was sent)."""
        new = text[len(row.sent):]
        if not new or row.dropped:
            return
        row.sent = text
        try:
            wanted = row.send(new)
        except Exception:  # noqa: BLE001 - a reader's failure must not fail the batch
            log.exception("a streamed row's reader failed; generating it no further")
            wanted = False
        if not wanted:
            row.done = row.dropped = True


class _ReaderLeft(StoppingCriteria):
    """Finishes the rows nobody reads any more (the others go on)."""

    def __init__(self, rows: list[_Row | None]):
        self.rows = rows

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        return torch.tensor([r is not None and r.dropped for r in self.rows], dtype=torch.bool,
                            device=input_ids.device)
