"""Turn a :class:`core.prompt.Prompt` into what one model feeds its decoder.

Each image placeholder becomes the model's own number of visual tokens; the image goes through
the model's image processor and vision tower once and is then remembered by content digest (a
bounded LRU), so the same image in many requests or after a preemption is encoded once.
An optional ``select`` keeps a subset of an image's visual tokens at their original positions
(the drafter's compression).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch

from core.prompt import EncodedPrompt, Prompt
from models.loader import LoadedModel
from models.vision import VisualTokens, splice_images

TokenSelect = Callable[[VisualTokens], VisualTokens]


class PromptEncoder:
    def __init__(
        self, model: LoadedModel, image_processor: Any | None = None, cache_images: int = 64
    ) -> None:
        self.model = model
        self._image_processor = image_processor
        self._cache: OrderedDict[str, VisualTokens] = OrderedDict()
        self.cache_images = cache_images

    def layout(self, prompt: Prompt) -> EncodedPrompt:
        """The prompt's rows without running the vision tower: placeholders expanded, image rows
        known, no embeddings yet (``encode`` gives them). Enough to hash and schedule it."""
        ids = torch.tensor(prompt.token_ids, dtype=torch.long)
        if not prompt.images:
            return EncodedPrompt(ids, torch.arange(len(ids)), None, None)
        if self.model.vision is None or self.model.image_token_id is None:
            raise ValueError(f"{self.model.path} is a text-only model; it cannot take images")
        counts = [self.model.vision.tokens_per_image] * len(prompt.images)
        expanded = self._expand(ids, prompt.image_token_id, counts)
        firsts = torch.nonzero(ids == prompt.image_token_id).flatten().tolist()
        starts = [first + i * (counts[0] - 1) for i, first in enumerate(firsts)]
        rows = tuple(zip(starts, counts, strict=True))
        return EncodedPrompt(expanded, torch.arange(len(expanded)), None, None, image_rows=rows)

    def encode(self, prompt: Prompt, select: TokenSelect | None = None) -> EncodedPrompt:
        ids = torch.tensor(prompt.token_ids, dtype=torch.long)
        if not prompt.images:
            return EncodedPrompt(ids, torch.arange(len(ids)), None, None)
        if self.model.vision is None or self.model.image_token_id is None:
            raise ValueError(f"{self.model.path} is a text-only model; it cannot take images")
        pairs = zip(prompt.images, prompt.digests, strict=True)
        full = [self._visual(img, digest) for img, digest in pairs]
        expanded = self._expand(ids, prompt.image_token_id, [v.num_total for v in full])
        images = full if select is None else [select(v) for v in full]
        spliced = splice_images(expanded, self.model.image_token_id, images)
        counts = [int(v.index.shape[0]) for v in images]  # rows each image occupies here
        firsts = torch.nonzero(ids == prompt.image_token_id).flatten().tolist()
        starts = [first + sum(c - 1 for c in counts[:i]) for i, first in enumerate(firsts)]
        return EncodedPrompt(
            spliced.token_ids, spliced.positions, spliced.embeds, spliced.embed_index,
            image_rows=tuple(zip(starts, counts, strict=True)),
        )  # fmt: skip

    def _expand(self, ids: torch.Tensor, placeholder: int, counts: list[int]) -> torch.Tensor:
        """Placeholder ``i`` -> ``counts[i]`` copies of this model's own image token id."""
        assert self.model.image_token_id is not None
        is_image = ids == placeholder
        repeats = torch.ones_like(ids)
        repeats[is_image] = torch.tensor(counts, dtype=torch.long)
        expanded = torch.repeat_interleave(ids, repeats)
        expanded[torch.repeat_interleave(is_image, repeats)] = self.model.image_token_id
        return expanded

    def _visual(self, image: Any, digest: str) -> VisualTokens:
        hit = self._cache.get(digest)
        if hit is not None:
            self._cache.move_to_end(digest)
            return hit
        assert self.model.vision is not None
        pixels = self.image_processor(images=[image], return_tensors="pt")["pixel_values"]
        visual = self.model.vision(pixels)[0]
        self._cache[digest] = visual
        while len(self._cache) > self.cache_images:
            self._cache.popitem(last=False)
        return visual

    @property
    def image_processor(self) -> Any:
        if self._image_processor is None:
            self._image_processor = self.model.processor().image_processor
        return self._image_processor
