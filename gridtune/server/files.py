"""Uploaded files: plain bytes under DATA/files/, with a small JSON record beside each.

Files are stored and served as bytes only: never executed, imported or unpickled.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import threading
import time
from pathlib import Path
from typing import Any, BinaryIO

from .errors import APIError, invalid, not_found

PURPOSES = ("fine-tune", "batch")
DEFAULT_MAX_BYTES = 512 * 1024 * 1024


def _safe_name(name: str) -> str:
    name = os.path.basename(name or "upload") or "upload"
    return name[:255]


class FileStore:
    def __init__(self, root: Path, *, max_bytes: int = DEFAULT_MAX_BYTES):
        self.root = Path(root)
        self.max_bytes = max_bytes
        self._lock = threading.Lock()

    def _meta_path(self, file_id: str) -> Path:
        return self.root / f"{file_id}.json"

    def path(self, file_id: str) -> Path:
        """The stored bytes of ``file_id`` (404 if there is no such file)."""
        self.get(file_id)
        return self.root / f"{file_id}.bin"

    @staticmethod
    def _valid_id(file_id: str) -> bool:
        return file_id.startswith("file-") and file_id[5:].isalnum() and len(file_id) < 64

    def create(self, src: BinaryIO, *, filename: str, purpose: str) -> dict[str, Any]:
        if purpose not in PURPOSES:
            raise invalid(f"'{purpose}' is not a supported purpose here; use one of: {', '.join(PURPOSES)}",
                          param="purpose")
        self.root.mkdir(parents=True, exist_ok=True)
        file_id = "file-" + secrets.token_hex(12)
        part = self.root / f".{file_id}.part"
        size = 0
        try:
            with open(part, "wb") as dst:
                while chunk := src.read(1 << 20):
                    size += len(chunk)
                    if size > self.max_bytes:
                        raise APIError(413, f"the file is larger than this server's limit of {self.max_bytes:,} bytes",
                                       param="file", code="file_too_large")
                    dst.write(chunk)
            os.replace(part, self.root / f"{file_id}.bin")
        finally:
            part.unlink(missing_ok=True)
        meta = {
            "id": file_id, "object": "file", "bytes": size, "created_at": int(time.time()),
            "filename": _safe_name(filename), "purpose": purpose, "status": "processed",
        }
        tmp = self.root / f".{file_id}.json.tmp"
        tmp.write_text(json.dumps(meta))
        os.replace(tmp, self._meta_path(file_id))
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

    def delete(self, file_id: str) -> dict[str, Any]:
        self.get(file_id)
        with self._lock:
            (self.root / f"{file_id}.bin").unlink(missing_ok=True)
            self._meta_path(file_id).unlink(missing_ok=True)
        return {"id": file_id, "object": "file", "deleted": True}

    def copy_to(self, file_id: str, dest: Path) -> Path:
        shutil.copyfile(self.path(file_id), dest)
        return dest
