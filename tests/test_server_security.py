"""The local server as an attacker meets it: a web page in the user's browser (cross-origin
simple requests, DNS rebinding), another account on the machine (no token, file modes), and
a client that floods it or walks away (body size, queue, disconnects, export paths).

Everything talks to a real `gridtune serve` process on 127.0.0.1 over HTTP; the server's
own counters (the ``gridtune`` field of /v1/models: Engine.stats()) say what it is doing.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import time
from pathlib import Path

import httpx
import openai
import pytest

from tests.server_support import chat_examples, gridtune_cmd, serve_subprocess, wait_for, write_jsonl
from tests.tiny_model import make_tiny_model

pytestmark = pytest.mark.local

SHARED_KEY = "shared-key-for-a-remote-client-0123456789"
MSG = [{"role": "user", "content": "Write about Oslo in 2040."}]
CONTEXT = 32768
# Tokens for work that must still be running when the test acts on it: the tiny model decodes
# thousands of tokens a second, and greedily it never ends by itself, so it takes seconds.
LONG = 30000


@pytest.fixture(scope="module")
def long_model_dir(tmp_path_factory) -> Path:
    """The tiny model with a long context (RoPE has no fixed end), so one request can run for
    seconds however fast the decoder gets."""
    path = make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-long")
    config = json.loads((path / "config.json").read_text())
    config["max_position_embeddings"] = CONTEXT
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def srv(long_model_dir, tmp_path_factory):
    """A real server with small limits. Its API key comes from the environment (never argv):
    a client holding only that key stands for "someone with the key", the state file's token
    for "the owner"."""
    data = tmp_path_factory.mktemp("sec") / "data"
    env = {**os.environ, "GRIDTUNE_LOCAL_API_KEY": SHARED_KEY}
    with serve_subprocess(long_model_dir, data, "--max-batch", "2", "--max-queue", "2", "--max-body-mb", "0.5",
                          "--max-upload-mb", "1", "--max-files-mb", "2", env=env) as (proc, state):
        yield Server(proc, state, data)


class Server:
    def __init__(self, proc: subprocess.Popen, state: dict, data: Path):
        self.proc, self.state, self.data = proc, state, data
        self.base_url = state["base_url"]
        self.port = state["port"]
        self.token = state["token"]
        self.model = state["model"]

    def headers(self, key: str | None = "owner", **extra: str) -> dict[str, str]:
        h = {"Authorization": f"Bearer {self.token if key == 'owner' else key}"} if key else {}
        return {**h, **extra}

    def client(self, key: str | None = None) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base_url, api_key=key or self.token, max_retries=0)

    def stats(self) -> dict:
        r = httpx.get(f"{self.base_url}/models", headers=self.headers(), timeout=10)
        assert r.status_code == 200, r.text
        return r.json()["data"][0]["gridtune"]

    def idle(self, timeout: float = 60) -> None:
        wait_for(lambda: self.stats()["in_flight"] == 0, timeout=timeout, interval=0.05)


def _chat_body(srv: Server, **kw) -> dict:
    return {"model": srv.model, "messages": MSG, "temperature": 0, "max_tokens": 5, **kw}


# -- web pages ---------------------------------------------------------------------------

def test_a_cross_origin_text_plain_post_is_refused(srv):
    """What a page can send without a CORS preflight: text/plain. Refused by its Origin, and
    refused for its type too (even with the token, which a page cannot have anyway)."""
    before = srv.stats()["generated_tokens"]
    body = json.dumps(_chat_body(srv))
    page = {"Content-Type": "text/plain", "Origin": "https://evil.example"}
    r = httpx.post(f"{srv.base_url}/chat/completions", content=body, headers=page)
    assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden_origin"
    assert r.json()["error"]["type"] == "invalid_request_error"
    assert "access-control-allow-origin" not in r.headers
    r = httpx.post(f"{srv.base_url}/chat/completions", content=body, headers=srv.headers(**page))
    assert r.status_code == 403
    r = httpx.post(f"{srv.base_url}/chat/completions", content=body,
                   headers=srv.headers(**{"Content-Type": "text/plain", "Sec-Fetch-Site": "cross-site"}))
    assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden_origin"
    r = httpx.post(f"{srv.base_url}/chat/completions", content=body, headers=srv.headers(**{"Content-Type": "text/plain"}))
    assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type"
    # the same for a fine-tuning job: nothing is created
    r = httpx.post(f"{srv.base_url}/fine_tuning/jobs", headers=page,
                   content=json.dumps({"model": srv.model, "training_file": "file-abc"}))
    assert r.status_code == 403
    r = httpx.post(f"{srv.base_url}/fine_tuning/jobs", headers=srv.headers(**{"Content-Type": "text/plain"}),
                   content=json.dumps({"model": srv.model, "training_file": "file-abc"}))
    assert r.status_code == 415
    assert srv.client().fine_tuning.jobs.list().data == []
    # and a preflight gets no permission
    r = httpx.options(f"{srv.base_url}/chat/completions",
                      headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
    assert r.status_code == 403 and "access-control-allow-origin" not in r.headers
    assert srv.stats()["generated_tokens"] == before  # nothing was generated
    # the real client still works
    assert srv.client().chat.completions.create(**_chat_body(srv)).choices[0].message.content is not None


def test_a_multipart_upload_with_a_foreign_origin_is_refused(srv, tmp_path):
    files_before = {f.id for f in srv.client().files.list()}
    payload = {"file": ("train.jsonl", b'{"messages": []}\n', "application/octet-stream")}
    r = httpx.post(f"{srv.base_url}/files", data={"purpose": "fine-tune"}, files=payload,
                   headers={"Origin": "http://localhost:8000"})  # another local web app is still a web page
    assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden_origin"
    r = httpx.post(f"{srv.base_url}/files", data={"purpose": "fine-tune"}, files=payload,
                   headers=srv.headers(Origin="null"))  # a sandboxed page or a file:// page
    assert r.status_code == 403
    assert {f.id for f in srv.client().files.list()} == files_before
    # an upload that is not multipart: 415
    r = httpx.post(f"{srv.base_url}/files", content=b"x", headers=srv.headers(**{"Content-Type": "text/plain"}))
    assert r.status_code == 415


def test_a_foreign_host_header_is_refused(srv, tmp_path):
    """DNS rebinding: the page's own name arrives in Host, with the token or without it."""
    f = srv.client().files.create(file=write_jsonl(tmp_path / "t.jsonl", chat_examples(3)).open("rb"),
                                  purpose="fine-tune")
    for path in ("/files", f"/files/{f.id}/content", "/models", "/fine_tuning/jobs"):
        r = httpx.get(f"{srv.base_url}{path}", headers=srv.headers(Host=f"rebind.attacker.example:{srv.port}"))
        assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden_host", path
        assert "AGI scenario" not in r.text
    r = httpx.get(f"{srv.base_url}/files", headers=srv.headers(Host=f"127.0.0.1:{srv.port + 1}"))
    assert r.status_code == 403  # the right name on another port is another server
    for host in (f"127.0.0.1:{srv.port}", f"localhost:{srv.port}", f"LOCALHOST:{srv.port}"):
        assert httpx.get(f"{srv.base_url}/files", headers=srv.headers(Host=host)).status_code == 200, host
    srv.client().files.delete(f.id)


