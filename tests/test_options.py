"""Options defined once (pipeline/options.py): the same bounds and messages for the
command line, the settings forms and the grid spec; and one rule for where a run's
settings are kept, the same for the CLI and the TUI."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from gridtune.cli.main import main
from gridtune.pipeline.spec.grid import GridError, parse_spec
from gridtune.pipeline.spec.options import EXPORT, FINETUNE, GENERATION, OptionError
from gridtune.pipeline.spec.project import create_project, load_project_spec
from gridtune.store import Store
from gridtune.tui.screens.generate import Settings
from tests.test_tui_export import fill
from tests.test_tui_generate import small_spec


def test_parse_converts_and_names_the_setting_and_its_bounds():
    assert GENERATION["temperature"].parse("1.5") == 1.5
    assert GENERATION["max_tokens"].parse(" 80 ") == 80
    assert GENERATION["concurrency"].parse("auto") is None and GENERATION["rpm"].parse("") is None
    with pytest.raises(OptionError, match=r"^temperature must be within 0\.\.2, not 3$"):
        GENERATION["temperature"].parse("3")
    with pytest.raises(OptionError, match=r"^max tokens must be a whole number at least 1, not 'lots'$"):
        GENERATION["max_tokens"].parse("lots")
    with pytest.raises(OptionError, match=r"^rpm must be positive, not nan$"):
        GENERATION["rpm"].parse("nan")
    with pytest.raises(OptionError, match=r"validation fraction must be in \[0, 1\), not 1$"):
        EXPORT["validation_fraction"].parse("1")
    with pytest.raises(OptionError, match=r"epochs must be within 1\.\.50, not 0"):
        FINETUNE["epochs"].parse("0")
    assert EXPORT["min_grade"].check(5) == 5


def test_one_bound_three_places_one_message():
    # the form, the spec and the command line say the same thing about temperature
    with pytest.raises(ValueError, match="temperature must be within 0..2"):
        Settings.parse({"temperature": "2.5", "max_tokens": "5", "samples": "1"})
    spec_text = ('name = "x"\n[prompt]\ngeneration = "about {a}"\n[variables]\na = ["b"]\n'
                 "[generation]\ntemperature = 2.5\n")
    with pytest.raises(GridError, match=r"^\[generation\] temperature must be within 0\.\.2, not 2\.5$"):
        parse_spec(spec_text)
    result = CliRunner().invoke(main, ["ask", "-", "hi", "--temperature", "2.5"])
    assert result.exit_code == 2 and "--temperature must be within 0..2, not 2.5" in result.output


def test_export_and_finetune_flags_use_the_same_bounds(tmp_path):
    path = tmp_path / "p.gridtune"
    create_project(path, small_spec()).close()
    out = CliRunner().invoke(main, ["export", str(path), "-o", str(tmp_path / "x.jsonl"), "--min-grade", "7"])
    assert out.exit_code == 2 and "--min-grade must be within 0..5, not 7" in out.output
    out = CliRunner().invoke(main, ["export", str(path), "-o", str(tmp_path / "x.jsonl"),
                                    "--validation-fraction", "1.5"])
    assert out.exit_code == 2 and "--validation-fraction must be in [0, 1), not 1.5" in out.output
    assert not (tmp_path / "x.jsonl").exists()
    out = CliRunner().invoke(main, ["finetune", str(path), "--epochs", "99"])
    assert out.exit_code == 2 and "--epochs must be within 1..50, not 99" in out.output


def test_cli_run_settings_are_per_run_and_save_defaults_saves_them(tmp_path, fake_openai):
    path = tmp_path / "p.gridtune"
    create_project(path, small_spec()).close()
    out = CliRunner().invoke(main, ["generate", str(path), "--model", "fake-model", "--temperature", "0.2",
                                    "--limit", "1"])
    assert out.exit_code == 0, out.output
    with Store.open(path) as store:
        assert load_project_spec(store).settings.temperature == 1.0  # the defaults stay
        run = store.latest_run()
        assert run.model == "fake-model" and run.params["temperature"] == 0.2  # recorded on the run
    out = CliRunner().invoke(main, ["generate", str(path), "--model", "fake-model", "--temperature", "0.2",
                                    "--save-defaults", "--limit", "1"])
    assert out.exit_code == 0, out.output
    assert "saved as the grid's defaults: model fake-model, temperature 0.2" in out.output
    with Store.open(path) as store:
        settings = load_project_spec(store).settings
        assert (settings.model, settings.temperature) == ("fake-model", 0.2)


def test_cli_generate_on_a_finished_project_says_so_and_creates_no_run(tmp_path, fake_openai):
    path = tmp_path / "p.gridtune"
    create_project(path, small_spec()).close()
    fill(path)
    out = CliRunner().invoke(main, ["generate", str(path), "--model", "fake-model"])
    assert out.exit_code == 0, out.output
    assert "nothing left to generate: all 4 completions are done" in out.output
    with Store.open(path) as store:
        assert store.latest_run() is None
    assert fake_openai.chat_requests() == []
