"""The ctypes declarations agree with include/ember.h: every function the header exports is
declared with the header's argument and result types, every struct has the header's fields
(and, compiled with the C compiler, the same size and offsets), every enum the same values.
A change of the header that the package does not follow fails here."""

import ctypes
import re
import shutil
import subprocess
from ctypes import POINTER
from pathlib import Path

import pytest

import ember
from ember import _ffi, errors

ROOT = Path(__file__).resolve().parents[3]
HEADER = (ROOT / "include" / "ember.h").read_text()
# The declarations: comments and preprocessor lines removed.
CODE = re.sub(r"/\*.*?\*/|//[^\n]*|^#[^\n]*", "", HEADER, flags=re.S | re.M)

SCALARS = {
    "int32_t": ctypes.c_int32,
    "uint32_t": ctypes.c_uint32,
    "uint64_t": ctypes.c_uint64,
    "size_t": ctypes.c_size_t,
    "float": ctypes.c_float,
    "double": ctypes.c_double,
    "uint8_t": ctypes.c_uint8,
    "bool": ctypes.c_bool,
}


def ctype_of(declaration: str, result: bool = False):
    """The ctypes types a C type may be declared as (a set: char pointers have two forms)."""
    array = re.search(r"\[(\d+)\]$", declaration)
    if array:  # a fixed-size array field: `char name[32]`
        (element,) = ctype_of(declaration[: array.start()].strip())
        return {element * int(array.group(1))}
    text = declaration.replace("*", " * ")
    depth = text.count("*")
    words = [w for w in text.replace("*", " ").split() if w not in ("const", "struct")]
    if words[0] == "enum":
        base = _ffi.ember_status if words[1] == "ember_status" and result else ctypes.c_int
    elif words[0] in SCALARS:
        base = SCALARS[words[0]]
    elif words[0] == "char":
        base = ctypes.c_char
    elif words[0] == "void":
        base = None
    elif words[0] in _ffi.CALLBACKS:
        base = _ffi.CALLBACKS[words[0]]
    else:
        base = getattr(_ffi, words[0])  # a struct or handle type named as in C
    if depth == 0:
        return {base}
    if base is None:
        assert depth == 1
        return {ctypes.c_void_p}
    if base is ctypes.c_char and depth == 1:
        return {ctypes.c_char_p, POINTER(ctypes.c_char)}
    if base is ctypes.c_char and depth == 2:
        return {POINTER(ctypes.c_char_p)}
    for _ in range(depth):
        base = POINTER(base)
    return {base}


def split_declaration(declaration: str):
    """(type, name) of `const char *text_ptr`; arrays keep their size: `char [32]`."""
    m = re.match(r"(.*?)(\w+)\s*(\[\d+\])?\s*$", declaration.strip(), re.S)
    return (m.group(1).strip() + " " + (m.group(3) or "")).strip(), m.group(2)


def header_functions():
    """{name: (result type, [parameter types])} of every function of the header."""
    body = CODE[CODE.index('extern "C" {') + len('extern "C" {'):]
    functions = {}
    for m in re.finditer(r"([\w\s\*]+?)\b(ember_\w+)\s*\(([^)]*)\)\s*;", body, re.S):
        result, name, params = m.group(1), m.group(2), m.group(3).strip()
        types = [] if params == "void" else [split_declaration(p)[0] for p in params.split(",")]
        functions[name] = (result.strip(), types)
    return functions


FUNCTIONS = header_functions()


def test_the_header_parses():
    # Guards the parser itself: a few known declarations, and a plausible count.
    assert len(FUNCTIONS) >= 40
    assert FUNCTIONS["ember_step"] == (
        "enum ember_status",
        ["struct ember_session *", "const int32_t *", "size_t", "float *"],
    )
    assert FUNCTIONS["ember_last_error"] == ("const char *", [])


def test_every_header_function_is_declared_and_nothing_else():
    assert set(_ffi.SIGNATURES) == set(FUNCTIONS)


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_signature_matches_the_header(name):
    result, params = FUNCTIONS[name]
    restype, argtypes = _ffi.SIGNATURES[name]
    function = getattr(_ffi.lib, name)
    assert function.restype is restype and function.argtypes == argtypes
    assert restype in ctype_of(result, result=True) if result != "void" else restype is None
    assert len(argtypes) == len(params)
    for i, (declared, c_type) in enumerate(zip(argtypes, params)):
        assert declared in ctype_of(c_type), f"{name} argument {i}: {c_type}"


def test_status_functions_raise():
    for name, (restype, _) in _ffi.SIGNATURES.items():
        if restype is _ffi.ember_status:
            assert getattr(_ffi.lib, name).errcheck is errors.check, name


def test_the_package_calls_only_declared_functions():
    package = ROOT / "bindings" / "python" / "ember"
    used = set()
    for source in package.glob("*.py"):
        used |= set(re.findall(r"_lib\.(ember_\w+)", source.read_text()))
    assert used and used <= set(FUNCTIONS)


def header_structs():
    """{name: [(field type, field name)]} of every struct the header defines."""
    structs = {}
    for m in re.finditer(r"typedef struct (\w+) \{(.*?)\} \1;", CODE, re.S):
        fields = [split_declaration(f) for f in m.group(2).split(";") if f.strip()]
        structs[m.group(1)] = fields
    return structs