# -- other users on the machine -----------------------------------------------------------

def test_a_request_without_the_token_is_refused(srv):
    for headers in ({}, {"Authorization": "Bearer local"}, {"Authorization": f"Bearer {srv.token[:-1]}"},
                    {"Authorization": srv.token}):
        r = httpx.get(f"{srv.base_url}/files", headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", headers
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=srv.base_url, api_key="local", max_retries=0).models.list()
    assert srv.client().models.list().data  # the owner token
    assert srv.client(SHARED_KEY).models.list().data  # the key from GRIDTUNE_LOCAL_API_KEY
    # the token is in no command line, the key neither
    cmdline = Path(f"/proc/{srv.proc.pid}/cmdline").read_bytes()
    assert srv.token.encode() not in cmdline and SHARED_KEY.encode() not in cmdline
    assert "visible to every user" not in (srv.data / "test-serve.log").read_text()  # no argv key, no warning


def _modes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): stat.S_IMODE(p.lstat().st_mode) for p in [root, *root.rglob("*")]
            if p.name != "test-serve.log"}  # (the test harness's own log)


def test_everything_the_server_writes_is_private(srv, tmp_path):
    client = srv.client()
    train = client.files.create(file=write_jsonl(tmp_path / "train.jsonl", chat_examples(10)).open("rb"),
                                purpose="fine-tune")
    job = client.fine_tuning.jobs.create(model=srv.model, training_file=train.id,
                                         hyperparameters={"n_epochs": 1, "batch_size": 5})
    done = wait_for(lambda: (j := client.fine_tuning.jobs.retrieve(job.id)).status in ("succeeded", "failed",
                                                                                     "cancelled") and j,
                    timeout=300)
    assert done.status == "succeeded", done.error
    modes = _modes(srv.data)
    assert modes["."] == 0o700 and modes["server.json"] == 0o600 and modes["files"] == 0o700
    assert modes[f"files/{train.id}.bin"] == 0o600 and modes[f"files/{train.id}.json"] == 0o600
    assert modes[f"jobs/{job.id}"] == 0o700 and modes[f"jobs/{job.id}/state.json"] == 0o600
    assert any(k.startswith(f"jobs/{job.id}/result/") for k in modes)  # the trained adapter is there too
    loose = {k: oct(m) for k, m in modes.items() if m & 0o077}
    assert loose == {}, f"readable by others: {loose}"


