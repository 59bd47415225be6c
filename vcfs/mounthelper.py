"""``mount.vcfs`` / ``mount.fuse.vcfs``: what mount(8) runs for vcfs.

``mount -t fuse.vcfs BACKING MOUNTPOINT -o config=FILE,...`` (and an /etc/fstab line or a
systemd .mount unit, which both end up there) makes mount(8) run
``/sbin/mount.fuse.vcfs BACKING MOUNTPOINT [-sfnvrw] [-N NS] [-o OPTIONS] [-t TYPE]``, with
PATH removed from the environment. This module only translates that call into the
``vcfs mount`` command line (which backgrounds the daemon and returns once the mount
answers), so the helper and the CLI cannot drift apart.

``umount MOUNTPOINT`` needs no helper (umount(8) would look for ``umount.fuse``, shared by
every FUSE filesystem, so vcfs ships none): the kernel writes back the mount's dirty pages
to the daemon before the unmount completes, and the daemon then seals and fsyncs what it
holds and exits. ``vcfs umount`` also waits for that last step.

Options: the vcfs ones are below; mount flags (mountconfig.FUSE_FLAGS) go to the kernel;
options meant for mount(8), fstab or systemd are ignored; anything else is an error that
names it, because a misspelt option silently ignored could drop a protection. A PIN is never
an option (it would be visible in /proc/*/cmdline and in fstab).
"""

from __future__ import annotations

from vcfs.errors import UsageError
from vcfs.mountconfig import ALWAYS_ON, FUSE_FLAGS

VALUE_OPTIONS = {"config": "--config", "pkcs11_module": "--pkcs11-module", "pin_file": "--pin-file"}
VALUE_OPTIONS |= {"log_file": "--log-file"}
FLAG_OPTIONS = {"allow_other": "--allow-other", "debug": "--debug"}
# For mount(8), fstab and systemd, or always on in vcfs: accepted and dropped.
IGNORED = {"defaults", "auto", "noauto", "nofail", "_netdev", "user", "users", "nouser", "owner", "group"}
IGNORED |= {"default_permissions", "dev", "suid"} | set(ALWAYS_ON)  # nodev,nosuid are always on
# atime policies libfuse does not pass on (the kernel's relatime applies) and the async default
IGNORED |= {"atime", "relatime", "diratime", "nodiratime", "strictatime", "lazytime", "async"}
IGNORED_PREFIXES = ("x-", "comment=", "_")


def _options(text: str) -> list[str]:
    """vcfs mount arguments for one ``-o`` list."""
    out: list[str] = []
    flags: list[str] = []
    for opt in filter(None, (o.strip() for o in text.split(","))):
        name, eq, value = opt.partition("=")
        if name in ("pin", "user_pin", "so_pin"):
            raise UsageError(
                f"mount option {name}= would put the HSM PIN on a command line",
                hint="use pin_file=FILE (mode 0600) or the systemd credential hsm-pin",
            )
        if name in VALUE_OPTIONS:
            if not eq or not value:
                raise UsageError(f"mount option {name} needs a value ({name}=...)")
            out += [VALUE_OPTIONS[name], value]
        elif opt in FLAG_OPTIONS:
            out.append(FLAG_OPTIONS[opt])
        elif opt in FUSE_FLAGS:
            flags.append(opt)
        elif opt in IGNORED or opt.startswith(IGNORED_PREFIXES):
            continue
        else:
            raise UsageError(
                f"unknown mount option {opt!r}",
                hint="vcfs takes config=, pkcs11_module=, pin_file=, log_file=, allow_other, debug and the mount "
                f"flags {', '.join(sorted(FUSE_FLAGS))}",
            )
    if flags:
        out += ["-o", ",".join(flags)]
    return out


def mount_argv(args: list[str]) -> list[str] | None:
    """``vcfs`` arguments for a mount(8) helper call, or None for a fake mount (``-f``)."""
    positional: list[str] = []
    out: list[str] = []
    fake = False
    it = iter(args)
    for arg in it:
        if arg == "-o":
            out += _options(next(it, ""))
        elif arg.startswith("-o") and len(arg) > 2:
            out += _options(arg[2:])
        elif arg in ("-t", "-N"):
            value = next(it, "")
            if arg == "-N":
                raise UsageError(f"vcfs cannot mount into another namespace (-N {value})")
        elif arg.startswith("-") and len(arg) > 1 and set(arg[1:]) <= set("sfnvrw"):
            fake = fake or "f" in arg
            if "r" in arg:
                out += ["-o", "ro"]
        elif arg.startswith("-"):
            raise UsageError(f"unknown mount helper argument {arg!r}")
        else:
            positional.append(arg)
    if len(positional) != 2:
        raise UsageError("usage: mount.vcfs BACKING MOUNTPOINT [-o OPTIONS]")
    if fake:
        return None
    return ["mount", *positional, *out]
