"""The raw layer mirrors include/loldu.h one to one; finding and loading the library;
OPENBLAS_CORETYPE; the version check; status codes become the documented exceptions."""

from __future__ import annotations

import ctypes
import inspect
import os
import re
import shutil
import subprocess
import threading

import numpy as np
import pytest

import loldu
from loldu import _capi, errors
from conftest import HEADER, PACKAGE_ROOT, run_python

PROTOTYPE = re.compile(r"LOLDU_API\s+([^;{}]*?)\b(loldu_\w+)\s*\(([^;]*?)\)\s*;", re.S)
HANDLES = {"loldu_adapter", "loldu_optimizer", "loldu_checkpoint"}
STRUCTS = {"loldu_config", "loldu_adapter_info", "loldu_optimizer_config", "loldu_lora_layer", "loldu_lora_options",
           "loldu_merge_options"}
ENUMS = {"loldu_status", "loldu_dtype", "loldu_factor", "loldu_path", "loldu_optimizer_kind", "loldu_backend",
         "loldu_lora_kind"}
SCALARS = {
    "unsigned": ctypes.c_uint,
    "int": ctypes.c_int,
    "int32_t": ctypes.c_int32,
    "int64_t": ctypes.c_int64,
    "size_t": ctypes.c_size_t,
    "double": ctypes.c_double,
}


def header_prototypes(text: str) -> dict[str, tuple[str, list[str]]]:
    """name -> (return type, [parameter types]) for every LOLDU_API function."""
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    out = {}
    for ret, name, params in PROTOTYPE.findall(text):
        params = " ".join(params.split())
        types = []
        if params != "void":
            for p in params.split(","):
                p = p.strip()
                types.append(re.sub(r"\s*\b\w+$", "", p) if re.search(r"[\w*]\s*\b\w+$", p) else p)
        out[name] = (" ".join(ret.split()), types)
    return out


def expected_ctype(c_type: str):
    """The ctypes type the raw layer must use for a C type of the header."""
    t = " ".join(c_type.replace("const", " ").split())
    t = t.replace(" *", "*").replace("* ", "*")
    if t == "void":
        return None
    if t.endswith("*"):
        base = t[:-1].strip()
        if base == "void":
            return ctypes.c_void_p
        if base == "char":
            return ctypes.c_char_p
        if base in HANDLES:
            return ctypes.c_void_p
        if base in STRUCTS:
            return ctypes.POINTER(getattr(_capi, base))
        return ctypes.POINTER(expected_ctype(base))
    if t in ENUMS:
        return ctypes.c_int
    return SCALARS[t]


def declared_functions() -> dict[str, object]:
    return {name: f for name, f in vars(_capi).items() if name.startswith("loldu_") and isinstance(f, ctypes._CFuncPtr)}


def test_every_header_function_is_declared_once_with_matching_types(header_text):
    prototypes = header_prototypes(header_text)
    declared = declared_functions()
    assert len(prototypes) == 64
    assert set(declared) == set(prototypes), (set(prototypes) ^ set(declared))
    for name, (ret, params) in prototypes.items():
        f = declared[name]
        assert f.__name__ == name
        assert f.restype is expected_ctype(ret), (name, ret, f.restype)
        assert f.argtypes is not None, name
        assert list(f.argtypes) == [expected_ctype(p) for p in params], (name, params, f.argtypes)


def test_each_declaration_has_the_header_prototype_above_it(header_text):
    source = inspect.getsource(_capi)
    lines = source.splitlines()
    header = " ".join(re.sub(r"/\*.*?\*/", "", header_text, flags=re.S).split())
    for name in declared_functions():
        at = next(i for i, line in enumerate(lines) if line.startswith(f"{name} = _declare("))
        comment = []
        i = at - 1
        while lines[i].startswith("#"):
            comment.insert(0, lines[i][1:].strip())
            i -= 1
        prototype = " ".join(" ".join(comment).split())
        assert f"{name}(" in prototype and prototype.startswith("LOLDU_API"), name
        assert prototype in header, f"the comment above {name} is not the header's prototype: {prototype}"


def test_constants_match_the_header(header_text):
    for name, value in re.findall(r"\b(LOLDU_[A-Z0-9_]+)\s*=\s*(\d+)", header_text):
        assert getattr(_capi, name) == int(value), name
    for name, value in re.findall(r"#define (LOLDU_VERSION_(?:MAJOR|MINOR|PATCH))\s+(\d+)", header_text):
        assert getattr(_capi, name) == int(value)


