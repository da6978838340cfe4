"""`gridtune serve` as a process: the API key, the loopback rule, server.json, and two
gridtune processes sharing one auto-started server."""

from __future__ import annotations

import json
import os
import subprocess
import time

import httpx
import openai
import pytest

from tests.server_support import gridtune_cmd, serve_subprocess, wait_for
from tests.tiny_model import tiny_model_dir  # noqa: F401 - fixture

pytestmark = pytest.mark.local


def test_api_key_is_required_and_never_written(tiny_model_dir, tmp_path):  # noqa: F811
    data = tmp_path / "data"
    with serve_subprocess(tiny_model_dir, data, "--api-key", "s3cret-key") as (proc, state):
        assert "visible to every user in `ps`" in (data / "test-serve.log").read_text()
        assert state["base_url"].startswith("http://127.0.0.1:") and state["pid"] == proc.pid
        r = httpx.get(f"{state['base_url']}/models")
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError) as exc:
            openai.OpenAI(base_url=state["base_url"], api_key="wrong", max_retries=0).models.list()
        assert exc.value.body["type"] == "invalid_request_error"
        ok = openai.OpenAI(base_url=state["base_url"], api_key="s3cret-key", max_retries=0)
        assert [m.id for m in ok.models.list()] == [state["model"]]
        owner = openai.OpenAI(base_url=state["base_url"], api_key=state["token"], max_retries=0)
        assert [m.id for m in owner.models.list()] == [state["model"]]  # the state file's token works too
    assert not (data / "server.json").exists()  # removed on exit
    for path in data.rglob("*"):
        if path.is_file():
            assert b"s3cret-key" not in path.read_bytes(), path


def test_refuses_a_public_address_without_a_key(tmp_path):
    r = subprocess.run(gridtune_cmd("serve", "--host", "0.0.0.0", "--data-dir", str(tmp_path)),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "without --api-key" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_one_data_dir_has_one_server(tiny_model_dir, tmp_path):  # noqa: F811
    data = tmp_path / "data"
    with serve_subprocess(tiny_model_dir, data) as (proc, state):
        r = subprocess.run(gridtune_cmd("serve", "--port", "0", "--data-dir", str(data), "--model",
                                        str(tiny_model_dir)), capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and "already running" in r.stderr


def _servers_on(data_dir) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmd = open(f"/proc/{entry}/cmdline", "rb").read().decode(errors="replace")
            except OSError:
                continue
            if "serve" in cmd and str(data_dir) in cmd:
                pids.append(int(entry))
    return pids


def test_two_gridtune_processes_share_one_auto_started_server(tiny_model_dir, tmp_path):  # noqa: F811
    home = tmp_path / "home"
    env = {**os.environ, "GRIDTUNE_HOME": str(home), "GRIDTUNE_LOCAL_MODEL": str(tiny_model_dir),
           "GRIDTUNE_IDLE_MINUTES": "2"}
    env.pop("OPENAI_API_KEY", None)
    env.pop("OPENAI_BASE_URL", None)
    data = home / "server"
    try:
        procs = [subprocess.Popen(gridtune_cmd("ask", "-", "Hello there", "--max-tokens", "5", "--temperature", "0"),
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(2)]
        outs = [p.communicate(timeout=240) for p in procs]
        for p, (_out, err) in zip(procs, outs):
            assert p.returncode == 0, err
        assert any("starting the local server" in err for _, err in outs)
        state = json.loads((data / "server.json").read_text())
        assert state["model"] == tiny_model_dir.name and "api_key" not in json.dumps(state)
        assert len(state["token"]) >= 32 and (data / "server.json").stat().st_mode & 0o777 == 0o600
        assert (data.stat().st_mode & 0o777) == 0o700 and (data / "server.log").stat().st_mode & 0o777 == 0o600
        assert _servers_on(data) == [state["pid"]]
        # a third process finds the running server and starts nothing
        r = subprocess.run(gridtune_cmd("ask", "-", "Again", "--max-tokens", "3"), env=env, capture_output=True,
                           text=True, timeout=120)
        assert r.returncode == 0 and "starting" not in r.stderr
        assert json.loads((data / "server.json").read_text())["pid"] == state["pid"]
    finally:
        for pid in _servers_on(data):
            os.kill(pid, 15)
        wait_for(lambda: not _servers_on(data), timeout=30)
        time.sleep(0.1)


def test_no_server_and_no_start_is_a_clear_error(monkeypatch, tmp_path):
    from gridtune.pipeline.client.backend import BackendError
    from gridtune.pipeline.client.local_service import ensure_backend

    monkeypatch.setenv("GRIDTUNE_HOME", str(tmp_path))
    with pytest.raises(BackendError, match="gridtune serve"):
        ensure_backend(start=False)


def test_idle_server_exits_by_itself_and_removes_its_state(tiny_model_dir, tmp_path):  # noqa: F811
    data = tmp_path / "data"
    with serve_subprocess(tiny_model_dir, data) as (proc, state):
        pass  # (--idle-timeout 0 here: it would never exit; the next one does)
    log = open(tmp_path / "idle.log", "wb")
    proc = subprocess.Popen(gridtune_cmd("serve", "--port", "0", "--model", str(tiny_model_dir), "--data-dir",
                                         str(data), "--idle-timeout", "0.03"), stdout=log, stderr=log)
    try:
        wait_for(lambda: (data / "server.json").exists() or proc.poll() is not None, timeout=120)
        assert proc.wait(timeout=120) == 0
        assert not (data / "server.json").exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
