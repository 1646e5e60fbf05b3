"""The HTTP front door: OpenAI-compatible chat completions over an engine, with keys and limits.

:class:`Gateway` holds the logic of every route and talks to the engine only through an
:class:`EngineClient` (an in-process ``AsyncEngine``, or the Engine deployment's handle under Ray
Serve), so the same code serves both. Every client mistake is answered in OpenAI's error shape
with a 4xx. Admission (:class:`serve.tenant_slots.TenantSlots`): at most ``max_in_flight``
requests run (503 with ``Retry-After`` otherwise, safe to retry: nothing started), and one tenant
holds at most its share of them (``tenant_share``): its requests beyond that wait up to
``tenant_wait_s`` for one of its own to finish (then 429 with ``Retry-After``), so a tenant
flooding the server takes neither the room of the others nor, by bouncing, the cores. A
streaming client that disconnects cancels its request, which aborts it in the engine and frees
its KV and drafter state.
"""

from __future__ import annotations

import json
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError

from core.plan import RequestOutput
from core.prompt import Prompt
from core.sampling import SamplingParams
from scheduler.engine import Completion
from serve.auth import Caller, KeyStore
from serve.openai.convert import engine_request
from serve.openai.errors import APIError, bad_request
from serve.openai.images import ImageLimits
from serve.openai.protocol import ChatCompletionRequest, chunk_body, completion_body, usage
from serve.tenant_slots import NoSlot, TenantSlots


class EngineClient(Protocol):
    def stream(
        self,
        prompt: Prompt,
        sampling: SamplingParams,
        adapter: str | None,
        whole: bool = False,
        learn: bool = False,
    ) -> AsyncIterator[RequestOutput | Completion]:
        """Each step's output for the request, then its ``Completion`` (``learn``: ``adapter``
        is learned online from this user's requests, and this one may be kept; ``whole``: the
        ``Completion`` only, for a caller who waits for the whole answer anyway: one message
        from the engine's process instead of one per step); raises ``ValueError`` for
        a request the engine refuses (e.g. longer than the context) and ``RuntimeError`` when the
        engine is gone (its step loop died, or its process); closing it aborts the request."""
        ...

    async def alive(self) -> bool:
        """False once the engine's step loop has died."""
        ...


@dataclass(frozen=True)
class GatewayConfig:
    model_name: str = "tiny-target"
    adapters: frozenset[str] = frozenset()  # drafter adapters the engine has loaded
    image_limits: ImageLimits = field(default_factory=ImageLimits)
    default_max_tokens: int = 256
    max_body_bytes: int = 16 * 1024 * 1024
    max_in_flight: int = 64
    # the fraction of ``max_in_flight`` one tenant may hold (at least one request)
    tenant_share: float = 0.5
    # how long a request over its tenant's share waits for one of the tenant's requests to finish
    # (0: refused at once)
    tenant_wait_s: float = 0.0
    retry_after_s: int = 1
    public_system_prompts: frozenset[str] = frozenset()  # system turns whose KV all tenants share
    learning: bool = False  # online learning is on: keys with learn: true get adapters learned for them


def covspec_stats(completion: Completion) -> dict[str, Any]:
    s = completion.stats
    return {
        "tau": round(s.tau, 4),
        "verify_steps": s.verify_steps,
        "draft_tokens": s.draft_tokens,
        "accepted_tokens": s.accepted_tokens,
        "link_bytes_up": s.link_bytes_up,  # to the drafter pool and back, serialized (0: in-engine)
        "link_bytes_down": s.link_bytes_down,
        "adapter": s.adapter,  # the drafter adapter that drafted it, and its learned version if any
        "adapter_version": s.adapter_version,
        "ttft_s": round(completion.ttft_s, 4),
    }


def sse(body: dict[str, Any] | str) -> str:
    return f"data: {body if isinstance(body, str) else json.dumps(body)}\n\n"


# told the HTTP status of every chat response and the caller's tenant (None before auth)
ResponseRecorder = Callable[[int, str | None], None]


