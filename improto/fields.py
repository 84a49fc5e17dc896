"""Custom `construct` fields that stay strict when compiled.

construct's compiled parsers read variable-length fields with a bare `io.read(n)`, which
silently returns fewer bytes on truncated input, and its compiled `Bytes` builder writes
whatever it is given. These fields check lengths, bounds and UTF-8 in both the interpreted
and the compiled code paths, and raise the typed errors of `improto.errors`.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import IO, TYPE_CHECKING, Generic, TypeVar

from construct import CodeGen, Construct, Container, stream_read, stream_write

from improto.errors import BadUtf8, EncodeError, InvalidField, MalformedFrame

_PREFIX = {1: ">B", 2: ">H", 4: ">I"}
_U16 = struct.Struct(">H")

_V = TypeVar("_V")  # what a field parses into and builds from
_P = TypeVar("_P")  # what a list element parses into
_B = TypeVar("_B")  # what a list element builds from

if TYPE_CHECKING:
    # The stubs (stubs/construct) make Construct generic in what it parses and builds.
    _Construct = Construct
else:

    class _Unparameterised:
        """At run time construct's classes are not generic: `_Construct[P, B]` is Construct."""

        def __getitem__(self, params: object) -> type[Construct]:
            return Construct

    _Construct = _Unparameterised()


def read_exact(io: IO[bytes], n: int) -> bytes:
    """Read exactly n bytes or raise MalformedFrame (used by generated code too)."""
    data = io.read(n)
    if len(data) != n:
        raise MalformedFrame(f"truncated: wanted {n} bytes, {len(data)} left")
    return data


def check_end(io: IO[bytes]) -> None:
    if io.read(1):
        raise MalformedFrame("trailing bytes after the last field")


