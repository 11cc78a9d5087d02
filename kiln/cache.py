"""The compile cache: finished artifacts on disk, addressed by everything that shapes them.

A compile first looks up a quick key, the model's fingerprint without capture (its code,
state, weights and call; kiln/frontend/fingerprint.py) with the profile, options, versions and
host: an alias file names the full key it last led to. The full key is a sha256 over the captured graph (its code and every node's op, shape and dtype),
the bytes of every weight, the input spec with its dynamic ranges, the output structure, the
profile's digest, the compile options, the versions of kiln, torch and each backend library,
and the host (CPU flags, usable cores). Change any of them and the key changes.

An entry is an artifact directory (the same format `CompiledModel.save` writes). Writes go to a
temporary directory in the cache root and are renamed into place, so a crash never leaves half
an entry. A hit is loaded through `kiln.load` (checksums first); a corrupt entry is removed
and rebuilt. The cache keeps under a size cap by evicting the least recently used entries.
Beside an entry, `<entry>.runtime/` holds what a runtime compiled from its engine files for the
next hit (OpenVINO's blob: kiln/backends/openvino_kept.py); a new entry is loaded once to fill
it, and it goes with its entry.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch

from kiln import version
from kiln.errors import ArtifactError, KilnError
from kiln.host import host_fingerprint, usable_cores
from kiln.backends import registry
from kiln.runtime import load

log = logging.getLogger("kiln")

USED_SUFFIX = ".used"  # a marker beside each entry (inside, it would be an unlisted artifact file)
RUNTIME_SUFFIX = ".runtime"  # beside each entry: what runtimes compiled from its engine files (BackendSettings.runtime_cache)
ALIAS_SUFFIX = ".alias"  # a quick key's file, holding the full key it last led to


def default_dir() -> Path:
    """The user's cache directory (XDG on Linux), kiln's folder inside it."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "kiln"


def quick_key(fingerprint: str, profile_digest: str, options: dict) -> str:
    """The key of a model's fingerprint (kiln/frontend/fingerprint.py) under a profile and
    options: it names, through an alias file, the full key of the build it last led to."""
    digest = hashlib.sha256(b"quick")
    digest.update(json.dumps([fingerprint, profile_digest, options, version.library_versions(), torch.__version__,
                              host_fingerprint(), usable_cores()], sort_keys=True, default=str).encode())
    return digest.hexdigest()


def cache_key(gm: torch.fx.GraphModule, input_spec: dict, output_structure: str, profile_digest: str,
              options: dict) -> str:
    digest = hashlib.sha256()

    def add(label: str, value) -> None:
        digest.update(label.encode())
        digest.update(json.dumps(value, sort_keys=True, default=str).encode() if not isinstance(value, bytes) else value)

    add("graph", gm.code)
    for node in gm.graph.nodes:
        val = node.meta.get("val")
        shape = [str(s) for s in val.shape] if isinstance(val, torch.Tensor) else None
        add("node", [node.op, str(node.target), shape, str(getattr(val, "dtype", None))])
    for name, tensor in [*gm.named_parameters(), *gm.named_buffers()]:
        add("weight", [name, str(tensor.dtype), list(tensor.shape)])
        add("bytes", tensor.detach().contiguous().cpu().view(-1).view(torch.uint8).numpy().tobytes()
            if tensor.numel() else b"")
    add("inputs", input_spec)
    add("outputs", output_structure)
    add("profile", profile_digest)
    add("options", options)
    add("versions", {**version.library_versions(), "torch": torch.__version__})
    add("host", {**host_fingerprint(), "cores": usable_cores()})
    return digest.hexdigest()