# -- limits ---------------------------------------------------------------------------------

def test_an_oversized_body_is_refused_before_it_is_read(srv):
    big = json.dumps(_chat_body(srv, messages=[{"role": "user", "content": "x" * 600_000}]))
    r = httpx.post(f"{srv.base_url}/chat/completions", content=big,
                   headers=srv.headers(**{"Content-Type": "application/json"}))
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    def chunks():  # no Content-Length: chunked, counted as it arrives
        for _ in range(64):
            yield b" " * 65536

    r = httpx.post(f"{srv.base_url}/chat/completions", content=chunks(),
                   headers=srv.headers(**{"Content-Type": "application/json"}))
    assert r.status_code == 413 and r.json()["error"]["type"] == "invalid_request_error"
    # a prompt under the body cap but far past the context is refused by its length in characters
    t = time.monotonic()
    assert srv.stats()["context_length"] == CONTEXT
    r = httpx.post(f"{srv.base_url}/completions", json={"model": srv.model, "prompt": "y" * (CONTEXT * 8 + 1)},
                   headers=srv.headers())
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert "characters" in r.json()["error"]["message"] and time.monotonic() - t < 5
    r = httpx.post(f"{srv.base_url}/chat/completions", json=_chat_body(srv, n=3), headers=srv.headers())
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"  # more than the queue holds
    assert srv.client().chat.completions.create(**_chat_body(srv)).choices  # still serving


def test_the_queue_limit_answers_429_with_retry_after_and_the_server_keeps_serving(srv):
    srv.idle()
    with httpx.Client(timeout=120) as http:
        with http.stream("POST", f"{srv.base_url}/chat/completions", headers=srv.headers(),
                         json=_chat_body(srv, n=2, max_tokens=LONG, stream=True)) as held:
            assert held.status_code == 200
            assert held.headers["x-gridtune-max-batch"] == "2"
            wait_for(lambda: srv.stats()["in_flight"] == 2, timeout=30, interval=0.05)  # the queue is full
            r = http.post(f"{srv.base_url}/chat/completions", json=_chat_body(srv), headers=srv.headers())
            assert r.status_code == 429, r.text
            err = r.json()["error"]
            assert err["type"] == "rate_limit_error" and err["code"] == "rate_limit_exceeded"
            assert 1 <= int(r.headers["retry-after"]) <= 120 and "retry after" in err["message"]
            with pytest.raises(openai.RateLimitError):
                srv.client().completions.create(model=srv.model, prompt="hi", max_tokens=3)
            lines = held.iter_lines()  # (one iterator: a dropped one closes the response)
            assert next(lines).startswith("data: ")  # it is still streaming
            assert srv.stats()["in_flight"] == 2
            before_close = srv.stats()["generated_tokens"]
        # the stream's client went away: its rows are cancelled (sse-starlette cancels the generator)
        t = time.monotonic()
        srv.idle(timeout=5)
        assert time.monotonic() - t < 1.0
        assert srv.stats()["generated_tokens"] - before_close < LONG
    r = srv.client().chat.completions.with_raw_response.create(**_chat_body(srv))
    assert r.headers["x-gridtune-max-batch"] == "2" and r.parse().choices[0].finish_reason in ("stop", "length")


