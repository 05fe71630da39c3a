"""Streamed text: nothing of a stop string is ever sent, characters are sent whole, and every
request field is checked with OpenAI's error naming it."""

import pytest

from deltatune.serve.protocol import ApiError, parse
from deltatune.serve.sampling import nucleus
from deltatune.serve.text import TextStream


class Pieces:
    """A tokenizer whose token i decodes to pieces[i] (bytes, so a character can span tokens)."""

    def __init__(self, pieces: list[bytes]):
        self.pieces = pieces

    def decode(self, ids, skip_special_tokens=True):
        return b"".join(self.pieces[i] for i in ids).decode("utf-8", errors="replace")


def stream(pieces: list[bytes], stop: list[str]) -> tuple[list[str], TextStream]:
    s = TextStream(Pieces(pieces), stop)
    sent = []
    for i in range(len(pieces)):
        sent.append(s.push(i))
        if s.stopped:
            break
    if not s.stopped:
        sent.append(s.finish())
    return sent, s


def test_a_stop_string_across_tokens_is_never_sent():
    sent, s = stream([b"Hello", b" wo", b"rld", b" END", b"ING more"], stop=["ENDING"])
    assert "".join(sent) == "Hello world " and s.stopped
    assert sent[3] == " "  # of " END" only the space: "END" might begin the stop string


def test_held_back_text_is_released_when_it_is_no_stop():
    sent, s = stream([b"a E", b"Nx", b"!"], stop=["ENDING"])
    assert sent == ["a ", "ENx", "!", ""] and not s.stopped


def test_a_character_split_over_tokens_is_sent_whole():
    snowman = "☃".encode()
    sent, _ = stream([b"x", snowman[:1], snowman[1:], b"y"], stop=[])
    assert sent == ["x", "", "☃", "y", ""]


def test_nucleus_keeps_the_smallest_set_reaching_top_p():
    import torch
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    assert torch.equal(nucleus(probs, 0.7), torch.tensor([0.5, 0.3, 0.0, 0.0]))
    assert torch.equal(nucleus(probs, 0.5), torch.tensor([0.5, 0.0, 0.0, 0.0]))
    assert torch.equal(nucleus(probs, 1.0), probs)


@pytest.mark.parametrize("body, chat, param", [
    ([1, 2], False, None),
    ({"model": "m", "prompt": ["a", 3]}, False, "prompt"),
    ({"model": "m", "prompt": "a", "top_p": 0}, False, "top_p"),
    ({"model": "m", "prompt": "a", "seed": 1.5}, False, "seed"),
    ({"model": "m", "prompt": "a", "logprobs": 6}, False, "logprobs"),
    ({"model": "m", "prompt": "a", "stream_options": {"include_usage": True}}, False, "stream_options"),
    ({"model": "m", "messages": []}, True, "messages"),
    ({"model": "m", "messages": [{"role": "user", "content": 5}]}, True, "messages[0].content"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, True, "top_logprobs"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "max_completion_tokens": -1}, True,
     "max_completion_tokens"),
])
def test_bad_fields_are_named(body, chat, param):
    with pytest.raises(ApiError) as err:
        parse(body, chat)
    assert err.value.status == 400 and err.value.param == param


def test_good_requests_parse():
    r = parse({"model": "m", "messages": [{"role": "developer", "content": [{"type": "text", "text": "hi"}]}],
               "max_completion_tokens": 5, "logprobs": True, "top_logprobs": 2, "n": 3, "stop": "x",
               "stream": True, "stream_options": {"include_usage": True}, "seed": 4}, chat=True)
    assert r.prompts == [[{"role": "system", "content": "hi"}]] and r.sampling.max_tokens == 5
    assert r.sampling.top_logprobs == 2 and r.n == 3 and r.sampling.stop == ["x"] and r.include_usage
    assert parse({"model": "m", "prompt": ["a", "b"], "logprobs": 0}, chat=False).sampling.logprobs
