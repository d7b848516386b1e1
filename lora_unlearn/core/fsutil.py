"""Writing output folders so that a crash or an error never leaves half of one behind.

:func:`atomic_dir` builds an output in a temporary folder beside it and publishes it with one
rename. Temporary folders are named ``.NAME.tmp-PID-XXXXXXXX`` (and, on filesystems without
an atomic exchange, the replaced folder ``.NAME.old-PID-XXXXXXXX``): hidden, never the output's
name, and carrying the writer's process id, so that a later write can tell a folder left by a
killed writer (its process is gone) from one a live writer is still filling.

Reading is guarded too: weights are read from safetensors only, and pickle files (which can run
code when loaded) only inside :func:`pickle_allowed` or with ``allow_pickle=True``.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import errno
import hashlib
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from ..errors import UserError

_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)-[A-Za-z0-9_]+$")

# renameat2(2) (Linux >= 3.15, glibc >= 2.28): RENAME_EXCHANGE swaps two paths atomically.
_AT_FDCWD, _RENAME_NOREPLACE, _RENAME_EXCHANGE = -100, 1, 2
try:
    _renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    _renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    _renameat2.restype = ctypes.c_int
except (AttributeError, OSError, TypeError):
    _renameat2 = None
USE_EXCHANGE = True  # tests set False to exercise the two-rename fallback


def is_leftover_name(name: str) -> bool:
    """Whether ``name`` is one of :func:`atomic_dir`'s temporary names (never an output)."""
    return _LEFTOVER.match(name) is not None


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # no such process (or a number no process can have)
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        with contextlib.suppress(OSError):
            path.unlink()
    else:
        shutil.rmtree(path, ignore_errors=True)


def _leftovers(out: Path) -> list[tuple[str, Path]]:
    """(kind, path) of the temporary folders of ``out`` whose writer process is gone."""
    try:
        entries = list(out.parent.iterdir())
    except OSError:
        return []
    found = []
    for entry in entries:
        m = _LEFTOVER.match(entry.name)
        if m and m["name"] == out.name and not _alive(int(m["pid"])):
            found.append((m["kind"], entry))
    return found