def test_python_enum_tables_follow_the_header(header_text):
    """Every Python table of a C enum lists the header's members in value order."""
    def members(enum: str, prefix: str) -> tuple[str, ...]:
        body = re.search(r"typedef enum %s \{(.*?)\}" % enum, header_text, re.S).group(1)
        pairs = sorted((int(v), n) for n, v in re.findall(r"(LOLDU_\w+)\s*=\s*(\d+)", body))
        return tuple(n[len(prefix):].lower() for _, n in pairs)

    assert loldu.Z_INITS == members("loldu_z_init", "LOLDU_INIT_")
    assert loldu.RESIDUALS == members("loldu_residual", "LOLDU_RESIDUAL_")
    assert loldu.PATHS == members("loldu_path", "LOLDU_PATH_")
    assert loldu.FACTORS == members("loldu_factor", "LOLDU_FACTOR_")
    assert loldu.KINDS == members("loldu_optimizer_kind", "LOLDU_")
    assert loldu.SCHEDULES == members("loldu_schedule", "LOLDU_SCHEDULE_")
    assert loldu.LORA_KINDS == members("loldu_lora_kind", "LOLDU_LORA_")
    assert tuple(loldu.BACKENDS.values()) == members("loldu_backend", "LOLDU_BACKEND_")


def test_version_matches_header_and_library(header_text):
    version = re.search(r'#define LOLDU_VERSION_STRING "([^"]+)"', header_text).group(1)
    assert loldu.__version__ == loldu.HEADER_VERSION == version
    assert loldu.library_version() == version
    major, minor, patch = (int(p) for p in version.split("."))
    assert _capi.loldu_version_number() == major * 10000 + minor * 100 + patch


def test_version_check_rejects_another_minor_version(monkeypatch):
    monkeypatch.setattr(_capi, "loldu_version_number", lambda: _capi.LOLDU_VERSION_NUMBER + 100)
    expected = f"needs {_capi.LOLDU_VERSION_MAJOR}.{_capi.LOLDU_VERSION_MINOR}.x"
    with pytest.raises(ImportError, match=re.escape(expected)):
        _capi._check_version()


def test_struct_layouts_match_the_c_compiler(tmp_path):
    compiler = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    assert compiler, "a C compiler (cc) is needed to check the struct layouts"
    lines = ["#include <stdio.h>", "#include <stddef.h>", '#include "loldu.h"', "int main(void) {"]
    for struct in STRUCTS:
        cls = getattr(_capi, struct)
        lines.append(f'printf("{struct} %zu\\n", sizeof({struct}));')
        for field, _ in cls._fields_:
            lines.append(f'printf("{struct}.{field} %zu\\n", offsetof({struct}, {field}));')
    lines += ["return 0;", "}"]
    (tmp_path / "layout.c").write_text("\n".join(lines))
    subprocess.run([compiler, f"-I{HEADER.parent}", "layout.c", "-o", "layout"], cwd=tmp_path, check=True)
    output = subprocess.run([str(tmp_path / "layout")], capture_output=True, text=True, check=True).stdout
    c = dict(line.rsplit(" ", 1) for line in output.splitlines())
    for struct in STRUCTS:
        cls = getattr(_capi, struct)
        assert int(c[struct]) == ctypes.sizeof(cls), struct
        for field, _ in cls._fields_:
            assert int(c[f"{struct}.{field}"]) == getattr(cls, field).offset, (struct, field)


# --- finding the library ------------------------------------------------------------------------

