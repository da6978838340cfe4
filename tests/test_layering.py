"""The layering DESIGN.md asks for: pipeline/ and store/ never load Textual,
and the server imports nothing of the app but the validator (and core).
import-linter checks the same statically (pyproject.toml, `lint-imports`); these
tests also see what is loaded at run time."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import gridtune.pipeline
import gridtune.store


def _modules(package) -> list[str]:
    return [m.name for m in pkgutil.walk_packages(package.__path__, prefix=f"{package.__name__}.")]


def test_pipeline_and_store_never_import_textual():
    modules = _modules(gridtune.pipeline) + _modules(gridtune.store)
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "bad = sorted(m for m in sys.modules if m == 'textual' or m.startswith('textual.'))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ""


def test_pipeline_and_store_source_names_no_ui_library():
    """Imports inside functions escape the test above until they run: read the source too."""
    import re
    from pathlib import Path

    pattern = re.compile(r"^\s*(from|import)\s+(textual|rich|click)\b", re.M)
    offenders = []
    for package in (gridtune.pipeline, gridtune.store):
        for path in Path(package.__path__[0]).rglob("*.py"):
            if pattern.search(path.read_text()):
                offenders.append(str(path))
    assert offenders == []


# What the server may load of the rest of gridtune: core, locations, and the validator
# with exactly the modules the validator itself imports (token counts, the price table).
SERVER_MAY_LOAD = {"gridtune", "gridtune.locations", "gridtune.pipeline", "gridtune.pipeline.format",
                   "gridtune.pipeline.format.validate",
                   "gridtune.pipeline.format.tokens", "gridtune.pipeline.format.cost"}


def _loaded_after(imports: list[str]) -> set[str]:
    """The gridtune modules a fresh interpreter holds after importing ``imports``
    (server modules that need the [local] extra are passed over where it is missing)."""
    code = (
        "import importlib, sys\n"
        f"for m in {imports!r}:\n"
        "    try: importlib.import_module(m)\n"
        "    except ImportError as e:\n"
        "        if 'torch' in str(e) or 'transformers' in str(e) or 'peft' in str(e): continue\n"
        "        raise\n"
        "print('\\n'.join(sorted(m for m in sys.modules if m.startswith('gridtune'))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return set(out.stdout.split())


def _outside_server(modules: set[str]) -> set[str]:
    return {m for m in modules if not m.startswith(("gridtune.server", "gridtune.core"))}


def test_the_validator_needs_only_what_the_server_may_load():
    """If the validator grows an import (the store, say), the server would drag it in."""
    assert _outside_server(_loaded_after(["gridtune.pipeline.format.validate"])) <= SERVER_MAY_LOAD


def test_server_imports_only_the_validator_of_the_app():
    import gridtune.server

    # jobs.py imports the validator inside a function: import it as the server would.
    loaded = _loaded_after(_modules(gridtune.server) + ["gridtune.pipeline.format.validate"])
    assert _outside_server(loaded) - SERVER_MAY_LOAD == set()


def test_server_source_names_nothing_of_the_app_but_the_validator():
    """Imports inside functions escape the test above until they run: read the source too."""
    import re
    from pathlib import Path

    import gridtune.server

    pattern = re.compile(r"^\s*(?:from|import)\s+(?:gridtune\.|\.\.)(pipeline|store|tui|screens)([.\w]*)", re.M)
    offenders = []
    for path in Path(gridtune.server.__path__[0]).rglob("*.py"):
        for layer, rest in pattern.findall(path.read_text()):
            if f"{layer}{rest}".split(" ")[0] != "pipeline.format.validate":
                offenders.append(f"{path.name}: {layer}{rest}")
    assert offenders == []


def test_python_dash_m_gridtune_is_the_command_line():
    """DESIGN.md: `python -m gridtune …` is the same command line as `gridtune …`."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "gridtune", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "Usage: gridtune" in out.stdout and "generate" in out.stdout
