"""Use a fine-tuning result: load it for generation, or export it as a plain model directory.

A job's ``result/`` is either a PEFT LoRA adapter (``adapter_config.json``) or a full model
(``config.json``); both carry the tokenizer and ``gridtune.json`` naming the base model.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from gridtune.server.model import LoadedModel, ModelError, load_model


def is_adapter(result_dir: Path) -> bool:
    return (Path(result_dir) / "adapter_config.json").is_file()


def result_base(result_dir: Path) -> str | None:
    """The base model a result was trained from (None: the default model)."""
    info = Path(result_dir) / "gridtune.json"
    if info.is_file():
        return json.loads(info.read_text()).get("base_model")
    return None


def load_tuned(loaded: LoadedModel, result_dir: Path, *, adapter_name: str = "default") -> Any:
    """A model ready to ``generate`` with the result applied, in eval mode.

    LoRA: returns a ``peft.PeftModel`` wrapping ``loaded.model``. PEFT injects the adapter
    layers into ``loaded.model`` in place, so afterwards the base answers as the tuned model;
    for the base's own answers use ``with tuned.disable_adapter(): ...``. More adapters can
    join the same model with ``tuned.load_adapter(dir, adapter_name=...)`` and
    ``tuned.set_adapter(name)``.
    Full fine-tuning: returns a new model loaded from ``result_dir`` on ``loaded``'s device
    and dtype; ``loaded.model`` is untouched. Both use ``loaded.tokenizer`` (the result
    carries an identical copy).
    """
    result_dir = Path(result_dir)
    if is_adapter(result_dir):
        from peft import PeftModel

        tuned = PeftModel.from_pretrained(loaded.model, str(result_dir), adapter_name=adapter_name)
        tuned.eval()
        return tuned
    if (result_dir / "config.json").is_file():
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(result_dir), dtype=loaded.dtype, local_files_only=True)
        model.to(loaded.device)
        model.eval()
        return model
    raise ModelError(f"{result_dir} is neither a LoRA adapter nor a model directory")


class ExportTargetError(ModelError):
    """The output directory cannot be used (exists and is not empty, parent missing, ...)."""


def check_target(out_dir: Path, *, make_parents: bool = True) -> None:
    """Refuse an ``out_dir`` that exists and is not an empty directory, or whose parent is
    missing (made only with ``make_parents``) or not writable: before any work is done."""
    if out_dir.is_symlink() or (out_dir.exists() and not (out_dir.is_dir() and not any(out_dir.iterdir()))):
        raise ExportTargetError(f"{out_dir} already exists and is not an empty directory; choose a new directory")
    if make_parents:
        out_dir.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    elif not out_dir.parent.is_dir():
        raise ExportTargetError(f"{out_dir.parent} does not exist; create it first")
    if not os.access(out_dir.parent, os.W_OK | os.X_OK):
        raise PermissionError(errno.EACCES, "permission denied", str(out_dir.parent))


@contextlib.contextmanager
def staged(out_dir: Path) -> Iterator[Path]:
    """A temp dir beside ``out_dir``, renamed to it when the block ends well and removed
    whatever happens: a failed export (a full disk included) leaves nothing behind."""
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(mode=0o700)
        yield tmp
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def merge_into(base: str | None, result_dir: Path, dest: Path) -> None:
    """Write the merged model (safetensors, config, tokenizer) into the existing dir ``dest``.

    LoRA: the adapter is merged into the base weights (fp32 on the CPU, so the result is
    exact). Full fine-tuning: the result is copied. ``base`` None: the result's own base.
    """
    result_dir = Path(result_dir)
    if is_adapter(result_dir):
        from peft import PeftModel

        loaded = load_model(base if base is not None else result_base(result_dir), device="cpu")
        tuned = PeftModel.from_pretrained(loaded.model, str(result_dir))
        merged = tuned.merge_and_unload()
        merged.save_pretrained(dest, safe_serialization=True)
        loaded.tokenizer.save_pretrained(dest)
    elif (result_dir / "config.json").is_file():
        for src in sorted(result_dir.rglob("*")):  # file by file: the first failure is a plain OSError
            target = dest / src.relative_to(result_dir)
            if src.is_dir():
                target.mkdir(exist_ok=True)
            else:
                shutil.copyfile(src, target)
    else:
        raise ModelError(f"{result_dir} is neither a LoRA adapter nor a model directory")


def export_merged(base: str | None, result_dir: Path, out_dir: Path, *, make_parents: bool = True) -> Path:
    """Write a plain Hugging Face model directory (safetensors, config, tokenizer) to ``out_dir``.

    See merge_into. ``base`` None means the base recorded in the result. Written to a temp
    dir beside ``out_dir`` and renamed, so a failed export leaves nothing half-written; an
    existing ``out_dir`` is refused unless it is an empty directory (the rename replaces
    it). Missing parents are created only with ``make_parents``.
    """
    result_dir, out_dir = Path(result_dir), Path(out_dir)
    check_target(out_dir, make_parents=make_parents)
    with staged(out_dir) as tmp:
        merge_into(base, result_dir, tmp)
    return out_dir
