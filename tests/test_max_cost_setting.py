"""The run's budget (``max_cost``) as a setting defined once (pipeline/options.py):
the same bounds and message in the form, on the command line and in the run's
options; passed per run (never saved in the spec) and recorded on the run; a field
of the generate screen whose run stops at the budget, with the bound shown first."""

from __future__ import annotations

import os
import socket

import pytest
from click.testing import CliRunner

from gridtune.cli.main import main
from gridtune.pipeline.generation.generate import GenerateError, GenerateOptions, preview_run, worst_cost
from gridtune.pipeline.spec.options import GENERATION, SPEC_SETTINGS, OptionError
from gridtune.pipeline.spec.project import load_project_spec
from gridtune.store import Store, runlock
from gridtune.tui.screens.generate import Settings, budget_text, usd
from tests.test_generate import completions, make_project
from tests.test_tui_generate import GridtuneApp, wait_for
from tests.tui_helpers import settle

MAX_COST = GENERATION["max_cost"]


def test_max_cost_parses_an_amount_and_leaving_it_empty_means_no_budget():
    assert MAX_COST.optional and MAX_COST.unset == "none"
    assert MAX_COST.parse("0.5") == 0.5 and MAX_COST.parse(" 12 ") == 12.0
    for empty in ("", "none", "-", "off"):
        assert MAX_COST.parse(empty) is None
    assert MAX_COST.format(0.25) == "0.25" and MAX_COST.format(None) == ""


@pytest.mark.parametrize(("typed", "shown"), [("0", "0"), ("-1", "-1"), ("abc", "'abc'"), ("inf", "inf"),
                                             ("nan", "nan")])
def test_max_cost_rejects_what_is_not_a_positive_amount_in_one_line_naming_it(typed, shown):
    with pytest.raises(OptionError) as caught:
        MAX_COST.parse(typed)
    assert str(caught.value) == f"max cost must be a positive amount in USD, not {shown}"
    # the form says the same, naming its field
    with pytest.raises(ValueError, match=r"^max cost must be a positive amount in USD"):
        Settings.parse({"temperature": "1", "max_tokens": "50", "samples": "1", "max_cost": typed})


def test_the_run_options_and_the_flag_check_it_with_the_same_words():
    for bad in (0, -1.0, float("inf"), float("nan"), True, "1"):
        with pytest.raises(GenerateError, match=r"^--max-cost must be a positive amount in USD, not "):
            GenerateOptions(max_cost=bad).check()
    GenerateOptions(max_cost=0.01).check()
    assert MAX_COST.check(2, "--max-cost") == 2


def test_the_cli_flag_comes_from_the_one_definition(tmp_path):
    path = make_project(tmp_path, n_a=1, n_b=1)
    out = CliRunner().invoke(main, ["generate", "--help"])
    assert "--max-cost USD" in out.output
    for bad in ("0", "-1", "nan"):
        out = CliRunner().invoke(main, ["generate", str(path), "--max-cost", bad])
        assert out.exit_code == 2 and "--max-cost must be a positive amount in USD" in out.output
        assert out.output.count("\n") == 1  # one line
    out = CliRunner().invoke(main, ["generate", str(path), "--max-cost", "abc"])
    assert out.exit_code == 2 and "--max-cost" in out.output
    assert completions(path, "done") == []


def test_a_batch_is_refused_with_a_max_cost(tmp_path, fake_openai):
    path = make_project(tmp_path, n_a=1, n_b=1)
    out = CliRunner().invoke(main, ["generate", str(path), "--batch", "--max-cost", "1"])
    assert out.exit_code == 2 and "--max-cost applies to live runs, not --batch" in out.output
    assert fake_openai.chat_requests() == []


def test_max_cost_is_a_runs_only_recorded_on_it_and_never_saved_as_a_default(tmp_path, fake_openai):
    assert "max_cost" not in SPEC_SETTINGS
    path = make_project(tmp_path, n_a=1, n_b=1)
    out = CliRunner().invoke(main, ["generate", str(path), "--max-cost", "5", "--temperature", "0.2",
                                    "--save-defaults"])
    assert out.exit_code == 0, out.output
    assert "saved as the grid's defaults: temperature 0.2" in out.output
    assert "cost: max cost $5: up to $" in out.output and ", within it (at max_tokens" in out.output
    with Store.open(path) as store:
        spec = load_project_spec(store)
        assert spec.settings.temperature == 0.2 and not hasattr(spec.settings, "max_cost")
        assert store.latest_run().params["max_cost"] == 5.0


