"""Models by Hub id, offline: a fake Hub on 127.0.0.1 (huggingface_hub honours HF_ENDPOINT)
serves a tiny random model's files, so a real download runs, with its progress, into a
private HF_HOME; misspelled, gated, cut-off, offline and too-large end in one line naming
the model and what to do, and nothing half-downloaded is loaded."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

pytest.importorskip("huggingface_hub")

from gridtune.server import hub  # noqa: E402

pytestmark = pytest.mark.local
SHA = "0123456789abcdef0123456789abcdef01234567"


class FakeHub:
    """Repos: name -> {file: bytes}; 'gated/...' answers 403 GatedRepo, unknown ones 404
    RepoNotFound; a repo named '*cut*' sends half of each weight file and hangs up."""

    def __init__(self, repos: dict[str, dict[str, bytes]]):
        self.repos = repos
        self.requests: list[str] = []
        hub_ = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _refuse(self, repo: str) -> bool:
                if repo.startswith("gated/"):
                    self.send_response(403)
                    self.send_header("X-Error-Code", "GatedRepo")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return True
                if repo not in hub_.repos:
                    self.send_response(404)
                    self.send_header("X-Error-Code", "RepoNotFound")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return True
                return False

            def do_GET(self) -> None:
                self._serve(body=True)

            def do_HEAD(self) -> None:
                self._serve(body=False)

            def _serve(self, body: bool) -> None:
                path = self.path.split("?")[0]
                hub_.requests.append(f"{self.command} {path}")
                api = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/[^/]+)?", path)
                if api:
                    repo = api.group(1)
                    if self._refuse(repo):
                        return
                    files = hub_.repos[repo]
                    data = json.dumps({"id": repo, "modelId": repo, "sha": SHA, "private": False,
                                       "siblings": [{"rfilename": f, "size": len(b)} for f, b in files.items()]})
                    raw = data.encode()
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(raw)))
                    self.end_headers()
                    self.wfile.write(raw)
                    return
                res = re.fullmatch(r"/([^/]+/[^/]+)/resolve/[^/]+/(.+)", path)
                if not res or self._refuse(res.group(1)) or res.group(2) not in hub_.repos[res.group(1)]:
                    if res and res.group(1) in hub_.repos:
                        self.send_response(404)
                        self.send_header("X-Error-Code", "EntryNotFound")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                    return
                repo, name = res.group(1), res.group(2)
                blob = hub_.repos[repo][name]
                start = 0
                rng = self.headers.get("Range")
                if rng and rng.startswith("bytes=") and body:
                    start = int(rng[6:].split("-")[0] or 0)
                self.send_response(206 if start else 200)
                self.send_header("X-Repo-Commit", SHA)
                self.send_header("ETag", '"' + hashlib.sha256(blob).hexdigest() + '"')
                self.send_header("Content-Length", str(len(blob) - start))
                self.end_headers()
                if body:
                    if "cut" in repo and name.endswith(".safetensors"):
                        self.wfile.write(blob[start:start + (len(blob) - start) // 2])
                        self.wfile.flush()
                        self.close_connection = True
                        return
                    self.wfile.write(blob[start:])

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeHub:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    from tests.tiny_model import make_tiny_family_model

    path = make_tiny_family_model(tmp_path_factory.mktemp("hubsrc") / "m", "qwen2")
    return {p.name: p.read_bytes() for p in path.iterdir() if p.is_file()}


def _run(code: str, endpoint: str, home: Path, *, offline: bool = False) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
    env.update(HF_ENDPOINT=endpoint, HF_HOME=str(home), HF_HUB_DISABLE_TELEMETRY="1",
               HF_HUB_ETAG_TIMEOUT="5", HF_HUB_DOWNLOAD_TIMEOUT="5", OMP_NUM_THREADS="1")
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=240,
                          cwd=Path(__file__).resolve().parents[1])


FETCH = """
import sys
from gridtune.server.model import ModelError, resolve_source
try:
    print("OK", *resolve_source(sys.argv[1] if len(sys.argv) > 1 else {repo!r}))
