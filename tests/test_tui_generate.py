"""The generate screen, driven by its keys against a real loopback fake server;
checked in the project file."""

from __future__ import annotations

import os
import socket
import time

import pytest
from textual.app import App

from gridtune.pipeline.spec.grid import GenerationSettings, GridSpec
from gridtune.pipeline.spec.project import create_project, load_project_spec
from gridtune.store import Store, runlock
from gridtune.tui.context import ProjectContext
from gridtune.tui.events import OpenPlayground, ProjectChanged
from gridtune.tui.screens.generate import GenerateScreen, Settings
from tests.tui_helpers import settle


class HostApp(App):
    """Hosts one screen on a real project and records the messages it sends the app."""

    def __init__(self, path, screen_cls, **screen_kwargs):
        super().__init__()
        self.ctx = ProjectContext(path, Store.open(path))
        self.screen_cls = screen_cls
        self.playground_calls: list[dict] = []
        self.changes: list[frozenset[str]] = []

    def on_mount(self) -> None:
        self.push_screen(self.screen_cls(self.ctx))

    def on_unmount(self) -> None:
        self.ctx.close()

    def on_open_playground(self, message: OpenPlayground) -> None:
        self.playground_calls.append({"model": message.model})

    def on_project_changed(self, message: ProjectChanged) -> None:
        self.changes.append(message.what)


def GridtuneApp(path, start_mode="generate"):  # noqa: N802 - the one screen under test
    return HostApp(path, GenerateScreen)


def small_spec(samples: int = 1) -> GridSpec:
    return GridSpec(
        name="tiny",
        generation="Write about {place} in {year}.",
        training="Place: {place}. Year: {year}.",
        variables={"place": ["Oslo", "Lima"], "year": [2030, 2040]},
        settings=GenerationSettings(temperature=1.0, max_tokens=50, samples=samples),
    )


@pytest.fixture
def project(tmp_path):
    path = tmp_path / "tiny.gridtune"
    create_project(path, small_spec()).close()
    return path


