"""Writing the user's files so that a kill at any moment leaves the old file or the new one, never a partial one."""

import json
import math
import os
import re
import tempfile
from pathlib import Path

# The names tempfile.mkstemp gives atomic_write's temporaries: '.{name}.' + 8 random characters + '.tmp'.
TEMPORARY = re.compile(r'\..+\.[a-z0-9_]{8}\.tmp')


def atomic_write(path: str | os.PathLike, write) -> None:
    """Call ``write(tmp_path)`` and rename the result over ``path``: readers never see a partial file.

    The file gets the permissions the umask gives a new file (``mkstemp`` would leave it 0600). A process killed
    mid-write leaves its temporary behind; ``remove_stale_temporaries`` clears them.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f'{path} is a folder; give the path of a file to write')
    for folder in (path.parent, *path.parent.parents):
        if folder.exists() and not folder.is_dir():
            raise NotADirectoryError(f'cannot write {path}: {folder} is a file, not a folder')
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f'.{path.name}.', suffix='.tmp')
    except PermissionError:
        raise PermissionError(f'cannot write {path}: the folder {path.parent} is not writable') from None
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        with open(tmp, 'rb') as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def remove_stale_temporaries(directory: str | os.PathLike) -> list[Path]:
    """Delete the temporaries ``atomic_write`` left in ``directory`` when a process was killed mid-write.

    Only call it while no other process writes there (a training run holds its directory's ``RunLock``): a live
    writer's temporary looks the same. Returns the removed paths.
    """
    removed = []
    for entry in os.scandir(directory):
        if TEMPORARY.fullmatch(entry.name) and entry.is_file(follow_symlinks=False):
            Path(entry.path).unlink(missing_ok=True)
            removed.append(Path(entry.path))
    return removed


def _umask() -> int:
    # The umask can only be read by setting it; 0o077 in the meantime errs on the private side.
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def write_json(path: Path, data: dict) -> None:
    """``data`` as indented JSON at ``path``, atomically. NaN and infinities are not JSON: a non-finite number is a
    ValueError naming the field (callers decide what a non-finite result means before writing)."""
    if (field := non_finite_field(data)) is not None:
        raise ValueError(f'refusing to write {path}: field {field} is not a finite number')

    def write(tmp):
        with open(tmp, 'w') as f:
            json.dump(data, f, indent=2, default=str, allow_nan=False)
            f.write('\n')
    atomic_write(path, write)


def non_finite_field(data, where: str = '') -> str | None:
    """The path (``"metrics.loss"``) of the first NaN or infinite float in nested dicts and lists, or None."""
    if isinstance(data, float) and not math.isfinite(data):
        return where or 'value'
    items = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, (list, tuple)) else ()
    for key, value in items:
        if (found := non_finite_field(value, f'{where}.{key}' if where else str(key))) is not None:
            return found
    return None


