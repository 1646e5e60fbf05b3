"""Chat messages -> :class:`core.prompt.Prompt`, with the checkpoint's own chat template."""

from __future__ import annotations

from typing import Any

from core.prompt import Prompt


def chat_prompt(processor: Any, user_text: str, images: list[Any], system: str | None = None) -> Prompt:
    """The template applied to [system], user [images..., text], then the generation prompt."""
    messages: list[dict[str, Any]] = []
    if system is not None:
        messages.append({"role": "system", "content": [{"type": "text", "text": system}]})
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": user_text}]
    messages.append({"role": "user", "content": content})
    return messages_prompt(processor, messages, images)


def messages_prompt(processor: Any, messages: list[dict[str, Any]], images: list[Any]) -> Prompt:
    """Transformers-style chat ``messages`` (``{"type": "image"}`` parts where ``images`` go, in
    order) through the checkpoint's template, then the generation prompt.

    The text is tokenized without expanding image placeholders: each model expands them itself.
    """
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    tokenizer = processor.tokenizer
    ids = tokenizer(text)["input_ids"]
    image_token_id = tokenizer.convert_tokens_to_ids(getattr(processor, "image_token", "<image>"))
    return Prompt(tuple(ids), tuple(img.convert("RGB") for img in images), image_token_id)
