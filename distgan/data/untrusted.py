"""Untrusted input: user files read as regular files only, bounded by the bytes read; .npy data and CIFAR-10
pickles allocated only as large as the bytes that hold them.

A FIFO, a device or a socket named where a file belongs is refused by name before a byte is read (opening a FIFO
with no writer blocks forever, and a device reports size 0, so no size check based on the file's size holds),
and every read stops at its bound by counting the bytes it got, never by trusting what the file claims.

``numpy.load`` allocates the array its header describes before reading a byte of it, and unpickling a numpy
array calls ``ndarray``/``_reconstruct`` with any shape: a 100-byte file can ask for gigabytes, or (with no
state) hand out uninitialised memory. Here every array is a view of bytes already read, and its header must
account for exactly those bytes.
"""
from __future__ import annotations

import errno
import io
import math
import os
import pickle
import pickletools
import stat
from typing import Any, BinaryIO

import numpy as np

from distgan.data.errors import DataError

READ_CHUNK = 1 << 20

# ---------------------------------------------------------------- regular files only

_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def not_regular(mode: int) -> str | None:
    """What a file of this ``st_mode`` is when it is not a regular file ("a FIFO (named pipe)" ...), else None."""
    if stat.S_ISREG(mode):
        return None
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def require_regular_file(path: str | os.PathLike, what: str) -> os.stat_result:
    """The file's stat (symbolic links followed) after refusing anything but a regular file, by name; for readers
    that open the path themselves (safetensors). FileNotFoundError passes through."""
    info = os.stat(path)
    kind = not_regular(info.st_mode)
    if kind is not None:
        raise DataError(f"{what} {os.fspath(path)}: it is {kind}, not a regular file; point at a file")
    return info


def open_regular_file(path: str | os.PathLike, what: str) -> BinaryIO:
    """``path`` opened for reading, refused unless it is a regular file: opened non-blocking (a FIFO with no writer
    would block the open), then checked on the open descriptor. FileNotFoundError passes through."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        kind = not_regular(os.fstat(fd).st_mode)
        if kind is not None:
            raise DataError(f"{what} {os.fspath(path)}: it is {kind}, not a regular file; point at a file")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_bounded(stream: BinaryIO, max_bytes: int, too_big: str) -> bytes:
    """All of ``stream``, read in chunks; DataError(too_big) as soon as it passes ``max_bytes``."""
    chunks, total = [], 0
    while chunk := stream.read(min(READ_CHUNK, max_bytes + 1 - total)):
        total += len(chunk)
        if total > max_bytes:
            raise DataError(too_big)
        chunks.append(chunk)
    return b"".join(chunks)


def read_regular_file(path: str | os.PathLike, what: str, max_bytes: int) -> bytes:
    """The bytes of a regular file of at most ``max_bytes`` (counted as read); DataError naming ``what`` and the
    path otherwise. FileNotFoundError passes through; a name too long is said so."""
    try:
        with open_regular_file(path, what) as stream:
            return read_bounded(stream, max_bytes, f"{what} {os.fspath(path)}: larger than {max_bytes} bytes; "
                                                   "it cannot be what distgan reads there")
    except OSError as err:
        if err.errno == errno.ENAMETOOLONG:
            raise DataError(f"{what} {os.fspath(path)[:80]}...: the name is too long for the file system") from None
        raise

# ---------------------------------------------------------------- .npy


def read_npy_header(stream: BinaryIO, size: int, name: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, Fortran order, dtype) of a .npy of SIZE bytes, the stream left at its data; ValueError unless it
    holds plain numbers and exactly the bytes its header describes follow."""
    start = stream.tell() if stream.seekable() else 0
    try:
        version = np.lib.format.read_magic(stream)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(stream)
    except (ValueError, EOFError) as err:
        raise ValueError(f"{name}: not a .npy array: {err}") from None
    if dtype.hasobject:
        raise ValueError(f"{name}: .npy holds Python objects; only plain numbers are read")
    needed, have = math.prod(shape) * dtype.itemsize, size - (stream.tell() - start)
    if needed != have:
        raise ValueError(f"{name}: .npy header says {shape} {dtype} ({needed} bytes) but it holds {have} bytes")
    return shape, fortran, dtype


def parse_npy(data: bytes, name: str) -> np.ndarray:
    """The array of an in-memory .npy file (read-only view); ValueError unless its header matches its size."""
    stream = io.BytesIO(data)
    shape, fortran, dtype = read_npy_header(stream, len(data), name)
    array = np.frombuffer(data, dtype=dtype, count=math.prod(shape), offset=stream.tell())
    return array.reshape(shape, order="F" if fortran else "C")


# ---------------------------------------------------------------- CIFAR-10 pickles