async def wait_for(pilot, predicate, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        await pilot.pause(0.1)
    return predicate()


def counts(path):
    with Store.open(path) as store:
        return store.status_counts()


def test_settings_parse_errors_name_the_field():
    good = {"model": "", "temperature": "0.7", "max_tokens": "100", "samples": "2",
            "concurrency": "4", "rpm": "", "tpm": "none"}
    parsed = Settings.parse(good)
    assert parsed == {"model": None, "temperature": 0.7, "max_tokens": 100, "samples": 2,
                      "concurrency": 4, "rpm": None, "tpm": None, "max_cost": None}
    with pytest.raises(ValueError, match="temperature"):
        Settings.parse(good | {"temperature": "3"})
    with pytest.raises(ValueError, match="max tokens"):
        Settings.parse(good | {"max_tokens": "lots"})


async def test_start_from_keys_generates_every_cell(project, fake_openai):
    app = GridtuneApp(project, start_mode="generate")
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.pause()
        screen = app.screen
        assert isinstance(screen, GenerateScreen)
        await pilot.press("o")  # into the settings: type the model, then leave
        await pilot.press(*"fake-model")
        await pilot.press("escape")
        await pilot.press("s")
        assert await wait_for(pilot, lambda: counts(project).done == 4), counts(project)
        # The screen attaches to the stored progress and shows the finished run.
        assert await wait_for(pilot, lambda: screen.snap and screen.snap.run
                              and screen.snap.run.state == "finished")
        await pilot.pause(0.6)
        assert "4/4" in str(screen.query_one("#gen-fraction").render())
        assert "On: Write about" in str(screen.query_one("#gen-tail").render())
    with Store.open(project) as store:
        # The run's options are the run's (recorded on it); the grid's defaults stay as they were.
        assert load_project_spec(store).settings.model is None
        assert store.latest_run().model == "fake-model"
        done = store.completions(status="done")
        assert len(done) == 4 and all(c.model == "fake-model" for c in done)


async def test_pause_stops_the_detached_run_and_resume_finishes(project, fake_openai):
    fake_openai.set(latency=0.5)
    app = GridtuneApp(project, start_mode="generate")
    async with app.run_test(size=(80, 24)) as pilot:
        screen = app.screen
        screen.query_one("#set-model").value = "fake-model"
        screen.query_one("#set-concurrency").value = "1"
        await pilot.press("s")
        assert await wait_for(pilot, lambda: screen._active())
        await pilot.press("p")
        assert await wait_for(pilot, lambda: screen.snap.run.state == "stopped", timeout=20)
        assert counts(project).done < 4
        assert screen.check_action("resume", ()) and not screen.check_action("start", ())
        fake_openai.set(latency=0.0)
        await pilot.press("s")  # resume: the same key, now "Resume" in the footer
        assert await wait_for(pilot, lambda: counts(project).done == 4)


async def test_options_are_per_run_and_ctrl_s_saves_them_as_the_grids_defaults(project):
    app = GridtuneApp(project, start_mode="generate")
    async with app.run_test(size=(80, 24)) as pilot:
        screen = app.screen
        await settle(pilot)
        temp = screen.query_one("#set-temperature")
        temp.focus()
        temp.value = "0.3"
        await pilot.press("enter")  # done editing: checked, kept for the next run, not saved
        await settle(pilot)
        assert screen.focused is None and screen.error is None
        with Store.open(project) as store:
            assert load_project_spec(store).settings.temperature == 1.0
        # samples is the grid's: a run cannot take it, ctrl+s saves it
        screen.query_one("#set-samples").value = "2"
        await pilot.press("s")
        await settle(pilot)
        assert "samples is the grid's" in screen.error
        await pilot.press("ctrl+s")
        await settle(pilot)
        assert screen.error is None
        assert "saved as the grid's defaults" in [n.message for n in app._notifications][-1]
        assert frozenset({"grid", "settings"}) in app.changes  # the other screens hear of it
    with Store.open(project) as store:
        spec = load_project_spec(store)
        assert spec.settings.temperature == 0.3 and spec.settings.samples == 2
        assert store.status_counts().completions == 8  # 4 cells x 2 samples
        assert store.latest_run() is None


async def test_bad_setting_is_shown_inline_and_nothing_starts(project):
    app = GridtuneApp(project, start_mode="generate")
    async with app.run_test(size=(80, 24)) as pilot:
        screen = app.screen
        await pilot.pause()
        screen.query_one("#set-temperature").value = "9"
        await pilot.press("s")
        await pilot.pause()
        error = screen.query_one("#gen-error")
        assert error.display and "temperature" in str(error.render())
    with Store.open(project) as store:
        assert store.latest_run() is None


async def test_backend_error_is_shown_inline(project, monkeypatch):
    # A compatible server with nothing listening: the run cannot even pick a model.
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/v1")
    app = GridtuneApp(project, start_mode="generate")
    async with app.run_test(size=(80, 24)) as pilot:
        screen = app.screen
        await pilot.pause()
        await pilot.press("s")
        assert await wait_for(pilot, lambda: screen.error is not None, timeout=10)
        assert "model" in screen.error
        assert screen.busy is None


async def test_attaches_to_a_run_in_progress(project):
    # A run recorded by another live process (this one) shows as running at once.
    with Store.open(project) as store:
        run_id = store.start_run(pid=os.getpid(), host=socket.gethostname(), model="teacher",
                                 params={"temperature": 0.3, "max_tokens": 77, "concurrency": 40,
                                         "rpm": 500.0, "tpm": None}, is_alive=runlock.is_alive)
        store.heartbeat(run_id, {"run_id": run_id, "state": "running", "total": 4, "done": 1,
                                 "in_flight": 2, "requests_per_s": 1.5, "tokens_per_s": 42.0,
                                 "cost_usd": 0.0012, "eta_s": 2.0, "elapsed_s": 3.0})
    app = GridtuneApp(project, start_mode="generate")
    async with app.run_test(size=(80, 24)) as pilot:
        screen = app.screen
        assert await wait_for(pilot, lambda: screen.snap is not None)
        await pilot.pause()
        assert screen._active()
        assert "running" in str(screen.query_one("#gen-state").render())
        assert "1.5" in str(screen.query_one("#gen-rates").render())
        assert screen.check_action("pause", ()) and not screen.check_action("start", ())
        assert screen.query_one("#set-model").disabled
        # The fields show what the run (started elsewhere, e.g. the command line) runs with.
        assert await wait_for(pilot, lambda: screen.query_one("#set-concurrency").value == "40")
        shown = {k: screen.query_one(f"#set-{k}").value for k in ("model", "temperature", "max_tokens", "rpm", "tpm")}
        assert shown == {"model": "teacher", "temperature": "0.3", "max_tokens": "77", "rpm": "500", "tpm": ""}


# -- before a run: the estimate; while starting: the phase; during a run: why retries ---------

LOCAL_SPEED = {"max_batch": 3, "context_length": 2048, "in_flight": 0, "decoding": 0,
               "stream_tokens_per_s": 10.0, "batch_tokens_per_s": 20.0, "generated_tokens": 0}


async def test_estimate_is_shown_before_a_run_and_concurrency_follows_the_server(project, fake_openai):
    fake_openai.set(gridtune=LOCAL_SPEED, chunk_delay_s=0.01)
    app = GridtuneApp(project, start_mode="generate")
    async with app.run_test(size=(80, 24)) as pilot:
        screen = app.screen
        note = screen.query_one("#gen-note")
        assert await wait_for(pilot, lambda: "no model to generate with" in str(note.render()))
        screen.query_one("#set-model").value = "fake-model"  # typed: estimated again
        # 4 cells x 50 tokens at 20 tok/s with 3 at once: 10 s
        expected = ("up to about 10 s on " + fake_openai.base_url
                    + " (≈ 20 tok/s with 3 at once; up to 4 × 50 tokens)")
        assert await wait_for(pilot, lambda: screen.estimate == expected), screen.estimate
        assert str(note.render()) == "estimate: " + expected
        assert screen.query_one("#set-concurrency").value == ""  # auto
        await pilot.press("s")
        assert await wait_for(pilot, lambda: counts(project).done == 4)
        assert fake_openai.peak_in_flight == 3
        with Store.open(project) as store:
            assert store.latest_run().params["concurrency"] == 3
        # Finished: the estimate is for what is left.
        assert await wait_for(pilot, lambda: screen.estimate == "nothing left to generate")


async def test_retry_reasons_are_shown_in_words(project):
    with Store.open(project) as store:
        run_id = store.start_run(pid=os.getpid(), host=socket.gethostname(), model="teacher",
                                 params={"concurrency": 8}, is_alive=runlock.is_alive)
        store.heartbeat(run_id, {"run_id": run_id, "state": "running", "total": 4, "done": 1, "in_flight": 3,
                                 "retries": 5, "retry_reasons": {"timeout": 3, "rate_limited": 2},
                                 "estimate": "about 6 min on the local server", "elapsed_s": 3.0})
    app = GridtuneApp(project, start_mode="generate")
    async with app.run_test(size=(80, 24)) as pilot:
        screen = app.screen
        note = screen.query_one("#gen-note")
        assert await wait_for(pilot, lambda: "retries 5" in str(note.render()))
        assert str(note.render()) == "retries 5: 3 timeouts, 2 busy/rate-limited (429)"


async def test_starting_the_local_server_shows_a_phase_not_a_frozen_screen(project, tmp_path):
    from gridtune import locations
    from gridtune.pipeline.generation.estimate import local_server_starting

    assert local_server_starting()  # no OPENAI_* settings and no local server in this test's home
    app = GridtuneApp(project, start_mode="generate")
    async with app.run_test(size=(80, 24)) as pilot:
        screen = app.screen
        assert await wait_for(pilot, lambda: screen.estimate is not None)
        assert screen.estimate == ("no estimate until the local server runs: s starts it (the first start "
                                   "fetches the model, ~1 min) and estimates; s again starts the run")
        # What a start that must first start the server shows, second by second:
        screen.busy = "starting"
        screen._server_start = time.time() - 5
        screen.poll()
        state = screen.query_one("#gen-state")
        assert await wait_for(pilot, lambda: "5s" in str(state.render()) or "6s" in str(state.render()))
        assert "starting the local server (first start fetches the model, ~1 min) · " in str(state.render())
        # A server that writes its phase in its state file is quoted.
        server_dir = locations.server_dir()
        server_dir.mkdir(parents=True, exist_ok=True)
        # (no pid in it: conftest stops the servers it finds in a test's state files)
        (server_dir / "server.json").write_text('{"phase": "loading the model"}')
        assert await wait_for(pilot, lambda: "loading the model · " in str(state.render()))
        (server_dir / "server.json").unlink()
        screen.busy = None
        screen._server_start = None


# -- rough edges of issue 10 ------------------------------------------------------------------


def _record_running_run(path, **progress):
    with Store.open(path) as store:
        run_id = store.start_run(pid=os.getpid(), host=socket.gethostname(), model="teacher",
                                 params={"temperature": 0.3, "max_tokens": 77, "concurrency": 4},
                                 is_alive=runlock.is_alive)
        store.heartbeat(run_id, {"run_id": run_id, "state": "running", "total": 4, "elapsed_s": 3.0, **progress})
    return run_id


async def test_o_during_a_run_says_why_the_options_are_read_only(project):
    run_id = _record_running_run(project, done=1, in_flight=1)
    app = GridtuneApp(project, start_mode="generate")
    async with app.run_test(size=(80, 24)) as pilot:
        screen = app.screen
        assert await wait_for(pilot, lambda: screen._active())
        await settle(pilot)
        await pilot.press("o")
        await pilot.pause()
        assert screen.focused is None  # nothing to type into
        message = [n.message for n in app._notifications][-1]
        assert f"run #{run_id} runs with the options shown (read-only)" in message
        assert "read-only" in screen.query_one("#gen-settings").border_title


async def test_s_on_a_finished_grid_is_a_notice_and_creates_no_run(project):
    from tests.test_tui_export import fill

    fill(project)
    app = GridtuneApp(project, start_mode="generate")
    async with app.run_test(size=(80, 24)) as pilot:
        screen = app.screen
        screen.query_one("#set-model").value = "fake-model"
        await settle(pilot)
        assert screen.check_action("start", ())
        await pilot.press("s")
        assert await wait_for(pilot, lambda: screen.busy is None and app._notifications)
        message = [n.message for n in app._notifications][-1]
        assert message.startswith("nothing left to generate: all 4 completions are done")
        assert screen.error is None
    with Store.open(project) as store:
        assert store.latest_run() is None


async def test_pending_is_never_negative_when_the_heartbeat_is_behind_the_rows(project):
    # The last heartbeat still says 2 in flight, but their rows are saved: pending is 0, not -2.
    from tests.test_tui_export import fill

    fill(project)
    _record_running_run(project, done=2, in_flight=2)
    app = GridtuneApp(project, start_mode="generate")
    async with app.run_test(size=(80, 24)) as pilot:
        screen = app.screen
        assert await wait_for(pilot, lambda: screen._active())
        await settle(pilot)
        shown = str(screen.query_one("#gen-counts").render())
        assert "in flight 0" in shown and "pending 0" in shown, shown


async def test_a_run_started_elsewhere_appears_through_the_apps_external_change(project):
    # The real app: its poll of the file's data_version says "external"; the idle screen
    # (which polls nothing by itself) reads the project again and attaches.
    from gridtune.tui.app import GridtuneApp as RealApp

    app = RealApp(project, start_mode="generate")
    async with app.run_test(size=(80, 24)) as pilot:
        screen = app.screen
        await settle(pilot)
        assert isinstance(screen, GenerateScreen) and not screen._active()
        _record_running_run(project, done=1, in_flight=1)
        assert await wait_for(pilot, lambda: screen._active(), timeout=10)
        assert screen.query_one("#set-concurrency").value == "4"
