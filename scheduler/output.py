"""From verified tokens to what a client sees: kept tokens, text deltas, and why a request ends.

Every finish decision lives here: an end-of-turn token (kept, unless ``ignore_eos``),
``max_tokens``, or a stop string (the text ends before it); the scheduler only acts on them.

Text is detokenized incrementally: each step decodes only a window from the token before the
last emitted text to the end (``prefix_offset`` .. end, minus ``prefix_offset`` ..
``read_offset``), so the cost per step does not grow with the answer; a window whose text ends
in an incomplete character (U+FFFD) waits for the next token. The streamed text never shows
what the final text omits: while it ends in a prefix of a stop string, that tail is held back,
and released once it can no longer start one (or when the request ends for another reason).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from core.plan import Completion
from scheduler.request import RequestState, TextStream

Detokenize = Callable[[Sequence[int]], str]
INCOMPLETE = "\ufffd"  # what a byte-level decode shows for a character cut in half


@dataclass(frozen=True)
class Emission:
    token_ids: tuple[int, ...]  # the step's tokens the request keeps
    text: str  # new text to stream
    finish_reason: str | None  # "stop" (end of turn or stop string) or "length"; None: goes on


@dataclass(frozen=True)
class OutputProcessor:
    detokenize: Detokenize | None = None  # None: token ids only (no text, no stop strings)
    clock: Callable[[], float] = time.perf_counter

    def emit(self, req: RequestState, tokens: Sequence[int]) -> Emission:
        """Append the tokens ``req`` keeps of ``tokens`` to its output; its new text and, if it
        is done, why. Call once per step that emitted tokens for ``req``."""
        kept, reason = self._truncate(req, list(tokens))
        req.output_ids.extend(kept)
        if kept and req.first_token_s is None:
            req.first_token_s = self.clock()
        if self.detokenize is None:
            return Emission(tuple(kept), "", reason)
        stream = req.text
        pending = stream.held + self._decode(stream, req.output_ids, final=reason is not None)
        cut = _first_stop(pending, req.sampling.stop)
        if cut is not None:
            text, stream.held, reason = pending[:cut], "", "stop"
        elif reason is not None:
            text, stream.held = pending, ""
        else:
            hold = _stop_prefix_len(pending, req.sampling.stop)
            text, stream.held = pending[: len(pending) - hold], pending[len(pending) - hold :]
        stream.text += text
        return Emission(tuple(kept), text, reason)

    def completion(self, req: RequestState, reason: str) -> Completion:
        """``req``'s whole result, now that it ended for ``reason``."""
        now = self.clock()
        first = now if req.first_token_s is None else req.first_token_s
        return Completion(
            request_id=req.request_id,
            token_ids=tuple(req.output_ids),
            text=req.text.text,
            finish_reason=reason,
            stats=req.stats(),
            ttft_s=first - req.arrived_s,
            time_s=now - req.arrived_s,
        )

    def _decode(self, stream: TextStream, ids: Sequence[int], final: bool) -> str:
        """The text of the tokens past ``stream.read_offset``; "" while it ends mid-character,
        unless ``final`` (the request ends with these tokens)."""
        assert self.detokenize is not None
        before = self.detokenize(ids[stream.prefix_offset : stream.read_offset])
        after = self.detokenize(ids[stream.prefix_offset :])
        if len(after) <= len(before) or (after.endswith(INCOMPLETE) and not final):
            return ""
        stream.prefix_offset, stream.read_offset = stream.read_offset, len(ids)
        return after[len(before) :]

    @staticmethod
    def _truncate(req: RequestState, tokens: list[int]) -> tuple[list[int], str | None]:
        """``tokens`` cut after an end-of-turn token or at max_tokens; the finish reason if done."""
        remaining = req.remaining_tokens
        if not req.sampling.ignore_eos:
            for i, token in enumerate(tokens[:remaining]):
                if token in req.eos_token_ids:
                    return tokens[: i + 1], "stop"
        if len(tokens) >= remaining:
            return tokens[:remaining], "length"
        return tokens, None


def _first_stop(text: str, stops: Sequence[str]) -> int | None:
    """Where the earliest stop string in ``text`` starts, or None."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


def _stop_prefix_len(text: str, stops: Sequence[str]) -> int:
    """The length of the longest tail of ``text`` that a stop string starts with."""
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), longest, -1):
            if stop.startswith(text[len(text) - n :]):
                longest = n
                break
    return longest
