"""Models by Hugging Face Hub id: fetched with huggingface_hub into the user's own cache.

``fetch(repo_id)`` downloads what a model needs (config, tokenizer, chat template,
safetensors weights; one GGUF for a GGUF-only repository) into the standard cache
(HF_HOME / HF_HUB_CACHE; HF_TOKEN for gated or private models; HF_ENDPOINT for a
mirror), printing progress (bytes, rate, time left) on stderr and to ``on_progress``,
and returns the snapshot directory. Before the weights it checks that they fit the
device's memory and the cache's disk; after, that every file is whole (huggingface_hub
writes ``.incomplete`` files and renames them; the sizes are checked again here), so a
killed download is resumed, never loaded. Every failure is a ``HubError`` with one
line that names the model and what to do.

The rest of the server keeps transformers offline (model.py forces HF_HUB_OFFLINE):
only this module talks to the Hub, and only when the user has not set HF_HUB_OFFLINE
themselves; offline, a model already in the cache is used as it is.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gridtune.core.errors import one_line

# What a model needs: its config, its tokenizer and chat template, its weights.
WANTED = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
          "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
          "chat_template.jinja", "chat_template.json", "*.safetensors", "model.safetensors.index.json")
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")
_BYTES_PER = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}
_lock = threading.Lock()


def _truthy(value: str | None) -> bool:
    return (value or "").strip().upper() in ("1", "ON", "YES", "TRUE")


# Whether the user asked for offline, read before model.py forces it for transformers.
USER_OFFLINE = _truthy(os.environ.get("HF_HUB_OFFLINE")) or _truthy(os.environ.get("TRANSFORMERS_OFFLINE"))


def is_hub_id(name: str) -> bool:
    """Whether ``name`` reads as a Hub model id (owner/name) and is no local path."""
    return bool(_HUB_ID.fullmatch(name)) and not Path(name).expanduser().exists()


class HubError(RuntimeError):
    """A Hub model could not be fetched; one line naming it and what to do (model.py
    raises it on as its ModelError)."""


def _error(message: str) -> Exception:
    return HubError(message)


def _size(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}" if n < 10 * scale else f"{n / scale:.0f} {unit}"
    return f"{int(n)} B"


def _duration(seconds: float) -> str:
    seconds = int(seconds + 0.5)
    if seconds < 90:
        return f"{seconds} s"
    if seconds < 5400:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def progress_line(repo_id: str, done: int, total: int, elapsed: float) -> str:
    """'fetching OWNER/NAME: 312 MB of 988 MB, 41 MB/s, ~17 s left' (short: the TUI shows it)."""
    line = f"fetching {repo_id}: {_size(done)} of {_size(total)}"
    if elapsed >= 1 and done > 0:
        rate = done / elapsed
        line += f", {_size(rate)}/s, ~{_duration(max(total - done, 0) / rate)} left"
    return line


def _hint(repo_id: str) -> str:
    return (f"pre-download it (`hf download {repo_id}`) where the Hub is reachable, "
            "or pass --model a local directory or GGUF file")


def _pick_files(siblings: list[tuple[str, int | None]], repo_id: str) -> list[tuple[str, int | None]]:
    names = {name for name, _ in siblings}
    if "config.json" in names:
        if not any(n.endswith(".safetensors") for n in names):
            raise _error(f"{repo_id} has no safetensors weights (only pickled .bin files, which gridtune does not "
                         "load): convert it, or pass a local directory")
        # top-level files only; a sharded model's index names its shards (filtered once read)
        return [s for s in siblings if "/" not in s[0] and any(fnmatch.fnmatch(s[0], p) for p in WANTED)]
    ggufs = sorted((s for s in siblings if s[0].endswith(".gguf")), key=lambda s: s[1] or 0)
    if len(ggufs) == 1:
        return ggufs
    if ggufs:
        names_ = ", ".join(n for n, _ in ggufs[:4]) + (", …" if len(ggufs) > 4 else "")
        raise _error(f"{repo_id} holds several GGUF files ({names_}): download one "
                     f"(`hf download {repo_id} FILE`) and pass --model its path")
    raise _error(f"{repo_id} is not a model gridtune can load (no config.json, no GGUF file)")


def _weight_dtype_bytes(config: dict[str, Any]) -> int:
    dtype = str(config.get("torch_dtype") or config.get("dtype") or "float32").replace("torch.", "")
    return _BYTES_PER.get(dtype, 2)


def _available_memory(device: str) -> int | None:
    """Bytes free on ``device`` for weights (GPU free memory, or MemAvailable), None if unknown."""
    if device.startswith("cuda"):
        try:
            import torch

            return int(torch.cuda.mem_get_info(torch.device(device))[0])
        except Exception:  # noqa: BLE001
            return None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def check_fits(repo_id: str, weight_bytes: int, disk_bytes_per_param: int, device: str, dtype_bytes: int) -> None:
    """Refuse, in one line, a model whose weights in the loaded dtype exceed the device's free memory."""
    need = weight_bytes * dtype_bytes // max(1, disk_bytes_per_param)
    free = _available_memory(device)
    if free is not None and need > free:
        where = "GPU memory free" if device.startswith("cuda") else "memory available"
        raise _error(f"{repo_id} needs about {_size(need)} loaded on {device}, more than the {_size(free)} of "
                     f"{where}: pick a smaller model (or a GGUF), or use a machine with more memory")


