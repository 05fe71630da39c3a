"""OpenAI's request fields checked one by one, and its error body.

Bodies are read as plain JSON and every field is checked here, so a bad request gets OpenAI's
``{"error": {"message", "type", "param", "code"}}`` with status 400 and the field's name,
never a framework's own validation format.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

from .sampling import Sampling

MAX_N = 16
MAX_STOPS = 4


class ApiError(Exception):
    """An error answered with OpenAI's body."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 kind: str = "invalid_request_error", headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def bad(param: str, message: str) -> ApiError:
    return ApiError(400, f"{param}: {message}", param=param, code="invalid_value")


@dataclass
class Request:
    """A completion request, checked: the prompts to continue and how."""

    model: str
    prompts: list  # strings (completions) or message lists (chat)
    sampling: Sampling
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    chat: bool = False
    max_tokens_given: bool = False
    extra: dict = field(default_factory=dict)


def _number(body: dict, name: str, default: float, low: float, high: float) -> float:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise bad(name, f"expected a number, got {value!r}")
    if not low <= value <= high:
        raise bad(name, f"{value} is out of range [{low}, {high}]")
    return float(value)


def _integer(body: dict, name: str, default: Optional[int], low: int, high: int) -> Optional[int]:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad(name, f"expected an integer, got {value!r}")
    if not low <= value <= high:
        raise bad(name, f"{value} is out of range [{low}, {high}]")
    return value


def _flag(body: dict, name: str) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise bad(name, f"expected true or false, got {value!r}")
    return value


def _stops(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise bad("stop", "expected a string or a list of strings")
    if len(stops) > MAX_STOPS:
        raise bad("stop", f"at most {MAX_STOPS} stop strings, got {len(stops)}")
    return [s for s in stops if s]


def _messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("messages", "expected a non-empty list of messages")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad(where, "expected an object with role and content")
        role, content = m.get("role"), m.get("content")
        if role not in ("system", "developer", "user", "assistant"):
            raise bad(f"{where}.role", f"expected system, developer, user or assistant, got {role!r}")
        if isinstance(content, list):  # content parts: only text can be read by a text model
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise bad(f"{where}.content", "only text parts ({\"type\": \"text\", \"text\": ...}) are supported")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise bad(f"{where}.content", "expected a string")
        out.append({"role": "system" if role == "developer" else role, "content": content})
    return out


def parse(body: Any, chat: bool) -> Request:
    """A checked ``Request`` from a JSON body; ``ApiError`` naming the first bad field."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad("model", "expected the name of a model (see GET /v1/models)")
    if chat:
        prompts: list = [_messages(body)]
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, str):
            prompts = [prompt]
        elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            prompts = list(prompt)
        else:
            raise bad("prompt", "expected a string or a non-empty list of strings")
    length_field = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _integer(body, length_field, None, 1, 1 << 20)
    if chat:
        logprobs = _flag(body, "logprobs")
        top = _integer(body, "top_logprobs", 0, 0, 20)
        if top and not logprobs:
            raise bad("top_logprobs", "needs logprobs: true")
    else:
        count = _integer(body, "logprobs", None, 0, 5)
        logprobs, top = count is not None, count or 0
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise bad("seed", f"expected an integer, got {seed!r}")
    sampling = Sampling(max_tokens=max_tokens or 0, temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
                        top_p=_number(body, "top_p", 1.0, 0.0, 1.0), stop=_stops(body), seed=seed,
                        logprobs=logprobs, top_logprobs=top)
    if sampling.top_p == 0.0:
        raise bad("top_p", "must be greater than 0")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise bad("stream_options", "expected an object")
    stream = _flag(body, "stream")
    include_usage = bool((options or {}).get("include_usage", False))
    if options and not stream:
        raise bad("stream_options", "is only allowed with stream: true")
    return Request(model=model, prompts=prompts, sampling=sampling, n=_integer(body, "n", 1, 1, MAX_N),
                   stream=stream, include_usage=include_usage, chat=chat, max_tokens_given=max_tokens is not None)
