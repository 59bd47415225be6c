"""Rewrap throughput (headers/s) against the HSM's own ceiling, in one run: scripts/bench --rewrap N.

Two ceilings, each measured in a tight loop with the raw python-pkcs11 binding on the same
SoftHSM2 token, KEKs and session, right before and right after each rewrap (this machine is
shared and its speed drifts; ratios are taken against the mean of the two):

- "unwrap+wrap": the HSM's raw rate for one DEK unwrap (C_UnwrapKey under the old KEK, read
  the value, C_DestroyObject) plus one DEK wrap (C_CreateObject, C_WrapKey under the new KEK,
  C_DestroyObject): the two token operations a rewrap replaces, as vcfs does them for any
  file. This is the target's reference.
- "fused": the least token work a rewrap can do at all, which is what vcfs does in rewrap:
  C_UnwrapKey, read the value, C_WrapKey of the same object under the new KEK, C_DestroyObject.

The rewrap is the real command (`vcfs keys rewrap BACKING --json [--jobs J]`), timed by itself
(its "seconds": provider start, tree walk, every header, the final syncfs), plus its CPU time
(children included). Each round rewraps once with one session and once with J workers.
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


def _ceiling(store: Path, count: int) -> dict[str, float]:
    """Pairs per second on the store's token from the old to the new KEK: both ceilings, wall and CPU."""
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
        value = os.urandom(32)

        def new_dek() -> object:
            return session.create_object(
                {Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.KEY_TYPE: KeyType.AES, Attribute.VALUE: value,
                 **template}
            )

        dek = new_dek()
        blob = old_kek.wrap_key(dek, mechanism=mechanism)
        dek.destroy()  # type: ignore[attr-defined]

        def apart() -> None:  # unwrap a DEK, then wrap a DEK: what vcfs does for any file
            obj = old_kek.unwrap_key(ObjectClass.SECRET_KEY, KeyType.AES, blob, mechanism=mechanism, store=False,
                                     template=template)
            got = bytes(obj[Attribute.VALUE])
            obj.destroy()
            obj = session.create_object(
                {Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.KEY_TYPE: KeyType.AES, Attribute.VALUE: got,
                 **template}
            )
            new_kek.wrap_key(obj, mechanism=mechanism)
            obj.destroy()

        def fused() -> None:  # the least a rewrap needs: one unwrapped object, wrapped again
            obj = old_kek.unwrap_key(ObjectClass.SECRET_KEY, KeyType.AES, blob, mechanism=mechanism, store=False,
                                     template=template)
            obj[Attribute.VALUE]
            new_kek.wrap_key(obj, mechanism=mechanism)
            obj.destroy()

        out = {}
        for name, fn in (("apart", apart), ("fused", fused)):
            t0, c0 = time.monotonic(), time.process_time()
            for _ in range(count):
                fn()
            out[name], out[name + "_cpu"] = count / (time.monotonic() - t0), count / (time.process_time() - c0)
        return out
    finally:
        provider.close()


def _rewrap(store: Path, jobs: int) -> dict[str, float]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    out = json.loads(_vcfs("keys", "rewrap", str(store), "--json", "--jobs", str(jobs)).stdout)
    wall = time.monotonic() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if out["failed"] or out["busy"]:
        raise RuntimeError(f"rewrap did not finish cleanly: {out}")
    n = out["rewrapped"]
    return {"headers": n, "per_s": n / out["seconds"], "per_s_wall": n / wall, "per_s_cpu": n / cpu}


def run(work: Path, n: int, repeat: int, jobs: int = 2) -> dict[str, Any]:
    os.environ["VCFS_HOME"] = str(work / "vcfs-home")
    store = work / "rewrap-store"
    _vcfs("init", str(store))
    print(f"rewrap: creating {n} files", file=sys.stderr)
    create_rate = _make_files(store, n)
    count = min(n, 2000)
    rounds = []
    for rep in range(repeat):
        for j in (1, jobs):
            _vcfs("keys", "rotate", str(store), "default")
            c1 = _ceiling(store, count)
            r = _rewrap(store, j)
            c2 = _ceiling(store, count)
            ceil = {k: (c1[k] + c2[k]) / 2 for k in c1}
            row = {
                "jobs": j,
                "headers_per_s": r["per_s"],
                "ceiling_unwrap_wrap_per_s": ceil["apart"],
                "ceiling_fused_per_s": ceil["fused"],
                "ratio": r["per_s"] / ceil["apart"],
                "ratio_fused": r["per_s"] / ceil["fused"],
                "ratio_cpu": r["per_s_cpu"] / ceil["apart_cpu"],
                "ratio_fused_cpu": r["per_s_cpu"] / ceil["fused_cpu"],
            }
            rounds.append(row)
            print(f"[{rep + 1}/{repeat}] jobs {j}: {r['per_s']:.0f} headers/s; "
                  f"ceiling unwrap+wrap {ceil['apart']:.0f}/s "
                  f"(ratio {row['ratio']:.2f}, cpu {row['ratio_cpu']:.2f}), fused {ceil['fused']:.0f}/s "
                  f"(ratio {row['ratio_fused']:.2f}, cpu {row['ratio_fused_cpu']:.2f})", file=sys.stderr)
    summary = {}
    for j in sorted({1, jobs}):
        mine = [r for r in rounds if r["jobs"] == j]
        summary[f"jobs{j}"] = {k: statistics.median(float(r[k]) for r in mine) for k in mine[0] if k != "jobs"}
    one = summary["jobs1"]
    print(f"rewrap of {n} headers, one session (median of {repeat}): {one['headers_per_s']:.0f} headers/s = "
          f"{one['ratio']:.2f} of the HSM's unwrap+wrap rate ({one['ceiling_unwrap_wrap_per_s']:.0f}/s; target >= 0.50)"
          f", {one['ratio_fused']:.2f} of the fused minimum ({one['ceiling_fused_per_s']:.0f}/s); --jobs {jobs}: "
          f"{summary[f'jobs{jobs}']['headers_per_s']:.0f} headers/s")
    return {"files": n, "repeat": repeat, "create_files_per_s": create_rate, "rounds": rounds, "median": summary}
