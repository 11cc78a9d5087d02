"""What OpenVINO compiled from an engine's files, kept for the next load of the same files.

OpenVINO's model cache (CACHE_DIR with CACHE_MODE=OPTIMIZE_SIZE) stores the compiled graph
without its weights, which it reads again from the engine's .bin: a load from it skips the
graph transformations (MiniLM b8 fp32: 0.12 s against 0.2 s). Its key is the model file's path,
its graph and the config, not the weights' bytes: a blob kept for other weights mixes them
into the answer (measured: an edited .bin loaded through an older blob answered unlike a fresh
compile of the same files). So kiln keeps one folder per engine, named by the sha256s of its
files (checked before they load), their path and the config; once a blob is complete, the
folder's files and their sha256s are sealed in a list, and a folder that does not match its
list is removed and made again. Only compile-cache entries, which never move, use this.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

log = logging.getLogger("kiln")

SEAL = "kiln-checksums.json"
CACHE_MODE = "OPTIMIZE_SIZE"  # the blob leaves the weights in the engine's own .bin


def kept_folder(root: Path, xml: Path, checksums: tuple[str, ...], device: str, config: dict) -> Path:
    """The folder for the engine at `xml` whose files have these sha256s, compiled for `device`
    with `config`: one OpenVINO cache key, so one blob."""
    key = json.dumps([str(xml.resolve()), list(checksums), device, sorted(config.items())], default=str)
    return root / f"openvino-{hashlib.sha256(key.encode()).hexdigest()[:32]}"


def compile_keeping(core, xml: Path, device: str, config: dict, folder: Path):
    """Compile the model at `xml` from the blob kept in `folder` when the folder is intact;
    otherwise compile it afresh while OpenVINO writes the blob into a staging folder, which is
    sealed and moved into place (a crash leaves no half-written folder in use)."""
    if _intact(folder):
        return core.compile_model(str(xml), device, {**config, "CACHE_DIR": str(folder), "CACHE_MODE": CACHE_MODE})
    shutil.rmtree(folder, ignore_errors=True)
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".tmp-", dir=folder.parent))
    except OSError as exc:  # a read-only cache still loads, without keeping anything
        log.debug("cannot keep OpenVINO's compiled model in %s: %s", folder.parent, exc)
        return core.compile_model(str(xml), device, config)
    try:
        compiled = core.compile_model(str(xml), device, {**config, "CACHE_DIR": str(staging), "CACHE_MODE": CACHE_MODE})
        try:
            _seal(staging)
            os.replace(staging, folder)
        except OSError as exc:  # another process placed the folder first, or the disk is full: theirs, or none
            log.debug("could not keep OpenVINO's compiled model in %s: %s", folder, exc)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return compiled


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()  # a blob without weights: kilobytes to a few MB


def _seal(folder: Path) -> None:
    files = {f.name: _sha256(f) for f in folder.iterdir() if f.is_file()}
    (folder / SEAL).write_text(json.dumps(files, sort_keys=True))


def _intact(folder: Path) -> bool:
    """Whether `folder` holds exactly the files its seal lists, each with its sha256, and at
    least one (a compile that wrote nothing leaves nothing worth loading from)."""
    try:
        sealed = json.loads((folder / SEAL).read_text())
        present = {f.name for f in folder.iterdir() if f.name != SEAL}
        return (isinstance(sealed, dict) and bool(sealed) and present == set(sealed)
                and all(_sha256(folder / name) == digest for name, digest in sealed.items()))
    except (OSError, ValueError):
        return False
