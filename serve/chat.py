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


def public_tokens(
    processor: Any, messages: list[dict[str, Any]], prompt: Prompt, public: frozenset[str]
) -> int:
    """How many leading tokens of ``prompt`` (built from ``messages``) a deployment declared
    public: the whole system turn when its text is one of ``public``, else 0."""
    first = messages[0] if messages else None
    if first is None or first["role"] != "system" or not public:
        return 0
    text = "".join(part.get("text", "") for part in first["content"])
    if text not in public:
        return 0
    turn = processor.apply_chat_template([first], add_generation_prompt=False)
    ids = tuple(processor.tokenizer(turn)["input_ids"])
    return len(ids) if prompt.token_ids[: len(ids)] == ids else 0


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
