"""OpenAI's response bodies: whole completions, streamed chunks, usage and log-probabilities."""

from __future__ import annotations

from typing import Optional

from .protocol import Request
from .sampling import Choice


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _token_text(tokenizer, token: int) -> str:
    return tokenizer.decode([token])


def chat_logprob(choice: Choice, tokenizer) -> dict:
    """One entry of a chat choice's ``logprobs.content``."""
    text = _token_text(tokenizer, choice.token)
    return {"token": text, "logprob": choice.logprob, "bytes": list(text.encode()),
            "top_logprobs": [{"token": (t := _token_text(tokenizer, i)), "logprob": v, "bytes": list(t.encode())}
                             for i, v in choice.top]}


class Collector:
    """Gathers a non-streamed request's events into its choices."""

    def __init__(self, request: Request, tokenizer):
        self.request, self.tokenizer = request, tokenizer
        count = len(request.prompts) * request.n
        self.texts = [""] * count
        self.choices: list[list[Choice]] = [[] for _ in range(count)]
        self.finish: list[Optional[str]] = [None] * count
        self.completion_tokens = 0
        self.ended = 0
        self.error: Optional[str] = None

    def open(self, count: int) -> bool:
        return self.ended < count

    def add(self, event: dict) -> None:
        i = event["index"]
        self.texts[i] += event.get("text", "")
        choice = event.get("choice")
        if choice is not None and choice.logprob is not None and event.get("finish") is None:
            self.choices[i].append(choice)
        if event.get("finish") is not None:
            self.finish[i] = event["finish"]
            self.completion_tokens += event["completion_tokens"]
            self.ended += 1
            self.error = self.error or event.get("error")

    def logprobs(self, i: int) -> Optional[dict]:
        if not self.request.sampling.logprobs:
            return None
        if self.request.chat:
            return {"content": [chat_logprob(c, self.tokenizer) for c in self.choices[i]]}
        return completion_logprobs(self.choices[i], self.tokenizer)


def completion_logprobs(choices: list[Choice], tokenizer, offset: int = 0) -> dict:
    """The legacy completions ``logprobs`` object."""
    tokens = [_token_text(tokenizer, c.token) for c in choices]
    offsets, at = [], offset
    for t in tokens:
        offsets.append(at)
        at += len(t)
    return {"tokens": tokens, "token_logprobs": [c.logprob for c in choices],
            "top_logprobs": [{_token_text(tokenizer, i): v for i, v in c.top} for c in choices],
            "text_offset": offsets}


def final_body(request: Request, meta: dict, collector: Collector, prompt_tokens: int) -> dict:
    """The whole response of a non-streamed request."""
    choices = []
    for i, text in enumerate(collector.texts):
        if request.chat:
            choices.append({"index": i, "message": {"role": "assistant", "content": text},
                            "logprobs": collector.logprobs(i), "finish_reason": collector.finish[i]})
        else:
            choices.append({"index": i, "text": text, "logprobs": collector.logprobs(i),
                            "finish_reason": collector.finish[i]})
    return {"id": meta["id"], "object": "chat.completion" if request.chat else "text_completion",
            "created": meta["created"], "model": meta["model"], "choices": choices,
            "usage": usage(prompt_tokens, collector.completion_tokens)}


def stream_head(request: Request, meta: dict) -> dict:
    """The fields every streamed chunk starts with."""
    return {"id": meta["id"], "object": "chat.completion.chunk" if request.chat else "text_completion",
            "created": meta["created"], "model": meta["model"]}


def chunk(request: Request, meta: dict, index: int, content, finish: Optional[str], choice: Optional[Choice],
          tokenizer) -> dict:
    """One streamed chunk: ``content`` is text (or, for chat's first chunk, the delta itself)."""
    head = stream_head(request, meta)
    logprobs = None
    if choice is not None and request.sampling.logprobs and choice.logprob is not None:
        logprobs = ({"content": [chat_logprob(choice, tokenizer)]} if request.chat
                    else completion_logprobs([choice], tokenizer))
    if request.chat:
        delta = content if isinstance(content, dict) else ({"content": content} if content else {})
        body = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
    else:
        body = {"index": index, "text": content, "logprobs": logprobs, "finish_reason": finish}
    return {**head, "choices": [body]}
