"""Backends that misbehave on purpose, for isolation tests. They live in an importable module
so that a child build process can construct them by class path, as it does real backends."""

from __future__ import annotations

import os
import signal
import time

from kiln.backends.onnxruntime import OnnxRuntimeBackend


class SegfaultingBackend(OnnxRuntimeBackend):
    name = "segfaulting"

    def compile(self, partition, settings):
        print("about to crash", flush=True)
        os.kill(os.getpid(), signal.SIGSEGV)


class HangingBackend(OnnxRuntimeBackend):
    name = "hanging"

    def compile(self, partition, settings):
        time.sleep(3600)


class MemoryHungryBackend(OnnxRuntimeBackend):
    name = "memory_hungry"

    def compile(self, partition, settings):
        hoard = bytearray(8 * 2**30)  # far past any budget the tests set
        return hoard


class RaisingBackend(OnnxRuntimeBackend):
    name = "raising"

    def compile(self, partition, settings):
        raise RuntimeError("exporter exploded")
