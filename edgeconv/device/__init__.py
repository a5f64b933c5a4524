"""The device side: target profiles, memory fit, host planning, the on-device runner, bundle checks, local bench."""
