"""Is a compiled library file whole? Checked before it is loaded.

Loading a truncated shared library (a build killed while linking, a partial copy of the
cache) does not fail cleanly: the loader maps the file's segments, and touching a page past
the end of the file kills the process with SIGBUS. So `attnkernels._ext` checks a library
before `torch.ops.load_library` sees it:

* the ELF structure: the program headers' and sections' file ranges and the section-header
  table must lie inside the file (a truncated file fails this);
* the checksum: once a library has loaded (after each build, or the first time for one built
  before records were kept), its SHA-256 is recorded beside it in `<library>.sha256` (the
  format of `sha256sum`, so `sha256sum -c` verifies it too); a library whose bytes differ from
  the record (damaged in place, same size) fails this. A library without a record gets the
  structural check only.

Imports only the standard library.
"""
from __future__ import annotations

import hashlib
import os
import struct
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, NamedTuple

_ELF_MAGIC = b"\x7fELF"
_ET_DYN = 3  # e_type of a shared object
_SHT_NOBITS = 8  # a section that occupies no bytes in the file (.bss)
# Per ELF class (1: 32-bit, 2: 64-bit): the header after e_ident, a program header, a section
# header; struct formats without the byte order, which e_ident[5] gives.
_LAYOUT = {
    1: ("HHIIIIIHHHHHH", "IIIIIIII", "IIIIIIIIII"),
    2: ("HHIQQQIHHHHHH", "IIQQQQQQ", "IIQQQQIIQQ"),
}


def problem(library: Path) -> str | None:
    """None if `library` looks whole, else what is wrong with it, in a few words."""
    try:
        damage = _structure_problem(library) if sys.platform.startswith("linux") else None
        if damage is None:
            damage = _checksum_problem(library)
    except OSError as err:
        damage = f"it cannot be read: {err.strerror or err}"
    return damage


def record_path(library: Path) -> Path:
    """Where the checksum of `library` is recorded."""
    return library.with_name(library.name + ".sha256")


def record_is_current(library: Path) -> bool:
    """True if the checksum of `library` was recorded after the file was last written (a
    rebuild makes the record stale)."""
    try:
        return record_path(library).stat().st_mtime_ns >= library.stat().st_mtime_ns
    except OSError:
        return False


def record(library: Path) -> None:
    """Record the checksum of `library`, which just loaded; written atomically, so a reader
    never sees half a record. Raises OSError if the folder is not writable."""
    line = f"{_sha256(library)}  {library.name}\n"
    target = record_path(library)
    partial = target.with_name(f"{target.name}.{os.getpid()}.tmp")
    partial.write_text(line, encoding="ascii")
    os.replace(partial, target)


def forget(library: Path) -> None:
    """Remove the checksum record of `library` if there is one."""
    record_path(library).unlink(missing_ok=True)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _checksum_problem(library: Path) -> str | None:
    recorded_at = record_path(library)
    if not recorded_at.is_file():
        return None
    recorded = recorded_at.read_text(encoding="ascii", errors="replace").split()
    if recorded and recorded[0] == _sha256(library):
        return None
    return f"its SHA-256 differs from the one recorded when it last loaded ({recorded_at})"


class _Table(NamedTuple):
    """A table of fixed-size entries in the file: the program headers or the section headers."""

    what: str
    offset: int
    entry_size: int
    count: int
    fmt: str  # struct format of one entry

    def end(self) -> int:
        return self.offset + self.entry_size * self.count

    def entries(self, f: BinaryIO) -> Iterator[tuple[int, ...]]:
        for i in range(self.count):
            f.seek(self.offset + i * self.entry_size)
            yield struct.unpack(self.fmt, f.read(struct.calcsize(self.fmt)))


def _structure_problem(library: Path) -> str | None:
    """What makes `library` an incomplete or foreign ELF shared object, or None."""
    size = library.stat().st_size
    with open(library, "rb") as f:
        ident = f.read(16)
        if len(ident) < 16 or ident[:4] != _ELF_MAGIC:
            return "it is not an ELF file"
        elf_class, byte_order = ident[4], ident[5]
        if elf_class not in _LAYOUT or byte_order not in (1, 2):
            return "its ELF header is damaged"
        order = "<" if byte_order == 1 else ">"
        header_fmt, program_fmt, section_fmt = (order + fmt for fmt in _LAYOUT[elf_class])
        raw = f.read(struct.calcsize(header_fmt))
        if len(raw) < struct.calcsize(header_fmt):
            return f"it is truncated: {size} bytes end inside the ELF header"
        fields = struct.unpack(header_fmt, raw)
        e_type, phoff, shoff = fields[0], fields[4], fields[5]
        phentsize, phnum, shentsize, shnum = fields[8:12]
        if e_type != _ET_DYN:
            return "it is not a shared library"
        programs = _Table("program header table", phoff, phentsize, phnum, program_fmt)
        sections = _Table("section header table", shoff, shentsize, shnum, section_fmt)
        for table in (programs, sections):
            if table.count and (table.entry_size < struct.calcsize(table.fmt) or table.end() > size):
                return f"it is truncated: {size} bytes, but its {table.what} ends at byte {table.end()}"
        for offset, length, what in _file_ranges(f, programs, sections, wide=elf_class == 2):
            if offset + length > size:
                return f"it is truncated: {size} bytes, but a {what} ends at byte {offset + length}"
    return None


def _file_ranges(
    f: BinaryIO, programs: _Table, sections: _Table, wide: bool
) -> Iterator[tuple[int, int, str]]:
    """(offset, length, what) of every segment and every section that has bytes in the file."""
    for fields in programs.entries(f):
        # p_offset and p_filesz: 64-bit headers put p_flags second, shifting them by one.
        offset, length = (fields[2], fields[5]) if wide else (fields[1], fields[4])
        yield offset, length, "segment"
    for fields in sections.entries(f):
        sh_type, offset, length = fields[1], fields[4], fields[5]
        if sh_type != _SHT_NOBITS:
            yield offset, length, "section"
