"""`Upload`: one uploaded file, on disk (the gateway) or in memory (in-process callers, tests)."""
from __future__ import annotations

import hashlib


class Upload:
    """One uploaded file: its name (for messages), size, sha256, and where its bytes are.

    The gateway streams every upload to a temporary file (`service.api.deps.stored_uploads`) and builds
    the Upload from that `path`, with the size and hash computed while streaming: no upload is held in
    gateway memory, and a decode worker opens the file itself. In-process callers and tests may pass
    the bytes instead (`Upload(filename, data)`); size and hash are then computed here. Exactly one of
    `data` and `path` is set.
    """

    __slots__ = ("filename", "size", "sha256", "path", "data")

    def __init__(self, filename: str, data: bytes | None = None, *, path: str | None = None,
                 size: int | None = None, sha256: str | None = None) -> None:
        if (data is None) == (path is None):
            raise ValueError("an Upload needs either its bytes (data) or the path of a file holding them")
        if data is not None:
            size, sha256 = len(data), hashlib.sha256(data).hexdigest()
        elif size is None or sha256 is None:
            raise ValueError("an Upload from a file needs the file's size and sha256")
        self.filename = filename
        self.data = data
        self.path = path
        self.size = size
        self.sha256 = sha256

    @property
    def source(self) -> bytes | str:
        """What a decode job is given: the bytes, or the path of the file (opened by the worker)."""
        return self.data if self.data is not None else self.path  # type: ignore[return-value]

    def __repr__(self) -> str:
        where = f"path={self.path!r}" if self.path is not None else "in memory"
        return f"Upload(filename={self.filename!r}, size={self.size}, sha256={self.sha256[:12]}..., {where})"
