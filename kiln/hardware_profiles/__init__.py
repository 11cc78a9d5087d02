"""Hardware profiles as validated data: see schema.py for the fields."""

from kiln.hardware_profiles.schema import DeviceSpec, LinkSpec, Profile, available, load

__all__ = ["DeviceSpec", "LinkSpec", "Profile", "available", "load"]