class CompileCache:
    def __init__(self, root: Path, max_bytes: int):
        self.root = Path(root).expanduser()
        self.max_bytes = max_bytes

    def entry(self, key: str) -> Path:
        return self.root / key[:2] / key

    def alias(self, quick: str) -> str | None:
        """The full key a quick key last led to, or None."""
        try:
            key = self._alias_path(quick).read_text().strip()
        except OSError:
            return None
        return key if re.fullmatch(r"[0-9a-f]{64}", key) else None  # a damaged alias names no path

    def remember(self, quick: str, key: str) -> None:
        """Let `quick` lead to `key` (written atomically; the alias is a hint, never trusted alone:
        the entry it names is re-verified against the model)."""
        path = self._alias_path(quick)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, staging = tempfile.mkstemp(prefix=".tmp-alias-", dir=path.parent)
            with os.fdopen(fd, "w") as out:
                out.write(key)
            os.replace(staging, path)
        except OSError as exc:
            log.warning("could not write compile cache alias %s: %s", quick[:12], exc)

    def _alias_path(self, quick: str) -> Path:
        return self.root / quick[:2] / f"{quick}{ALIAS_SUFFIX}"

    def get(self, key: str):
        """The cached CompiledModel for `key`, or None. A corrupt entry is removed."""
        path = self.entry(key)
        if not (path / "manifest.json").is_file():
            return None
        try:
            compiled = load(path, runtime_cache=_runtime_dir(path))
        except ArtifactError as exc:
            log.warning("compile cache entry %s is unusable (%s); rebuilding", key[:12], exc.what)
            _remove(path)
            return None
        self._mark_used(path)
        return compiled

    def put(self, key: str, compiled) -> Path | None:
        """Store `compiled` atomically; returns the entry, or None if it could not be written."""
        target = self.entry(key)
        staging = None
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
            compiled.save(str(staging / "artifact") + "/")
            try:
                os.replace(staging / "artifact", target)
            except OSError:  # another process stored the same key first; theirs is as good
                pass
            else:
                _keep_compiled(target)
            self._mark_used(target)
        except (OSError, KilnError) as exc:
            log.warning("could not write compile cache entry %s: %s", key[:12], exc)
            return None
        finally:
            if staging is not None:
                shutil.rmtree(staging, ignore_errors=True)
        self.evict()
        return target

    @staticmethod
    def _mark_used(path: Path) -> None:
        Path(str(path) + USED_SUFFIX).touch()

    def evict(self) -> list[Path]:
        """Remove least recently used entries until the cache fits `max_bytes`."""
        entries = []
        for path in self.root.glob("*/*"):
            if path.is_dir() and not path.name.startswith(".tmp-") and not path.name.endswith(RUNTIME_SUFFIX):
                marker = Path(str(path) + USED_SUFFIX)
                used = marker.stat().st_mtime if marker.exists() else path.stat().st_mtime
                size = sum(f.stat().st_size for p in (path, _runtime_dir(path)) for f in p.rglob("*") if f.is_file())
                entries.append((used, size, path))
        total = sum(size for _, size, _ in entries)
        removed = []
        for used, size, path in sorted(entries):
            if total <= self.max_bytes:
                break
            _remove(path)
            total -= size
            removed.append(path)
        return removed


def _runtime_dir(entry: Path) -> Path:
    return Path(str(entry) + RUNTIME_SUFFIX)


def _remove(entry: Path) -> None:
    shutil.rmtree(entry, ignore_errors=True)
    shutil.rmtree(_runtime_dir(entry), ignore_errors=True)
    Path(str(entry) + USED_SUFFIX).unlink(missing_ok=True)


def _keep_compiled(entry: Path) -> None:
    """Load a new entry once where one of its backends keeps what it compiles from the entry's
    files (Backend.keeps_compiled): the first cache hit then loads as fast as the later ones."""
    try:
        backends = {e["backend"] for e in json.loads((entry / "manifest.json").read_text())["engines"]}
        if any(registry.get(name).keeps_compiled for name in backends):
            load(entry, runtime_cache=_runtime_dir(entry))
    except (OSError, ValueError, KeyError, KilnError) as exc:  # the entry still serves; its first hit compiles
        log.warning("could not prepare compile cache entry %s for fast loads: %s", entry.name[:12], exc)
