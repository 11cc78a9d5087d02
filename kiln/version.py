"""kiln's version, in a module nothing else has to be imported for (manifests and cache keys read
it), and the versions of the libraries whose change changes what kiln builds."""

import importlib.metadata

__version__ = "0.1.0"

# torch and every backend's library: a new release of any of them can build a different engine
LIBRARIES = ("torch", "onnxruntime", "onnx", "onnxscript", "openvino", "torchao", "tensorrt")


def library_versions() -> dict[str, str | None]:
    """kiln's and each of LIBRARIES' installed version (None: not installed), from package metadata."""
    versions: dict[str, str | None] = {"kiln": __version__}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions
