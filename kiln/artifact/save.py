"""Write a CompiledModel as an artifact: a directory, or the same layout in one zip file."""

from __future__ import annotations

import json
import os
import platform
import shutil
import tempfile
import zipfile
from pathlib import Path

import torch

from kiln.artifact.manifest import ENGINE_DIR, FORMAT, MANIFEST, SCHEMA_VERSION, sha256_file
from kiln.backends import registry
from kiln.errors import ArtifactError
from kiln.host import host_fingerprint
from kiln import version


def save(compiled, path: Path, as_directory: bool) -> Path:
    staging = Path(tempfile.mkdtemp(prefix="kiln-save-"))
    try:
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
        return _place(staging, path, as_directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _place(staging: Path, path: Path, as_directory: bool) -> Path:
    path = path.expanduser()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if as_directory:
            if path.exists():
                shutil.rmtree(path)
            shutil.copytree(staging, path)
            return path
        # Write beside the target and rename, so a crash never leaves half an artifact.
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".partial", dir=path.parent)
        os.close(fd)
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as archive:
            archive.write(staging / MANIFEST, MANIFEST)
            for file in sorted((staging / ENGINE_DIR).iterdir()):
                archive.write(file, f"{ENGINE_DIR}/{file.name}")
        os.replace(tmp, path)
        return path
    except OSError as exc:
        raise ArtifactError(f"could not write the artifact: {exc.strerror or exc}", where=str(path),
                            fix="choose a writable path with free space") from exc
