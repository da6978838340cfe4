"""The layering DESIGN.md asks for: pipeline/ and store/ never load Textual,
and the server imports nothing of the app but the validator."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import gridtune.pipeline
import gridtune.store


def _modules(package) -> list[str]:
    return [f"{package.__name__}.{m.name}" for m in pkgutil.iter_modules(package.__path__)]


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


def test_server_imports_only_the_validator_of_the_app():
    import gridtune.server

    allowed = ("gridtune.server", "gridtune.locations", "gridtune.pipeline.validate",
               "gridtune.pipeline.tokens", "gridtune.pipeline.cost", "gridtune.pipeline")
    modules = _modules(gridtune.server)
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}:\n"
        "    try: importlib.import_module(m)\n"
        "    except ImportError as e:\n"
        "        if 'torch' in str(e) or 'transformers' in str(e) or 'peft' in str(e): continue\n"
        "        raise\n"
        "print('\\n'.join(sorted(m for m in sys.modules if m.startswith('gridtune'))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    loaded = [m for m in out.stdout.split() if m and m != "gridtune"]
    bad = [m for m in loaded if not m.startswith(allowed)]
    assert bad == []


def test_python_dash_m_gridtune_is_the_command_line():
    """DESIGN.md: `python -m gridtune …` is the same command line as `gridtune …`."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "gridtune", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "Usage: gridtune" in out.stdout and "generate" in out.stdout
