"""The chat completions request as validated by pydantic, and the response and chunk shapes.

Fields follow OpenAI's API. Parameters we do not implement are either accepted at their neutral
value (``frequency_penalty: 0``, ``logprobs: false``) or refused with a 400 that names them;
unknown fields are refused, so a typo never silently changes nothing.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator


def _unicode(text: str) -> str:
    """JSON can carry lone surrogates (``"\\ud800"``), which are no text: tokenizers and UTF-8
    encoders fail on them, so they are refused here."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(
            f"text holds a lone surrogate (\\u{ord(text[e.start]):04x}), which is not valid Unicode"
        ) from e
    return text


Text = Annotated[str, AfterValidator(_unicode)]  # every string field of a request


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextPart(Strict):
    type: Literal["text"]
    text: Text


class ImageURL(Strict):
    url: Text
    detail: Literal["auto", "low", "high"] | None = None  # accepted, ignored (as vLLM does)


class ImagePart(Strict):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class Message(Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: Text | list[ContentPart]
    name: Text | None = None


class StreamOptions(Strict):
    include_usage: bool = False


class ChatCompletionRequest(Strict):
    model: Text | None = None
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    top_k: int = Field(default=0, ge=0)  # extension (vLLM's too)
    seed: int | None = None
    stop: Text | list[Text] | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: Text | None = None  # accepted, not used
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logprobs: bool = False

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError("only n = 1 is supported; send several requests for several answers")
        return n

    @field_validator("frequency_penalty", "presence_penalty")
    @classmethod
    def _no_penalty(cls, value: float) -> float:
        if value != 0:
            raise ValueError("penalties are not supported (they would change the target's output)")
        return value

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, value: bool) -> bool:
        if value:
            raise ValueError("logprobs are not supported yet")
        return value

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else value or []
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes up to 4 non-empty strings")
        return value

    @property
    def stop_strings(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    @property
    def new_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def completion_body(
    request_id: str,
    model: str,
    text: str,
    finish_reason: str,
    usage_: dict[str, Any],
    covspec: dict[str, Any],
) -> dict[str, Any]:
    return {
        "id": request_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": finish_reason,
            }
        ],
        "usage": usage_,
        "covspec": covspec,
    }


def chunk_body(
    request_id: str,
    model: str,
    delta: dict[str, Any] | None,
    finish_reason: str | None = None,
    usage_: dict[str, Any] | None = None,
    covspec: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One ``chat.completion.chunk``; ``delta=None`` makes the usage-only chunk (no choices)."""
    body: dict[str, Any] = {
        "id": request_id,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": []
        if delta is None
        else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
        "usage": usage_,
    }
    if covspec is not None:
        body["covspec"] = covspec
    return body
