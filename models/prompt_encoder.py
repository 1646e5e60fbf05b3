"""Turn a :class:`core.prompt.Prompt` into what one model feeds its decoder.

Each image placeholder becomes the model's own number of visual tokens for that image (fixed for
LLaVA-1.5, per image size for LLaVA-NeXT's tiles and Qwen2-VL's dynamic resolution); the image
goes through the model's image processor and vision tower once and is then remembered by content
digest (a bounded LRU), so the same image in many requests or after a preemption is encoded once.
Positions come from the images' layouts (``models.vision.prompt_positions``), M-RoPE included.
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
from models.vision import ImageLayout, VisualTokens, prompt_positions, splice_images

TokenSelect = Callable[[VisualTokens], VisualTokens]


class PromptEncoder:
    def __init__(
        self, model: LoadedModel, image_processor: Any | None = None, cache_images: int = 64
    ) -> None:
        self.model = model
        self._image_processor = image_processor
        self._cache: OrderedDict[str, VisualTokens] = OrderedDict()
        self._layouts: OrderedDict[str, ImageLayout] = OrderedDict()
        self._inputs: OrderedDict[str, Any] = OrderedDict()  # processed, not yet encoded (layout ran)
        self.cache_images = cache_images

    def layout(self, prompt: Prompt) -> EncodedPrompt:
        """The prompt's rows and positions without running the vision tower: placeholders
        expanded, image rows known, no embeddings yet (``encode`` gives them). Enough to hash and
        schedule it."""
        ids = torch.tensor(prompt.token_ids, dtype=torch.long)
        if not prompt.images:
            return EncodedPrompt(ids, torch.arange(len(ids)), None, None)
        self._check_vision()
        layouts = [
            self._layout(img, digest) for img, digest in zip(prompt.images, prompt.digests, strict=True)
        ]
        counts = [lay.num_tokens for lay in layouts]
        expanded = self._expand(ids, prompt.image_token_id, counts)
        assert self.model.image_token_id is not None
        positions, grid = prompt_positions(expanded, self.model.image_token_id, layouts)
        rows = self._image_rows(ids, prompt.image_token_id, counts)
        return EncodedPrompt(expanded, positions, None, None, image_rows=rows, embed_positions=grid)

    def encode(self, prompt: Prompt, select: TokenSelect | None = None) -> EncodedPrompt:
        ids = torch.tensor(prompt.token_ids, dtype=torch.long)
        if not prompt.images:
            return EncodedPrompt(ids, torch.arange(len(ids)), None, None)
        self._check_vision()
        pairs = list(zip(prompt.images, prompt.digests, strict=True))
        layouts = [self._layout(img, digest) for img, digest in pairs]  # first: it keeps the processed
        full = [self._visual(img, digest) for img, digest in pairs]  # image for the tower to take
        expanded = self._expand(ids, prompt.image_token_id, [v.num_total for v in full])
        images = full if select is None else [select(v) for v in full]
        assert self.model.image_token_id is not None
        spliced = splice_images(expanded, self.model.image_token_id, images, layouts)
        counts = [int(v.index.shape[0]) for v in images]  # rows each image occupies here
        return EncodedPrompt(
            spliced.token_ids, spliced.positions, spliced.embeds, spliced.embed_index,
            image_rows=self._image_rows(ids, prompt.image_token_id, counts),
            embed_positions=spliced.embed_positions,
        )  # fmt: skip

    def _check_vision(self) -> None:
        if self.model.vision is None or self.model.image_token_id is None:
            raise ValueError(f"{self.model.path} is a text-only model; it cannot take images")

    @staticmethod
    def _image_rows(ids: torch.Tensor, placeholder: int, counts: list[int]) -> tuple[tuple[int, int], ...]:
        """(first row, rows) of each image once placeholder ``i`` became ``counts[i]`` rows."""
        firsts = torch.nonzero(ids == placeholder).flatten().tolist()
        starts = [first + sum(c - 1 for c in counts[:i]) for i, first in enumerate(firsts)]
        return tuple(zip(starts, counts, strict=True))

    def _expand(self, ids: torch.Tensor, placeholder: int, counts: list[int]) -> torch.Tensor:
        """Placeholder ``i`` -> ``counts[i]`` copies of this model's own image token id."""
        assert self.model.image_token_id is not None
        is_image = ids == placeholder
        repeats = torch.ones_like(ids)
        repeats[is_image] = torch.tensor(counts, dtype=torch.long)
        expanded = torch.repeat_interleave(ids, repeats)
        expanded[torch.repeat_interleave(is_image, repeats)] = self.model.image_token_id
        return expanded

    def _processed(self, image: Any, digest: str) -> Any:
        """The image processor's output for ``image``, kept from ``_layout`` until encoded."""
        inputs = self._inputs.pop(digest, None)
        return self.image_processor(images=[image], return_tensors="pt") if inputs is None else inputs

    def _layout(self, image: Any, digest: str) -> ImageLayout:
        hit = self._layouts.get(digest)
        if hit is not None:
            self._layouts.move_to_end(digest)
            return hit
        assert self.model.vision is not None
        inputs = self._processed(image, digest)
        layout = self.model.vision.layouts(inputs)[0]
        if digest not in self._cache:  # encode() will want these soon: keep a few
            self._inputs[digest] = inputs
            while len(self._inputs) > 8:
                self._inputs.popitem(last=False)
        _remember(self._layouts, digest, layout, self.cache_images * 16)
        return layout

    def _visual(self, image: Any, digest: str) -> VisualTokens:
        hit = self._cache.get(digest)
        if hit is not None:
            self._cache.move_to_end(digest)
            return hit
        assert self.model.vision is not None
        visual = self.model.vision(self._processed(image, digest))[0]
        _remember(self._cache, digest, visual, self.cache_images)
        return visual

    @property
    def image_processor(self) -> Any:
        if self._image_processor is None:
            self._image_processor = self.model.processor().image_processor
        return self._image_processor


def _remember(cache: OrderedDict[str, Any], key: str, value: Any, size: int) -> None:
    cache[key] = value
    while len(cache) > size:
        cache.popitem(last=False)
