"""A fast path for ``list<u8>`` in wasmtime-py 51.

Its C API hands component values over as arrays of tagged unions, one 32-byte value per
element, and wasmtime-py fills and reads them one ctypes call per byte: about 1 µs a
byte, which made every message's bytes the host's main cost. Here a byte list is built and
read as one buffer with strided slices instead. Only ``ListType`` of ``U8`` changes; the
layout is checked against ctypes' view of the struct at import."""

from __future__ import annotations

import ctypes
from typing import Any

from wasmtime import _ffi as ffi
from wasmtime.component import _types

_VAL = ffi.wasmtime_component_val_t
_SIZE = ctypes.sizeof(_VAL)
_KIND_AT = _VAL.kind.offset
_VALUE_AT = _VAL.of.offset
_U8 = ffi.WASMTIME_COMPONENT_U8.value

_to_c = _types.ListType.convert_to_c
_from_c = _types.ListType.convert_from_c


def _bytes_to_c(self: _types.ListType, store: Any, val: Any, ptr: Any) -> None:
    if not (self._is_bytes() and isinstance(val, (bytes, bytearray, memoryview))):
        _to_c(self, store, val, ptr)
        return
    n = len(val)
    raw = ffi.wasmtime_component_vallist_t()
    ffi.wasmtime_component_vallist_new_uninit(raw, n)
    if n:
        buf = bytearray(_SIZE * n)
        buf[_KIND_AT::_SIZE] = bytes([_U8]) * n
        buf[_VALUE_AT::_SIZE] = val
        ctypes.memmove(raw.data, (ctypes.c_char * len(buf)).from_buffer(buf), len(buf))
    ptr.contents.kind = ffi.WASMTIME_COMPONENT_LIST
    ptr.contents.of.list = raw


def _bytes_from_c(self: _types.ListType, c: Any) -> Any:
    if not self._is_bytes():
        return _from_c(self, c)
    assert c.kind == ffi.WASMTIME_COMPONENT_LIST.value
    try:
        n = c.of.list.size
        return ctypes.string_at(c.of.list.data, _SIZE * n)[_VALUE_AT::_SIZE] if n else b""
    finally:
        # u8 values own nothing: freeing the array is all the cleanup there is.
        ffi.wasmtime_component_vallist_delete(ctypes.byref(c.of.list))


def install() -> None:
    """Replaces wasmtime-py's byte-list conversions (idempotent)."""
    setattr(_types.ListType, "convert_to_c", _bytes_to_c)
    setattr(_types.ListType, "convert_from_c", _bytes_from_c)
