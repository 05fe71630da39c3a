"""The HTTP side: OpenAI's routes over an ``Engine``, hot loading, the playground page.

Requests are checked in ``protocol``; each completion becomes one ``Sequence`` per prompt and
choice, whose events the engine's thread hands to this request's asyncio queue. A client that
goes away cancels its sequences, which frees their rows at the next step.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from importlib import resources
from typing import AsyncIterator, Optional

from fastapi import FastAPI, Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .adapters import AdapterError, Adapters
from .engine import Engine, QueueFull, Sequence
from .protocol import ApiError, Request, bad, parse
from .responses import Collector, chunk, final_body, stream_head, usage

BASE = "base"
HOT_LOADING_OFF = "hot loading is off; start deltatune serve with --adapters-dir DIR to load and unload adapters"


def create_app(engine: Engine, api_key: Optional[str] = None, context: int = 2048,
               default_max_tokens: int = 256) -> FastAPI:
    """The FastAPI application serving ``engine`` (started and stopped with the app)."""

    async def lifespan(app: FastAPI):
        engine.start()
        yield
        engine.stop()

    app = FastAPI(title="deltatune serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    adapters: Adapters = engine.adapters
    tokenizer = engine.tokenizer

    @app.exception_handler(ApiError)
    async def api_error(_, err: ApiError):
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_, err: RequestValidationError):
        first = err.errors()[0] if err.errors() else {}
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return JSONResponse(ApiError(400, f"{param}: {first.get('msg', 'invalid request')}", param=param).body(), 400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_, err: StarletteHTTPException):
        kind = "invalid_request_error" if err.status_code < 500 else "server_error"
        return JSONResponse(ApiError(err.status_code, str(err.detail), kind=kind).body(), err.status_code)

    @app.middleware("http")
    async def check_key(request: HttpRequest, call_next):
        if api_key and request.url.path.startswith("/v1/"):
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                err = ApiError(401, "a wrong or missing API key (send Authorization: Bearer KEY)",
                               kind="authentication_error", code="invalid_api_key")
                return JSONResponse(err.body(), status_code=401)
        return await call_next(request)

    async def body_of(request: HttpRequest):
        try:
            return json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ApiError(400, f"the request body is not valid JSON ({err})", code="invalid_json") from None

    # ----- information ---------------------------------------------------------------------------------
    @app.get("/health")
    async def health():
        return {"status": "ok", "running": engine.busy()}

    @app.get("/v1/models")
    async def models():
        data = [{"id": BASE, "object": "model", "created": int(engine.started), "owned_by": "deltatune", "method": None}]
        for entry in list(adapters.entries.values()):
            data.append({"id": entry.name, "object": "model", "created": entry.created, "owned_by": "deltatune",
                         "parent": BASE, "method": entry.method, "rank": entry.rank,
                         "digest": f"sha256:{entry.digest}", "loaded": adapters.loaded(entry.name)})
        return {"object": "list", "data": data}

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return resources.files(__package__).joinpath("page.html").read_text(encoding="utf-8")

    # ----- completions --------------------------------------------------------------------------------
    def encode(request: Request) -> list[list[int]]:
        if request.chat:
            texts = [tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True)
                     for m in request.prompts]
            return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        return [tokenizer(p)["input_ids"] for p in request.prompts]

    def sequences_for(request: Request, queue: asyncio.Queue, loop) -> tuple[list[Sequence], int]:
        if request.model != BASE and request.model not in adapters.entries:
            raise ApiError(404, f"the model {request.model!r} does not exist; GET /v1/models lists base and "
                                "the adapters", param="model", code="model_not_found")
        prompts = encode(request)
        virtual = _virtual_tokens(adapters, request.model)
        longest = max(len(p) for p in prompts) + virtual
        if longest >= context:
            raise bad("prompt" if not request.chat else "messages",
                      f"the prompt has {longest} tokens; the model's context is {context}")
        if request.max_tokens_given and longest + request.sampling.max_tokens > context:
            raise bad("max_tokens", f"{longest} prompt tokens plus max_tokens {request.sampling.max_tokens} "
                                    f"exceed the model's context of {context} tokens")
        if not request.max_tokens_given:
            request.sampling.max_tokens = min(default_max_tokens if request.chat else 16, context - longest)
        def sink(event: dict) -> None:  # called on the engine's thread
            try:
                loop.call_soon_threadsafe(queue.put_nowait, event)
            except RuntimeError:  # the event loop has closed (shutdown): nobody is waiting any more
                pass
        adapter = None if request.model == BASE else request.model
        out = [Sequence(adapter, p, request.sampling, sink, index=i * request.n + j)
               for i, p in enumerate(prompts) for j in range(request.n)]
        return out, sum(len(p) for p in prompts)  # counted once per prompt, whatever n is

    async def complete(http: HttpRequest, chat: bool):
        request = parse(await body_of(http), chat)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        sequences, prompt_tokens = sequences_for(request, queue, loop)
        try:
            engine.submit(sequences)
        except QueueFull as err:
            raise ApiError(429, f"the server is busy: {err}; retry shortly", kind="rate_limit_error",
                           code="rate_limit_exceeded", headers={"Retry-After": "1"}) from None
        meta = {"id": ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex, "created": int(time.time()),
                "model": request.model}
        if request.stream:
            return StreamingResponse(_stream(engine, request, sequences, queue, meta, prompt_tokens, tokenizer),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        collector = Collector(request, tokenizer)
        try:
            while collector.open(len(sequences)):
                try:
                    event = await asyncio.wait_for(queue.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if await http.is_disconnected():
                        engine.cancel(sequences)
                        return PlainTextResponse("", status_code=499)
                    continue
                collector.add(event)
        except asyncio.CancelledError:
            engine.cancel(sequences)
            raise
        if collector.error:
            raise ApiError(500, collector.error, kind="server_error", code="generation_failed")
        return final_body(request, meta, collector, prompt_tokens)

    @app.post("/v1/completions")
    async def completions(http: HttpRequest):
        return await complete(http, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(http: HttpRequest):
        return await complete(http, chat=True)

    # ----- hot loading ----------------------------------------------------------------------------------
    async def load(name, path, name_field: str, path_field: str) -> dict:
        if adapters.root is None:
            raise ApiError(404, HOT_LOADING_OFF, code="hot_loading_off")
        if not isinstance(name, str) or not name or name == BASE:
            raise bad(name_field, f"expected an adapter name other than {BASE!r}")
        if not isinstance(path, str) or not path:
            raise bad(path_field, "expected a folder under the adapters folder")
        try:
            folder = adapters.resolve(path)
            entry, changed = await asyncio.wrap_future(engine.call(lambda: adapters.add(name, folder)))
        except AdapterError as err:
            raise bad(path_field, str(err)) from None
        except (ValueError, FileNotFoundError, NotImplementedError) as err:
            raise bad(path_field, f"{path}: {err}") from None
        return {"name": entry.name, "method": entry.method, "rank": entry.rank, "digest": f"sha256:{entry.digest}",
                "changed": changed}

    async def unload(name, name_field: str) -> None:
        if adapters.root is None:
            raise ApiError(404, HOT_LOADING_OFF, code="hot_loading_off")
        if not isinstance(name, str) or name not in adapters.entries:
            raise ApiError(404, f"no adapter named {name!r} is loaded", param=name_field, code="model_not_found")
        await asyncio.wrap_future(engine.call(lambda: adapters.remove(name)))

    @app.post("/v1/adapters")
    async def add_adapter(http: HttpRequest):
        body = await body_of(http)
        body = body if isinstance(body, dict) else {}
        return await load(body.get("name"), body.get("path"), "name", "path")

    @app.delete("/v1/adapters/{name}")
    async def delete_adapter(name: str):
        await unload(name, "name")
        return {"name": name, "deleted": True}

    @app.post("/v1/load_lora_adapter")
    async def vllm_load(http: HttpRequest):
        body = await body_of(http)
        body = body if isinstance(body, dict) else {}
        await load(body.get("lora_name"), body.get("lora_path"), "lora_name", "lora_path")
        return PlainTextResponse(f"Success: LoRA adapter '{body['lora_name']}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def vllm_unload(http: HttpRequest):
        body = await body_of(http)
        name = body.get("lora_name") if isinstance(body, dict) else None
        await unload(name, "lora_name")
        return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")

    return app


def _virtual_tokens(adapters: Adapters, model: str) -> int:
    entry = adapters.entries.get(model)
    return 0 if entry is None else entry.virtual_tokens


async def _stream(engine: Engine, request: Request, sequences: list[Sequence], queue: asyncio.Queue, meta: dict,
                  prompt_tokens: int, tokenizer) -> AsyncIterator[str]:
    """Server-sent events: one chunk per piece of text, a last chunk per choice, usage, [DONE]."""
    done, completion_tokens = 0, 0
    try:
        if request.chat:
            for s in sequences:
                yield _event(chunk(request, meta, s.index, {"role": "assistant", "content": ""}, None, None, tokenizer))
        while done < len(sequences):
            event = await queue.get()
            finish = event.get("finish")
            if "error" in event:
                yield _event({"error": {"message": event["error"], "type": "server_error", "param": None,
                                        "code": "generation_failed"}})
            if event.get("text") or event.get("choice") is not None and request.sampling.logprobs and not finish:
                yield _event(chunk(request, meta, event["index"], event.get("text", ""), None, event.get("choice"),
                                   tokenizer))
            if finish is not None:
                done += 1
                completion_tokens += event["completion_tokens"]
                yield _event(chunk(request, meta, event["index"], "", finish, None, tokenizer))
        if request.include_usage:
            yield _event({**stream_head(request, meta), "choices": [], "usage": usage(prompt_tokens, completion_tokens)})
        yield "data: [DONE]\n\n"
    finally:
        if done < len(sequences):  # the client went away: free the rows
            engine.cancel(sequences)


def _event(data: dict) -> str:
    return f"data: {json.dumps(data)}\n\n"