def _package_copy(root) -> str:
    """A copy of the package in root/a/b/loldu, away from the repository's build folder."""
    target = root / "a" / "b"
    target.mkdir(parents=True)
    shutil.copytree(PACKAGE_ROOT / "loldu", target / "loldu", ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    return str(target)


LOAD = "import sys; sys.path.insert(0, sys.argv[1]); import loldu; print(loldu.library_path)"


def test_missing_library_error_lists_every_place(tmp_path):
    path = _package_copy(tmp_path)
    result = run_python(LOAD, path, env={"LOLDU_LIBRARY": None, "PYTHONPATH": None})
    if ctypes.util.find_library("loldu"):  # installed system-wide: found there
        assert result.returncode == 0, result.stderr
        return
    assert result.returncode != 0
    assert "FileNotFoundError: libloldu.so not found" in result.stderr
    assert str(tmp_path / "a" / "b" / "loldu" / "libloldu.so") in result.stderr
    assert str(tmp_path / ".build" / "release" / "libloldu.so") in result.stderr
    assert "the system's library path" in result.stderr
    assert "make build" in result.stderr


def test_wrong_LOLDU_LIBRARY_is_an_error_naming_it(tmp_path):
    missing = tmp_path / "nowhere" / "libloldu.so"
    result = run_python("import loldu", env={"LOLDU_LIBRARY": str(missing)})
    assert result.returncode != 0
    assert "FileNotFoundError" in result.stderr and "LOLDU_LIBRARY" in result.stderr
    assert str(missing) in result.stderr


def test_search_order(tmp_path):
    lib = loldu.library_path
    path = _package_copy(tmp_path)
    # the repository's build folder, relative to the package source
    build = tmp_path / ".build" / "release"
    build.mkdir(parents=True)
    shutil.copy(lib, build / "libloldu.so")
    result = run_python(LOAD, path, env={"LOLDU_LIBRARY": None, "PYTHONPATH": None})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(build / "libloldu.so")
    # the package folder comes first
    shutil.copy(lib, tmp_path / "a" / "b" / "loldu" / "libloldu.so")
    result = run_python(LOAD, path, env={"LOLDU_LIBRARY": None, "PYTHONPATH": None})
    assert result.stdout.strip() == str(tmp_path / "a" / "b" / "loldu" / "libloldu.so")
    # LOLDU_LIBRARY comes before both; a folder is accepted too
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(lib, other / "libloldu.so")
    result = run_python(LOAD, path, env={"LOLDU_LIBRARY": str(other), "PYTHONPATH": None})
    assert result.stdout.strip() == str(other / "libloldu.so")


# --- OpenBLAS core type ---------------------------------------------------------------------------

@pytest.mark.parametrize(
    "flags, expected",
    [("fpu sse avx2 avx512f avx512bw", "SkylakeX"), ("fpu sse avx avx2 fma", "Haswell"), ("fpu sse sse2", None)],
)
def test_openblas_coretype_from_cpu_flags(tmp_path, flags, expected):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n\n")
    environ = {}
    assert _capi.configure_openblas(environ, str(cpuinfo)) == expected
    assert environ.get("OPENBLAS_CORETYPE") == expected
    preset = {"OPENBLAS_CORETYPE": "Zen"}
    assert _capi.configure_openblas(preset, str(cpuinfo)) == "Zen"
    assert preset == {"OPENBLAS_CORETYPE": "Zen"}


def test_openblas_coretype_is_set_before_openblas_loads():
    expected = _capi.openblas_coretype(_capi._cpu_flags())
    code = """
        import ctypes, os, loldu
        blas = ctypes.CDLL("libopenblas.so.0")
        blas.openblas_get_corename.restype = ctypes.c_char_p
        print(os.environ.get("OPENBLAS_CORETYPE"), blas.openblas_get_corename().decode())
    """
    result = run_python(code, env={"OPENBLAS_CORETYPE": None})
    assert result.returncode == 0, result.stderr
    env_value, corename = result.stdout.split()
    assert env_value == str(expected)
    if expected is not None:
        assert corename.lower() == expected.lower()  # OpenBLAS runs the kernels that were asked for
    result = run_python(code, env={"OPENBLAS_CORETYPE": "Haswell"})
    assert result.stdout.split() == ["Haswell", "Haswell"]


# --- OpenMP wait policy --------------------------------------------------------------------------

def test_omp_wait_policy_is_set_only_before_an_openmp_runtime_starts(tmp_path):
    maps = tmp_path / "maps"
    maps.write_text("7f00-7f01 r-xp 0 08:01 1 /usr/lib/x86_64-linux-gnu/libopenblas.so.0\n")
    environ = {}
    assert _capi.configure_openmp(environ, str(maps), modules={}) == "PASSIVE"
    assert environ == {"OMP_WAIT_POLICY": "PASSIVE"}
    for runtime in ("torch/lib/libgomp-a34b3233.so.1", "libgomp.so.1", "libiomp5.so", "llvm/lib/libomp.so.5"):
        maps.write_text(f"7f00-7f01 r-xp 0 08:01 1 /opt/{runtime}\n")
        environ = {}
        assert _capi.configure_openmp(environ, str(maps), modules={}) is None and environ == {}, runtime
    maps.write_text("")
    for environ, modules in (({}, {"torch": None}), ({"LOLDU_KEEP_OMP_WAIT_POLICY": "1"}, {}),
                             ({"OMP_WAIT_POLICY": "ACTIVE"}, {})):
        before = dict(environ)
        assert _capi.configure_openmp(environ, str(maps), modules=modules) == environ.get("OMP_WAIT_POLICY")
        assert environ == before


def test_importing_loldu_before_torch_makes_torchs_openmp_threads_wait_passively():
    """What torch's OpenMP runtime (libgomp) started with, as OMP_DISPLAY_ENV=VERBOSE prints it:
    after `import loldu.torch`, PASSIVE (spin count 0); the user's own setting when there is one;
    libgomp's default (spinning 300000 rounds) with the opt-out, or when torch was imported first
    (its runtime had started: the variable is then left unset)."""
    code = """
        import os, sys
        if sys.argv[1] == "torch first":
            import torch
        import loldu.torch
        print(os.environ.get("OMP_WAIT_POLICY"))
    """
    clean = {"OMP_WAIT_POLICY": None, "LOLDU_KEEP_OMP_WAIT_POLICY": None, "GOMP_SPINCOUNT": None,
             "OMP_DISPLAY_ENV": "VERBOSE"}
    cases = [({}, "loldu first", "PASSIVE", "0"),
             ({"OMP_WAIT_POLICY": "ACTIVE"}, "loldu first", "ACTIVE", "30000000000"),
             ({"LOLDU_KEEP_OMP_WAIT_POLICY": "1"}, "loldu first", "None", "300000"),
             ({}, "torch first", "None", "300000")]
    for env, order, variable, spin_count in cases:
        result = run_python(code, order, env={**clean, **env})
        assert result.returncode == 0, result.stderr
        assert result.stdout.split() == [variable], (env, order, result.stdout)
        assert re.findall(r"GOMP_SPINCOUNT = '(\d+)'", result.stderr) == [spin_count], (env, order, result.stderr)


# --- status codes and errors --------------------------------------------------------------------

def test_every_status_has_its_exception_class():
    bases = {
        1: ValueError, 2: ValueError, 3: ValueError, 4: ValueError, 5: TypeError, 6: RuntimeError,
        7: MemoryError, 8: RuntimeError, 9: OSError, 10: ValueError, 11: ValueError, 12: RuntimeError,
    }
    names = set()
    for status, base in bases.items():
        cls = errors.error_class(status)
        assert issubclass(cls, loldu.LoLDUError) and issubclass(cls, base)
        assert cls.status == status
        e = errors.error_from_status(status, "message")
        assert isinstance(e, cls) and e.status == status and str(e) == "message"
        names.add(cls)
        assert e.status_name == next(k[6:] for k, v in vars(_capi).items() if k.startswith("LOLDU_ERR_") and v == status)
    assert len(names) == 12
    assert errors.error_class(99) is loldu.LoLDUError
    e = errors.error_from_status(99, "")
    assert str(e) == "unknown status"


def test_raw_failures_carry_the_library_message():
    handle = _capi.loldu_adapter_p()
    w = np.ones((3, 2), np.float32)
    status = _capi.loldu_adapter_create(ctypes.byref(handle), _capi.LOLDU_FLOAT32, 3, 0, w.ctypes.data, None, None)
    assert status == _capi.LOLDU_ERR_SHAPE
    with pytest.raises(loldu.ShapeError, match=r"n must be in \[1, 2147483647\], got 0") as info:
        errors.check(status)
    assert info.value.status == 3 and info.value.message == _capi.loldu_last_error().decode()

    status = _capi.loldu_adapter_create(None, _capi.LOLDU_FLOAT32, 3, 2, w.ctypes.data, None, None)
    with pytest.raises(loldu.NullPointerError, match="out is NULL"):
        errors.check(status)
    status = _capi.loldu_adapter_create(ctypes.byref(handle), 7, 3, 2, w.ctypes.data, None, None)
    with pytest.raises(loldu.InvalidArgumentError, match="dtype must be LOLDU_FLOAT32"):
        errors.check(status)

    a = loldu.Adapter(np.eye(4, dtype=np.float32), rank=2)
    stale = a.handle
    a.close()
    with pytest.raises(loldu.InvalidHandleError, match="not a live loldu_adapter handle"):
        errors.check(_capi.loldu_zero_grad(stale))


def test_last_error_is_per_thread():
    failures = []

    def worker(rank_value: int):
        w = np.ones((5, 5), np.float64)
        for _ in range(200):
            try:
                loldu.Adapter(w, rank=rank_value)
            except loldu.InvalidArgumentError as e:
                if f"got {rank_value}" not in str(e):
                    failures.append(str(e))
            else:
                failures.append(f"rank {rank_value} was accepted")

    threads = [threading.Thread(target=worker, args=(r,)) for r in (0, 6, 7, 99)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []


def test_threads():
    before = loldu.get_num_threads()
    try:
        loldu.set_num_threads(1)
        assert loldu.get_num_threads() == 1
        assert loldu.threads_set_by_user()
        with pytest.raises(loldu.InvalidArgumentError, match="threads must be >= 1"):
            loldu.set_num_threads(0)
    finally:
        loldu.set_num_threads(before)


def test_import_without_torch():
    code = """
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name == "torch" or name.startswith("torch."):
                    raise ImportError("torch is blocked")
        sys.meta_path.insert(0, Block())
        import loldu, numpy as np
        with loldu.Adapter(np.eye(3), rank=2) as a:
            print(a.forward(np.ones((1, 3))).tolist())
        try:
            import loldu.torch
        except ImportError as e:
            print("no torch:", e)
    """
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["[[1.0, 1.0, 1.0]]", "no torch: torch is blocked"]