# Opcodes with 8-byte lengths, persistent ids, extension codes and class instantiation: real CIFAR-10 batches
# (Python 2 pickles of dicts, lists, strings and numpy arrays) use none of them.
_REFUSED_OPCODES = {"BINBYTES8", "BINUNICODE8", "BYTEARRAY8", "NEXT_BUFFER", "READONLY_BUFFER", "PERSID",
                    "BINPERSID", "EXT1", "EXT2", "EXT4", "INST", "OBJ", "NEWOBJ", "NEWOBJ_EX", "LONG4"}
_MEMO_PUTS = {"PUT", "BINPUT", "LONG_BINPUT"}


def _check_opcodes(data: bytes) -> None:
    """Walk the pickle without running it: refuse unneeded opcodes and memo indices past the opcode count
    (the unpickler sizes its memo table by the largest index)."""
    for count, (opcode, arg, _) in enumerate(pickletools.genops(data)):
        if opcode.name in _REFUSED_OPCODES:
            raise pickle.UnpicklingError(f"opcode {opcode.name} is not used by CIFAR-10 batches")
        if opcode.name in _MEMO_PUTS and int(arg) > count:
            raise pickle.UnpicklingError(f"memo index {arg} at opcode {count}")


class _NdarrayType:
    """Stands in for numpy.ndarray: it may only be named as _reconstruct's first argument, never called."""

    def __new__(cls, *args, **kwargs):
        raise pickle.UnpicklingError("numpy.ndarray called directly (CIFAR-10 batches use _reconstruct)")


_INTEGER_DTYPES = ("u1", "i1", "u2", "i2", "u4", "i4", "u8", "i8")


class _Dtype:
    """Stands in for numpy.dtype(name): integer types only; its pickled state may set only the byte order."""

    def __init__(self, name: Any, align: Any = False, copy: Any = True):
        if not (isinstance(name, str) and name in _INTEGER_DTYPES):
            raise pickle.UnpicklingError(f"dtype {name!r} is not an integer type")
        self.dtype = np.dtype(name)

    def __setstate__(self, state: Any) -> None:
        order = state[1] if isinstance(state, tuple) and len(state) > 1 else None
        if order not in ("|", "<", ">", "="):
            raise pickle.UnpicklingError(f"dtype state {str(state)[:60]}")
        if order in "<>":
            self.dtype = self.dtype.newbyteorder(order)


class _PendingArray:
    """What _reconstruct gives: an array made only from the bytes its pickled state carries, shape checked."""

    array: np.ndarray | None = None

    def __setstate__(self, state: Any) -> None:
        if not (isinstance(state, tuple) and len(state) == 5):
            raise pickle.UnpicklingError("array state is not (version, shape, dtype, fortran, data)")
        _, shape, dtype, fortran, raw = state
        if not isinstance(dtype, _Dtype):
            raise pickle.UnpicklingError("array dtype is not an integer numpy.dtype")
        if not (isinstance(shape, tuple) and len(shape) <= 4 and all(type(d) is int and d >= 0 for d in shape)):
            raise pickle.UnpicklingError(f"array shape {str(shape)[:60]}")
        if not isinstance(raw, bytes):
            raise pickle.UnpicklingError("array data is not a byte string")
        needed = math.prod(shape) * dtype.dtype.itemsize
        if needed != len(raw):
            raise pickle.UnpicklingError(f"array of shape {shape} needs {needed} bytes but the pickle holds {len(raw)}")
        array = np.frombuffer(raw, dtype=dtype.dtype, count=math.prod(shape))
        self.array = array.reshape(shape, order="F" if fortran else "C")


def _reconstruct(subtype: Any, shape: Any, typecode: Any) -> _PendingArray:
    if subtype is not _NdarrayType:
        raise pickle.UnpicklingError("_reconstruct of something other than numpy.ndarray")
    return _PendingArray()


def _latin1(text: Any, encoding: Any = "latin1") -> bytes:
    """_codecs.encode as Python 3 pickles of Python 2 byte strings use it."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("_codecs.encode of something other than a latin-1 string")
    return text.encode("latin-1")


_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct, ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): _NdarrayType, ("numpy", "dtype"): _Dtype, ("_codecs", "encode"): _latin1,
}


class _CifarUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name} (only numpy arrays are allowed)")
        return _ALLOWED[module, name]


def _resolve(value: Any) -> Any:
    """Replace each _PendingArray in dicts and lists by its array; one never given its bytes is an error."""
    if isinstance(value, _PendingArray):
        if value.array is None:
            raise pickle.UnpicklingError("numpy array without its data")
        return value.array
    if isinstance(value, dict):
        return {key: _resolve(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_resolve(item) for item in value]
    if value is _NdarrayType or isinstance(value, _Dtype):
        raise pickle.UnpicklingError("a bare numpy type")
    return value


def load_cifar_pickle(data: bytes) -> Any:
    """Unpickle a CIFAR-10 python batch: containers, numbers, strings and integer numpy arrays whose bytes
    the pickle carries; anything else raises (pickle.UnpicklingError, ValueError, ...)."""
    _check_opcodes(data)
    return _resolve(_CifarUnpickler(io.BytesIO(data), encoding="bytes").load())
