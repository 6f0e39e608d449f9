"""The fused kernel's build cache (``stm_fast.ops.build``): keyed by the sources and build inputs, not the
checkout's path; a cached library is checked against its manifest before it is loaded, and a damaged one is
rebuilt, or refused in one line where no compiler is. Every test uses its own cache folder; everything that
loads a library runs in a subprocess, so that a crash (SIGBUS from a truncated library) is an exit code."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from stm_fast.ops import build, scan_fused

REPO = Path(__file__).resolve().parents[1]
CSRC = REPO / "stm_fast" / "ops" / "csrc"
# The automatic backend choice (one "stm_fast:" line when the fused kernel is passed over), then a scan
# through whichever backend was chosen, compared with the torch backend's.
PROBE = """
import sys, torch, stm_fast
from stm_fast import ssm
print(stm_fast.__file__)
name = ssm.resolve_backend(None, "cpu")
torch.manual_seed(0)
u, delta, z = (torch.randn(2, 6, 9) for _ in range(3))
A, B, C = -torch.rand(6, 4) - 0.5, torch.randn(2, 4, 9), torch.randn(2, 4, 9)
y = ssm.selective_scan(u, delta, A, B, C, z=z, delta_softplus=True, backend=name)
ref = ssm.selective_scan(u, delta, A, B, C, z=z, delta_softplus=True, backend="torch")
print(name, float((y - ref).abs().max()) < 1e-5)
"""


def run_probe(cache, cwd=REPO, **env):
    """PROBE in a fresh process with the cache ``cache``: (exit code, stdout lines, stderr's stm_fast lines)."""
    full = dict(os.environ, STM_FUSED_BUILD_DIR=str(cache), OMP_NUM_THREADS="1", **env)
    full.pop("STM_SCAN_BACKEND", None)
    full.pop("STM_FUSED_CAPABILITY", None)
    out = subprocess.run([sys.executable, "-c", PROBE], env=full, cwd=str(cwd), capture_output=True, text=True,
                         timeout=600)
    said = [line for line in out.stderr.splitlines() if line.startswith("stm_fast:")]
    return out.returncode, out.stdout.split("\n"), said, out.stderr


def entries(cache):
    return sorted(p for p in Path(cache).iterdir() if p.is_dir())


def library(entry):
    (lib,) = entry.glob("*.so")
    return lib


# ---------------------------------------------------------------- the key and the manifest (no compiler)


def test_the_key_ignores_the_checkout_path_and_follows_every_file_of_csrc(tmp_path, monkeypatch):
    monkeypatch.setenv("STM_FUSED_BUILD_DIR", str(tmp_path / "cache"))
    a, b = tmp_path / "one" / "csrc", tmp_path / "two" / "csrc"
    shutil.copytree(CSRC, a)
    shutil.copytree(CSRC, b)

    def entry(folder, capability="AVX2", cflags=("-O3",)):
        return build.entry_dir(build.key_inputs(build.read_sources(folder), capability, list(cflags), ["-fopenmp"]))

    assert entry(a) == entry(b) and entry(a).parent == tmp_path / "cache"
    assert entry(a) != entry(a, capability="DEFAULT") and entry(a) != entry(a, cflags=("-O2",))
    (b / "vec_math.h").write_text((b / "vec_math.h").read_text() + "\n// a change to a header\n")
    assert entry(a) != entry(b)
    shutil.copy(a / "vec_math.h", b / "vec_math.h")
    assert entry(a) == entry(b)
    (b / "extra.h").write_text("// a new header\n")
    assert entry(a) != entry(b)
    inputs = build.key_inputs(build.read_sources(a), "AVX2", [], [])
    assert {"torch", "torch_git", "python", "machine", "capability", "cflags", "ldflags"} <= set(inputs)
    assert scan_fused.build_dir("AVX2").parent == tmp_path / "cache"
    assert scan_fused.build_dir("AVX2").name.startswith("scan_fused-AVX2-")


def test_the_cache_root_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("STM_FUSED_BUILD_DIR", raising=False)
    monkeypatch.delenv("STM_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert build.cache_root() == tmp_path / "xdg" / "stm_fast"
    monkeypatch.setenv("STM_CACHE_DIR", str(tmp_path / "pkg"))
    assert build.cache_root() == tmp_path / "pkg"
    monkeypatch.setenv("STM_FUSED_BUILD_DIR", str(tmp_path / "kernel"))
    assert build.cache_root() == tmp_path / "kernel"


@pytest.mark.parametrize("damage, expect", [
    (lambda e: (e / "lib.so").write_bytes((e / "lib.so").read_bytes()[:500]), "truncated: 500 of 1000 bytes"),
    (lambda e: (e / "lib.so").write_bytes(b""), "truncated: 0 of 1000 bytes"),
    (lambda e: (e / "lib.so").write_bytes(b"y" * 1000), "SHA-256 mismatch"),
    (lambda e: (e / "lib.so").unlink(), "library missing"),
    (lambda e: (e / build.MANIFEST).unlink(), "no manifest: an interrupted build"),
    (lambda e: (e / build.MANIFEST).write_text('{"size": 10'), "unreadable manifest: JSONDecodeError"),
    (lambda e: None, ""),
], ids=["truncated", "empty", "altered", "missing", "no_manifest", "bad_manifest", "intact"])
def test_a_library_is_checked_against_its_manifest(tmp_path, damage, expect):
    entry = tmp_path / "scan_fused-AVX2-0123"
    entry.mkdir()
    (entry / "lib.so").write_bytes(b"x" * 1000)
    build.write_manifest(entry, "lib.so", {"capability": "AVX2"})
    assert json.loads((entry / build.MANIFEST).read_text())["size"] == 1000
    damage(entry)
    lib, why = build.check_entry(entry, "lib.so")
    assert why == expect and (lib is None) == bool(expect)
    assert build.check_entry(tmp_path / "never-built", "lib.so") == (None, "")


# ---------------------------------------------------------------- real builds (a compile each, in subprocesses)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A cache holding one real build, made by three processes started at once (one compiles, two wait on
    its lock and load its result): (cache folder, their stdout and stderr)."""
    if scan_fused._missing_tool():
        pytest.skip(f"no build here: {scan_fused._missing_tool()}")
    cache = tmp_path_factory.mktemp("kernel-cache")
    env = dict(os.environ, STM_FUSED_BUILD_DIR=str(cache), OMP_NUM_THREADS="1")
    env.pop("STM_FUSED_CAPABILITY", None)
    code = "from stm_fast.ops import scan_fused; print(*scan_fused.available())"
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, cwd=str(REPO), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    return cache, [p.communicate(timeout=900) + (p.returncode,) for p in procs]


@pytest.mark.slow
def test_three_simultaneous_first_builds_compile_once(built):
    cache, runs = built
    assert all(rc == 0 and out.startswith("True built for ") for out, _, rc in runs), runs
    assert sum(err.count("building the fused CPU scan kernel") for _, err, _ in runs) == 1, runs
    (entry,) = entries(cache)
    assert build.check_entry(entry, library(entry).name)[0] == library(entry)


@pytest.mark.slow
@pytest.mark.parametrize("cut", ["truncated", "empty"])
def test_a_damaged_kernel_without_a_compiler_is_refused_in_one_line(built, tmp_path, cut):
    """Without the check a truncated library ends the process with SIGBUS (exit 135 / -7) and an empty one
    falls back with a line naming no fix; now: exit 0, the torch backend, one line naming the damage and the
    fix."""
    cache = tmp_path / "cache"
    shutil.copytree(built[0], cache)
    lib = library(entries(cache)[0])
    data = lib.read_bytes()
    lib.write_bytes(data[: len(data) // 2] if cut == "truncated" else b"")
    rc, out, said, err = run_probe(cache, CXX="/nonexistent/g++")
    assert rc == 0, err[-2000:]
    assert out[1] == "torch True", out
    have = len(data) // 2 if cut == "truncated" else 0
    assert len(said) == 1 and f"cached kernel damaged (truncated: {have} of {len(data)} bytes)" in said[0], said
    assert "set CXX to a working g++/clang++" in said[0], said


@pytest.mark.slow
def test_a_truncated_kernel_is_rebuilt_with_one_line(built, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(built[0], cache)
    (entry,) = entries(cache)
    lib = library(entry)
    size = lib.stat().st_size
    lib.write_bytes(lib.read_bytes()[: size // 2])
    rc, out, said, err = run_probe(cache)
    assert rc == 0, err[-2000:]
    assert out[1] == "fused True", out
    assert said == [f"stm_fast: the cached fused scan kernel in {entry} is damaged (truncated: {size // 2} of "
                    f"{size} bytes); rebuilding it (about half a minute; if this repeats, delete {entry})"], said
    assert build.check_entry(entry, lib.name)[0] == lib and entries(cache) == [entry]
    rc, out, said, err = run_probe(cache)  # the next process loads the rebuilt kernel silently
    assert (rc, out[1], said) == (0, "fused True", []), err[-2000:]


@pytest.mark.slow
def test_two_checkouts_of_the_same_sources_share_one_build(built, tmp_path):
    """A second copy of the package in another folder finds the first one's build: no compile, no new entry."""
    checkout = tmp_path / "checkout"
    shutil.copytree(REPO / "stm_fast", checkout / "stm_fast", ignore=shutil.ignore_patterns("__pycache__"))
    cache = built[0]
    lib = library(entries(cache)[0])
    before = lib.stat()
    rc, out, said, err = run_probe(cache, cwd=checkout, PYTHONPATH=str(checkout))
    assert rc == 0, err[-2000:]
    assert out[0] == str(checkout / "stm_fast" / "__init__.py"), out
    assert out[1] == "fused True" and said == [], (out, said)
    after = lib.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert entries(cache) == [lib.parent]


@pytest.mark.slow
def test_without_a_compiler_a_valid_cached_kernel_is_used(built, tmp_path):
    empty_bin = tmp_path / "bin"
    empty_bin.mkdir()
    rc, out, said, err = run_probe(built[0], CXX="/nonexistent/g++", PATH=str(empty_bin))
    assert rc == 0, err[-2000:]
    assert out[1] == "fused True" and said == [], (out, said, err[-2000:])