def _mtime(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return -1


def recover(out: str | Path, clean: bool = True) -> bool:
    """Undo what a writer of ``out`` that was killed mid-publish left; return whether ``out`` was restored.

    If ``out`` is missing and a killed writer's ``.old`` folder exists (it was killed between
    its two renames, possible only without an atomic exchange), that folder is the complete
    previous output (an old folder is renamed to a ``.tmp`` name before it is deleted) and is
    renamed back to ``out``. With ``clean``, the killed writers' other
    temporary folders (a half-built new output, or an old one being deleted) are removed.
    Folders of live writers are never touched.
    """
    out = Path(out)
    found = _leftovers(out)
    restored = False
    if not out.exists() and not out.is_symlink():
        olds = sorted((p for kind, p in found if kind == "old"), key=_mtime)
        if olds:
            with contextlib.suppress(OSError):
                olds[-1].rename(out)
                restored = True
                found = [(k, p) for k, p in found if p != olds[-1]]
    if clean:
        for _, path in found:
            _remove(path)
    return restored


def _rename2(src: Path, dst: Path, flags: int) -> bool:
    """renameat2(src, dst, flags); False where the system or filesystem does not offer it."""
    if _renameat2 is None or not USE_EXCHANGE:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
        return False
    raise OSError(err, os.strerror(err), str(src), None, str(dst))


def _fsync(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_tree(root: Path) -> None:
    for folder, _, files in os.walk(root):
        for name in files:
            _fsync(Path(folder) / name)
        _fsync(Path(folder))


def _publish(tmp: Path, out: Path) -> None:
    if out.exists() or out.is_symlink():
        if _rename2(tmp, out, _RENAME_EXCHANGE):  # out is the new folder, tmp the old one: no gap
            _fsync(out.parent)
            _remove(tmp)
            return
        old = out.with_name(f".{out.name}.old-{os.getpid()}-{secrets.token_hex(4)}")
        out.rename(old)
        try:
            tmp.rename(out)  # between these two renames out is missing: recover() restores old
        except BaseException:
            old.rename(out)
            raise
        _fsync(out.parent)
        trash = out.with_name(f".{out.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
        try:
            old.rename(trash)  # a folder being deleted must never be taken for a complete old one
        except OSError:
            trash = old
        _remove(trash)
        return
    try:
        if not _rename2(tmp, out, _RENAME_NOREPLACE):
            tmp.rename(out)
    except FileExistsError:
        raise UserError(f"output {out} was created by someone else while this was written: "
                        "choose another path or pass --overwrite") from None
    _fsync(out.parent)


def publish(src: str | Path, out: str | Path, overwrite: bool = False) -> None:
    """Move the complete folder ``src`` (on the same filesystem) to ``out`` with :func:`atomic_dir`'s guarantee.

    For a folder built elsewhere than in ``atomic_dir`` (e.g. a resumable run's work folder):
    ``out`` is at every instant absent, the complete old folder or the complete ``src``. ``src``
    is first renamed to a temporary name beside ``out``, so that the old folder, which the swap
    leaves there until it is deleted, is never found under ``src``'s name.
    """
    src, out = Path(src), Path(out)
    recover(out)
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise UserError(f"output {out} already exists: choose another path or pass --overwrite")
    if out.exists() and not out.is_dir():
        raise UserError(f"output {out} exists and is not a folder: choose another path")
    _fsync_tree(src)
    staged = out.with_name(f".{out.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        src.rename(staged)
        try:
            _publish(staged, out)
        except BaseException:  # nothing was published: staged still holds src's content
            with contextlib.suppress(OSError):
                staged.rename(src)
            raise
    except OSError as e:
        raise UserError(f"cannot write output {out}: {e.strerror} ({e.filename}); "
                        "choose a path in a writable folder") from None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_separate(out: str | Path, inputs: Iterable[str | Path], what: str = "input") -> None:
    """UserError if ``out`` is one of ``inputs``, lies inside one, or contains one.

    Writing there would change an input while it is read, or (with overwrite) delete it.
    """
    target = Path(out).resolve()
    for given in inputs:
        path = Path(given).resolve()
        if target == path:
            raise UserError(f"output {out} is the {what} {given} itself: write the result to another folder")
        if path in target.parents:
            raise UserError(f"output {out} is inside the {what} {given}: choose an output folder outside it")
        if target in path.parents:
            raise UserError(f"output {out} contains the {what} {given}, which replacing it would delete: "
                            "choose another output folder")


@contextlib.contextmanager
def atomic_dir(out: str | Path, overwrite: bool = False, inputs: Iterable[str | Path] = ()) -> Iterator[Path]:
    """Yield a fresh temporary folder beside ``out``; publish it as ``out`` when the block succeeds.

    Guarantee: at every instant, including when the writing process is killed (SIGKILL, OOM)
    at any point, ``out`` is either absent (if it was absent before), the complete previous
    folder, or the complete new one; never a mixture or a partial folder.

    - On an exception in the block the temporary folder is removed and ``out`` is untouched.
    - Files are fsync'ed before publishing, so the same holds after a power loss on filesystems
      that honour fsync and rename ordering (ext4, xfs, btrfs).
    - New ``out``: one rename (``RENAME_NOREPLACE`` where available).
    - Replacing ``out`` (``overwrite``): where the system has ``renameat2(RENAME_EXCHANGE)``
      (Linux >= 3.15 on ext4, xfs, btrfs, tmpfs, ...) the new and old folders are swapped
      atomically, then the old one is deleted: ``out`` never disappears. Elsewhere ``out`` is
      renamed to ``.NAME.old-PID-X`` and the new folder renamed in; a kill between those two
      renames leaves ``out`` missing for a moment, and :func:`recover` (run by the next
      ``atomic_dir`` on ``out`` and by :func:`lora_unlearn.core.adapter_io.load_adapter` on a missing
      folder) renames the complete old folder back.
    - What a killed writer leaves is only hidden ``.NAME.tmp-PID-X`` / ``.NAME.old-PID-X``
      folders (a partial new output, or an old one partly deleted); the next ``atomic_dir`` on
      ``out`` deletes those whose writer process is gone, and ``load_adapter`` refuses such names.

    ``inputs`` are folders the block reads: ``out`` may not be, contain or lie inside one of them.
    Two processes writing the same ``out`` at once each publish a complete folder; the last wins.
    """
    out = Path(out)
    if out.name in ("", ".", ".."):
        raise UserError(f"output {out} does not name a folder: give a path such as runs/NAME")
    recover(out)
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise UserError(f"output {out} already exists: choose another path or pass --overwrite")
    if out.exists() and not out.is_dir():
        raise UserError(f"output {out} exists and is not a folder: choose another path")
    check_separate(out, inputs)
    blocker = next((p for p in out.parents if p.exists() or p.is_symlink()), None)
    if blocker is not None and not blocker.is_dir():
        raise UserError(f"cannot create output folder {out}: {blocker} is a file, not a folder; choose another path")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
        tmp.chmod(0o777 & ~_umask())  # mkdtemp makes 0700; the output gets a normal folder's mode
    except OSError as e:
        raise UserError(f"cannot create output folder {out}: {e.strerror} ({e.filename}); "
                        "choose a path in a writable folder") from None
    try:
        yield tmp
        _fsync_tree(tmp)
        try:
            _publish(tmp, out)
        except OSError as e:
            raise UserError(f"cannot write output {out}: {e.strerror} ({e.filename}); "
                            "choose a path in a writable folder") from None
    except BaseException:
        _remove(tmp)
        raise


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ---- reading pickles --------------------------------------------------------------------------

_ALLOW_PICKLE: contextvars.ContextVar[bool] = contextvars.ContextVar("lora_unlearn_allow_pickle", default=False)


@contextlib.contextmanager
def pickle_allowed(allowed: bool = True) -> Iterator[None]:
    """Within the block, read pickle weights as if ``allow_pickle=True`` was passed.

    Applies to :func:`lora_unlearn.core.adapter_io.load_adapter` and
    :func:`lora_unlearn.core.models.load_base`; the CLI's global ``--allow-pickle`` option wraps
    the command in this, which reaches every load a command or recipe makes.
    """
    token = _ALLOW_PICKLE.set(bool(allowed))
    try:
        yield
    finally:
        _ALLOW_PICKLE.reset(token)


def pickle_is_allowed(allow_pickle: bool = False) -> bool:
    return bool(allow_pickle) or _ALLOW_PICKLE.get()
