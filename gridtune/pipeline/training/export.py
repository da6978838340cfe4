"""Export graded completions as a fine-tuning JSONL file.

Chat format: {"messages": [system?, user = training prompt, assistant = text]}.
Legacy completion format: {"prompt": training prompt + separator,
"completion": " " + text + stop}, the separator and stop chosen, as OpenAI's
old prepare_data tool chose them, among strings that appear nowhere in the data.

Rows stream from the store and lines stream to disk (aiofiles) into temporary
files renamed into place at the end, so memory stays flat and a failure never
leaves half a file. The written file is validated and the export recorded in
the project.

Completions cut off at max tokens (finish_reason "length") are left out unless
``include_cut_off``; then they are written as they are, and in the completion
format *without* the stop sequence (appending it would teach the model to stop
mid-sentence), which the result's warnings and the validation report say, with
their count and share.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import json
import os
from collections.abc import AsyncGenerator, Generator
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiofiles
import aiofiles.os

from ...core.errors import GridtuneError
from ...store import Store, evaluation
from ..client.local_service import local_model_name
from ..format.validate import ValidationReport, show, validate_file
from ..generation.estimate import ServerInfo, training_cost_line
from ..spec.grid import GridSpec, cell_key
from ..spec.options import EXPORT
from ..spec.project import load_project_spec
from .holdout import HoldOut, HoldOutError, add_held_out_cases, plan as plan_hold_out

FORMATS = ("chat", "completion")
# prepare_data's candidates, minus " ->" / "\n" / "." which long prose easily
# contains or needs; the first that appears nowhere in the data wins.
SEPARATORS = ("\n\n###\n\n", "\n\n===\n\n", "\n\n---\n\n", "\n\n===>\n\n", "\n\n--->\n\n", "\n\n### =>\n\n")
STOPS = (" END", " STOP", " [END]", "***", "+++", "&&&", "$$$", "@@@", "%%%")
_BATCH = 500  # rows per read from the store and lines per write


class ExportError(GridtuneError, ValueError):
    """Bad input for an export (exit 2); nothing was written."""


@dataclass
class ExportResult:
    path: Path
    valid_path: Path | None
    format: str
    n_train: int
    n_valid: int
    n_skipped: int
    separator: str | None
    stop: str | None
    report: ValidationReport
    valid_report: ValidationReport | None
    export_id: int
    min_grade: int | None = None
    validation_fraction: float = 0.0
    warnings: list[str] = field(default_factory=list)
    include_cut_off: bool = False
    n_cut_off: int = 0  # cut-off completions written (train + valid), only with include_cut_off
    n_cut_off_left_out: int = 0  # cut-off completions the export would otherwise have kept
    cost_line: str | None = None  # what training on it costs on the backend in use, when asked
    held_out: dict[str, Any] | None = None  # what was held out for evaluation (HoldOutPlan.to_dict + completions)

    @property
    def ok(self) -> bool:
        return self.report.ok and (self.valid_report is None or self.valid_report.ok)

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "export_id": self.export_id,
            "path": str(self.path),
            "valid_path": str(self.valid_path) if self.valid_path else None,
            "format": self.format,
            "min_grade": self.min_grade,
            "validation_fraction": self.validation_fraction,
            "train": self.n_train,
            "valid": self.n_valid,
            "skipped": self.n_skipped,
            "separator": self.separator,
            "stop": self.stop,
            "warnings": list(self.warnings),
            "include_cut_off": self.include_cut_off,
            "cut_off": self.n_cut_off,
            "cut_off_left_out": self.n_cut_off_left_out,
            "cost_line": self.cost_line,
            "held_out": self.held_out,
            "report": self.report.to_dict(),
            "valid_report": self.valid_report.to_dict() if self.valid_report else None,
        }

    def summary(self) -> str:
        where = f" and {self.n_valid:,} to {self.valid_path}" if self.valid_path else ""
        lines = [f"exported {self.n_train:,} example(s) to {self.path}{where} "
                 f"({self.format} format, {self.n_skipped:,} finished completion(s) left out)"]
        if self.format == "completion":
            lines.append(f"separator `{show(self.separator or '')}`, stop `{show(self.stop or '')}`: "
                         f"end prompts with the separator and pass the stop when you call the model")
        lines += [f"warning: {w}" for w in self.warnings]
        lines.append(self.report.render_text())
        if self.valid_report:
            lines.append(self.valid_report.render_text())
        if self.cost_line:
            lines.append(f"cost: {self.cost_line}")
        return "\n".join(lines)


def valid_path_for(out_path: str | Path) -> Path:
    """`<FILE stem>.valid.jsonl` beside FILE."""
    out = Path(out_path)
    return out.with_name(f"{out.stem}.valid.jsonl")


def in_validation(values: dict[str, Any], completion_id: int, fraction: float) -> bool:
    """Deterministic split: a stable hash of the cell and completion, not random."""
    if fraction <= 0:
        return False
    digest = hashlib.sha256(f"{cell_key(values)}\x00{completion_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def chat_example(spec: GridSpec, values: dict[str, Any], text: str) -> dict[str, Any]:
    prompt = spec.render(values)
    return {"messages": [*prompt.training_messages(), {"role": "assistant", "content": text}]}


def completion_example(spec: GridSpec, values: dict[str, Any], text: str, separator: str, stop: str) -> dict[str, Any]:
    prompt = spec.render(values).training
    # A leading space tokenizes better (prepare_data); don't double one already there.
    completion = text if text.startswith(" ") else " " + text
    return {"prompt": prompt + separator, "completion": completion + stop}


def _check_args(format: str, min_grade: int | None, fraction: float, separator: str | None,
                stop: str | None, out_path: Path) -> None:
    if format not in FORMATS:
        raise ExportError(f"--format must be one of {', '.join(FORMATS)}, not {format!r}")
    if min_grade is not None:
        EXPORT["min_grade"].check(min_grade, "--min-grade", ExportError)
    EXPORT["validation_fraction"].check(fraction, "--validation-fraction", ExportError)
    if format == "chat" and (separator is not None or stop is not None):
        raise ExportError("--separator and --stop apply to --format completion only")
    for name, marker in (("separator", separator), ("stop", stop)):
        if marker is not None and not marker:
            raise ExportError(f"--{name} must not be empty")
    if out_path.is_dir():
        raise ExportError(f"{out_path}: is a directory; give a .jsonl file name")
    if not out_path.parent.is_dir():
        raise ExportError(f"{out_path.parent}: no such directory")
    if out_path.suffix == "" or out_path.name.endswith(".valid.jsonl"):
        raise ExportError(f"{out_path}: give a file name ending in .jsonl (not .valid.jsonl)")


ExportRow = tuple[int, dict[str, Any], str, int | None]


async def _rows(store: Store, min_grade: int | None,
                include_cut_off: bool = False) -> AsyncGenerator[list[ExportRow]]:
    """The store's export rows in batches, read on one worker thread (sqlite
    connections stay on the thread that made them) so the event loop never blocks."""
    loop = asyncio.get_running_loop()
    gen: Generator[ExportRow] = store.iter_export_rows(min_grade, batch=_BATCH, include_cut_off=include_cut_off)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="gridtune-export") as pool:
        try:
            while batch := await loop.run_in_executor(pool, lambda: list(itertools.islice(gen, _BATCH))):
                yield batch
        finally:
            await loop.run_in_executor(pool, gen.close)


async def _choose_markers(store: Store, spec: GridSpec, min_grade: int | None,
                          separator: str | None, stop: str | None,
                          include_cut_off: bool = False) -> tuple[str, str, list[str]]:
    """First pass: pick the first separator and stop that occur nowhere in the
    prompts or completions; report given ones that do occur."""
    seps = {s: False for s in (SEPARATORS if separator is None else (separator,))}
    stops = {s: False for s in (STOPS if stop is None else (stop,))}
    async with aclosing(_rows(store, min_grade, include_cut_off)) as batches:
        async for batch in batches:
            for _cid, values, text, _grade in batch:
                prompt = spec.render(values).training
                for table in (seps, stops):
                    for marker, seen in table.items():
                        if not seen and marker and (marker in prompt or marker in text):
                            table[marker] = True
    warnings = []
    if separator is None:
        separator = next((s for s in SEPARATORS if not seps[s]), None)
        if separator is None:
            raise ExportError("every default separator occurs in the data; choose one with --separator")
    elif seps[separator]:
        warnings.append(f"the separator `{show(separator)}` occurs inside the data")
    if stop is None:
        stop = next((s for s in STOPS if not stops[s]), None)
        if stop is None:
            raise ExportError("every default stop sequence occurs in the data; choose one with --stop")
    elif stops[stop]:
        warnings.append(f"the stop `{show(stop)}` occurs inside the data; generation may end early")
    return separator, stop, warnings


def _refuse_project_files(store: Store, *outs: Path | None) -> None:
    """An export must never overwrite the project it comes from (or its WAL, or a run's log)."""
    project = store.path.resolve()
    taken = {project, *(project.with_name(project.name + s) for s in ("-wal", "-shm", "-journal", ".log", ".run.lock"))}
    for out in outs:
        if out is not None and out.resolve() in taken:
            raise ExportError(f"{out}: is the project's own file; give another .jsonl file name")


def _temp_for(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


async def _write(store: Store, spec: GridSpec, tmp_train: Path, tmp_valid: Path | None, *, format: str,
                 min_grade: int | None, separator: str | None, stop: str | None,
                 fraction: float, cut_off: frozenset[int] = frozenset(),
                 held_out: frozenset[str] = frozenset()) -> tuple[int, int, int, int, int, int]:
    """Stream the examples into the temporary files; (n_train, n_valid, n_blank,
    cut-off in train, cut-off in valid, held out). ``cut_off``: ids of cut-off
    completions to write (the completion format gives them no stop); ``held_out``:
    cell keys whose completions go to neither file (they are the evaluation's)."""
    n_train = n_valid = n_blank = n_held = 0
    cut_train = cut_valid = 0
    async with aiofiles.open(tmp_train, "w", encoding="utf-8", newline="\n") as ftrain:
        fvalid = await aiofiles.open(tmp_valid, "w", encoding="utf-8", newline="\n") if tmp_valid else None
        try:
            async with aclosing(_rows(store, min_grade, bool(cut_off))) as batches:
                async for batch in batches:
                    train_lines, valid_lines = [], []
                    for cid, values, text, _grade in batch:
                        if held_out and cell_key(values) in held_out:
                            n_held += 1
                            continue
                        if not text.strip():
                            n_blank += 1  # an empty answer is no training example
                            continue
                        is_cut = cid in cut_off
                        if format == "chat":
                            example = chat_example(spec, values, text)
                        else:
                            # A cut-off text gets no stop: it did not end there (said in the warnings).
                            example = completion_example(spec, values, text, separator,  # type: ignore[arg-type]
                                                         "" if is_cut else stop)  # type: ignore[arg-type]
                        line = json.dumps(example, ensure_ascii=False) + "\n"
                        if fvalid is not None and in_validation(values, cid, fraction):
                            valid_lines.append(line)
                            cut_valid += is_cut
                        else:
                            train_lines.append(line)
                            cut_train += is_cut
                    n_train += len(train_lines)
                    n_valid += len(valid_lines)
                    await ftrain.write("".join(train_lines))
                    if fvalid is not None and valid_lines:
                        await fvalid.write("".join(valid_lines))
        finally:
            if fvalid is not None:
                await fvalid.close()
    return n_train, n_valid, n_blank, cut_train, cut_valid, n_held


def _cut_off_candidates(store: Store, min_grade: int | None) -> frozenset[int]:
    """Cut-off completions the export would keep were they not cut off."""
    return frozenset(
        cid for cid, _length, grade, _status in store.review_rows(where="cut_off", sort="grid")
        if (grade is None or grade > 0) and (not min_grade or (grade is not None and grade >= min_grade))
    )


def _cut_off_warning(n: int, total: int) -> str:
    return (f"{n:,} of {total:,} example(s) ({n / max(total, 1):.0%}) were cut off at max tokens "
            f"(included with --include-cut-off)")


async def export_project_async(
    store: Store,
    out_path: str | Path,
    *,
    format: str = "chat",
    min_grade: int | None = None,
    separator: str | None = None,
    stop: str | None = None,
    validation_fraction: float = 0.0,
    model: str | None = None,
    include_cut_off: bool = False,
    hold_out: HoldOut | None = None,
    backend: tuple[str, str, ServerInfo | None] | None = None,
) -> ExportResult:
    """Export the kept completions (see the module's doc). ``hold_out``: values and
    combinations kept out of both files; their cells become evaluation cases and
    the choice is recorded with the export. ``backend``: (kind, label, server info)
    of the backend training would run on, for the result's cost line
    (estimate.backend_for_costs gives it); None: no cost line."""
    out = Path(out_path)
    try:
        _check_args(format, min_grade, validation_fraction, separator, stop, out)
    except OSError as exc:
        raise ExportError(f"{out}: {exc.strerror or exc}") from None
    try:
        spec = load_project_spec(store)
    except ValueError as exc:
        raise ExportError(str(exc)) from None
    warnings: list[str] = []
    cells = [values for _id, values in store.cells()]
    try:
        held = plan_hold_out(cells, hold_out) if hold_out is not None and not hold_out.empty else None
    except HoldOutError as exc:
        raise ExportError(str(exc)) from None
    cut_candidates = _cut_off_candidates(store, min_grade)
    cut_off = cut_candidates if include_cut_off else frozenset()
    if format == "completion":
        separator, stop, warnings = await _choose_markers(store, spec, min_grade, separator, stop, include_cut_off)
    valid_out = valid_path_for(out) if validation_fraction > 0 else None
    _refuse_project_files(store, out, valid_out)
    # On the local backend the tokens (and so the training time and the context check)
    # are the local model's own; elsewhere the named model's, else gpt-4o-mini's.
    counted_for = model
    if counted_for is None and backend is not None and backend[0] == "local":
        counted_for = local_model_name()
    tmp_train = _temp_for(out)
    tmp_valid = _temp_for(valid_out) if valid_out else None
    try:
        n_train, n_valid, n_blank, cut_train, cut_valid, n_held = await _write(
            store, spec, tmp_train, tmp_valid, format=format, min_grade=min_grade,
            separator=separator, stop=stop, fraction=validation_fraction, cut_off=cut_off,
            held_out=held.keys if held else frozenset(),
        )
        if n_train == 0:
            what = "no finished completion" + (f" graded {min_grade} or more" if min_grade else "")
            if n_valid:
                raise ExportError(f"all {n_valid} example(s) fell into the validation split; "
                                  "lower --validation-fraction")
            if cut_candidates and not include_cut_off:
                what += (f"; {len(cut_candidates):,} cut-off completion(s) left out (regenerate them with "
                         f"`gridtune generate PROJECT --redo-cut-off --max-tokens N`, or --include-cut-off)")
            raise ExportError(f"nothing to export: {what} (rejected ones are never exported)")
        report = await asyncio.to_thread(validate_file, tmp_train, counted_for)
        report.path = str(out)
        valid_report = None
        if tmp_valid is not None and n_valid:
            valid_report = await asyncio.to_thread(validate_file, tmp_valid, counted_for)
            valid_report.path = str(valid_out)
            valid_report.stats["validation_file"] = True  # its report has no epochs and no price
        elif valid_out is not None:
            warnings.append(f"no example fell into the validation split; {valid_out} not written")
            valid_out = None
        if n_blank:
            warnings.append(f"{n_blank:,} empty completion(s) left out")
        if cut_train:
            report.warnings.append(_cut_off_warning(cut_train, n_train))
        if valid_report is not None and cut_valid:
            valid_report.warnings.append(_cut_off_warning(cut_valid, n_valid))
        if cut_train + cut_valid:
            how = (f"written without the stop `{show(stop or '')}`, so the model is not taught to stop mid-sentence"
                   if format == "completion" else
                   "in chat format every answer ends its turn, so the model learns to stop where these were cut")
            warnings.append(f"{cut_train + cut_valid:,} cut-off completion(s) included (--include-cut-off): {how}")
        elif cut_candidates and not include_cut_off:
            warnings.append(f"{len(cut_candidates):,} cut-off completion(s) left out (they hit max tokens): "
                            f"regenerate them with `gridtune generate PROJECT --redo-cut-off --max-tokens N`, "
                            f"or keep them with --include-cut-off")
        cost_line = None
        if backend is not None:
            kind, label, info = backend
            cost_line = training_cost_line(
                backend_kind=kind, model=model, tokens_total=int(report.stats.get("billed_tokens_total") or 0),
                epochs=int(report.stats.get("epochs") or 0), legacy_format=format == "completion", info=info,
                backend_label=label)
        done = store.status_counts().done
        record = report.to_dict()
        record["valid"] = valid_report.to_dict() if valid_report else None
        record["include_cut_off"] = include_cut_off
        record["cut_off"] = cut_train + cut_valid
        # Recorded so the export screen shows them after a restart, as every other part of the report.
        record["cut_off_left_out"] = 0 if include_cut_off else len(cut_candidates)
        record["cost_line"] = cost_line
        record["held_out"] = held.to_dict() | {"completions": n_held} if held is not None else None
        if held is not None:
            warnings.append(f"{len(held.keys):,} cell(s) held out for evaluation ({n_held:,} completion(s) "
                            f"kept out of training): `gridtune eval PROJECT --model TUNED` asks them")
        moves: list[tuple[Path, Path]] = [(tmp_train, out)]
        if tmp_valid is not None and valid_out is not None:
            moves.append((tmp_valid, valid_out))
        export_id = _record_and_rename(store, moves, dict(
            path=str(out.resolve()), valid_path=str(valid_out.resolve()) if valid_out else None,
            format=format, min_grade=min_grade, separator=separator, stop=stop,
            validation_fraction=float(validation_fraction), n_train=n_train, n_valid=n_valid, report=record,
        ))
        if held is not None:
            evaluation.set_holdout(store, export_id, held.to_dict())
            add_held_out_cases(store, held, cells)
    except OSError as exc:  # an unwritable directory, a full disk, a name too long
        raise ExportError(f"{out}: cannot write: {exc.strerror or exc}") from None
    finally:
        for tmp in (tmp_train, tmp_valid):
            if tmp is not None:
                with contextlib.suppress(OSError):
                    tmp.unlink(missing_ok=True)
    return ExportResult(
        path=out, valid_path=valid_out, format=format, n_train=n_train, n_valid=n_valid,
        n_skipped=max(0, done - n_train - n_valid), separator=separator, stop=stop,
        report=report, valid_report=valid_report, export_id=export_id, min_grade=min_grade,
        validation_fraction=float(validation_fraction), warnings=warnings,
        include_cut_off=include_cut_off, n_cut_off=cut_train + cut_valid,
        n_cut_off_left_out=0 if include_cut_off else len(cut_candidates), cost_line=cost_line,
        held_out=held.to_dict() | {"completions": n_held} if held is not None else None,
    )


def _record_and_rename(store: Store, moves: list[tuple[Path, Path]], record: dict[str, Any]) -> int:
    """Record the export and give its files their names as one step: the record is
    inserted in a write transaction, the files renamed inside it, and the
    transaction committed last. If anything fails (a locked or read-only project,
    a full disk at commit) the record is rolled back and any file the export
    replaced is put back, so there is never a file without its record or a
    record without its file."""
    backups: list[tuple[Path, Path]] = []  # (backup, original) of files the export replaces
    renamed: list[Path] = []
    try:
        with store.transaction():  # BEGIN IMMEDIATE: a locked or read-only project fails here, first
            export_id = store.record_export(**record)
            for tmp, final in moves:
                if final.exists():
                    backup = _temp_for(final).with_suffix(".bak")
                    os.link(final, backup)
                    backups.append((backup, final))
                os.replace(tmp, final)
                renamed.append(final)
    except BaseException:
        for final in renamed:
            with contextlib.suppress(OSError):
                final.unlink()
        for backup, final in backups:
            with contextlib.suppress(OSError):
                os.replace(backup, final)
        raise
    finally:
        for backup, _final in backups:
            with contextlib.suppress(OSError):
                backup.unlink()
    return export_id


def answers_in(path: str | Path, stop: str | None) -> list[str]:
    """The answers of one exported file, read back as the model sees them: the last
    message of a chat example; a completion without its leading space or stop."""
    texts: list[str] = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if not line.strip():
                continue
            example = json.loads(line)
            if "messages" in example:
                texts.append(example["messages"][-1].get("content") or "")
                continue
            text = example.get("completion") or ""
            if stop and text.endswith(stop):
                text = text[: -len(stop)]
            texts.append(text[1:] if text.startswith(" ") else text)
    return texts


def exported_texts(export: Any) -> list[str]:
    """The answers an export wrote: its training file, then its validation file."""
    texts: list[str] = []
    for path in (export.path, export.valid_path):
        if path and Path(path).exists():
            texts.extend(answers_in(path, export.stop))
    return texts


def record_diversity(store: Store, export: Any) -> dict[str, Any]:
    """The lexical diversity of what ``export`` wrote ("kept") against every finished
    completion of the project ("all"), stored with the export's report (key
    "diversity", as DiversityStats.to_dict). Seconds on a large project: call it
    from a worker, after the export."""
    from ...store import curation
    from ..curation.diversity import DiversityStats, measure

    kept = measure(exported_texts(export))
    every = measure([r.text for r in curation.finished_rows(store)])
    data = DiversityStats(export.min_grade, kept, every).to_dict()
    data["kept_definition"] = "the examples this export wrote (training and validation files)"
    store.update_export_report(export.id, diversity=data)
    return data


def export_project(store: Store, out_path: str | Path, **kwargs: Any) -> ExportResult:
    """Synchronous wrapper for the command line and tests."""
    return asyncio.run(export_project_async(store, out_path, **kwargs))