STRUCTS = header_structs()


def test_struct_fields_match_the_header():
    assert set(STRUCTS) == set(_ffi.STRUCTS)
    for name, fields in STRUCTS.items():
        declared = _ffi.STRUCTS[name]._fields_
        assert [f for f, _ in declared] == [n for _, n in fields], name
        for (field, ctype), (c_type, _) in zip(declared, fields):
            assert ctype in ctype_of(c_type), f"{name}.{field}: {c_type}"


def test_opaque_types_are_the_header_ones():
    opaque = set(re.findall(r"typedef struct (\w+) \1;", CODE))
    assert opaque == {"ember_model", "ember_session", "ember_sampler", "ember_detokenizer",
                      "ember_generation", "ember_pool"}
    for name in opaque:
        assert issubclass(getattr(_ffi, name), ctypes.Structure)


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler")
def test_struct_layouts_match_the_c_compiler(tmp_path):
    lines = ['#include "ember.h"', "#include <stddef.h>", "#include <stdio.h>", "int main(void) {"]
    for name, fields in STRUCTS.items():
        lines.append(f'  printf("{name} %zu\\n", sizeof({name}));')
        for _, field in fields:
            lines.append(f'  printf("{name}.{field} %zu\\n", offsetof({name}, {field}));')
    lines += ["  return 0;", "}"]
    (tmp_path / "layout.c").write_text("\n".join(lines))
    subprocess.run(["cc", "-std=c11", "-I", str(ROOT / "include"), str(tmp_path / "layout.c"),
                    "-o", str(tmp_path / "layout")], check=True)
    output = subprocess.run([str(tmp_path / "layout")], check=True, capture_output=True,
                            text=True).stdout
    c = dict(line.rsplit(" ", 1) for line in output.splitlines())
    for name, struct in _ffi.STRUCTS.items():
        assert int(c[name]) == ctypes.sizeof(struct), name
        for field, _ in struct._fields_:
            assert int(c[f"{name}.{field}"]) == getattr(struct, field).offset, f"{name}.{field}"


def test_callbacks_match_the_header():
    typedefs = {m.group(2): (m.group(1), m.group(3)) for m in re.finditer(
        r"typedef ([\w\s\*]+?)\s*\(\*(\w+)\)\(([^)]*)\);", CODE)}
    assert set(typedefs) == set(_ffi.CALLBACKS)
    for name, (result, params) in typedefs.items():
        callback = _ffi.CALLBACKS[name]
        expected = ctype_of(result) if result != "void" else {None}
        assert callback._restype_ in expected, name
        types = [split_declaration(p)[0] for p in params.split(",")]
        assert len(callback._argtypes_) == len(types)
        for declared, c_type in zip(callback._argtypes_, types):
            assert declared in ctype_of(c_type), f"{name}: {c_type}"


@pytest.mark.parametrize("enum_name, prefix, python", [
    ("ember_status", "EMBER_", ember.Status),
    ("ember_stop_reason", "EMBER_STOP_REASON_", ember.StopReason),
    ("ember_log_level", "EMBER_LOG_LEVEL_", ember.LogLevel),
    ("ember_kv_type", "EMBER_KV_", ember.KvType),
    ("ember_constraint_kind", "EMBER_CONSTRAINT_", ember.ConstraintKind),
    ("ember_constraint_state", "EMBER_CONSTRAINT_STATE_", ember.ConstraintState),
])
def test_enums_match_the_header(enum_name, prefix, python):
    body = re.search(r"typedef enum %s \{(.*?)\} %s;" % (enum_name, enum_name), CODE, re.S).group(1)
    values = {}
    for entry in body.split(","):
        if entry.strip():
            key, value = (s.strip() for s in entry.split("="))
            name = key[len(prefix):]
            if name.startswith("ERR_"):  # EMBER_ERR_IO is Status.IO
                name = name[len("ERR_"):]
            values[name] = int(value)
    assert values == {member.name: member.value for member in python}


def test_every_failing_status_has_its_exception():
    for status in ember.Status:
        if status == ember.Status.OK:
            continue
        cls = errors.ERRORS[status]
        assert issubclass(cls, ember.EmberError) and cls.status == status
        assert ember.status_name(status) == f"EMBER_ERR_{status.name}"
    assert len(set(errors.ERRORS.values())) == len(ember.Status) - 1


def test_abi_version_matches_the_header():
    header = int(re.search(r"#define EMBER_ABI_VERSION (\d+)", HEADER).group(1))
    assert ember.ABI_VERSION == header == ember.abi_version()


def test_param_defaults_set_struct_size():
    # The *_params_default functions fill struct_size with the size given: the package
    # passes sizeof of its structs, as the EMBER_*_PARAMS_DEFAULT macros do.
    for name, function in [("ember_model_params", "ember_model_params_default"),
                           ("ember_session_params", "ember_session_params_default"),
                           ("ember_sampler_params", "ember_sampler_params_default"),
                           ("ember_generate_params", "ember_generate_params_default")]:
        params = _ffi.STRUCTS[name]()
        getattr(_ffi.lib, function)(ctypes.sizeof(params), ctypes.byref(params))
        assert params.struct_size == ctypes.sizeof(params), name