def _decode_utf8(raw: bytes, name: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadUtf8(f"{name}: invalid UTF-8 at byte {e.start}") from None


def _expect_bytes(obj: object, name: str) -> bytes:
    """The compiled Blob builder's type check (`bytes` exactly, not a subclass)."""
    if type(obj) is not bytes:
        raise EncodeError(name + ": expected bytes")
    return obj


def _check_len(n: int, lo: int, hi: int, name: str, exc: type[InvalidField]) -> None:
    if not lo <= n <= hi:
        raise exc(f"{name}: length {n} outside {lo}..{hi}")


class _Prefixed(_Construct[_V, _V], Generic[_V]):
    """Shared machinery of length-prefixed fields with a byte-length range."""

    def __init__(self, name: str, prefix_size: int, lo: int, hi: int) -> None:
        super().__init__()
        self.field_name = name
        self.prefix = struct.Struct(_PREFIX[prefix_size])
        self.lo, self.hi = lo, hi
        assert hi < 256**prefix_size

    def _read_raw(self, stream: IO[bytes], path: str) -> bytes:
        (n,) = self.prefix.unpack(stream_read(stream, self.prefix.size, path))
        _check_len(n, self.lo, self.hi, self.field_name, InvalidField)
        return stream_read(stream, n, path)

    def _write_raw(self, raw: bytes, stream: IO[bytes], path: str) -> None:
        _check_len(len(raw), self.lo, self.hi, self.field_name, EncodeError)
        stream_write(stream, self.prefix.pack(len(raw)), self.prefix.size, path)
        stream_write(stream, raw, len(raw), path)

    def _emit_common(self, code: CodeGen) -> str:
        uid = code.allocateId()
        code.append(
            f"""
            from improto.fields import read_exact, _decode_utf8, _check_len, _expect_bytes
            from improto.errors import InvalidField, EncodeError
            prefix_{uid} = struct.Struct({self.prefix.format!r})
            """
        )
        return str(uid)

    def _emit_parser(self, code: CodeGen, kind: str, value: str) -> str:
        """Generate `parse_<kind>_<id>(io)`: read the prefix, check it, read that many bytes
        into `raw` and return the expression `value` (written in terms of `raw`)."""
        u = self._emit_common(code)
        name, lo, hi = self.field_name, self.lo, self.hi
        code.append(
            f"""
            def parse_{kind}_{u}(io):
                n = prefix_{u}.unpack(read_exact(io, {self.prefix.size}))[0]
                _check_len(n, {lo}, {hi}, {name!r}, InvalidField)
                raw = read_exact(io, n)
                return {value}
            """
        )
        return f"parse_{kind}_{u}(io)"

    def _emit_builder(self, code: CodeGen, kind: str, to_bytes: str) -> str:
        """Generate `build_<kind>_<id>(obj, io)`: turn `obj` into bytes by the expression
        `to_bytes`, check their length, write the prefix and the bytes, return `obj`."""
        u = self._emit_common(code)
        name, lo, hi = self.field_name, self.lo, self.hi
        code.append(
            f"""
            def build_{kind}_{u}(obj, io):
                raw = {to_bytes}
                _check_len(len(raw), {lo}, {hi}, {name!r}, EncodeError)
                io.write(prefix_{u}.pack(len(raw)))
                io.write(raw)
                return obj
            """
        )
        return f"build_{kind}_{u}(obj, io)"

    def _sizeof(self, context: Container, path: str) -> int:
        raise NotImplementedError


class Utf8(_Prefixed[str]):
    """A UTF-8 string behind a 1- or 2-byte length prefix counting bytes."""

    def _parse(self, stream: IO[bytes], context: Container, path: str) -> str:
        return _decode_utf8(self._read_raw(stream, path), self.field_name)

    def _build(self, obj: object, stream: IO[bytes], context: Container, path: str) -> str:
        if not isinstance(obj, str):
            raise EncodeError(f"{self.field_name}: expected str, got {type(obj).__name__}")
        self._write_raw(obj.encode("utf-8"), stream, path)
        return obj

    def _emitparse(self, code: CodeGen) -> str:
        return self._emit_parser(code, "utf8", f"_decode_utf8(raw, {self.field_name!r})")

    def _emitbuild(self, code: CodeGen) -> str:
        return self._emit_builder(code, "utf8", "obj.encode('utf-8')")


class Blob(_Prefixed[bytes]):
    """Opaque bytes behind a length prefix."""

    def _parse(self, stream: IO[bytes], context: Container, path: str) -> bytes:
        return self._read_raw(stream, path)

    def _build(self, obj: object, stream: IO[bytes], context: Container, path: str) -> bytes:
        if not isinstance(obj, bytes):
            raise EncodeError(f"{self.field_name}: expected bytes, got {type(obj).__name__}")
        self._write_raw(obj, stream, path)
        return obj

    def _emitparse(self, code: CodeGen) -> str:
        return self._emit_parser(code, "blob", "raw")

    def _emitbuild(self, code: CodeGen) -> str:
        return self._emit_builder(code, "blob", f"_expect_bytes(obj, {self.field_name!r})")


class List16(_Construct[list[_P], Sequence[_B]], Generic[_P, _B]):
    """u16 element count (checked against lo..hi at the prefix), then the elements."""

    def __init__(self, name: str, subcon: Construct[_P, _B], lo: int, hi: int) -> None:
        super().__init__()
        self.field_name = name
        self.subcon = subcon
        self.lo, self.hi = lo, hi

    def _parse(self, stream: IO[bytes], context: Container, path: str) -> list[_P]:
        (n,) = _U16.unpack(stream_read(stream, 2, path))
        _check_len(n, self.lo, self.hi, self.field_name, InvalidField)
        return [self.subcon._parsereport(stream, context, path) for _ in range(n)]

    def _build(
        self, obj: Sequence[_B], stream: IO[bytes], context: Container, path: str
    ) -> Sequence[_B]:
        _check_len(len(obj), self.lo, self.hi, self.field_name, EncodeError)
        stream_write(stream, _U16.pack(len(obj)), 2, path)
        for item in obj:
            self.subcon._build(item, stream, context, path)
        return obj

    def _sizeof(self, context: Container, path: str) -> int:
        raise NotImplementedError

    def _emitparse(self, code: CodeGen) -> str:
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

    def _emitbuild(self, code: CodeGen) -> str:
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


class TailList16(List16[_P, _B]):
    """A List16 that may be left out as a frame's last field: no bytes at all parse as the
    empty list, and the empty list is built as no bytes (so a frame without it keeps the
    bytes of the layout that had no such field); a present count is checked as List16's."""

    def _parse(self, stream: IO[bytes], context: Container, path: str) -> list[_P]:
        head = stream.read(2)
        if not head:
            return []
        if len(head) != 2:
            raise MalformedFrame(f"truncated: wanted 2 bytes, {len(head)} left")
        (n,) = _U16.unpack(head)
        _check_len(n, self.lo, self.hi, self.field_name, InvalidField)
        return [self.subcon._parsereport(stream, context, path) for _ in range(n)]

    def _build(
        self, obj: Sequence[_B], stream: IO[bytes], context: Container, path: str
    ) -> Sequence[_B]:
        if not obj:
            return obj
        return super()._build(obj, stream, context, path)

    def _emitparse(self, code: CodeGen) -> str:
        u = code.allocateId()
        name, lo, hi = self.field_name, self.lo, self.hi
        code.append(
            f"""
            from improto.fields import _check_len, _U16
            from improto.errors import InvalidField, MalformedFrame
            def parse_tail_{u}(io, this):
                head = io.read(2)
                if not head:
                    return []
                if len(head) != 2:
                    raise MalformedFrame('truncated: wanted 2 bytes, 1 left')
                n = _U16.unpack(head)[0]
                _check_len(n, {lo}, {hi}, {name!r}, InvalidField)
                return [{self.subcon._compileparse(code)} for i in range(n)]
            """
        )
        return f"parse_tail_{u}(io, this)"

    def _emitbuild(self, code: CodeGen) -> str:
        u = code.allocateId()
        name, lo, hi = self.field_name, self.lo, self.hi
        code.append(
            f"""
            from improto.fields import _check_len, _U16
            from improto.errors import EncodeError
            def build_tail_{u}(objs, io, this):
                if not objs:
                    return objs
                _check_len(len(objs), {lo}, {hi}, {name!r}, EncodeError)
                io.write(_U16.pack(len(objs)))
                for obj in objs:
                    {self.subcon._compilebuild(code)}
                return objs
            """
        )
        return f"build_tail_{u}(obj, io, this)"


class FixedBytes(_Construct[bytes, bytes]):
    """Exactly `size` opaque bytes, checked in both directions."""

    def __init__(self, name: str, size: int) -> None:
        super().__init__()
        self.field_name = name
        self.size = size

    def _parse(self, stream: IO[bytes], context: Container, path: str) -> bytes:
        return stream_read(stream, self.size, path)

    def _build(self, obj: object, stream: IO[bytes], context: Container, path: str) -> bytes:
        if not isinstance(obj, bytes) or len(obj) != self.size:
            raise EncodeError(f"{self.field_name}: expected exactly {self.size} bytes")
        stream_write(stream, obj, self.size, path)
        return obj

    def _sizeof(self, context: Container, path: str) -> int:
        return self.size

    def _emitparse(self, code: CodeGen) -> str:
        code.append("from improto.fields import read_exact")
        return f"read_exact(io, {self.size})"

    def _emitbuild(self, code: CodeGen) -> str:
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


class End(_Construct[None, None]):
    """Asserts that the frame has no bytes after its last field (construct ignores them)."""

    def __init__(self) -> None:
        super().__init__()
        self.flagbuildnone = True

    def _parse(self, stream: IO[bytes], context: Container, path: str) -> None:
        check_end(stream)

    def _build(self, obj: None, stream: IO[bytes], context: Container, path: str) -> None:
        return None

    def _sizeof(self, context: Container, path: str) -> int:
        return 0

    def _emitparse(self, code: CodeGen) -> str:
        code.append("from improto.fields import check_end")
        return "check_end(io)"

    def _emitbuild(self, code: CodeGen) -> str:
        return "None"


class PackedRun(_Construct[None, None]):
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

    def _parse(self, stream: IO[bytes], context: Container, path: str) -> None:
        values = self.fmt.unpack(stream_read(stream, self.fmt.size, path))
        context.update(zip(self.names, values, strict=True))

    def _build(self, obj: None, stream: IO[bytes], context: Container, path: str) -> None:
        stream_write(stream, self.fmt.pack(*[context[n] for n in self.names]), self.fmt.size, path)

    def _sizeof(self, context: Container, path: str) -> int:
        return self.fmt.size

    def _emitparse(self, code: CodeGen) -> str:
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

    def _emitbuild(self, code: CodeGen) -> str:
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