def _post_and_hang_up(srv: Server, body: dict) -> socket.socket:
    raw = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", srv.port))
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\n"
                 + f"Host: 127.0.0.1:{srv.port}\r\nAuthorization: Bearer {srv.token}\r\n".encode()
                 + f"Content-Type: application/json\r\nContent-Length: {len(raw)}\r\n\r\n".encode() + raw)
    return sock


def test_a_client_that_disconnects_frees_the_server_within_a_second(srv):
    """Non-streamed: the server watches the connection while it collects, and cancels the rows."""
    srv.idle()
    before = srv.stats()["generated_tokens"]
    sock = _post_and_hang_up(srv, _chat_body(srv, n=2, max_tokens=LONG))
    wait_for(lambda: srv.stats()["generated_tokens"] > before + 20, timeout=30, interval=0.05)
    assert srv.stats()["in_flight"] == 2  # both rows are decoding when the client leaves
    sock.close()
    t = time.monotonic()
    wait_for(lambda: srv.stats()["in_flight"] == 0, timeout=5, interval=0.02)
    freed = time.monotonic() - t
    assert freed < 1.0, f"freed after {freed:.2f} s"
    stopped = srv.stats()
    time.sleep(0.5)
    assert srv.stats()["generated_tokens"] == stopped["generated_tokens"]  # no more tokens for nobody
    assert stopped["generated_tokens"] - before < LONG  # far from the 2 x LONG it was asked for


def test_a_full_upload_store_makes_room_from_the_oldest_unreferenced_file(srv, tmp_path):
    client = srv.client()
    for f in client.files.list():
        client.files.delete(f.id)
    blob = tmp_path / "blob.jsonl"
    blob.write_bytes(b"z" * (900 * 1024))
    first = client.files.create(file=blob.open("rb"), purpose="batch")
    time.sleep(1.1)  # created_at has whole seconds
    second = client.files.create(file=blob.open("rb"), purpose="batch")
    third = client.files.create(file=blob.open("rb"), purpose="batch")  # 3 x 0.9 MB > the 2 MB quota
    ids = {f.id for f in client.files.list()}
    assert first.id not in ids and {second.id, third.id} <= ids
    big = tmp_path / "big.jsonl"
    big.write_bytes(b"z" * (1100 * 1024))
    with pytest.raises(openai.APIStatusError) as exc:
        client.files.create(file=big.open("rb"), purpose="batch")  # over the 1 MB per-file limit
    assert exc.value.status_code == 413 and exc.value.body["code"] == "file_too_large"


# -- export ---------------------------------------------------------------------------------------

def test_export_outside_the_export_root_is_refused(srv, tmp_path):
    """Someone with the shared key (not the owner) cannot make the server write where they choose,
    neither by an absolute path, by '..', nor through a symlink in the export directory."""
    evil = tmp_path / "autostart" / "evil"
    root = srv.data / "exports"
    root.mkdir(exist_ok=True)
    (root / "link").symlink_to(tmp_path)
    url = f"{srv.base_url}/gridtune/export_model"
    for out in (str(evil), "../../autostart/evil", "link/evil", str(root)):
        r = httpx.post(url, json={"model": "ft:any", "output_dir": out}, headers=srv.headers(SHARED_KEY))
        assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden_path", out
        assert r.headers["x-should-retry"] == "false"
    assert not (tmp_path / "autostart").exists() and not (tmp_path / "evil").exists()
    # under the root, or as the owner: the path is fine, the model is not -> 404, not retried
    for key, out in ((SHARED_KEY, "mine"), ("owner", str(tmp_path / "mine"))):
        r = httpx.post(url, json={"model": "ft:nope", "output_dir": out}, headers=srv.headers(key))
        assert r.status_code == 404 and r.headers["x-should-retry"] == "false", r.text
    # the openai client sends it once, not three times
    calls = []
    client = openai.OpenAI(base_url=srv.base_url, api_key=SHARED_KEY, max_retries=2,
                           http_client=httpx.Client(event_hooks={"request": [calls.append]}))
    with pytest.raises(openai.PermissionDeniedError):
        client.post("/gridtune/export_model", cast_to=object, body={"model": "ft:x", "output_dir": str(evil)})
    assert len(calls) == 1


