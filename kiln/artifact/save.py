"""Write a CompiledModel as an artifact: a directory, or the same layout in one zip file.

Saving never deletes what it did not write: an existing path is replaced only when it is itself
a kiln artifact and the caller asked for that (overwrite=True), and the replacement is atomic,
so a crash mid-save leaves the old artifact or the new one, never a mix or nothing.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import platform
import shutil
import sys
import tempfile
import zipfile
from pathlib import Path

import torch

from kiln.artifact.manifest import ENGINE_DIR, FORMAT, MANIFEST, MANIFEST_MAX_BYTES, SCHEMA_VERSION, sha256_file
from kiln.backends import registry
from kiln.errors import ArtifactError
from kiln.host import host_fingerprint
from kiln import version


def save(compiled, path: Path, as_directory: bool, overwrite: bool = False) -> Path:
    """Write `compiled` to `path`. An existing `path` is replaced only if it is a kiln artifact
    and `overwrite` is true (an empty directory, holding nothing to lose, is filled); anything
    else there is refused with an ArtifactError and left as it was."""
    given = Path(path).expanduser()
    path = Path(os.path.abspath(given))  # absolute, so that a refusal of "." names the folder
    check_target(path, overwrite)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # A directory is built beside its target so that the final rename stays on one filesystem.
        staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent) if as_directory
                       else tempfile.mkdtemp(prefix="kiln-save-"))
    except OSError as exc:
        raise _write_error(exc, path) from exc
    try:
        _write(compiled, staging)
        _place(staging, path, as_directory, overwrite)
        return given
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def check_target(path: str | Path, overwrite: bool = False) -> None:
    """Raise ArtifactError unless saving to `path` may go ahead: nothing there, an empty
    directory, or (with overwrite) an existing kiln artifact. Callers with a long build ahead
    (the CLI) call it first, so a refusal costs nothing."""
    path = Path(os.path.abspath(Path(path).expanduser()))
    if not os.path.lexists(path):
        return
    if path.is_dir() and not path.is_symlink() and not any(path.iterdir()):
        return
    problem = _not_an_artifact(path)
    if problem is not None:
        raise ArtifactError(f"will not replace it: it exists and is not a kiln artifact ({problem})", where=str(path),
                            fix="choose a path that does not exist yet (kiln replaces only its own artifacts), "
                                "or move what is there away")
    if not overwrite:
        raise ArtifactError("a kiln artifact already exists here", where=str(path),
                            fix="pass overwrite=True (kiln compile --overwrite) to replace it, or choose another path")


def _not_an_artifact(path: Path) -> str | None:
    """None when `path` is a kiln artifact kiln may replace, else why not. A directory qualifies
    only if it holds nothing but its manifest and the engine files that manifest lists, so that
    replacing it cannot take a user's file with it."""
    if path.is_symlink():
        return "a symbolic link"
    try:
        if path.is_dir():
            manifest_path = path / MANIFEST
            if not manifest_path.is_file() or manifest_path.is_symlink():
                return "no manifest.json"
            if manifest_path.stat().st_size > MANIFEST_MAX_BYTES:
                return "manifest.json is too large"
            manifest = _kiln_manifest(manifest_path.read_bytes())
            if manifest is None:
                return "manifest.json is not a kiln manifest"
            listed = {MANIFEST} | {f.get("path") for e in manifest.get("engines", []) if isinstance(e, dict)
                                   for f in e.get("files", []) if isinstance(f, dict)}
            # Two levels only (the artifact's own depth): a big folder is refused at its first stray entry.
            for item in path.iterdir():
                if item.name == ENGINE_DIR and item.is_dir() and not item.is_symlink():
                    stray = next((f"{ENGINE_DIR}/{e.name}" for e in item.iterdir()
                                  if e.is_symlink() or not e.is_file() or f"{ENGINE_DIR}/{e.name}" not in listed), None)
                elif item.name == MANIFEST:
                    stray = None
                else:
                    stray = item.name
                if stray is not None:
                    return f"it holds {stray}, which is no file of the artifact"
            return None
        if not path.is_file():
            return "not a regular file or directory"
        if not zipfile.is_zipfile(path):
            return "not a zip archive"
        with zipfile.ZipFile(path) as archive:
            try:
                info = archive.getinfo(MANIFEST)
            except KeyError:
                return "no manifest.json"
            if info.file_size > MANIFEST_MAX_BYTES:
                return "manifest.json is too large"
            if _kiln_manifest(archive.read(info)) is None:
                return "manifest.json is not a kiln manifest"
        return None
    except (OSError, zipfile.BadZipFile, EOFError) as exc:
        return f"unreadable: {exc}"


