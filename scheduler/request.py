"""A request as the scheduler tracks it between steps: the one record of it in the engine."""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from core.plan import RequestStats
from core.prompt import EncodedPrompt, Prompt
from core.sampling import SamplingParams
from kvcache.prefix_cache import Fetch
from kvcache.sequence_blocks import SequenceBlocks


@dataclass
class TextStream:
    """A request's text so far, as ``scheduler.output`` detokenizes it incrementally."""

    prefix_offset: int = 0  # output tokens before the decode window
    read_offset: int = 0  # output tokens whose text is decoded
    text: str = ""  # streamed so far
    held: str = ""  # decoded, but possibly the start of a stop string


class Status(enum.Enum):
    WAITING = "waiting"  # no KV (new, or preempted: its output so far is recomputed)
    RUNNING = "running"  # holds KV blocks
    FINISHED = "finished"


@dataclass
class RequestState:
    request_id: int
    prompt: Prompt
    encoded: EncodedPrompt  # the target's view of the prompt (visual embeddings maybe still to come)
    sampling: SamplingParams
    compression: float | None  # drafter visual-token ratio the request pinned; None = the policy's
    generator: torch.Generator
    eos_token_ids: frozenset[int]
    adapter: str | None = None  # the drafter LoRA of the request's user
    arrived_s: float = 0.0  # perf_counter when it arrived (before its prompt was encoded)
    first_token_s: float | None = None  # perf_counter when its first token was emitted
    status: Status = Status.WAITING
    output_ids: list[int] = field(default_factory=list)
    text: TextStream = field(default_factory=TextStream)
    blocks: SequenceBlocks | None = None
    verify_steps: int = 0
    draft_tokens: int = 0
    accepted_tokens: int = 0
    preemptions: int = 0
    group: int = 0  # the pipeline group it is scheduled with (``SchedulerConfig.groups``)
    link_bytes_up: int = 0  # its draft calls and trees across the drafter link, serialized
    link_bytes_down: int = 0
    adapter_version: int | None = None  # the version of ``adapter`` its last tree was drafted with
    adapter_known: bool = True  # False while a learned adapter has no version (the base drafter drafts)
    block_hashes: tuple[bytes, ...] = ()  # content hash per full prompt block (prefix caching)
    cached_tokens: int = 0  # prompt tokens found in a prefix cache at the first admission
    published: int = 0  # leading prompt blocks already in the prefix cache (found or offered)
    # the Redis lookup of ``scheduler.admission``: not asked yet, in flight (the request waits
    # for it), or asked (once per admission)
    fetch: Fetch | None = None
    fetched: bool = False
    # computes ``encoded`` with its visual embeddings (the vision tower) the first time a chunk
    # needs them; None once done or when ``encoded`` came complete. A prompt whose image rows
    # all come from a prefix cache never runs the vision tower.
    visual: Callable[[], EncodedPrompt] | None = None

    @property
    def num_prompt(self) -> int:
        return self.encoded.num_tokens

    @property
    def num_tokens(self) -> int:
        """Prompt plus output: the sequence whose KV the target needs."""
        return self.num_prompt + len(self.output_ids)

    @property
    def num_computed(self) -> int:
        return 0 if self.blocks is None else self.blocks.num_tokens

    @property
    def num_missing(self) -> int:
        return self.num_tokens - self.num_computed

    @property
    def remaining_tokens(self) -> int:
        return self.sampling.max_tokens - len(self.output_ids)

    def stats(self) -> RequestStats:
        return RequestStats(
            prompt_tokens=self.num_prompt,
            output_tokens=len(self.output_ids),
            verify_steps=self.verify_steps,
            draft_tokens=self.draft_tokens,
            accepted_tokens=self.accepted_tokens,
            cached_tokens=self.cached_tokens,
            preemptions=self.preemptions,
            link_bytes_up=self.link_bytes_up,
            link_bytes_down=self.link_bytes_down,
            adapter=self.adapter if self.adapter_known or self.adapter_version is not None else None,
            adapter_version=self.adapter_version,
        )

    def chunk(self, n: int) -> EncodedPrompt:
        """The next ``n`` missing tokens (prompt rows with their image embeddings, then outputs)."""
        start, end = self.num_computed, self.num_computed + n
        if self.visual is not None and any(s < end and start < s + k for s, k in self.encoded.image_rows):
            complete = self.visual()
            if not torch.equal(complete.token_ids, self.encoded.token_ids):
                raise AssertionError(f"request {self.request_id}: the encoded prompt differs from its layout")
            self.encoded, self.visual = complete, None
        parts = self.encoded.chunk(start, min(end, self.num_prompt)) if start < self.num_prompt else None
        outputs = self.output_ids[max(start - self.num_prompt, 0) : max(end - self.num_prompt, 0)]
        out_ids = torch.tensor(outputs, dtype=torch.long)
        first = self.encoded.next_position + max(start - self.num_prompt, 0)  # outputs follow the prompt
        out_pos = torch.arange(first, first + len(outputs))
        if parts is None:
            return EncodedPrompt(out_ids, out_pos, None, None)
        return EncodedPrompt(
            torch.cat([parts.token_ids, out_ids]),
            torch.cat([parts.positions, out_pos]),
            parts.embeds,
            parts.embed_index,
            embed_positions=parts.embed_positions,
        )
