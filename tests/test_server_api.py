"""The local server's endpoints through the official openai client, on a tiny real model."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest

from tests.server_support import InProcessServer, varied_model_dir  # noqa: F401 - fixture

pytestmark = pytest.mark.local

MSG = [{"role": "user", "content": "Write about Oslo in 2040."}]


@pytest.fixture(scope="module")
def server(varied_model_dir, tmp_path_factory):  # noqa: F811
    with InProcessServer(varied_model_dir, tmp_path_factory.mktemp("srv"), max_upload_bytes=64 * 1024) as srv:
        yield srv


@pytest.fixture
def client(server):
    with server.client() as c:
        yield c


def greedy(client, server, **kw):
    kw.setdefault("max_tokens", 40)
    return client.chat.completions.create(model=server.model, messages=MSG, temperature=0, **kw)


def test_models_lists_the_base_model(client, server):
    ids = [m.id for m in client.models.list()]
    assert ids == [server.model]
    assert client.models.retrieve(server.model).id == server.model


def test_chat_non_stream_has_text_finish_reason_and_usage(client, server):
    r = greedy(client, server, max_tokens=12)
    assert r.object == "chat.completion" and r.model == server.model
    choice = r.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert r.usage.completion_tokens <= 12 and r.usage.prompt_tokens > 5
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_max_tokens_gives_length(client, server):
    r = greedy(client, server, max_tokens=7)
    if r.choices[0].finish_reason == "length":
        assert r.usage.completion_tokens == 7
    r2 = client.chat.completions.create(model=server.model, messages=MSG, temperature=0,
                                        max_completion_tokens=3)
    assert r2.choices[0].finish_reason == "length" and r2.usage.completion_tokens == 3


def test_stream_matches_non_stream_and_reports_usage(client, server):
    full = greedy(client, server, max_tokens=25)
    chunks = list(client.chat.completions.create(model=server.model, messages=MSG, temperature=0, max_tokens=25,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [full.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def _middle_stop(text: str) -> str:
    """A substring from the middle of ``text`` (clean characters, first occurrence past the start)."""
    for start in range(len(text) // 3, len(text) - 3):
        cand = text[start:start + 3]
        if "\ufffd" not in cand and cand.strip() and text.find(cand) == start:
            return cand
    pytest.skip("no usable substring in the greedy output")


def test_stop_cuts_before_the_stop_string(client, server):
    full = greedy(client, server, max_tokens=40).choices[0].message.content
    stop = _middle_stop(full)
    r = greedy(client, server, max_tokens=40, stop=[stop, "never-appears-here"])
    assert r.choices[0].message.content == full[:full.index(stop)]
    assert r.choices[0].finish_reason == "stop"
    # streamed: the same cut, and no piece of the stop ever emitted
    chunks = list(client.chat.completions.create(model=server.model, messages=MSG, temperature=0, max_tokens=40,
                                                 stop=stop, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full[:full.index(stop)]
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]


def test_n_choices_and_seed(client, server):
    r = client.chat.completions.create(model=server.model, messages=MSG, n=2, temperature=1.0, seed=7, max_tokens=10)
    assert [c.index for c in r.choices] == [0, 1]
    again = client.chat.completions.create(model=server.model, messages=MSG, n=2, temperature=1.0, seed=7,
                                           max_tokens=10)
    assert [c.message.content for c in again.choices] == [c.message.content for c in r.choices]
    assert r.choices[0].message.content != r.choices[1].message.content  # seed+index differ
    assert r.usage.completion_tokens >= 2 and r.usage.completion_tokens <= 20


def test_n_choices_stream_with_usage(client, server):
    kw = dict(model=server.model, messages=MSG, n=2, temperature=1.0, seed=11, max_tokens=8)
    full = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    texts, reasons = ["", ""], [None, None]
    for c in chunks[:-1]:
        (choice,) = c.choices
        texts[choice.index] += choice.delta.content or ""
        reasons[choice.index] = choice.finish_reason or reasons[choice.index]
    assert texts == [c.message.content for c in full.choices]
    assert reasons == [c.finish_reason for c in full.choices]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_concurrent_requests_decode_like_sequential_ones(server):
    """Batched decoding (rows joining and leaving) gives each request what it gets alone."""
    prompts = [[{"role": "user", "content": f"Tell me about case {i} " * (1 + i % 3)}] for i in range(6)]

    async def one(client, msgs, i):
        r = await client.chat.completions.create(model=server.model, messages=msgs, temperature=0,
                                                 max_tokens=8 + 3 * i)
        return r.choices[0].message.content, r.choices[0].finish_reason

    async def run(concurrent: bool):
        async with openai.AsyncOpenAI(base_url=server.base_url, api_key=server.key, max_retries=0) as client:
            if concurrent:
                return await asyncio.gather(*[one(client, p, i) for i, p in enumerate(prompts)])
            return [await one(client, p, i) for i, p in enumerate(prompts)]

    assert asyncio.run(run(True)) == asyncio.run(run(False))


def test_legacy_completions_with_stop_and_stream(client, server):
    full = client.completions.create(model=server.model, prompt="The capital of France is", temperature=0,
                                     max_tokens=30)
    assert full.object == "text_completion" and full.choices[0].finish_reason in ("stop", "length")
    text = full.choices[0].text
    stop = _middle_stop(text)
    cut = client.completions.create(model=server.model, prompt="The capital of France is", temperature=0,
                                    max_tokens=30, stop=stop)
    assert cut.choices[0].text == text[:text.index(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=server.model, prompt="The capital of France is", temperature=0, max_tokens=30, stream=True)
        if c.choices)
    assert streamed == text
    assert client.completions.create(model=server.model, prompt="x", temperature=0).usage.completion_tokens <= 16


def test_files_roundtrip(client, tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_bytes(b'{"prompt": "a", "completion": "b"}\n')
    f = client.files.create(file=path.open("rb"), purpose="fine-tune")
    assert f.id.startswith("file-") and f.bytes == path.stat().st_size and f.filename == "train.jsonl"
    assert f.id in [x.id for x in client.files.list()]
    assert client.files.retrieve(f.id).purpose == "fine-tune"
    assert client.files.content(f.id).read() == path.read_bytes()
    assert client.files.delete(f.id).deleted is True
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(f.id)


def test_file_errors(client, tmp_path):
    big = tmp_path / "big.jsonl"
    big.write_bytes(b"x" * (200 * 1024))
    with pytest.raises(openai.APIStatusError) as exc:
        client.files.create(file=big.open("rb"), purpose="fine-tune")
    assert exc.value.status_code == 413 and exc.value.body["code"] == "file_too_large"
    small = tmp_path / "s.jsonl"
    small.write_bytes(b"{}\n")
    with pytest.raises(openai.BadRequestError) as exc:
        client.files.create(file=small.open("rb"), purpose="vision")
    assert exc.value.body["param"] == "purpose"


@pytest.mark.parametrize("kwargs, status, param", [
    ({"model": "no-such-model"}, 404, "model"),
    ({"temperature": 3}, 400, "temperature"),
    ({"top_p": 1.5}, 400, "top_p"),
    ({"max_tokens": 0}, 400, "max_tokens"),
    ({"n": 99}, 400, "n"),
    ({"stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"messages": []}, 400, "messages"),
    ({"messages": [{"role": "tool", "content": "x"}]}, 400, "messages.[0].role"),
    ({"logprobs": True}, 400, "logprobs"),
])
def test_bad_chat_requests_get_openai_shaped_errors(client, server, kwargs, status, param):
    args = {"model": server.model, "messages": MSG, **kwargs}
    with pytest.raises(openai.APIStatusError) as exc:
        client.chat.completions.create(**args)
    assert exc.value.status_code == status
    body = exc.value.body
    assert set(body) == {"message", "type", "param", "code"} and body["param"] == param
    assert body["type"] == "invalid_request_error" and body["message"]


def test_unparseable_body_and_unknown_route(server):
    r = httpx.post(f"{server.base_url}/chat/completions", content=b"{not json",
                   headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.get(f"{server.base_url}/nothing-here")
    assert r.status_code == 404 and "error" in r.json()
    r = httpx.get(f"{server.base_url}/fine_tuning/jobs/ftjob-nope")
    assert r.status_code == 404 and r.json()["error"]["param"] == "fine_tuning_job_id"
    assert json.loads(httpx.get(f"{server.base_url}/models").text)["object"] == "list"


def test_legacy_refusals_come_before_the_stream(client, server):
    """A prompt the engine refuses is a 400 at once, streamed or not, never an in-band error."""
    with pytest.raises(openai.BadRequestError) as exc:
        client.completions.create(model=server.model, prompt="hello world " * 3000, stream=True)
    assert exc.value.body["code"] == "context_length_exceeded" and exc.value.body["param"] == "prompt"
    r = httpx.post(f"{server.base_url}/completions", json={"model": server.model, "prompt": "x", "best_of": "2"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "best_of"


def test_an_oversized_chunked_upload_is_refused_without_reading_it(server):
    """No Content-Length to check: the body is cut off at the limit, not spooled to the end first."""
    from gridtune.server.app import create_app

    head = (b'--B\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nfine-tune\r\n'
            b'--B\r\nContent-Disposition: form-data; name="file"; filename="big.jsonl"\r\n\r\n')
    chunks = [head] + [b"x" * (1 << 20)] * 64
    read, sent = [], []

    async def receive():
        read.append(1)
        body = chunks[len(read) - 1] if len(read) <= len(chunks) else b""
        return {"type": "http.request", "body": body, "more_body": len(read) < len(chunks)}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v1/files", "raw_path": b"/v1/files", "root_path": "", "query_string": b"",
             "headers": [(b"content-type", b"multipart/form-data; boundary=B"), (b"transfer-encoding", b"chunked"),
                         (b"host", f"127.0.0.1:{server.port}".encode())],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", server.port)}
    asyncio.run(create_app(server.state)(scope, receive, send))
    assert sent[0]["status"] == 413 and json.loads(sent[1]["body"])["error"]["code"] == "file_too_large"
    assert len(read) <= 3  # the head and a chunk or two, not 64 MiB


def test_export_model_is_refused_to_a_client_on_another_machine(server, tmp_path):
    """It writes on the server's disk: a key holder elsewhere on the network may not write outside
    the export directory."""
    from starlette.testclient import TestClient

    from gridtune.server.app import create_app

    out = tmp_path / "merged"
    # Not as a context manager: no lifespan, so the shared server's engine is left alone.
    remote = TestClient(create_app(server.state), base_url=f"http://127.0.0.1:{server.port}",
                        client=("10.1.2.3", 40000))
    r = remote.post("/v1/gridtune/export_model", json={"model": "anything", "output_dir": str(out)})
    assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden_path"
    assert not out.exists()


def test_logit_bias_bans_and_forces_tokens(client, server):
    """-100 bans a token (the greedy answer's first token never comes), +100 makes one
    come every step, as OpenAI's logit_bias does; a bad map is one 400 naming it."""
    ids = server.state.engine.chat_prompt(server.model, MSG)
    tok = server.state.engine.tokenizer_for(server.model)
    first = greedy(client, server, max_tokens=6)
    first_id = tok(first.choices[0].message.content, add_special_tokens=False)["input_ids"][0]
    banned = greedy(client, server, max_tokens=6, logit_bias={str(first_id): -100})
    assert banned.choices[0].message.content != first.choices[0].message.content
    again = tok(banned.choices[0].message.content, add_special_tokens=False)["input_ids"]
    assert first_id not in again
    forced_id = next(t for t in range(100, 200) if t not in ids and tok.decode([t]).strip())
    forced = greedy(client, server, max_tokens=5, logit_bias={str(forced_id): 100})
    assert forced.choices[0].message.content == tok.decode([forced_id] * 5)
    for bad in ({"x": 1}, {"5": 101}, [5], {"5": "a"}):
        with pytest.raises(openai.BadRequestError) as err:
            greedy(client, server, max_tokens=3, logit_bias=bad)
        assert err.value.body["param"] == "logit_bias"
