"""Check our model layer against transformers on the same checkpoint (``covspec check-model``).

Four comparisons of logits, each against ``AutoModelForImageTextToText`` (or
``AutoModelForCausalLM``) running plain full-sequence forwards, the simplest oracle there is:

- prefill: every prompt position of an image + text chat prompt;
- decode: 8 incremental single-token steps through the paged pool;
- tree: a draft tree after the prompt, each node against the forward of its root-to-node path;
- batch: several sequences of different lengths, with and without images (of different shapes),
  in one packed forward.

KV blocks are handed out in a scrambled order so that paging is really exercised.

The oracle always runs in fp32 on the CPU. A check in bf16 / fp16 (on a GPU, say) also runs
transformers in that dtype on that device (the *peer*) against the same oracle: our low-precision
error is judged against the error transformers' own low-precision forward makes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.forward_batch import SequenceInput, pack
from core.kv import PagedKVCache
from core.tree import DraftTree
from models.loader import DTYPES, LoadedModel, load_model
from models.vision import prompt_positions, splice_images

BLOCK_SIZE = 4
TREE_PARENTS = [-1, -1, 0, 0, 1, 2, 4, 5]  # 8 nodes, 2 root branches, branching below


@dataclass(frozen=True)
class CheckReport:
    prefill_max_abs_diff: float
    decode_max_abs_diff: float
    tree_max_abs_diff: float
    batch_max_abs_diff: float
    prompt_tokens: int
    decode_steps: int
    tree_nodes: int
    batch_sequences: int
    dtype: str
    device: str = "cpu"
    # bf16 / fp16: transformers' own max |logit - fp32 oracle| in that dtype, per comparison
    peer_max_abs_diff: dict[str, float] | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def verdicts(self, tolerance: float) -> dict[str, tuple[float, float, bool]]:
        """Comparison -> (our diff, the bound it must stay within, within it). The bound is
        ``tolerance``, or twice the peer's diff when that is larger (low precision)."""
        out = {}
        for name in ("prefill", "decode", "tree", "batch"):
            ours = float(getattr(self, f"{name}_max_abs_diff"))
            bound = max(tolerance, 2 * (self.peer_max_abs_diff or {}).get(name, 0.0))
            out[name] = (ours, bound, ours <= bound)
        return out


