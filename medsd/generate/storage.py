"""The output folder of a synthetic dataset, local or on any pyarrow filesystem (``s3://``, ``gs://``, ...).

Every file is written to a hidden temporary name beside its final one and then moved into place, so a
crash never leaves half a file under a real name. Temporaries start with '.' so parquet readers skip
them, and end with ``.tmp`` so a resumed run can sweep them up.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import uuid
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.fs as pafs

TEMPORARY_SUFFIX = ".tmp"
_PROBE_NAME = ".medsd-write-probe"


class OutputFolder:
    """Files under one folder URI, addressed by POSIX paths relative to it."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        # A plain path becomes absolute first: from_uri takes absolute local paths or URIs only.
        location = uri if "://" in uri else os.path.abspath(os.path.expanduser(uri))
        try:
            self.filesystem, self.root = pafs.FileSystem.from_uri(location)
        except (pa.ArrowInvalid, ValueError) as error:
            message = f"generate.out: {uri!r} is not a folder path or a pyarrow filesystem URI ({error})"
            raise ValueError(message) from None

    def path(self, relative: str) -> str:
        """Full path of ``relative`` on the filesystem."""
        return posixpath.join(self.root, relative)

    def describe(self) -> str:
        return self.uri if "://" in self.uri else self.root

    # Checks --------------------------------------------------------------------------------------------------

    def check_writable(self) -> None:
        """Create the folder and write, then delete, a probe file; PermissionError naming the folder otherwise."""
        try:
            self.filesystem.create_dir(self.root, recursive=True)
            self.write_atomic(_PROBE_NAME, b"medsd")
            self.filesystem.delete_file(self.path(_PROBE_NAME))
        except (OSError, pa.ArrowException) as error:
            raise PermissionError(
                f"generate.out: cannot write to the output folder {self.describe()} ({error}); "
                "choose a folder you can create files in"
            ) from None

    def is_empty(self) -> bool:
        """True when the folder is missing or holds nothing."""
        info = self.filesystem.get_file_info(self.root)
        if info.type == pafs.FileType.NotFound:
            return True
        return not self.filesystem.get_file_info(pafs.FileSelector(self.root, recursive=False))

    # Reading -------------------------------------------------------------------------------------------------

    def read(self, relative: str) -> bytes | None:
        """The bytes of ``relative``, or None when it does not exist."""
        try:
            with self.filesystem.open_input_stream(self.path(relative)) as stream:
                return stream.read()
        except FileNotFoundError:
            return None

    def exists(self, relative: str) -> bool:
        return self.filesystem.get_file_info(self.path(relative)).type == pafs.FileType.File

    def file_size(self, relative: str) -> int:
        return self.filesystem.get_file_info(self.path(relative)).size

    # Writing -------------------------------------------------------------------------------------------------

    def write_atomic(self, relative: str, data: bytes) -> None:
        """Write ``data`` to ``relative`` all at once or not at all (temporary file + move)."""
        with self.open_atomic(relative) as stream:
            stream.write(data)

    @contextlib.contextmanager
    def open_atomic(self, relative: str) -> Iterator[pa.NativeFile]:
        """An output stream that becomes ``relative`` only when the block ends without an exception.

        On a local disk the move is a rename, atomic as os.replace; object stores publish whole objects.
        """
        final = self.path(relative)
        folder, name = posixpath.split(final)
        temporary = posixpath.join(folder, f".{name}.{uuid.uuid4().hex}{TEMPORARY_SUFFIX}")
        self.filesystem.create_dir(folder, recursive=True)
        try:
            with self.filesystem.open_output_stream(temporary) as stream:
                yield stream
            self.filesystem.move(temporary, final)
        except BaseException:
            with contextlib.suppress(OSError, pa.ArrowException):
                self.filesystem.delete_file(temporary)
            raise

    def remove_temporaries(self) -> int:
        """Delete temporary files a crashed run left behind; returns how many. Only safe with no writer running."""
        if self.filesystem.get_file_info(self.root).type == pafs.FileType.NotFound:
            return 0
        leftovers = [
            info.path
            for info in self.filesystem.get_file_info(pafs.FileSelector(self.root, recursive=True))
            if info.type == pafs.FileType.File and _is_temporary(info.base_name)
        ]
        for path in leftovers:
            self.filesystem.delete_file(path)
        return len(leftovers)


def _is_temporary(name: str) -> bool:
    return name.startswith(".") and name.endswith(TEMPORARY_SUFFIX)
