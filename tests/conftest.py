"""Suite-wide setup: each test gets its own empty compile cache, so no test sees another's
builds and the user's cache directory is never touched."""

import pytest

import kiln.cache


@pytest.fixture(autouse=True)
def _private_compile_cache(tmp_path_factory, monkeypatch):
    root = tmp_path_factory.mktemp("kiln-cache")
    monkeypatch.setattr(kiln.cache, "default_dir", lambda: root)
