"""Ingest mounts against normal mounts, in one run: scripts/bench --ingest.

Two daemons on the same disk, interleaved and repeated (this machine is shared and noisy, so
only ratios within one run mean anything):

- ``vcfs``: a normal mount; each new file's DEK is wrapped by one HSM call (SoftHSM2 C_WrapKey
  under the KEK).
- ``vcfs-ingest``: an ingest mount of a second store made the same way (encrypted names), run
  with no reachable token at all; each new file's DEK is sealed to the recipient: one X-Wing
  encapsulation (ML-KEM-768 + X25519) in the daemon, no HSM call.

Workloads: ``create_N`` (N small files: create, one 16 KiB write, close; files/s, the cost
that differs), ``segments`` (recorder streams cutting 2 MiB segments flat out: one create per
segment) and ``recorders`` (4 Mbit/s streams into one file each). Also, in this process, the
per-file key cost alone: one HSM wrap versus one encapsulation-and-wrap (us per file).
Target: the ingest mount within 1.2x of the normal one on the recorder workloads.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import bench

PY = sys.executable


def _vcfs(env: dict[str, str], *args: str) -> None:
    subprocess.run([PY, "-m", "vcfs", *args], check=True, capture_output=True, text=True, env=env)


def setup_ingest(work: Path) -> bench.Target:
    """A store with a recipient, mounted write-only by a daemon that can reach no token."""
    trusted = {**os.environ, "VCFS_HOME": str(work / "vcfs-home")}
    store, mnt, etc = work / "ingest-store", work / "ingest-mnt", work / "ingest-etc"
    mnt.mkdir()
    etc.mkdir()
    _vcfs(trusted, "init", str(store))
    _vcfs(trusted, "keys", "recipient", "new", str(store), "default", "--out", str(etc / "rec.pub"))
    _vcfs(trusted, "keys", "recipient", "names", str(store), "--out", str(etc / "names.key"))
    env = {**os.environ, "VCFS_HOME": str(work / "ingest-home"), "SOFTHSM2_CONF": str(work / "none.conf")}
    _vcfs(
        env, "mount", "--ingest", str(etc / "rec.pub"), "--ingest-names", str(etc / "names.key"), str(store), str(mnt)
    )
    return bench.Target(
        "vcfs-ingest", mnt, bench.pid_of(f"vcfs mount -f .*{mnt}"), lambda: _vcfs(env, "umount", str(mnt)), store, env
    )


def w_create(t: bench.Target, n: int) -> dict[str, float]:
    """n new files of 16 KiB each (create, write, close), in one directory per run."""
    d = t.mnt / f"create-{time.monotonic_ns()}"
    d.mkdir()
    data = os.urandom(16384)
    cpu0 = t.cpu_seconds()
    t0 = time.monotonic()
    for i in range(n):
        with open(d / f"segment-{i:05}.ts", "wb", buffering=0) as f:
            f.write(data)
    wall = time.monotonic() - t0
    cpu = t.cpu_seconds() - cpu0
    for p in d.iterdir():
        p.unlink()
    d.rmdir()
    return {"files/s": n / wall, "daemon_cpu_ms_per_file": cpu / n * 1000}


def key_costs(work: Path, count: int) -> dict[str, float]:
    """Microseconds per file for the one step that differs: an HSM wrap vs an X-Wing wrap."""
    sys.path.insert(0, str(bench.ROOT))
    os.environ["VCFS_HOME"] = str(work / "vcfs-home")
    from vcfs.config import load_config
    from vcfs.core import kemwrap
    from vcfs.keys.recipient import load_public
    from vcfs.keys.setup import HostKeyOptions, open_provider

    public = load_public(work / "ingest-etc" / "rec.pub").public
    provider = open_provider(load_config(work / "ingest-store"), HostKeyOptions())
    try:
        ref = provider.current("default")
        dek = bytearray(os.urandom(32))
        out = {}
        for name, fn in (
            ("hsm_wrap_us", lambda: provider.wrap(ref, dek)),
            ("xwing_wrap_us", lambda: kemwrap.wrap_to(public, dek)),
        ):
            fn()
            t0 = time.perf_counter()
            for _ in range(count):
                fn()
            out[name] = (time.perf_counter() - t0) / count * 1e6
        return out
    finally:
        provider.close()


def run(work: Path, repeat: int, files: int, streams: int, seconds: float) -> dict[str, Any]:
    targets = [bench.setup_vcfs(work, "vcfs", [])]
    targets.append(setup_ingest(work))
    res = bench.Results()
    plan = [
        (f"create_{files}", lambda t: w_create(t, files)),
        (f"segments_flat_out_{streams}", lambda t: bench.w_segments(t, streams, seconds, 2 * bench.MiB, None)),
        (f"recorders_{4 * streams}", lambda t: bench.w_recorders(t, 4 * streams, seconds)),
    ]
    try:
        for rep in range(repeat):
            for wl, fn in plan:
                order = targets if rep % 2 == 0 else list(reversed(targets))
                for t in order:
                    print(f"[{rep + 1}/{repeat}] {wl} on {t.name}", file=sys.stderr)
                    res.add(wl, t.name, fn(t))
    finally:
        for t in targets:
            t.stop()
    out: dict[str, Any] = {"workloads": {}, "repeat": repeat}
    print(f"{'workload':<24} {'metric':<24} {'vcfs':>10} {'vcfs-ingest':>12} {'ingest/vcfs':>12}")
    for wl, by_target in res.runs.items():
        out["workloads"][wl] = {}
        for m in by_target["vcfs"]:
            normal = statistics.median(by_target["vcfs"][m])
            ingest = statistics.median(by_target["vcfs-ingest"][m])
            ratio = ingest / normal if normal else float("nan")
            out["workloads"][wl][m] = {
                "vcfs": normal,
                "vcfs-ingest": ingest,
                "ratio": ratio,
                "vcfs_runs": by_target["vcfs"][m],
                "ingest_runs": by_target["vcfs-ingest"][m],
            }
            print(f"{wl:<24} {m:<24} {normal:>10.2f} {ingest:>12.2f} {ratio:>11.2f}x")
    out["key_cost"] = key_costs(work, 500)
    print("per-file key cost in one process (us):", {k: round(v, 1) for k, v in out["key_cost"].items()})
    return out