except ModelError as exc:
    print("ERR", exc)
"""


def test_hub_ids_are_told_from_paths(tmp_path: Path) -> None:
    assert hub.is_hub_id("Qwen/Qwen2.5-0.5B-Instruct")
    assert not hub.is_hub_id("SmolLM2-135M-Instruct")
    assert not hub.is_hub_id("a/b/c") and not hub.is_hub_id("/abs/path")
    (tmp_path / "org" / "name").mkdir(parents=True)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        assert not hub.is_hub_id("org/name")  # a local directory wins
    finally:
        os.chdir(cwd)
    assert hub.progress_line("o/m", 312_000_000, 988_000_000, 7.6).startswith("fetching o/m: 312 MB of 988 MB, ")
    assert "left" in hub.progress_line("o/m", 312_000_000, 988_000_000, 7.6)


def test_download_with_progress_then_offline_from_cache(tiny_files: dict[str, bytes], tmp_path: Path) -> None:
    big = dict(tiny_files)
    with FakeHub({"test-org/tiny-qwen": big}) as fake:
        code = ("from gridtune.server.model import load_model\n"
                "m = load_model('test-org/tiny-qwen', device='cpu', on_progress=lambda l: print('PHASE', l))\n"
                "print('NAME', m.name)\n"
                "print('TEMPLATE', m.tokenizer.apply_chat_template([{'role': 'user', 'content': 'hi'}], "
                "tokenize=False, add_generation_prompt=True).replace(chr(10), '|'))\n")
        done = _run(code, fake.url, tmp_path / "hf")
        assert done.returncode == 0, done.stderr[-2000:]
        assert "NAME test-org/tiny-qwen" in done.stdout
        assert "TEMPLATE <|im_start|>user|hi<|im_end|>|<|im_start|>assistant|" in done.stdout
        assert re.search(r"fetching test-org/tiny-qwen: [\d.]+ [kM]?B of [\d.]+ [kM]?B", done.stderr), done.stderr
        assert "PHASE fetching test-org/tiny-qwen" in done.stdout and "PHASE loading test-org/tiny-qwen" in done.stdout
        snapshots = list((tmp_path / "hf" / "hub").glob("models--test-org--tiny-qwen/snapshots/*/model.safetensors"))
        assert len(snapshots) == 1  # in the user's standard cache
        assert any(r.startswith("GET /test-org/tiny-qwen/resolve/") for r in fake.requests)
    # the Hub gone and HF_HUB_OFFLINE set: the cached copy loads as it is
    again = _run(code, "http://127.0.0.1:9", tmp_path / "hf", offline=True)
    assert again.returncode == 0 and "NAME test-org/tiny-qwen" in again.stdout, again.stderr[-2000:]


def test_errors_are_one_line_naming_the_model(tiny_files: dict[str, bytes], tmp_path: Path) -> None:
    with FakeHub({"test-org/tiny-qwen": tiny_files, "test-org/cut-qwen": tiny_files}) as fake:
        home = tmp_path / "hf"
        lines = {}
        for repo in ("test-org/tiny-qwne", "gated/llama", "test-org/cut-qwen"):
            done = _run(FETCH.format(repo=repo), fake.url, home)
            assert done.returncode == 0, done.stderr[-2000:]
            assert "Traceback" not in done.stderr
            out = [ln for ln in done.stdout.splitlines() if ln.startswith(("OK", "ERR"))]
            assert len(out) == 1 and out[0].startswith("ERR") and repo in out[0], done.stdout
            lines[repo] = out[0]
        assert "misspelled" in lines["test-org/tiny-qwne"]
        assert "gated" in lines["gated/llama"] and "HF_TOKEN" in lines["gated/llama"]
        assert "hf download" in lines["test-org/cut-qwen"] or "again" in lines["test-org/cut-qwen"]
        # the cut-off file never became a snapshot file: nothing half-downloaded to load
        assert not list(home.glob("hub/models--test-org--cut-qwen/snapshots/*/model.safetensors"))
    offline = _run(FETCH.format(repo="test-org/never-fetched"), "http://127.0.0.1:9", tmp_path / "hf2", offline=True)
    line = [ln for ln in offline.stdout.splitlines() if ln.startswith(("OK", "ERR"))]
    assert line and line[0].startswith("ERR test-org/never-fetched is not in the Hugging Face cache"), offline.stdout
    assert "HF_HUB_OFFLINE" in line[0] and "hf download test-org/never-fetched" in line[0]
    unreachable = _run(FETCH.format(repo="test-org/never-fetched"), "http://127.0.0.1:9", tmp_path / "hf3")
    line = [ln for ln in unreachable.stdout.splitlines() if ln.startswith(("OK", "ERR"))]
    assert line and line[0].startswith("ERR") and "test-org/never-fetched" in line[0], unreachable.stdout


def test_too_large_for_the_device_is_refused_before_downloading(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hub, "_available_memory", lambda device: 1_000_000_000)
    with pytest.raises(hub.HubError) as info:
        hub.check_fits("big/model", 14_000_000_000, 2, "cpu", 4)  # 7B bf16 weights, fp32 on the CPU
    assert str(info.value).startswith("big/model needs about 28 GB loaded on cpu, more than the 1.0 GB")
    hub.check_fits("small/model", 270_000_000, 2, "cpu", 4)


def test_serve_refuses_a_gated_model_in_one_line(tmp_path: Path) -> None:
    with FakeHub({}) as fake:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
        env.update(HF_ENDPOINT=fake.url, HF_HOME=str(tmp_path / "hf"), OMP_NUM_THREADS="1")
        done = subprocess.run([sys.executable, "-m", "gridtune", "serve", "--model", "gated/gemma-x",
                               "--data-dir", str(tmp_path / "srv")], env=env, capture_output=True, text=True,
                              timeout=240, cwd=Path(__file__).resolve().parents[1])
    assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr[-2000:]
    last = [ln for ln in done.stderr.splitlines() if "gated/gemma-x" in ln][-1]
    assert "is gated" in last and "HF_TOKEN" in last
    assert not (tmp_path / "srv" / "server.json").exists()  # no phase left behind


def test_a_hub_id_or_path_is_what_an_auto_started_server_serves(tmp_path: Path, monkeypatch) -> None:
    from gridtune.pipeline.client import local_service

    monkeypatch.delenv("GRIDTUNE_LOCAL_MODEL", raising=False)
    assert local_service.loadable_model("Qwen/Qwen2.5-0.5B-Instruct")
    assert local_service.loadable_model(str(tmp_path))
    assert not local_service.loadable_model("ft:Qwen/Qwen2.5-0.5B-Instruct:local:agi:ftjob-1")
    assert not local_service.loadable_model("SmolLM2-135M-Instruct") and not local_service.loadable_model(None)
    # A model tuned from a Hub id or path (ask, eval): the server for it loads the base.
    smf = local_service.server_model_for
    assert smf("ft:Qwen/Qwen2.5-0.5B-Instruct:local:agi:ftjob-1") == "Qwen/Qwen2.5-0.5B-Instruct"
    assert smf(f"ft:{tmp_path}:local::ftjob-2") == str(tmp_path)
    assert smf("ft:SmolLM2-135M-Instruct:local::ftjob-3") is None  # the default's: the default server
    assert smf("ft:gpt-4o-mini-2024-07-18:org::abc") is None and smf("Qwen/Qwen2.5-0.5B-Instruct") is not None
    cmd = local_service._serve_command(tmp_path, "Qwen/Qwen2.5-0.5B-Instruct")
    assert cmd[-2:] == ["--model", "Qwen/Qwen2.5-0.5B-Instruct"]
    assert "--model" not in local_service._serve_command(tmp_path)
