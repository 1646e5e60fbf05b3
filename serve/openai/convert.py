"""A validated chat request -> the engine's prompt and sampling parameters."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from core.prompt import Prompt
from core.sampling import SamplingParams
from serve.chat import messages_prompt, public_tokens
from serve.openai.errors import bad_request
from serve.openai.images import ImageLimits, load_image
from serve.openai.protocol import ChatCompletionRequest, ImagePart

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


@dataclass(frozen=True)
class EngineRequest:
    prompt: Prompt
    sampling: SamplingParams


async def template_messages(
    req: ChatCompletionRequest, limits: ImageLimits
) -> tuple[list[dict[str, Any]], list[Any]]:
    """OpenAI messages -> transformers messages with image placeholders, and the decoded images."""
    messages: list[dict[str, Any]] = []
    images: list[Any] = []
    for i, message in enumerate(req.messages):
        if isinstance(message.content, str):
            parts: list[dict[str, Any]] = [{"type": "text", "text": message.content}]
        else:
            parts = []
            for j, part in enumerate(message.content):
                if isinstance(part, ImagePart):
                    if message.role != "user":
                        raise bad_request("images are accepted in user messages only", f"messages[{i}]")
                    if len(images) == limits.max_images:
                        raise bad_request(f"more than {limits.max_images} images in one request", "messages")
                    images.append(await load_image(part.image_url.url, limits, f"messages[{i}].content[{j}]"))
                    parts.append({"type": "image"})
                else:
                    parts.append({"type": "text", "text": part.text})
        messages.append({"role": ROLES[message.role], "content": parts})
    if messages[-1]["role"] != "user":
        raise bad_request("the last message must be the user's", "messages")
    return messages, images


async def engine_request(
    req: ChatCompletionRequest,
    processor: Any,
    limits: ImageLimits,
    default_max_tokens: int,
    tenant: str,
    public_systems: frozenset[str] = frozenset(),
) -> EngineRequest:
    """``APIError`` 400 for anything the caller got wrong; the engine checks the context length.
    The prompt's KV lives in the authenticated ``tenant``'s namespace, except a system turn
    whose text is one of ``public_systems``."""
    messages, images = await template_messages(req, limits)
    try:
        prompt = messages_prompt(processor, messages, images)
        shared = public_tokens(processor, messages, prompt, public_systems)
        prompt = dataclasses.replace(prompt, tenant=tenant, public_tokens=shared)
        sampling = SamplingParams(
            max_tokens=req.new_tokens or default_max_tokens,
            temperature=req.temperature,
            top_p=req.top_p,
            top_k=req.top_k,
            seed=req.seed,
            stop=req.stop_strings,
        )
    except ValueError as e:
        raise bad_request(str(e)) from e
    return EngineRequest(prompt, sampling)