def _kiln_manifest(data: bytes) -> dict | None:
    try:
        manifest = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("format") == FORMAT else None


def _write(compiled, staging: Path) -> None:
    (staging / ENGINE_DIR).mkdir()
    engines = []
    versions = {"kiln": version.__version__, "torch": torch.__version__, "python": platform.python_version()}
    for partition in compiled.plan.partitions:
        engine = compiled.engines[partition.name]
        entry = engine.save(staging / ENGINE_DIR, partition.name)
        files = [{"path": f"{ENGINE_DIR}/{name}", "sha256": sha256_file(staging / ENGINE_DIR / name),
                  "size": (staging / ENGINE_DIR / name).stat().st_size} for name in entry.files]
        engines.append({"partition": partition.name, "backend": entry.backend, "files": files,
                        "meta": {**entry.meta, "output_names": list(partition.graph.output_names)}})
        status = registry.get(entry.backend).available()
        versions[entry.backend] = status.version
    manifest = {
        "format": FORMAT, "schema_version": SCHEMA_VERSION, "versions": versions, "host": host_fingerprint(),
        "profile": compiled.profile, "input_spec": compiled.input_spec.to_dict(),
        "output_structure": compiled.output_structure, "output_none_positions": list(compiled.output_none_positions),
        "plan": compiled.plan.to_dict(),
        "engines": engines, "report": compiled.report.to_dict(),
    }
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=1, default=str))


def _place(staging: Path, path: Path, as_directory: bool, overwrite: bool) -> None:
    partial = None
    try:
        if as_directory:
            check_target(path, overwrite)  # again: the build may have taken long, and the path is about to go
            _swap_in(staging, path)
            return
        fd, partial = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
        os.close(fd)
        with zipfile.ZipFile(partial, "w", compression=zipfile.ZIP_STORED) as archive:
            archive.write(staging / MANIFEST, MANIFEST)
            for file in sorted((staging / ENGINE_DIR).iterdir()):
                archive.write(file, f"{ENGINE_DIR}/{file.name}")
        check_target(path, overwrite)
        _swap_in(Path(partial), path)
        partial = None
    except OSError as exc:
        raise _write_error(exc, path) from exc
    finally:
        if partial is not None:
            Path(partial).unlink(missing_ok=True)


def _swap_in(new: Path, target: Path) -> None:
    """Put `new` (a file or directory beside `target`) at `target` in one step."""
    if not os.path.lexists(target):
        os.rename(new, target)
        return
    if not (target.is_dir() and not target.is_symlink()) and not new.is_dir():
        os.replace(new, target)  # a file over a file: rename(2) replaces atomically
        return
    # A directory cannot be renamed over a non-empty one. RENAME_EXCHANGE swaps the two paths
    # atomically; afterwards `new` names the old artifact, which is removed.
    if _exchange(new, target):
        _remove(new)
        return
    # Without renameat2 (another OS, an old kernel, a filesystem without RENAME_EXCHANGE):
    # move the old artifact aside, the new one in, and the old one back if that fails. Between
    # the two renames (microseconds) `target` does not exist; a crash exactly there leaves the
    # old artifact complete under the `.old` name beside it.
    aside = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
    aside.rmdir()  # only the unique name is wanted
    os.rename(target, aside)
    try:
        os.rename(new, target)
    except BaseException:
        os.rename(aside, target)
        raise
    _remove(aside)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths atomically with Linux's renameat2(RENAME_EXCHANGE); False where
    that is unavailable (the caller falls back), OSError for any other failure."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2  # glibc 2.28+
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    renameat2.restype = ctypes.c_int
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):  # kernel or filesystem without RENAME_EXCHANGE
        return False
    raise OSError(err, os.strerror(err), str(b))


def _write_error(exc: OSError, path: Path) -> ArtifactError:
    return ArtifactError(f"could not write the artifact: {exc.strerror or exc}", where=str(path),
                         fix="choose a writable path with free space")
