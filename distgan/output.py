"""The one way distgan writes an output (a file or a folder): :class:`Output`.

- It is written into a hidden temporary sibling, ``.NAME.partial-PID-XXXX/NAME``, marked as distgan's own by a
  ``.distgan-partial.json`` (the writer's pid and its start time), and renamed into place only when complete.
- A lock (``fcntl.flock`` on ``.NAME.lock`` beside the target) is held for the whole write: a second writer of the
  same target fails at once, naming the first one's pid.
- The target is checked when the write starts and again at the rename, under the lock: a file or folder that
  appeared meanwhile, or changed into one the check refuses, is kept and the command fails with one line. The
  rename itself never replaces anything (``renameat2(RENAME_NOREPLACE)``); replacing an existing target needs
  the caller's check to accept it (``--force`` on a folder distgan wrote).
- On an error, KeyboardInterrupt or :class:`distgan.stop.Interrupted` (SIGTERM), the partial output is removed;
  a partial left by a killed process is removed by the next writer of that target (or of its folder, see
  :func:`remove_stale_partials`) once its writer's pid is gone. SIGINT/SIGTERM are held during the rename and the
  clean-up, so neither is ever half done.
"""
from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import os
import shutil
import signal
import socket
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional

from distgan.errors import UserError

MARKER = ".distgan-partial.json"
Check = Callable[[Path], None]  # raises UserError when the target as it stands now may not be replaced


class OutputError(UserError):
    """An output that cannot be written without losing something: the message names it and the fix."""


def refuse_existing(flag: str) -> Check:
    """The default check: an existing target is never replaced."""
    def check(target: Path) -> None:
        raise OutputError(f"{flag} {target} already exists; choose another {flag} (or pass --force where the "
                          "command offers it)")
    return check


def replace_file_with_force(flag: str, force: bool) -> Check:
    """An existing regular file is replaced only with ``--force``; a folder or anything else never."""
    def check(target: Path) -> None:
        if target.is_symlink() or not target.is_file():
            raise OutputError(f"{flag} {target}: it exists and is not a regular file; remove it yourself or choose "
                              f"another {flag}")
        if not force:
            raise OutputError(f"{flag} {target} already exists; pass --force to replace it, or choose another {flag}")
    return check


def _start_time(pid: int) -> Optional[str]:
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat), None where unknown: with
    the pid it names one process, even after the pid is reused."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rfind(")") + 2:].split()[19]


def _writer_alive(marker: dict) -> bool:
    pid = marker.get("pid")
    if not isinstance(pid, int) or marker.get("host") != socket.gethostname():
        return True  # another machine's writer (a shared filesystem): never ours to judge
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    started = marker.get("started")
    return started is None or _start_time(pid) in (None, started)


def remove_stale_partials(folder: Path, name: Optional[str] = None) -> list[Path]:
    """Remove the ``.NAME.partial-*`` folders in ``folder`` (of one ``name``, or all) whose marker says distgan
    wrote them and whose writer is gone (this host, pid dead or reused). Others are left as they are."""
    pattern = f".{name}.partial-*" if name is not None else ".*.partial-*"
    removed = []
    for path in folder.glob(pattern):
        try:
            marker = json.loads((path / MARKER).read_text())
        except (OSError, ValueError):
            continue  # no marker: not provably ours
        if isinstance(marker, dict) and not _writer_alive(marker):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


_RENAME_NOREPLACE = 1
_AT_FDCWD = -100


