"""Custom `construct` fields that stay strict when compiled.

construct's compiled parsers read variable-length fields with a bare `io.read(n)`, which
silently returns fewer bytes on truncated input, and its compiled `Bytes` builder writes
whatever it is given. These fields check lengths, bounds and UTF-8 in both the interpreted
and the compiled code paths, and raise the typed errors of `improto.errors`.
"""

from __future__ import annotations

import struct
from typing import Any

from construct import Construct, stream_read, stream_write

from improto.errors import BadUtf8, EncodeError, InvalidField, MalformedFrame

_PREFIX = {1: ">B", 2: ">H", 4: ">I"}
_U16 = struct.Struct(">H")


def read_exact(io: Any, n: int) -> bytes:
    """Read exactly n bytes or raise MalformedFrame (used by generated code too)."""
    data = io.read(n)
    if len(data) != n:
        raise MalformedFrame(f"truncated: wanted {n} bytes, {len(data)} left")
    return data


def check_end(io: Any) -> None:
    if io.read(1):
        raise MalformedFrame("trailing bytes after the last field")


def _decode_utf8(raw: bytes, name: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadUtf8(f"{name}: invalid UTF-8 at byte {e.start}") from None


def _check_len(n: int, lo: int, hi: int, name: str, exc: type[InvalidField]) -> None:
    if not lo <= n <= hi:
        raise exc(f"{name}: length {n} outside {lo}..{hi}")


class _Prefixed(Construct):  # type: ignore[misc]
    """Shared machinery of length-prefixed fields with a byte-length range."""

    def __init__(self, name: str, prefix_size: int, lo: int, hi: int) -> None:
        super().__init__()
        self.field_name = name
        self.prefix = struct.Struct(_PREFIX[prefix_size])
        self.lo, self.hi = lo, hi
        assert hi < 256**prefix_size

    def _read_raw(self, stream: Any, path: str) -> bytes:
        (n,) = self.prefix.unpack(stream_read(stream, self.prefix.size, path))
        _check_len(n, self.lo, self.hi, self.field_name, InvalidField)
        return stream_read(stream, n, path)  # type: ignore[no-any-return]

    def _write_raw(self, raw: bytes, stream: Any, path: str) -> None:
        _check_len(len(raw), self.lo, self.hi, self.field_name, EncodeError)
        stream_write(stream, self.prefix.pack(len(raw)), self.prefix.size, path)
        stream_write(stream, raw, len(raw), path)

    def _emit_common(self, code: Any) -> str:
        uid = code.allocateId()
        code.append(
            f"""
            from improto.fields import read_exact, _decode_utf8, _check_len
            from improto.errors import InvalidField, EncodeError
            prefix_{uid} = struct.Struct({self.prefix.format!r})
            """
        )
        return str(uid)

    def _sizeof(self, context: Any, path: str) -> int:
        raise NotImplementedError


class Utf8(_Prefixed):
    """A UTF-8 string behind a 1- or 2-byte length prefix counting bytes."""

    def _parse(self, stream: Any, context: Any, path: str) -> str:
        return _decode_utf8(self._read_raw(stream, path), self.field_name)

    def _build(self, obj: Any, stream: Any, context: Any, path: str) -> str:
        if not isinstance(obj, str):
            raise EncodeError(f"{self.field_name}: expected str, got {type(obj).__name__}")
        self._write_raw(obj.encode("utf-8"), stream, path)
        return obj

    def _emitparse(self, code: Any) -> str:
        u = self._emit_common(code)
        name, lo, hi = self.field_name, self.lo, self.hi
        code.append(
            f"""
            def parse_utf8_{u}(io):
                n = prefix_{u}.unpack(read_exact(io, {self.prefix.size}))[0]
                _check_len(n, {lo}, {hi}, {name!r}, InvalidField)
                return _decode_utf8(read_exact(io, n), {name!r})
            """
        )
        return f"parse_utf8_{u}(io)"

    def _emitbuild(self, code: Any) -> str:
        u = self._emit_common(code)
        name, lo, hi = self.field_name, self.lo, self.hi
        code.append(
            f"""
            def build_utf8_{u}(obj, io):
                raw = obj.encode('utf-8')
                _check_len(len(raw), {lo}, {hi}, {name!r}, EncodeError)
                io.write(prefix_{u}.pack(len(raw)))
                io.write(raw)
                return obj
            """
        )
        return f"build_utf8_{u}(obj, io)"


class Blob(_Prefixed):
    """Opaque bytes behind a length prefix."""

    def _parse(self, stream: Any, context: Any, path: str) -> bytes:
        return self._read_raw(stream, path)

    def _build(self, obj: Any, stream: Any, context: Any, path: str) -> bytes:
        if not isinstance(obj, bytes):
            raise EncodeError(f"{self.field_name}: expected bytes, got {type(obj).__name__}")
        self._write_raw(obj, stream, path)
        return obj

    def _emitparse(self, code: Any) -> str:
        u = self._emit_common(code)
        name, lo, hi = self.field_name, self.lo, self.hi
        code.append(
            f"""
            def parse_blob_{u}(io):
                n = prefix_{u}.unpack(read_exact(io, {self.prefix.size}))[0]
                _check_len(n, {lo}, {hi}, {name!r}, InvalidField)
                return read_exact(io, n)
            """
        )
        return f"parse_blob_{u}(io)"

    def _emitbuild(self, code: Any) -> str:
        u = self._emit_common(code)
        name, lo, hi = self.field_name, self.lo, self.hi
        code.append(
            f"""
            def build_blob_{u}(obj, io):
                if type(obj) is not bytes:
                    raise EncodeError({name!r} + ': expected bytes')
                _check_len(len(obj), {lo}, {hi}, {name!r}, EncodeError)
                io.write(prefix_{u}.pack(len(obj)))
                io.write(obj)
                return obj
            """
        )
        return f"build_blob_{u}(obj, io)"


class List16(Construct):  # type: ignore[misc]
    """u16 element count (checked against lo..hi at the prefix), then the elements."""

    def __init__(self, name: str, subcon: Construct, lo: int, hi: int) -> None:
        super().__init__()
        self.field_name = name
        self.subcon = subcon
        self.lo, self.hi = lo, hi

    def _parse(self, stream: Any, context: Any, path: str) -> list[Any]:
        (n,) = _U16.unpack(stream_read(stream, 2, path))
        _check_len(n, self.lo, self.hi, self.field_name, InvalidField)
        return [self.subcon._parsereport(stream, context, path) for _ in range(n)]

    def _build(self, obj: Any, stream: Any, context: Any, path: str) -> Any:
        _check_len(len(obj), self.lo, self.hi, self.field_name, EncodeError)
        stream_write(stream, _U16.pack(len(obj)), 2, path)
        for item in obj:
            self.subcon._build(item, stream, context, path)
        return obj

    def _sizeof(self, context: Any, path: str) -> int:
        raise NotImplementedError

    def _emitparse(self, code: Any) -> str:
        u = code.allocateId()
        name, lo, hi = self.field_name, self.lo, self.hi
        code.append(
            f"""
            from improto.fields import read_exact, _check_len, _U16
            from improto.errors import InvalidField
            def parse_list_{u}(io, this):
                n = _U16.unpack(read_exact(io, 2))[0]
                _check_len(n, {lo}, {hi}, {name!r}, InvalidField)
                return [{self.subcon._compileparse(code)} for i in range(n)]
            """
        )
        return f"parse_list_{u}(io, this)"

    def _emitbuild(self, code: Any) -> str:
        u = code.allocateId()
        name, lo, hi = self.field_name, self.lo, self.hi
        code.append(
            f"""
            from improto.fields import _check_len, _U16
            from improto.errors import EncodeError
            def build_list_{u}(objs, io, this):
                _check_len(len(objs), {lo}, {hi}, {name!r}, EncodeError)
                io.write(_U16.pack(len(objs)))
                for obj in objs:
                    {self.subcon._compilebuild(code)}
                return objs
            """
        )
        return f"build_list_{u}(obj, io, this)"


class FixedBytes(Construct):  # type: ignore[misc]
    """Exactly `size` opaque bytes, checked in both directions."""

    def __init__(self, name: str, size: int) -> None:
        super().__init__()
        self.field_name = name
        self.size = size

    def _parse(self, stream: Any, context: Any, path: str) -> bytes:
        return stream_read(stream, self.size, path)  # type: ignore[no-any-return]

    def _build(self, obj: Any, stream: Any, context: Any, path: str) -> bytes:
        if not isinstance(obj, bytes) or len(obj) != self.size:
            raise EncodeError(f"{self.field_name}: expected exactly {self.size} bytes")
        stream_write(stream, obj, self.size, path)
        return obj

    def _sizeof(self, context: Any, path: str) -> int:
        return self.size

    def _emitparse(self, code: Any) -> str:
        code.append("from improto.fields import read_exact")
        return f"read_exact(io, {self.size})"

    def _emitbuild(self, code: Any) -> str:
        uid = code.allocateId()
        code.append(
            f"""
            from improto.errors import EncodeError
            def build_fixed_{uid}(obj, io):
                if type(obj) is not bytes or len(obj) != {self.size}:
                    raise EncodeError({self.field_name!r} + ': expected exactly {self.size} bytes')
                io.write(obj)
                return obj
            """
        )
        return f"build_fixed_{uid}(obj, io)"


class End(Construct):  # type: ignore[misc]
    """Asserts that the frame has no bytes after its last field (construct ignores them)."""

    def __init__(self) -> None:
        super().__init__()
        self.flagbuildnone = True

    def _parse(self, stream: Any, context: Any, path: str) -> None:
        check_end(stream)

    def _build(self, obj: Any, stream: Any, context: Any, path: str) -> None:
        return None

    def _sizeof(self, context: Any, path: str) -> int:
        return 0

    def _emitparse(self, code: Any) -> str:
        code.append("from improto.fields import check_end")
        return "check_end(io)"

    def _emitbuild(self, code: Any) -> str:
        return "None"


class PackedRun(Construct):  # type: ignore[misc]
    """Several adjacent fixed-width integers read or written with one `struct` call.

    Only the compiled schema uses it (see `schema.merge_runs`): it is a nameless field
    whose generated code stores each value under its own name in the enclosing compiled
    Struct's `result`/`this` (parse) or reads them from its `objdict` (build). The bytes
    are exactly those of the separate fields; the interpreted reference keeps those.
    """

    def __init__(self, names: list[str], formats: str) -> None:
        super().__init__()
        self.names = names
        self.fmt = struct.Struct(">" + formats)
        self.flagbuildnone = True

    def _parse(self, stream: Any, context: Any, path: str) -> None:
        values = self.fmt.unpack(stream_read(stream, self.fmt.size, path))
        context.update(zip(self.names, values, strict=True))

    def _build(self, obj: Any, stream: Any, context: Any, path: str) -> None:
        stream_write(stream, self.fmt.pack(*[context[n] for n in self.names]), self.fmt.size, path)

    def _sizeof(self, context: Any, path: str) -> int:
        return self.fmt.size

    def _emitparse(self, code: Any) -> str:
        u = code.allocateId()
        stores = "\n".join(
            f"                result[{n!r}] = this[{n!r}] = values[{i}]"
            for i, n in enumerate(self.names)
        )
        code.append(
            f"""
            from improto.fields import read_exact
            run_{u} = struct.Struct({self.fmt.format!r})
            def parse_run_{u}(io, result, this):
                values = run_{u}.unpack(read_exact(io, {self.fmt.size}))
{stores}
            """
        )
        # Evaluated inside construct's generated parse_struct_*, where `result` and `this`
        # are the Struct's locals (construct 2.10.x code generator).
        return f"parse_run_{u}(io, result, this)"

    def _emitbuild(self, code: Any) -> str:
        u = code.allocateId()
        args = ", ".join(f"objdict[{n!r}]" for n in self.names)
        code.append(
            f"""
            run_{u} = struct.Struct({self.fmt.format!r})
            def build_run_{u}(objdict, io):
                io.write(run_{u}.pack({args}))
            """
        )
        return f"build_run_{u}(objdict, io)"
