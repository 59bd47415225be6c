"""What this process may do beyond its uid: Linux capabilities, read from /proc/self/status.

The service runs as a dedicated user with a few ambient capabilities (systemd/vcfs@.service)
instead of as root, so "am I root?" is the wrong question for things like giving a new file
to the user who created it; the capability is the right one.
"""

from __future__ import annotations

import os

CAP_CHOWN = 0


def effective_capabilities() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return int(line.split()[1], 16)
    except (OSError, ValueError, IndexError):
        pass
    return ~0 if os.geteuid() == 0 else 0


def has_capability(cap: int) -> bool:
    return bool(effective_capabilities() >> cap & 1)


def can_chown() -> bool:
    """True if files may be given to other users (root, or CAP_CHOWN)."""
    return os.geteuid() == 0 or has_capability(CAP_CHOWN)