def _call_hub(repo_id: str, fn: Callable[[], Any]) -> Any:
    """Run a huggingface_hub call, its errors turned into one line naming the model."""
    from huggingface_hub import errors as hub_errors

    try:
        return fn()
    except hub_errors.GatedRepoError:
        raise _error(f"{repo_id} is gated: accept its terms at https://huggingface.co/{repo_id}, then set HF_TOKEN "
                     "(or run `hf auth login`) and try again") from None
    except hub_errors.RepositoryNotFoundError:
        raise _error(f"no model {repo_id} on the Hugging Face Hub (misspelled? a private one needs HF_TOKEN); "
                     "or pass --model a local directory or GGUF file") from None
    except hub_errors.RevisionNotFoundError:
        raise _error(f"{repo_id}: no such revision on the Hub") from None
    except hub_errors.OfflineModeIsEnabled:
        raise _error(f"{repo_id} is not in the Hugging Face cache and HF_HUB_OFFLINE is set: "
                     + _hint(repo_id)) from None
    except hub_errors.LocalEntryNotFoundError:
        raise _error(f"{repo_id} is not in the Hugging Face cache ({_cache_dir()}) and the Hub cannot be reached: "
                     + _hint(repo_id)) from None
    except hub_errors.HfHubHTTPError as exc:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if status in (401, 403):
            raise _error(f"the Hub refused {repo_id} ({status}): set HF_TOKEN to a token that may read it") from None
        raise _error(f"could not fetch {repo_id} from the Hub ({one_line(exc)}): " + _hint(repo_id)) from None
    except OSError as exc:  # connection refused, DNS, disk full
        if getattr(exc, "errno", None) == 28:
            raise _error(f"the disk holding the Hugging Face cache ({_cache_dir()}) is full while fetching "
                         f"{repo_id}: free space or set HF_HOME to a larger disk") from None
        raise _error(f"could not reach the Hub to fetch {repo_id} ({one_line(exc, with_type=True)}): "
                     + _hint(repo_id)) from None
    except Exception as exc:  # noqa: BLE001 - httpx and friends: the user needs one line
        raise _error(f"could not fetch {repo_id} ({one_line(exc, with_type=True)}): " + _hint(repo_id)) from None


def _cache_dir() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


class _Offline:
    """huggingface_hub as the user set it up (model.py forces offline for transformers)."""

    def __enter__(self) -> None:
        from huggingface_hub import constants

        self.saved = constants.HF_HUB_OFFLINE
        constants.HF_HUB_OFFLINE = USER_OFFLINE

    def __exit__(self, *exc: Any) -> None:
        from huggingface_hub import constants

        constants.HF_HUB_OFFLINE = self.saved


def _storage(repo_id: str) -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE) / ("models--" + repo_id.replace("/", "--"))


def _complete(path: Path) -> tuple[Path, str | None] | None:
    """(path, GGUF name or None) when the snapshot at ``path`` holds a whole model."""
    if (path / "config.json").is_file():
        index = path / "model.safetensors.index.json"
        if index.is_file():
            shards = set(json.loads(index.read_text()).get("weight_map", {}).values())
            if not shards or not all((path / s).is_file() for s in shards):
                return None
        elif not any(path.glob("*.safetensors")):
            return None
        return path, None
    ggufs = sorted(path.glob("*.gguf"))
    return (path, ggufs[0].name) if len(ggufs) == 1 else None


def _cached(repo_id: str) -> tuple[Path, str | None] | None:
    """The cached snapshot of the model (refs/main's, else the newest), when it is whole."""
    storage = _storage(repo_id)
    ref = storage / "refs" / "main"
    candidates = []
    try:
        if ref.is_file():
            candidates.append(storage / "snapshots" / ref.read_text().strip())
        snapshots = storage / "snapshots"
        if snapshots.is_dir():
            candidates += sorted(snapshots.iterdir(), key=lambda p: p.stat().st_mtime, reverse=True)
    except OSError:
        return None
    for path in candidates:
        found = _complete(path) if path.is_dir() else None
        if found is not None:
            return found
    return None


class _Reporter(threading.Thread):
    """Every second: bytes on disk so far (finished files and the ``.incomplete`` ones) as one line."""

    def __init__(self, repo_id: str, blobs: Path, total: int, on_progress: Callable[[str], None] | None):
        super().__init__(name="gridtune-fetch", daemon=True)
        self.repo_id, self.blobs, self.total, self.on_progress = repo_id, blobs, total, on_progress
        self.finished = 0  # bytes of the files done
        self.stop = threading.Event()
        self.started_at = time.monotonic()
        self.tty = sys.stderr.isatty()

    def partial(self) -> int:
        try:
            return sum(p.stat().st_size for p in self.blobs.glob("*.incomplete"))
        except OSError:
            return 0

    def report(self, final: bool = False) -> None:
        done = min(self.total, self.finished + (0 if final else self.partial()))
        line = progress_line(self.repo_id, done, self.total, time.monotonic() - self.started_at)
        if self.tty:
            print("\r\033[K" + line, end="\n" if final else "", file=sys.stderr, flush=True)
        else:
            print(line, file=sys.stderr, flush=True)
        if self.on_progress is not None:
            self.on_progress(line)

    def run(self) -> None:
        while not self.stop.wait(1.0 if self.tty else 2.0):
            self.report()


