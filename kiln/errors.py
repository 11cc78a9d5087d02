"""kiln's error family.

Every message has three parts: what went wrong, where (file:field, input name, node and
source line, pass name), and what to do about it. Code raising these builds the message
with `KilnError.compose` so the three parts always appear in the same order.
"""

from __future__ import annotations


class KilnError(Exception):
    """Base of every error kiln raises on purpose."""

    @staticmethod
    def compose(what: str, where: str | None = None, fix: str | None = None) -> str:
        parts = [f"{where}: {what}" if where else what]
        if fix:
            parts.append(f"Fix: {fix}")
        return "\n".join(parts)

    def __init__(self, what: str, where: str | None = None, fix: str | None = None):
        self.what, self.where, self.fix = what, where, fix
        super().__init__(self.compose(what, where, fix))


class CaptureError(KilnError):
    """The model could not be captured as a graph."""


class ProfileError(KilnError):
    """A hardware profile is unknown, malformed or inconsistent."""


class PassFailed(KilnError):
    """A graph pass raised; names the pass, the passes before it and the node."""


class BackendUnavailable(KilnError):
    """A backend's runtime is not installed or cannot run here."""


class BackendError(KilnError):
    """A backend failed to build or run an engine."""


class InputMismatch(KilnError):
    """A call's inputs do not match the compiled input spec."""


class ArtifactError(KilnError):
    """A saved artifact is corrupt, tampered, or incompatible with this install."""


class VerificationError(KilnError):
    """The compiled model disagrees with eager PyTorch beyond the tolerance."""


class ServingError(KilnError):
    """An artifact cannot be served as asked (no dynamic batch, a missing serving extra), or a
    request to a served model is malformed."""


class OptionsError(KilnError):
    """CompileOptions or a keyword of optimize() is invalid."""


class UnprovenAccuracyWarning(UserWarning):
    """Layers were lowered without calibration data: their accuracy rests on the example inputs."""
