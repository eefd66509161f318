"""Files and directories written whole or not at all.

`atomic_write(path, write_fn)` calls write_fn on a temporary file beside `path`, then
renames it to `path`: a reader sees the old file or the new one, never half of one.

`atomic_directory(target)` yields a fresh hidden directory beside `target`; when the block
ends without an error it is renamed to `target`, so a reader never sees half a save. An
existing `target` is replaced only once the new one is complete: it is first renamed into
a hidden directory beside it and removed after the new one is in place (between the two
renames `target` is briefly absent and the old one is whole in that hidden directory).
On an error, also in the second rename, the new directory is removed and `target` is left
as it was.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
import tempfile
from collections.abc import Iterator


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike) -> Iterator[pathlib.Path]:
  """Yields the directory to write into; renames it to `target` on success (module docstring)."""
  target = pathlib.Path(target)
  if target.exists() and not target.is_dir():
    raise FileExistsError(f"directory: {str(target)!r} exists and is not a directory")
  target.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would hide the save from other users
  try:
    yield tmp
    if target.exists():  # swap: the old directory is removed only after the new one is in place
      old = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
      try:
        os.replace(target, old / target.name)
        try:
          os.replace(tmp, target)  # between the two renames the old directory is whole under `old`
        except BaseException:
          os.replace(old / target.name, target)  # put it back
          raise
      finally:
        shutil.rmtree(old, ignore_errors=True)
    else:
      os.replace(tmp, target)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def link_or_copy(source: str | os.PathLike, destination: str | os.PathLike) -> None:
  """A hard link to `source` at `destination` (no bytes copied); a copy where links fail
  (another file system)."""
  try:
    os.link(source, destination)
  except OSError:
    shutil.copy2(source, destination)


def atomic_write(path: str | os.PathLike, write_fn, binary: bool = False) -> None:
  """Calls write_fn(f) on a temporary file beside `path` (text unless `binary`), then
  renames it to `path`; on an error the temporary file is removed and `path` is untouched."""
  path = pathlib.Path(path)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") if binary else os.fdopen(fd, "w", encoding="utf-8") as f:
      write_fn(f)
    os.replace(tmp, path)
  except BaseException:
    os.unlink(tmp)
    raise
