"""Checks a release wheel for glibc 2.17 (manylinux2014), beyond what `auditwheel show` says.

Usage: python .ci/check_wheel.py WHEEL... (needs pyelftools: auditwheel's dependency).

For each wheel: its file name carries the manylinux2014_x86_64 and manylinux_2_17_x86_64
tags; each extension module in it asks glibc for no symbol version newer than 2.17; and
it has no undefined symbol without a version, other than CPython's own (the interpreter
provides those) or a weak one (allowed to be missing). That last check is the one
auditwheel does not make: a libc function newer than glibc 2.17 (getrandom is 2.25,
gettid 2.30) is absent from the 2.17 stubs that zig links against, so the linker leaves it
undefined and unversioned, auditwheel reports the wheel as fine, and the module fails to
load, or the call to fail, on an older glibc.
"""

from __future__ import annotations

import io
import re
import sys
import zipfile

from elftools.elf.elffile import ELFFile
from elftools.elf.gnuversions import GNUVerNeedSection, GNUVerSymSection
from elftools.elf.sections import SymbolTableSection

MAX_GLIBC = (2, 17)
TAGS = ("manylinux2014_x86_64", "manylinux_2_17_x86_64")
# What the interpreter exports to an extension module.
FROM_PYTHON = re.compile(r"_?Py")


def problems_of(name: str, data: bytes) -> list[str]:
    elf = ELFFile(io.BytesIO(data))
    dynsym = elf.get_section_by_name(".dynsym")
    versym = elf.get_section_by_name(".gnu.version")
    verneed = elf.get_section_by_name(".gnu.version_r")
    assert isinstance(dynsym, SymbolTableSection), f"{name}: no dynamic symbol table"
    versions: dict[int, str] = {}
    if isinstance(verneed, GNUVerNeedSection):
        for _, auxiliaries in verneed.iter_versions():
            for aux in auxiliaries:
                versions[aux["vna_other"]] = aux.name
    found: list[str] = []
    for index, symbol in enumerate(dynsym.iter_symbols()):
        if index == 0 or symbol["st_shndx"] != "SHN_UNDEF":
            continue
        number = 0
        if isinstance(versym, GNUVerSymSection):
            number = versym.get_symbol(index)["ndx"]
            number = number if isinstance(number, int) else 0
        version = versions.get(number & 0x7FFF)
        binding = symbol["st_info"]["bind"]
        if version is None:
            if binding != "STB_WEAK" and not FROM_PYTHON.match(symbol.name):
                found.append(f"{name}: {symbol.name} is undefined and unversioned")
            continue
        match = re.fullmatch(r"GLIBC_(\d+)\.(\d+)(?:\.\d+)?", version)
        if match and (int(match[1]), int(match[2])) > MAX_GLIBC:
            found.append(f"{name}: {symbol.name}@{version} is newer than glibc 2.17")
    return found


def main(wheels: list[str]) -> int:
    failed = False
    for wheel in wheels:
        problems = [f"the file name lacks {tag}" for tag in TAGS if tag not in wheel]
        modules = 0
        with zipfile.ZipFile(wheel) as archive:
            for entry in archive.namelist():
                if entry.endswith(".so"):
                    modules += 1
                    problems += problems_of(entry, archive.read(entry))
        if modules == 0:
            problems.append("no extension module in it")
        for problem in problems:
            print(f"{wheel}: {problem}")
        failed = failed or bool(problems)
        if not problems:
            print(f"{wheel}: glibc <= 2.17, no unversioned libc symbol ({modules} module)")
    return 1 if failed or not wheels else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
