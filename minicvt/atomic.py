"""Writing a file so that no moment loses it: atomic_write.

The file is assembled under a temporary name in the same folder (`.NAME.<random>.tmp`),
flushed to disk, renamed over the old one (a rename is atomic on POSIX), and the folder itself
is flushed so that the new name survives a power cut. A crash or `kill -9` at any moment leaves
the previous file or the new one, never a torn file. A temporary left by a killed write is
never read; `remove_temporaries` deletes those of the files it is given. A full disk (or a
folder without write permission) is a SaveError of one line naming the file.

Checkpoints, metrics, curves, the decoded-image cache and figures are all written this way.
"""
import os
import tempfile
from pathlib import Path

TEMP_SUFFIX = ".tmp"             # what atomic_write's temporaries end with


def _default_file_mode():
    """The mode open() would give a new file: 0o666 less the process's umask (read once, at
    import: reading it means setting it, which must not race with threads creating files)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


FILE_MODE = _default_file_mode()


class SaveError(OSError):
    """A file could not be written (a full disk, a folder without write permission); the
    message names the file and says that its previous version is intact."""


def atomic_write(path, write):
    """write(f) into a temporary file beside `path`, flushed to disk, then renamed to `path`,
    and the folder flushed so that the rename itself survives a power cut. On any failure
    the temporary is removed and `path` keeps its previous content; an OSError (ENOSPC, EACCES)
    becomes a SaveError of one line."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, FILE_MODE)                     # mkstemp makes 0600; give the usual mode
        os.replace(tmp, path)
        _fsync_folder(path.parent)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError) and not isinstance(e, SaveError):
            kept = "its previous version is intact" if path.exists() else "nothing was written"
            error = SaveError(f"cannot write {path}: {e.strerror or e}; {kept}")
            error.errno = e.errno
            raise error from e
        raise


def _fsync_folder(folder):
    """Flush a folder's entries (the rename) to disk; a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:                       # e.g. Windows: no file descriptors for folders
        return
    try:
        os.fsync(fd)
    except OSError:                       # some file systems refuse fsync on a folder
        pass
    finally:
        os.close(fd)


def remove_temporaries(folder, names):
    """Remove the temporaries that killed saves of the files `names` left in `folder`
    (`.last.npz.<random>.tmp`), and nothing else; -> their names. Nothing ever reads them, so
    this only frees the space."""
    found = sorted(f for name in names for f in Path(folder).glob(f".{name}.*{TEMP_SUFFIX}"))
    for f in found:
        f.unlink(missing_ok=True)
    return [f.name for f in found]
