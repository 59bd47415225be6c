"""Rewrap throughput (headers/s) against the HSM's own ceiling, in one run: scripts/bench --rewrap N.

Ceiling: the least token work a rewrap of one header needs, done in a tight loop with the raw
python-pkcs11 binding on the same SoftHSM2 token, KEKs and session kind: C_UnwrapKey of a
wrapped DEK under the old KEK, C_WrapKey of that object under the new KEK, C_DestroyObject.
It is measured right before and right after each rewrap, because this machine is shared and
its speed drifts; the ratio is taken against the mean of the two. The rewrap is the real
command (`vcfs keys rewrap BACKING --json`), timed by itself (its "seconds": provider start,
tree walk, every header, the final syncfs) and by wall clock, plus its CPU time.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

PY = sys.executable
PER_DIR = 1000


def _vcfs(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PY, "-m", "vcfs", *args], check=True, capture_output=True, text=True)


def _make_files(store: Path, n: int) -> float:
    """n small files written directly with CryptFile (a real HSM wrap each); returns files/s."""
    from vcfs.config import load_config
    from vcfs.cryptfile import create_cryptfile
    from vcfs.keys.setup import HostKeyOptions, open_provider

    provider = open_provider(load_config(store), HostKeyOptions())
    ref = provider.current("default")
    t0 = time.monotonic()
    try:
        for i in range(n):
            d = store / "files" / f"d{i // PER_DIR:03}"
            if i % PER_DIR == 0:
                d.mkdir()
            fd = os.open(d / f"f{i:06}", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            cf = create_cryptfile(fd, str(d), lambda dek: provider.wrap(ref, dek))
            cf.write(0, b"segment %d " % i * 40)
            cf.close()
    finally:
        provider.close()
    return n / (time.monotonic() - t0)


def _ceiling(store: Path, count: int) -> tuple[float, float]:
    """(wall, cpu) unwrap+wrap pairs per second on the store's token, from the old to the new KEK."""
    from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass

    from vcfs.config import load_config
    from vcfs.keys.base import KeyRef
    from vcfs.keys.setup import HostKeyOptions, open_provider

    provider = open_provider(load_config(store), HostKeyOptions())
    try:
        new = provider.current("default")
        new_kek, mech = provider.key_object(new)
        old_kek, _ = provider.key_object(KeyRef("default", new.version - 1))
        session = provider.session_for("default")
        mechanism = Mechanism(mech)
        template = {Attribute.SENSITIVE: False, Attribute.EXTRACTABLE: True, Attribute.TOKEN: False}
        dek = session.create_object(
            {
                Attribute.CLASS: ObjectClass.SECRET_KEY,
                Attribute.KEY_TYPE: KeyType.AES,
                Attribute.VALUE: os.urandom(32),
                **template,
            }
        )
        blob = old_kek.wrap_key(dek, mechanism=mechanism)
        dek.destroy()
        t0, c0 = time.monotonic(), time.process_time()
        for _ in range(count):
            obj = old_kek.unwrap_key(
                ObjectClass.SECRET_KEY, KeyType.AES, blob, mechanism=mechanism, store=False, template=template
            )
            new_kek.wrap_key(obj, mechanism=mechanism)
            obj.destroy()
        return count / (time.monotonic() - t0), count / (time.process_time() - c0)
    finally:
        provider.close()


def _rewrap(store: Path) -> dict[str, float]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    out = json.loads(_vcfs("keys", "rewrap", str(store), "--json").stdout)
    wall = time.monotonic() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if out["failed"] or out["busy"]:
        raise RuntimeError(f"rewrap did not finish cleanly: {out}")
    n = out["rewrapped"]
    return {"headers": n, "per_s": n / out["seconds"], "per_s_wall": n / wall, "per_s_cpu": n / cpu}


def run(work: Path, n: int, repeat: int) -> dict[str, Any]:
    os.environ["VCFS_HOME"] = str(work / "vcfs-home")
    store = work / "rewrap-store"
    _vcfs("init", str(store))
    print(f"rewrap: creating {n} files", file=sys.stderr)
    create_rate = _make_files(store, n)
    rounds = []
    for rep in range(repeat):
        _vcfs("keys", "rotate", str(store), "default")
        c1 = _ceiling(store, min(n, 3000))
        r = _rewrap(store)
        c2 = _ceiling(store, min(n, 3000))
        ceiling, ceiling_cpu = (c1[0] + c2[0]) / 2, (c1[1] + c2[1]) / 2
        rounds.append(
            {
                **r,
                "ceiling_per_s": ceiling,
                "ceiling_per_s_cpu": ceiling_cpu,
                "ratio": r["per_s"] / ceiling,
                "ratio_cpu": r["per_s_cpu"] / ceiling_cpu,
            }
        )
        print(
            f"[{rep + 1}/{repeat}] rewrap {r['per_s']:.0f} headers/s, ceiling {c1[0]:.0f}/{c2[0]:.0f} pairs/s, "
            f"ratio {rounds[-1]['ratio']:.2f} (cpu: {r['per_s_cpu']:.0f} vs {ceiling_cpu:.0f}, "
            f"{rounds[-1]['ratio_cpu']:.2f})",
            file=sys.stderr,
        )
    summary = {
        k: statistics.median(r[k] for r in rounds)
        for k in ("per_s", "per_s_wall", "ceiling_per_s", "ratio", "per_s_cpu", "ceiling_per_s_cpu", "ratio_cpu")
    }
    print(
        f"rewrap of {n} headers: median {summary['per_s']:.0f} headers/s, HSM ceiling {summary['ceiling_per_s']:.0f} "
        f"unwrap+wrap/s, ratio {summary['ratio']:.2f} (target >= 0.50); by CPU time {summary['ratio_cpu']:.2f}"
    )
    return {"files": n, "repeat": repeat, "create_files_per_s": create_rate, "rounds": rounds, "median": summary}