class ScrambledBlocks:
    """Hands out pool blocks in a scrambled order (a stand-in for kvcache.BlockPool)."""

    def __init__(self, num_blocks: int, seed: int) -> None:
        self.free = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed)).tolist()

    def table(self, num_tokens: int) -> tuple[int, ...]:
        return tuple(self.free.pop() for _ in range((num_tokens + BLOCK_SIZE - 1) // BLOCK_SIZE))


# image (height, width) for the prefill prompt and the batch's image prompts: different shapes
# tile differently (LLaVA-NeXT) and give different grids (Qwen2-VL)
IMAGE_SIZES = [(48, 40), (30, 64), (64, 30), (36, 36)]


@dataclass(frozen=True)
class _Prompt:
    input_ids: torch.Tensor  # [n] with each image's placeholders expanded by the processor
    images: dict[str, Any]  # the processor's image outputs (pixel_values, image_grid_thw, ...)
    next_position: int  # position of the first token after the prompt (M-RoPE: < n)


@dataclass
class _Run:
    """State of one check: a prompt prefilled into a pool, then decoded token by token."""

    prompt: _Prompt
    block_table: tuple[int, ...]
    kv: PagedKVCache
    tokens: list[int]  # decoded so far (transformers' greedy choices)
    next_token: int


class ModelChecker:
    def __init__(self, model: LoadedModel, reference: Any, seed: int, peer: Any = None) -> None:
        self.model, self.reference, self.seed = model, reference, seed
        self.peer = peer  # transformers in our dtype and on our device, or None
        self.peer_diffs: dict[str, float] = {}
        self.phase = "prefill"
        self.processor = model.processor()

    def prompt(self, text: str, image_size: tuple[int, int] | None, seed: int) -> _Prompt:
        from PIL import Image

        if self.model.vision is None:
            ids = self.processor.apply_chat_template(
                [{"role": "user", "content": text}], add_generation_prompt=True, return_dict=True
            )["input_ids"]
            return _Prompt(torch.tensor(ids), {}, len(ids))
        content: list[dict[str, str]] = [{"type": "text", "text": text}]
        images = None
        if image_size is not None:
            pixels = np.random.default_rng(seed).integers(0, 256, (*image_size, 3), dtype=np.uint8)
            images = [Image.fromarray(pixels)]
            content.insert(0, {"type": "image"})
        messages = [
            {"role": "system", "content": [{"type": "text", "text": "you are a helpful assistant ."}]},
            {"role": "user", "content": content},
        ]
        chat = self.processor.apply_chat_template(messages, add_generation_prompt=True)
        enc = self.processor(images=images, text=chat, return_tensors="pt")
        ids = enc["input_ids"][0]
        extras = {k: v for k, v in enc.items() if k not in ("input_ids", "attention_mask")}
        if images is None:
            return _Prompt(ids, extras, len(ids))
        positions, grid = self._positions(ids, extras)
        after = max(int(positions.max()), -1 if grid is None else int(grid.max())) + 1
        return _Prompt(ids, extras, after)

    def _positions(
        self, ids: torch.Tensor, images: dict[str, Any]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        assert self.model.vision is not None and self.model.image_token_id is not None
        return prompt_positions(ids, self.model.image_token_id, self.model.vision.layouts(images))

    def reference_logits(self, prompt: _Prompt, extra: list[int]) -> torch.Tensor:
        """Transformers' logits ``[n + len(extra), vocab]`` for the prompt followed by ``extra``."""
        tail = torch.tensor(extra, dtype=torch.long)
        ids = torch.cat([prompt.input_ids, tail])[None]
        kwargs = dict(prompt.images)
        if "mm_token_type_ids" in kwargs:  # the appended tokens are text
            kwargs["mm_token_type_ids"] = torch.cat([kwargs["mm_token_type_ids"][0], torch.zeros_like(tail)])[
                None
            ]
        if "pixel_values" not in kwargs:
            kwargs = {}
        with torch.inference_mode():
            ref = self.reference(input_ids=ids, **kwargs).logits[0].float()
            if self.peer is not None:
                device, dtype = self.peer.device, self.peer.dtype
                moved = {
                    k: v.to(device, dtype) if v.is_floating_point() else v.to(device)
                    for k, v in kwargs.items()
                }
                peer = self.peer(input_ids=ids.to(device), **moved).logits[0].float().cpu()
                self.peer_diffs[self.phase] = max(
                    self.peer_diffs.get(self.phase, 0.0), float((peer - ref).abs().max())
                )
        return ref

    def sequence(self, prompt: _Prompt, blocks: ScrambledBlocks, capacity: int) -> SequenceInput:
        ids = prompt.input_ids
        table = blocks.table(capacity)
        if "pixel_values" not in prompt.images:
            return SequenceInput(ids, torch.arange(len(ids)), table, 0)
        assert self.model.vision is not None and self.model.image_token_id is not None
        images = self.model.vision(prompt.images)
        spliced = splice_images(
            ids, self.model.image_token_id, images, self.model.vision.layouts(prompt.images)
        )
        return SequenceInput(
            spliced.token_ids,
            spliced.positions,
            table,
            0,
            embeds=spliced.embeds,
            embed_index=spliced.embed_index,
            embed_positions=spliced.embed_positions,
        )

    def start(self, extra_capacity: int = 32) -> tuple[_Run, float]:
        """Prefill an image + text prompt into a fresh pool; return the run and its max diff."""
        decoder = self.model.decoder
        kv = PagedKVCache(decoder.kv_layout(num_blocks=256, block_size=BLOCK_SIZE))
        prompt = self.prompt("what color is the star ?", IMAGE_SIZES[0], seed=self.seed)
        seq = self.sequence(prompt, ScrambledBlocks(256, self.seed), len(prompt.input_ids) + extra_capacity)
        ours = decoder.logits(decoder(pack([seq], BLOCK_SIZE), kv))
        ref = self.reference_logits(prompt, [])
        run = _Run(prompt, seq.block_table, kv, [], int(ref[-1].argmax()))
        return run, float((ours - ref).abs().max())

    def decode(self, run: _Run, steps: int) -> float:
        """Feed transformers' greedy tokens one at a time through the pool; max diff."""
        decoder, diff = self.model.decoder, 0.0
        for _ in range(steps):
            run.tokens.append(run.next_token)
            cached = len(run.prompt.input_ids) + len(run.tokens) - 1
            pos = run.prompt.next_position + len(run.tokens) - 1
            step = SequenceInput(torch.tensor([run.next_token]), torch.tensor([pos]), run.block_table, cached)
            ours = decoder.logits(decoder(pack([step], BLOCK_SIZE), run.kv))[0]
            ref = self.reference_logits(run.prompt, run.tokens)[-1]
            diff = max(diff, float((ours - ref).abs().max()))
            run.next_token = int(ref.argmax())
        return diff

    def run(self, decode_steps: int = 8) -> CheckReport:
        self.phase = "prefill"
        run, prefill_diff = self.start(extra_capacity=decode_steps + len(TREE_PARENTS))
        self.phase = "decode"
        decode_diff = self.decode(run, decode_steps)
        self.phase = "tree"
        tree_diff = self.tree_diff(run)
        self.phase = "batch"
        batch_diff, batch_size = self.batch_diff()
        weight = self.model.decoder.embed_tokens.weight
        return CheckReport(
            prefill_max_abs_diff=prefill_diff,
            decode_max_abs_diff=decode_diff,
            tree_max_abs_diff=tree_diff,
            batch_max_abs_diff=batch_diff,
            prompt_tokens=len(run.prompt.input_ids),
            decode_steps=decode_steps,
            tree_nodes=len(TREE_PARENTS),
            batch_sequences=batch_size,
            dtype=str(weight.dtype).removeprefix("torch."),
            device=str(weight.device),
            peer_max_abs_diff=dict(self.peer_diffs) if self.peer is not None else None,
        )

    def tree_diff(self, run: _Run) -> float:
        """A draft tree after the run's tokens; each node vs the forward of its path."""
        gen = torch.Generator().manual_seed(self.seed + 1)
        vocab = self.model.decoder.cfg.vocab_size
        tree = DraftTree(
            torch.randint(0, vocab, (len(TREE_PARENTS),), generator=gen), torch.tensor(TREE_PARENTS)
        )
        cached = len(run.prompt.input_ids) + len(run.tokens)
        item = SequenceInput(
            tree.token_ids,
            run.prompt.next_position + len(run.tokens) - 1 + tree.depths(),
            run.block_table,
            cached,
            attention_mask=tree.ancestor_mask(),
        )
        decoder = self.model.decoder
        ours = decoder.logits(decoder(pack([item], BLOCK_SIZE), run.kv))
        diff = 0.0
        for node in range(tree.num_nodes):
            path = [int(tree.token_ids[i]) for i in tree.path_to(node)]
            ref = self.reference_logits(run.prompt, run.tokens + path)[-1]
            diff = max(diff, float((ours[node] - ref).abs().max()))
        return diff

    def batch_diff(self) -> tuple[float, int]:
        """Sequences of different lengths (with and without images) in one packed forward."""
        decoder = self.model.decoder
        kv = PagedKVCache(decoder.kv_layout(num_blocks=256, block_size=BLOCK_SIZE))
        blocks = ScrambledBlocks(256, self.seed + 2)
        specs = [
            ("is there a red square ?", IMAGE_SIZES[1]),
            ("count", None),
            ("describe the scene in detail .", IMAGE_SIZES[2]),
            ("where is the blue circle ? answer briefly .", None),
            ("what is this ?", IMAGE_SIZES[3]),
        ]
        prompts = [self.prompt(text, size, self.seed + i) for i, (text, size) in enumerate(specs)]
        seqs = [self.sequence(p, blocks, len(p.input_ids)) for p in prompts]
        hidden = decoder(pack(seqs, BLOCK_SIZE), kv)
        ours = decoder.logits(hidden)
        diff, start = 0.0, 0
        for p, s in zip(prompts, seqs, strict=True):
            ref = self.reference_logits(p, [])
            diff = max(diff, float((ours[start : start + s.num_new] - ref).abs().max()))
            start += s.num_new
        return diff, len(seqs)


def load_reference(
    path: Path, architecture: str, dtype: torch.dtype = torch.float32, device: str = "cpu"
) -> Any:
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    auto = AutoModelForCausalLM if architecture.endswith("ForCausalLM") else AutoModelForImageTextToText
    return auto.from_pretrained(path, local_files_only=True, dtype=dtype).to(device).eval()


def check_model(
    path: str | Path,
    seed: int = 0,
    decode_steps: int = 8,
    dtype: str = "fp32",
    device: str = "cpu",
    attention_backend: str = "sdpa",
) -> CheckReport:
    """Compare our logits (in ``dtype`` on ``device``) with transformers' fp32 ones on the CPU
    for the checkpoint at ``path``; below fp32, transformers in ``dtype`` on ``device`` too."""
    model = load_model(path, dtype=dtype, attention_backend=attention_backend, device=device)
    reference = load_reference(Path(path), model.architecture)
    peer = None if dtype == "fp32" else load_reference(Path(path), model.architecture, DTYPES[dtype], device)
    return ModelChecker(model, reference, seed, peer).run(decode_steps)