def test_budget_text_fits_the_screen_and_says_what_the_budget_does():
    assert budget_text(0.5, 0.25, 4) == "max cost $0.5: up to $0.25 for 4 requests, within it"
    assert budget_text(0.01, 3.21, 1) == "max cost $0.01: up to $3.21 for 1 request; stops short of it"
    assert len(budget_text(1234.5, 12345.6789, 65_536)) <= 78
    assert budget_text(0.00005, 0.000123456, 4) == "max cost $0.00005: up to $0.000123 for 4 requests; " \
                                                 "stops short of it"  # never 5e-05
    assert [usd(x) for x in (5, 1234.5, 0.1, 0.0000004)] == ["$5", "$1,234.50", "$0.1", "$0"]
    assert budget_text(1, 0.0, 0) is None  # nothing to do: nothing to say


# -- the generate screen ----------------------------------------------------------------------


async def test_a_budget_typed_in_the_form_is_shown_first_and_the_run_stops_at_it(tmp_path, fake_openai):
    path = make_project(tmp_path, n_a=2, n_b=2)  # 4 cells of gpt-4o-mini (priced), max_tokens 50
    plan, _ = preview_run(path, GenerateOptions(max_cost=1.0))
    with Store.open(path) as store:
        most, requests, _completion = worst_cost(store, plan, GenerateOptions(max_cost=1.0))
    assert requests == 4
    budget = round(1.5 * most / requests, 8)  # room for one request at its worst, not two
    app = GridtuneApp(path)
    async with app.run_test(size=(80, 24)) as pilot:
        screen = app.screen
        await settle(pilot)
        await pilot.press("o")
        await pilot.pause()
        for _ in range(7):  # model, temp, max tokens, samples, concurrency, rpm, tpm: then max cost
            await pilot.press("tab")
        assert screen.focused is screen.query_one("#set-max_cost")
        await pilot.press(*str(budget), "enter")
        await settle(pilot)
        assert screen.error is None
        note = screen.query_one("#gen-note")
        assert await wait_for(pilot, lambda: "stops short of it" in str(note.render())), note.render()
        line = str(note.render()).splitlines()[-1]
        assert line == budget_text(budget, most, 4) and line.startswith(f"max cost {usd(budget)}: up to $")
        await pilot.press("b")  # a batch cannot stop part-way: refused inline
        await settle(pilot)
        assert "max cost applies to live runs" in screen.error
        await pilot.press("s")
        assert await wait_for(pilot, lambda: screen.snap and screen.snap.run
                              and screen.snap.run.state == "stopped", timeout=60)
        assert screen.error is None
        state = str(screen.query_one("#gen-state").render())
        assert "paused" in state and f"stopped at max cost ${budget:g}" in state  # says why, not just paused
    with Store.open(path) as store:
        run = store.latest_run()
        assert run.params["max_cost"] == budget  # the run took it from the form, and recorded it
        assert load_project_spec(store).settings.model == "gpt-4o-mini"
    done = completions(path, "done")
    assert 1 <= len(done) < 4 and len(completions(path, "pending")) == 4 - len(done)


async def test_an_active_runs_budget_is_shown_read_only(tmp_path):
    path = make_project(tmp_path, n_a=1, n_b=2)
    with Store.open(path) as store:
        run_id = store.start_run(pid=os.getpid(), host=socket.gethostname(), model="gpt-4o-mini",
                                 params={"temperature": 0.7, "max_tokens": 50, "concurrency": 2, "rpm": None,
                                         "tpm": None, "max_cost": 0.25}, is_alive=runlock.is_alive)
        store.heartbeat(run_id, {"run_id": run_id, "state": "running", "total": 2, "done": 0, "in_flight": 1,
                                 "elapsed_s": 1.0})
    app = GridtuneApp(path)
    async with app.run_test(size=(80, 24)) as pilot:
        screen = app.screen
        field = screen.query_one("#set-max_cost")
        assert await wait_for(pilot, lambda: field.value == "0.25")
        assert field.disabled