class Gateway:
    def __init__(
        self,
        engine: EngineClient,
        processor: Any,
        keys: KeyStore,
        config: GatewayConfig,
        record: ResponseRecorder = lambda status, tenant: None,
    ) -> None:
        self.engine, self.processor, self.keys, self.config = engine, processor, keys, config
        self.record = record
        share = max(int(config.tenant_share * config.max_in_flight), 1)
        self.slots = TenantSlots(config.max_in_flight, share, config.tenant_wait_s, config.retry_after_s)

    @property
    def in_flight(self) -> int:
        """Requests admitted and not finished, every tenant's."""
        return self.slots.total()

    @property
    def tenant_in_flight(self) -> Counter[str]:
        """Tenants with requests admitted and not finished, and how many."""
        return self.slots.in_flight

    # -- routes ---------------------------------------------------------------------------

    async def chat(self, request: Request) -> Response:
        response, tenant = await self._chat(request)
        self.record(response.status_code, tenant)
        return response

    async def _chat(self, request: Request) -> tuple[Response, str | None]:
        """The response, and the caller's tenant once known. The request holds an admission slot
        from before its body is read (load is shed before any image is decoded) until its answer
        is sent; a stream takes its slot along and gives it back when it ends."""
        caller = None
        try:
            caller = self.keys.authenticate(request.headers.get("authorization"))
            await self._admit(caller.tenant)
        except APIError as e:
            return error_response(e), None if caller is None else caller.tenant
        tenant, streaming = caller.tenant, False
        try:
            req = parse_request(await self._body(request))
            adapter = self._adapter(caller, req.model)
            cfg = self.config
            work = await engine_request(
                req,
                self.processor,
                cfg.image_limits,
                cfg.default_max_tokens,
                tenant,
                cfg.public_system_prompts,
            )
            learn = self.config.learning and caller.learn
            outputs = self.engine.stream(
                work.prompt, work.sampling, adapter, whole=not req.stream, learn=learn
            )
            first = await self._start(outputs)
            request_id = f"chatcmpl-{uuid.uuid4().hex}"
            model = req.model or self.config.model_name
            if req.stream:
                include_usage = bool(req.stream_options and req.stream_options.include_usage)
                events = self._events(first, outputs, request_id, model, include_usage, tenant)
                streaming = True
                return StreamingResponse(events, media_type="text/event-stream"), tenant
            completion = await self._finish(first, outputs)
        except APIError as e:
            return error_response(e), tenant
        finally:
            if not streaming:
                self.slots.release(tenant)
        stats = completion.stats
        body = completion_body(
            request_id, model, completion.text, completion.finish_reason,
            usage(stats.prompt_tokens, stats.output_tokens, stats.cached_tokens),
            covspec_stats(completion),
        )  # fmt: skip
        return JSONResponse(body), tenant

    async def models(self, request: Request) -> Response:
        try:
            caller = self.keys.authenticate(request.headers.get("authorization"))
        except APIError as e:
            return error_response(e)
        base = {"id": self.config.model_name, "object": "model", "created": 0, "owned_by": "covspec"}
        data, own = [base], self._own_adapter(caller)
        if own is not None:
            data.append({**base, "id": own, "parent": self.config.model_name, "root": self.config.model_name})
        return JSONResponse({"object": "list", "data": data})

    async def health(self) -> Response:
        if self.slots.closed is not None:  # draining: the server is stopping
            stopping = APIError(503, "the server is stopping", retry_after_s=self.config.retry_after_s)
            return error_response(stopping)
        if await self.engine.alive():
            return Response(status_code=200)
        return error_response(APIError(503, "the engine loop is not running"))

    def drain(self) -> int:
        """Admit nothing new from now on (503 with ``Retry-After``: another replica, or this one
        restarted, may take it), requests waiting for a slot included; the requests still
        running, which finish as usual."""
        self.slots.close("the server is stopping; retry shortly")
        return self.in_flight

    # -- pieces ---------------------------------------------------------------------------

    async def _admit(self, tenant: str) -> None:
        """A slot for the caller's request (waiting for one of its tenant's, if over its share)."""
        try:
            await self.slots.acquire(tenant)
        except NoSlot as e:
            raise APIError(
                e.status, e.message, retry_after_s=e.retry_after_s or self.config.retry_after_s
            ) from e

    async def _body(self, request: Request) -> bytes:
        """The body, refused (413) as soon as it is known to exceed the limit."""
        limit = self.config.max_body_bytes
        too_large = APIError(413, f"request body is larger than {limit} bytes")
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise too_large
        body = bytearray()
        async for part in request.stream():
            body += part
            if len(body) > limit:
                raise too_large
        return bytes(body)

    def _own_adapter(self, caller: Caller) -> str | None:
        """The caller's drafter adapter: the one learned for them while online learning is on,
        else their own if the engine has it loaded."""
        if self.config.learning and caller.learn:
            return caller.learned_adapter
        return caller.adapter if caller.adapter in self.config.adapters else None

    def _adapter(self, caller: Caller, model: str | None) -> str | None:
        """The drafter adapter for this request: the caller's own. ``model`` may name the base
        model or the caller's adapter; another user's adapter is refused (404: no existence oracle)."""
        own = self._own_adapter(caller)
        if model is None or model == self.config.model_name or (own is not None and model == own):
            return own
        raise APIError(404, f"model {model!r} does not exist or is not yours", "model")

    async def _start(self, outputs: AsyncIterator[RequestOutput | Completion]) -> RequestOutput | Completion:
        """The request's first output: a refused request fails here, before any byte is sent.
        Whatever ends the wait instead (a refusal, a dead engine, the caller's cancellation)
        closes its stream, which aborts it in the engine."""
        started = False
        try:
            first = await anext(outputs)
            started = True
            return first
        except ValueError as e:
            raise bad_request(str(e)) from e
        except RuntimeError as e:  # the engine loop is gone: not the caller's fault, retry elsewhere
            raise APIError(
                503, f"the engine is not running: {e}", retry_after_s=self.config.retry_after_s
            ) from e
        finally:
            if not started:
                await _close(outputs)

    async def _finish(
        self, first: RequestOutput | Completion, rest: AsyncIterator[RequestOutput | Completion]
    ) -> Completion:
        try:
            item = first
            while not isinstance(item, Completion):
                item = await anext(rest)
            return item
        except RuntimeError as e:  # the engine died with the request half done: retry it
            raise APIError(503, f"the engine stopped: {e}", retry_after_s=self.config.retry_after_s) from e
        finally:
            await _close(rest)

    async def _events(
        self,
        first: RequestOutput | Completion,
        rest: AsyncIterator[RequestOutput | Completion],
        request_id: str,
        model: str,
        include_usage: bool,
        tenant: str,
    ) -> AsyncIterator[str]:
        try:
            yield sse(chunk_body(request_id, model, {"role": "assistant", "content": ""}))
            item = first
            while True:
                if isinstance(item, Completion):
                    stats = item.stats
                    covspec = covspec_stats(item)
                    yield sse(chunk_body(request_id, model, {}, item.finish_reason, covspec=covspec))
                    if include_usage:
                        yield sse(
                            chunk_body(
                                request_id,
                                model,
                                None,
                                usage_=usage(stats.prompt_tokens, stats.output_tokens, stats.cached_tokens),
                            )
                        )
                    yield sse("[DONE]")
                    return
                if item.text:
                    yield sse(chunk_body(request_id, model, {"content": item.text}))
                item = await anext(rest)
        except RuntimeError as e:  # the engine died mid-stream: the status line is sent, so say it in-band
            yield sse(APIError(503, f"the engine stopped: {e}").body())
            yield sse("[DONE]")
        finally:  # also on disconnect: closing the engine stream aborts the request
            self.slots.release(tenant)
            await _close(rest)


