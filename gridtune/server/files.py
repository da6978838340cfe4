"""Uploaded files: plain bytes under DATA/files/, with a small JSON record beside each.

Files are stored and served as bytes only: never executed, imported or unpickled.
Everything here is private to the user (directories 0700, files 0600, whatever the
umask). The store has a total quota: an upload that would pass it first makes room by
deleting the oldest files no job still needs (files no job references at all go first,
then files of finished jobs; a queued or running job's files are never deleted); if
that is not enough it is refused with 413.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from gridtune.core.files import private_dir, write_json

from .errors import APIError, invalid, not_found

log = logging.getLogger("gridtune.server")

PURPOSES = ("fine-tune", "batch")
OUTPUT_PURPOSES = ("batch_output",)  # files the server writes itself (a batch's results), never uploads
DEFAULT_MAX_BYTES = 512 * 1024 * 1024
DEFAULT_QUOTA_BYTES = 2 * 1024 * 1024 * 1024


def _safe_name(name: str) -> str:
    name = os.path.basename(name or "upload") or "upload"
    return name[:255]


class FileStore:
    def __init__(self, root: Path, *, max_bytes: int = DEFAULT_MAX_BYTES, quota_bytes: int = DEFAULT_QUOTA_BYTES,
                 references: Callable[[], dict[str, bool]] | None = None):
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.quota_bytes = max(quota_bytes, max_bytes)
        # file id -> True when a queued/running job needs it (never deleted), False when only
        # finished jobs name it; set by the server once the job manager exists.
        self.references: Callable[[], dict[str, bool]] = references or dict
        self._lock = threading.Lock()
        self._remove_partial()

    def _remove_partial(self) -> None:
        """Uploads cut off by a crash leave ``.file-*.part``; nothing reads them."""
        if self.root.is_dir():
            for part in self.root.glob(".file-*.part"):
                part.unlink(missing_ok=True)

    def used_bytes(self) -> int:
        return sum(m.get("bytes", 0) for m in self.list())

    def _make_room(self, size: int, keep: str) -> list[str]:
        """Delete the oldest files no active job needs until ``size`` more bytes fit the quota;
        returns the ids deleted. Raises 413 (deleting nothing) when it cannot fit."""
        files = [m for m in self.list() if m["id"] != keep]
        used = sum(m.get("bytes", 0) for m in files)
        if used + size <= self.quota_bytes:
            return []
        refs = self.references()
        candidates = sorted((m for m in files if not refs.get(m["id"], False)),
                            key=lambda m: (m["id"] in refs, m["created_at"], m["id"]))
        victims, freed = [], 0
        for meta in candidates:
            if used - freed + size <= self.quota_bytes:
                break
            victims.append(meta["id"])
            freed += meta.get("bytes", 0)
        if used - freed + size > self.quota_bytes:
            raise APIError(413, f"the file store is full: {used:,} of {self.quota_bytes:,} bytes are used by files "
                                f"that fine-tuning jobs still need; delete some files or wait for the jobs to end",
                           param="file", code="storage_quota_exceeded")
        for file_id in victims:
            self._delete(file_id)
        if victims:
            log.info("upload quota: deleted %d old file(s) no queued or running job needs: %s", len(victims),
                     ", ".join(victims))
        return victims

    def _meta_path(self, file_id: str) -> Path:
        return self.root / f"{file_id}.json"

    def path(self, file_id: str) -> Path:
        """The stored bytes of ``file_id`` (404 if there is no such file)."""
        self.get(file_id)
        return self.root / f"{file_id}.bin"

    @staticmethod
    def _valid_id(file_id: str) -> bool:
        return file_id.startswith("file-") and file_id[5:].isalnum() and len(file_id) < 64

    def create(self, src: BinaryIO, *, filename: str, purpose: str, output: bool = False) -> dict[str, Any]:
        if purpose not in PURPOSES and not (output and purpose in OUTPUT_PURPOSES):
            raise invalid(f"'{purpose}' is not a supported purpose here; use one of: {', '.join(PURPOSES)}",
                          param="purpose")
        private_dir(self.root)
        file_id = "file-" + secrets.token_hex(12)
        part = self.root / f".{file_id}.part"
        size = 0
        try:
            fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
            with os.fdopen(fd, "wb") as dst:
                while chunk := src.read(1 << 20):
                    size += len(chunk)
                    if size > self.max_bytes:
                        raise APIError(413, f"the file is larger than this server's limit of {self.max_bytes:,} bytes",
                                       param="file", code="file_too_large")
                    dst.write(chunk)
            meta = {
                "id": file_id, "object": "file", "bytes": size, "created_at": int(time.time()),
                "filename": _safe_name(filename), "purpose": purpose, "status": "processed",
            }
            with self._lock:
                self._make_room(size, file_id)
                os.replace(part, self.root / f"{file_id}.bin")
                write_json(self._meta_path(file_id), meta)
        finally:
            part.unlink(missing_ok=True)
        return meta

    def get(self, file_id: str) -> dict[str, Any]:
        if not self._valid_id(file_id) or not self._meta_path(file_id).is_file():
            raise not_found(f"No such File object: {file_id}", param="id")
        return json.loads(self._meta_path(file_id).read_text())

    def list(self, purpose: str | None = None) -> list[dict[str, Any]]:
        if not self.root.is_dir():
            return []
        out = []
        for meta_path in self.root.glob("file-*.json"):
            try:
                meta = json.loads(meta_path.read_text())
            except (OSError, ValueError):
                continue
            if purpose is None or meta.get("purpose") == purpose:
                out.append(meta)
        out.sort(key=lambda m: (m["created_at"], m["id"]), reverse=True)
        return out

    def _delete(self, file_id: str) -> None:
        (self.root / f"{file_id}.bin").unlink(missing_ok=True)
        self._meta_path(file_id).unlink(missing_ok=True)

    def delete(self, file_id: str) -> dict[str, Any]:
        self.get(file_id)
        with self._lock:
            self._delete(file_id)
        return {"id": file_id, "object": "file", "deleted": True}

    def copy_to(self, file_id: str, dest: Path) -> Path:
        shutil.copyfile(self.path(file_id), dest)
        return dest