def fetch(repo_id: str, *, device: str = "cpu", dtype_bytes: int = 4,
          on_progress: Callable[[str], None] | None = None) -> tuple[Path, str | None]:
    """(snapshot directory, GGUF file name or None) for Hub model ``repo_id``, fetched
    into the user's cache when not there already; see the module's docstring."""
    try:
        import huggingface_hub  # noqa: F401
    except ImportError:
        raise _error("models by Hub id need huggingface_hub: pip install huggingface_hub") from None
    with _lock, _Offline():
        return _fetch(repo_id, device, dtype_bytes, on_progress)


def _fetch(repo_id: str, device: str, dtype_bytes: int,
           on_progress: Callable[[str], None] | None) -> tuple[Path, str | None]:
    from huggingface_hub import HfApi, constants, hf_hub_download

    if USER_OFFLINE:
        found = _cached(repo_id)
        if found is None:
            raise _error(f"{repo_id} is not in the Hugging Face cache ({_cache_dir()}) and HF_HUB_OFFLINE is set: "
                         + _hint(repo_id))
        return found
    try:
        info = _call_hub(repo_id, lambda: HfApi().model_info(repo_id, files_metadata=True))
    except Exception:
        found = _cached(repo_id)  # no Hub (network down, refused): a complete cached copy will do
        if found is not None:
            return found
        raise
    siblings = [(s.rfilename, getattr(s, "size", None)) for s in (info.siblings or [])]
    files = _pick_files(siblings, repo_id)
    revision = info.sha or "main"

    def download(name: str) -> Path:
        return Path(_call_hub(repo_id, lambda: hf_hub_download(repo_id, name, revision=revision)))

    small = [f for f in files if not f[0].endswith((".safetensors", ".gguf"))]
    weights = [f for f in files if f[0].endswith((".safetensors", ".gguf"))]
    snapshot: Path | None = None
    for name, _ in small:
        snapshot = download(name).parent
    if "model.safetensors.index.json" in dict(small) and snapshot is not None:
        shards = set(json.loads((snapshot / "model.safetensors.index.json").read_text()).get("weight_map", {}).values())
        weights = [w for w in weights if w[0] in shards]
    config: dict[str, Any] = {}
    if snapshot is not None and (snapshot / "config.json").is_file():
        config = json.loads((snapshot / "config.json").read_text())
    total = sum(size or 0 for _, size in weights)
    # a GGUF (no config) is quantized: about a byte a weight or less, dequantized on load
    check_fits(repo_id, total, _weight_dtype_bytes(config) if config else 1, device, dtype_bytes)
    cache = Path(constants.HF_HUB_CACHE)
    storage = _storage(repo_id)
    missing = sum(size or 0 for name, size in weights if not (storage / "snapshots" / revision / name).is_file())
    try:
        free = shutil.disk_usage(cache if cache.exists() else cache.parent).free
    except OSError:
        free = None
    if free is not None and missing > free:
        raise _error(f"{repo_id} needs {_size(missing)} more on disk and the Hugging Face cache ({cache}) has "
                     f"{_size(free)} free: free space or set HF_HOME to a larger disk")
    cached = {name for name, _ in weights if (storage / "snapshots" / revision / name).is_file()}
    reporter = _Reporter(repo_id, storage / "blobs", total, on_progress) if missing else None
    if reporter is not None:
        reporter.finished = sum(size or 0 for name, size in weights if name in cached)
        reporter.start()
    try:
        for name, size in weights:
            snapshot = download(name).parent
            if reporter is not None and name not in cached:
                reporter.finished = min(total, reporter.finished + (size or 0))
    finally:
        if reporter is not None:
            reporter.stop.set()
            reporter.join(timeout=5)
    if reporter is not None:
        reporter.finished = total
        reporter.report(final=True)
    assert snapshot is not None
    for name, size in files:  # whole files only: a cut-short one is never loaded
        path = snapshot / name
        if not path.is_file() or (size is not None and path.stat().st_size != size):
            raise _error(f"{repo_id}: {name} is incomplete in the cache; run the command again to resume the download")
    if revision != "main":  # as huggingface_hub records a branch: offline use finds this snapshot
        try:
            (storage / "refs").mkdir(parents=True, exist_ok=True)
            (storage / "refs" / "main").write_text(revision)
        except OSError:
            pass
    gguf = next((name for name, _ in files if name.endswith(".gguf")), None)
    return snapshot, gguf
