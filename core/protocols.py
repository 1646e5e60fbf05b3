"""The two roles the scheduler drives each step; it reaches models only through these."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

from core.draft import Drafted, DraftProposal, DraftRequest
from core.verify import VerifyItem, VerifyOutcome


class Drafter(Protocol):
    def propose(
        self, requests: Sequence[DraftRequest], stop: Callable[[], bool] | None = None
    ) -> list[DraftProposal]:
        """One draft tree per request, in order, each within its budget, grown from the last
        verified token (``output_ids[-1]``). The drafter keeps its own KV per request and brings
        it up to date from ``prompt`` and ``output_ids`` (a request it has not seen, or has
        released, is prefilled from scratch: ``prefill_tokens`` says how many tokens that took).
        A request it has no room for gets an empty tree marked ``dropped``, and its KV is gone.
        For sampling requests, children are drawn without replacement from the ``draft_probs``
        it reports. Leaves no tree KV behind. ``stop`` is asked between tree levels: once it
        says so, every tree is returned as grown so far (a proactive call making way for others;
        a tree cut for timing, never for its tokens, is verified as exactly as a whole one)."""
        ...

    def has_adapter(self, name: str) -> bool:
        """Whether a new request may name the LoRA adapter ``name`` (its drafts, never its
        output, depend on it)."""
        ...

    def release(self, request_id: int) -> None:
        """Forget a request (finished, aborted or preempted) and free its KV; unknown ids are fine."""
        ...

    def check_integrity(self) -> None:
        """Raise if the drafter's KV bookkeeping is inconsistent."""
        ...


class PendingDraft(Protocol):
    """A draft call on its way: the engine verifies other requests while it is out."""

    def result(self, timeout_s: float) -> Drafted:
        """The call's answer, waiting at most ``timeout_s`` for it; raises
        :class:`core.draft.DrafterUnavailable` when the drafter does not answer in time."""
        ...

    def done(self) -> bool:
        """Whether the call was answered (or failed): ``result`` would not wait."""
        ...


class DraftClient(Protocol):
    """The drafter as the engine reaches it: in this process, or across a link."""

    def submit(self, requests: Sequence[DraftRequest], ahead: bool = False) -> PendingDraft:
        """Send one draft call for ``requests`` (see :meth:`Drafter.propose`) and return at
        once, or once answered for a drafter in this process. A call ``ahead`` (proactive: trees
        no step waits for yet) yields to other calls: the drafter cuts its trees short when
        another call is waiting for it."""
        ...

    def has_adapter(self, name: str) -> bool: ...

    def release(self, request_id: int) -> None:
        """As :meth:`Drafter.release`; a drafter across a link may do it with its next call."""
        ...

    def check_integrity(self) -> None: ...


class Verifier(Protocol):
    def verify(self, items: Sequence[VerifyItem]) -> list[VerifyOutcome]:
        """Run every item in one target forward, writing KV for all its tokens and tree nodes at
        the slots of its block table, and decide each emitting item's tokens (greedy or by
        recursive rejection). Returns one outcome per item, in order. Does not free or move KV:
        the caller commits the accepted nodes."""
        ...