def rename_noreplace(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst`` unless ``dst`` exists (FileExistsError), atomically where the kernel and the
    filesystem offer renameat2; elsewhere a file is linked (atomic too) and a folder checked then renamed (a
    folder that appears in between makes the rename fail unless it is empty)."""
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is not None:
        if renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return
        code = ctypes.get_errno()
        if code not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise OSError(code, os.strerror(code), str(dst))
    if src.is_dir():
        if dst.exists() or dst.is_symlink():
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
        os.rename(src, dst)
    else:
        os.link(src, dst)
        os.unlink(src)


@contextmanager
def signals_held() -> Iterator[None]:
    """SIGINT and SIGTERM wait until the block is done (then arrive as usual)."""
    held = {signal.SIGINT, signal.SIGTERM}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


class TargetLock:
    """``fcntl.flock`` on ``.NAME.lock`` beside the target; the file is removed on release (a writer that opened
    it before the removal sees another inode and opens the new one)."""

    def __init__(self, target: Path, shown: Path, flag: str):
        self.path = target.with_name(f".{target.name}.lock")
        self.target, self.flag = shown, flag
        self.fd: Optional[int] = None

    def acquire(self) -> None:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 64).decode(errors="replace").strip() or "?"
                os.close(fd)
                raise OutputError(f"{self.flag} {self.target} is being written by another distgan process (pid "
                                  f"{holder}); wait for it to finish or choose another {self.flag}") from None
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.write(fd, str(os.getpid()).encode())
                self.fd = fd
                return
            os.close(fd)  # released and removed by its holder between our open and our lock: take the new one

    def release(self) -> None:
        if self.fd is not None:
            self.path.unlink(missing_ok=True)
            os.close(self.fd)
            self.fd = None


class Output:
    """Write one output through a temporary sibling (see the module's docstring)::

        with Output(out / "grid.png", check=replace_file_with_force("--out", force)) as path:
            image.save(path)            # path: the partial file; renamed to out/grid.png when the block ends

    ``folder``: the output is a folder (``path`` is created empty); else a file. ``check(target)`` is called when
    the target exists, at the start and again at the rename: it raises OutputError to refuse replacing it.
    ``empty_folder_ok``: an existing empty folder is taken over (removed at the rename, which fails if it is no
    longer empty) without asking ``check``.
    """

    def __init__(self, target: str | os.PathLike, *, folder: bool = False, check: Optional[Check] = None,
                 flag: str = "--out", empty_folder_ok: bool = False):
        self.given = Path(target)  # as the user wrote it: what messages and ``check`` see
        self.target = Path(os.path.abspath(target))
        self.folder, self.flag, self.empty_folder_ok = folder, flag, empty_folder_ok
        self.check = check or refuse_existing(flag)
        self.lock = TargetLock(self.target, self.given, flag)
        self.tmp: Optional[Path] = None
        self._found: Optional[tuple[int, int, int]] = None  # (device, inode, ctime) of the target accepted at the start
        self._was_empty = False  # that target was an empty folder, taken over (empty_folder_ok)

    # ---------------------------------------------------------------- start

    def __enter__(self) -> Path:
        return self.start()

    def start(self) -> Path:
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self.lock.acquire()
        try:
            remove_stale_partials(self.target.parent, self.target.name)
            self._found = self._accept()
            self.tmp = Path(tempfile.mkdtemp(dir=self.target.parent, prefix=f".{self.target.name}.partial-"
                                                                             f"{os.getpid()}-"))
            (self.tmp / MARKER).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                                       "started": _start_time(os.getpid()),
                                                       "target": self.target.name}))
            path = self.tmp / self.target.name
            if self.folder:
                path.mkdir()  # the usual permissions (mkdtemp's own folder is private; it is never the output)
            return path
        except BaseException:
            self.abort()
            raise

    def _accept(self) -> Optional[tuple[int, int, int]]:
        """The identity of an existing target this write may replace (None: there is none); refuses otherwise."""
        try:
            found = os.lstat(self.target)
        except FileNotFoundError:
            return None
        self._was_empty = self.empty_folder_ok and self._is_empty_folder()
        if not self._was_empty:
            self.check(self.given)
        return found.st_dev, found.st_ino, found.st_ctime_ns

    def _is_empty_folder(self) -> bool:
        return self.target.is_dir() and not self.target.is_symlink() and not any(self.target.iterdir())

    # ---------------------------------------------------------------- end

    def __exit__(self, kind, _err, _tb) -> None:
        if kind is None:
            self.commit()
        else:
            self.abort()

    def commit(self) -> Path:
        """Rename the finished output into place, after checking the target again; the lock is then released."""
        with signals_held():
            try:
                self._swap_in()
            finally:
                self.abort()
        return self.target

    def _swap_in(self) -> None:
        assert self.tmp is not None
        new = self.tmp / self.target.name
        try:
            now = os.lstat(self.target)
        except FileNotFoundError:
            now = None
        if now is not None:
            if self._was_empty and self._found is not None and self._found[:2] == (now.st_dev, now.st_ino):
                self._take_empty_folder()  # still the folder found empty, unless a file came meanwhile
            elif self._found != (now.st_dev, now.st_ino, now.st_ctime_ns):  # a new inode may reuse the number
                raise self._kept("changed" if self._found is not None else "appeared")
            else:
                self.check(self.given)  # changed meanwhile into something the check refuses: kept
                aside = self.tmp / ".replaced"
                os.rename(self.target, aside)
                try:
                    rename_noreplace(new, self.target)
                except BaseException:
                    os.rename(aside, self.target)
                    raise
                self._fsync_parent()
                return
        try:
            rename_noreplace(new, self.target)
        except OSError as err:  # FileExistsError, or ENOTEMPTY from a folder renamed onto one
            if err.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            raise self._kept("appeared") from None
        self._fsync_parent()

    def _kept(self, what: str) -> OutputError:
        return OutputError(f"{self.flag} {self.given} {what} while distgan was writing it; it was kept and nothing "
                           f"was written: move it away or choose another {self.flag}")

    def _take_empty_folder(self) -> None:
        try:
            os.rmdir(self.target)  # fails unless still empty: a file put there meanwhile is never lost
        except OSError as err:
            if err.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            raise OutputError(f"{self.flag} {self.given} received files while distgan was writing; they were kept "
                              f"and nothing was written: move them away or choose another {self.flag}") from None

    def _fsync_parent(self) -> None:
        fd = os.open(self.target.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def abort(self) -> None:
        """Remove the partial output (and anything moved aside) and release the lock; SIGINT/SIGTERM wait."""
        with signals_held():
            if self.tmp is not None:
                shutil.rmtree(self.tmp, ignore_errors=True)
                self.tmp = None
            self.lock.release()


def write_bytes(target: Path, data: bytes, check: Optional[Check] = None, flag: str = "--out") -> Path:
    """A small file written through :class:`Output`."""
    with Output(target, check=check, flag=flag) as path:
        path.write_bytes(data)
        with open(path, "rb+") as fh:
            os.fsync(fh.fileno())
    return Path(os.path.abspath(target))
