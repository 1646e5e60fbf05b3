"""Which sequences of a packed forward share one padded attention call.

A backend that pads every sequence to the longest query and the longest context (batched SDPA)
pays ``B x max_q x max_kv`` per head and layer. In a continuous-batching step one newcomer's
prompt chunk (a hundred queries or more) next to many decode rows (one token, or a few tree
nodes each) makes every decode row pay for the prompt's length: at 8 users in the tiny target's
closed-loop benchmark, a step with one 121-token prompt chunk next to seven 3-token trees took
~41 ms to verify padded, 30-35 ms split. Splitting the short queries from the long ones costs one
more call per layer and removes that padding.
"""

from __future__ import annotations

from collections.abc import Sequence

# split only when it saves at least this share of the padded work: a second call per layer
# (gathers, a mask, a kernel launch) is not free, and small savings drown in it
MIN_SAVING = 0.5


def padded_work(query_lens: Sequence[int], kv_lens: Sequence[int]) -> int:
    """Query x key pairs one padded call over these sequences computes."""
    return len(query_lens) * max(query_lens, default=0) * max(kv_lens, default=0)


def split_by_query_len(query_lens: Sequence[int], kv_lens: Sequence[int]) -> list[list[int]]:
    """Sequence indices in one group, or in two (short queries, long queries), each group in
    batch order: the split by query length with the least padded work, taken when it saves at
    least :data:`MIN_SAVING` of one call's."""
    everyone = list(range(len(query_lens)))
    whole = padded_work(query_lens, kv_lens)
    by_len = sorted(everyone, key=lambda i: query_lens[i])
    best, best_work = None, whole
    for cut in range(1, len(by_len)):
        if query_lens[by_len[cut - 1]] == query_lens[by_len[cut]]:
            continue  # equal lengths stay together
        short, long = by_len[:cut], by_len[cut:]
        work = sum(padded_work([query_lens[i] for i in g], [kv_lens[i] for i in g]) for g in (short, long))
        if work < best_work:
            best, best_work = cut, work
    if best is None or best_work > (1 - MIN_SAVING) * whole:
        return [everyone]
    return [sorted(by_len[:best]), sorted(by_len[best:])]