async def _close(stream: AsyncIterator[Any]) -> None:
    close = getattr(stream, "aclose", None)
    if close is not None:
        await close()


def parse_request(body: bytes) -> ChatCompletionRequest:
    try:
        payload = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise bad_request(f"request body is not valid JSON: {e}") from e
    except RecursionError as e:
        raise bad_request("request body nests arrays or objects too deeply") from e
    try:
        return ChatCompletionRequest.model_validate(payload)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise bad_request(f"{where}: {first['msg']}" if where else first["msg"], where or None) from e


def error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers())


# (path, HTTP methods, the Gateway method serving it); the Ray Serve ingress mirrors this table
ROUTES: tuple[tuple[str, list[str], Callable[[Gateway], Callable[..., Any]]], ...] = (
    ("/v1/chat/completions", ["POST"], lambda g: g.chat),
    ("/v1/models", ["GET"], lambda g: g.models),
    ("/health", ["GET"], lambda g: g.health),
)


def make_app(gateway: Gateway) -> FastAPI:
    """A FastAPI app serving ``gateway`` in this process, for any ASGI server (the tests use uvicorn);
    under Ray Serve, ``serve.deployments.GatewayServer`` serves the same routes."""
    app = FastAPI(title="CoVSpec Serve")
    for path, methods, route in ROUTES:
        app.add_api_route(path, route(gateway), methods=methods)
    return app