def test_export_errors_of_a_real_model_are_4xx_with_the_reason(srv, tmp_path):
    client = srv.client()
    jobs = [j for j in client.fine_tuning.jobs.list().data if j.status == "succeeded"]
    if not jobs:
        train = client.files.create(file=write_jsonl(tmp_path / "t.jsonl", chat_examples(10)).open("rb"),
                                    purpose="fine-tune")
        job = client.fine_tuning.jobs.create(model=srv.model, training_file=train.id,
                                             hyperparameters={"n_epochs": 1, "batch_size": 5})
        jobs = [wait_for(lambda: (j := client.fine_tuning.jobs.retrieve(job.id)).status == "succeeded" and j,
                         timeout=300)]
    model = jobs[0].fine_tuned_model
    url = f"{srv.base_url}/gridtune/export_model"
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    r = httpx.post(url, json={"model": model, "output_dir": str(full)}, headers=srv.headers(), timeout=300)
    assert r.status_code == 400 and "not an empty directory" in r.json()["error"]["message"]
    assert (full / "keep.txt").read_text() == "mine"
    empty = tmp_path / "empty"
    empty.mkdir()  # an existing empty folder is fine (it used to be a bare 500, retried three times)
    r = httpx.post(url, json={"model": model, "output_dir": str(empty)}, headers=srv.headers(), timeout=300)
    assert r.status_code == 200, r.text
    assert (empty / "config.json").is_file()
    # with the shared key, under the export root: allowed, and private
    r = httpx.post(url, json={"model": model, "output_dir": "shared/m1"}, headers=srv.headers(SHARED_KEY),
                   timeout=300)
    assert r.status_code == 200, r.text
    out = Path(r.json()["output_dir"])
    assert out == (srv.data / "exports" / "shared" / "m1").resolve() and (out / "config.json").is_file()
    assert {oct(m) for m in _modes(out).values() if m & 0o077} == set()


# -- the command line --------------------------------------------------------------------------------

def test_serve_defaults_to_a_free_port_and_reads_keys_safely(tmp_path):
    from gridtune.cli.local import serve_cmd

    assert {p.name: p.default for p in serve_cmd.params}["port"] == 0
    key_file = tmp_path / "key"
    key_file.write_text("k" * 40)
    key_file.chmod(0o644)
    r = subprocess.run(gridtune_cmd("serve", "--api-key-file", str(key_file), "--data-dir", str(tmp_path / "d")),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "can be read by other users" in r.stderr


def test_gridtune_clients_find_the_token_in_the_state_file(srv, monkeypatch, tmp_path):
    """The way every gridtune process finds the server: server.json -> base_url + token."""
    from gridtune.pipeline.client import local_service

    backend = local_service.running_backend(srv.data)
    assert backend is not None and backend.api_key == srv.token and backend.base_url == srv.base_url
    # a state file another user could have written is not trusted (it would steal the token)
    copy = tmp_path / "other"
    copy.mkdir()
    (copy / "server.json").write_text((srv.data / "server.json").read_text())
    (copy / "server.json").chmod(0o666)
    assert local_service.read_state(copy) is None


def test_allowed_origins_and_hosts_are_the_only_exceptions(long_model_dir, tmp_path):
    """--allow-origin / --allow-host open exactly what they name (an in-process server with a token)."""
    from tests.server_support import InProcessServer

    with InProcessServer(long_model_dir, tmp_path / "data", token="t" * 43,
                         allowed_origins=("http://localhost:3000/",), allowed_hosts=("box.lan",)) as s:
        auth = {"Authorization": f"Bearer {s.token}"}
        ok = httpx.get(f"{s.base_url}/models", headers={**auth, "Origin": "http://localhost:3000"})
        assert ok.status_code == 200 and ok.json()["data"][0]["gridtune"]["max_queue"] == 128
        for origin in ("http://localhost:3001", "http://localhost:3000.evil.example"):
            assert httpx.get(f"{s.base_url}/models", headers={**auth, "Origin": origin}).status_code == 403
        assert httpx.get(f"{s.base_url}/models", headers={**auth, "Host": f"box.lan:{s.port}"}).status_code == 200
        assert httpx.get(f"{s.base_url}/models", headers={**auth, "Host": f"box.lan.evil:{s.port}"}).status_code == 403
        assert httpx.get(f"{s.base_url}/models").status_code == 401
