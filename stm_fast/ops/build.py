"""The fused kernel's build cache: one entry per (sources, build inputs), checked before anything is loaded.

An entry is the folder ``<root>/scan_fused-<capability>-<key>``; ``key`` hashes every file of ``ops/csrc``
(names and bytes, headers included) and the build inputs (torch version and git revision, the CPython
extension suffix, the machine, the capability, the compiler and linker flags), never a path, so two
checkouts of the same sources share one entry. A finished build writes ``manifest.json`` (the library's
name, size and SHA-256, and the key's inputs) last, atomically; a library is loaded only when it matches
its manifest, so a truncated, empty or half-written library is rebuilt (or refused) instead of being
mapped (a truncated one ends the process with SIGBUS). Builds of one entry are serialised by an OS lock
(``flock``: released if its holder dies) on a file beside the entry; the lock's holder re-checks the
manifest first, so concurrent first builds compile once.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import sys
import sysconfig
from pathlib import Path
from typing import Optional, Tuple

import torch

__all__ = ["cache_root", "read_sources", "key_inputs", "entry_dir", "check_entry", "write_manifest",
           "fresh_entry", "entry_lock", "MANIFEST"]

MANIFEST = "manifest.json"
_LAYOUT = 2  # bump when the entry's layout or the manifest's meaning changes


def cache_root() -> Path:
    """``$STM_FUSED_BUILD_DIR``, else ``$STM_CACHE_DIR`` (the package's cache), else ``$XDG_CACHE_HOME/stm_fast``
    (default ``~/.cache/stm_fast``)."""
    root = os.environ.get("STM_FUSED_BUILD_DIR") or os.environ.get("STM_CACHE_DIR")
    if not root:
        cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(cache, "stm_fast")
    return Path(root)


def read_sources(csrc: Path) -> dict:
    """{file name: bytes} of every regular file in ``csrc`` (sources and headers), read once."""
    return {f.name: f.read_bytes() for f in sorted(csrc.iterdir()) if f.is_file() and not f.name.startswith(".")}


def key_inputs(sources: dict, capability: str, cflags: list, ldflags: list) -> dict:
    """Everything the built library depends on, except the compiler (a host without one must still find
    the entry its peers built): the sources' hashes, torch, the CPython ABI, the machine and the flags."""
    return {
        "layout": _LAYOUT,
        "sources": {name: hashlib.sha256(data).hexdigest() for name, data in sorted(sources.items())},
        "torch": torch.__version__,
        "torch_git": getattr(torch.version, "git_version", ""),
        "cxx11_abi": bool(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", True)),
        "python": sysconfig.get_config_var("EXT_SUFFIX") or sys.implementation.cache_tag,
        "machine": f"{sys.platform}-{platform.machine()}",
        "capability": capability,
        "cflags": list(cflags),
        "ldflags": list(ldflags),
    }


def entry_dir(inputs: dict) -> Path:
    """The cache entry of these inputs (the same folder for the same sources in any checkout)."""
    key = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]
    return cache_root() / f"scan_fused-{inputs['capability']}-{key}"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_entry(entry: Path, library: str) -> Tuple[Optional[Path], str]:
    """(the library's path, "") when ``entry`` holds a finished build of ``library`` matching its manifest;
    else (None, "") for an entry never built here, or (None, what is wrong) for a damaged one."""
    if not entry.is_dir() or not any(entry.iterdir()):
        return None, ""
    lib = entry / library
    try:
        manifest = json.loads((entry / MANIFEST).read_text())
        size, digest = int(manifest["size"]), str(manifest["sha256"])
        if manifest["library"] != library:
            return None, f"manifest names {manifest['library']}"
    except FileNotFoundError:
        return None, "no manifest: an interrupted build"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return None, f"unreadable manifest: {type(e).__name__}"
    if not lib.is_file():
        return None, "library missing"
    have = lib.stat().st_size
    if have != size:
        return None, f"truncated: {have} of {size} bytes" if have < size else f"{have} bytes, not {size}"
    if _sha256(lib) != digest:
        return None, "SHA-256 mismatch"
    return lib, ""


def write_manifest(entry: Path, library: str, inputs: dict) -> None:
    """Record the built library (size, SHA-256, key inputs); written last and atomically (rename)."""
    lib = entry / library
    manifest = {"library": library, "size": lib.stat().st_size, "sha256": _sha256(lib), "inputs": inputs}
    tmp = entry / f".{MANIFEST}.{os.getpid()}"
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    os.replace(tmp, entry / MANIFEST)


def fresh_entry(entry: Path, sources: dict) -> list:
    """Empty ``entry`` (unlinking files, so a process that has the old library mapped keeps its copy) and
    write the sources into ``entry/src``; returns the paths of the .cpp files to compile."""
    if entry.exists():
        shutil.rmtree(entry)
    src = entry / "src"
    src.mkdir(parents=True)
    for name, data in sources.items():
        (src / name).write_bytes(data)
    return [str(src / name) for name in sorted(sources) if name.endswith(".cpp")]


class entry_lock:
    """An exclusive OS lock on ``<entry>.lock`` (beside the entry, which a rebuild empties); ``TimeoutError``
    after ``timeout`` seconds."""

    def __init__(self, entry: Path, timeout: float = 1800.0):
        from filelock import FileLock  # a torch dependency; flock on POSIX, released when its holder dies

        entry.parent.mkdir(parents=True, exist_ok=True)
        self.path = entry.with_name(entry.name + ".lock")
        self._lock = FileLock(str(self.path), timeout=timeout)

    def __enter__(self):
        self._lock.acquire()
        return self

    def __exit__(self, *exc):
        self._lock.release()
        return False
