"""The ctypes structures of qmamba.cuda match qmamba_kernels.h byte for byte (CPU: compiled with nvcc, not run on a
GPU). A field added to one side only would shift every later field and fail silently at run time."""

from __future__ import annotations

import ctypes
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from qmamba import cuda as k

KERNELS = Path(__file__).resolve().parents[1] / "kernels"
STRUCTS = {"qm_scan_args": k.ScanArgs, "qm_linear_args": k.LinearArgs}


def c_field_names(cname: str) -> list[str]:
    """The field names of `typedef struct { ... } cname;` in qmamba_kernels.h, in order."""
    text = re.sub(r"/\*.*?\*/", "", (KERNELS / "qmamba_kernels.h").read_text(), flags=re.S)
    body = re.search(r"typedef struct \{([^}]*)\}\s*" + cname + ";", text)
    assert body, f"{cname} not found in qmamba_kernels.h"
    names = []
    for decl in body.group(1).split(";"):
        decl = decl.strip()
        if not decl:
            continue
        first, *rest = decl.split(",")
        for part in [first.split()[-1], *rest]:  # "int batch, seqlen" -> batch, seqlen
            names.append(re.sub(r"\[.*\]", "", part).strip().lstrip("*"))
    return names


def test_ctypes_structs_name_the_c_fields_in_order():
    for cname, py in STRUCTS.items():
        assert [f for f, _ in py._fields_] == c_field_names(cname), cname


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found: the C header cannot be compiled here")
def test_ctypes_structs_match_the_c_header(tmp_path):
    lines = ["#include <cstdio>", "#include <cstddef>", '#include "qmamba_kernels.h"', "int main() {"]
    for cname, py in STRUCTS.items():
        lines.append(f'  std::printf("{cname} size %zu\\n", sizeof({cname}));')
        for field, _ in py._fields_:
            lines.append(f'  std::printf("{cname} {field} %zu\\n", offsetof({cname}, {field}));')
    lines += ["  return 0;", "}"]
    src = tmp_path / "layout.cpp"
    src.write_text("\n".join(lines) + "\n")
    exe = tmp_path / "layout"
    r = subprocess.run(["nvcc", "-std=c++17", "-I", str(KERNELS), str(src), "-o", str(exe)], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    got = dict(line.rsplit(" ", 1) for line in subprocess.run([str(exe)], capture_output=True, text=True,
                                                              check=True).stdout.splitlines())
    for cname, py in STRUCTS.items():
        assert int(got[f"{cname} size"]) == ctypes.sizeof(py), cname
        for field, _ in py._fields_:
            assert int(got[f"{cname} {field}"]) == getattr(py, field).offset, f"{cname}.{field}"
