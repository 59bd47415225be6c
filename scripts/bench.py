"""Side-by-side benchmark of vcfs: see scripts/bench --help and docs/PERFORMANCE.md.

Runs the same workloads, interleaved and repeated, on a plain directory, vcfs, gocryptfs and
a no-crypto pyfuse3 passthrough (the ceiling of a Python FUSE daemon), all on the same disk
in one run, and reports medians, min-max and ratios. Speed is only ever compared within one
run: this machine is shared and noisy.

The encrypted-names cost has its own workload and target: ``ls_lR_5000`` on ``vcfs`` (names
encrypted, the default) and ``vcfs-plain`` (a ``--plain-names`` store). Run it alone with
``scripts/bench --names`` (= ``--only ls_lR_5000 --targets vcfs,vcfs-plain``).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
MiB = 1 << 20


def sh(*args: str, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), check=True, capture_output=True, text=True, **kw)  # type: ignore[call-overload]


def drop_caches() -> None:
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        print("bench: warning: cannot drop caches (not root?); 'cold' numbers are warm", file=sys.stderr)


def wait_mounted(mnt: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.ismount(mnt):
            return
        time.sleep(0.05)
    raise RuntimeError(f"{mnt} did not mount")


@dataclass
class Target:
    name: str
    mnt: Path
    pid: int | None = None  # daemon, for CPU and RSS
    stop: Callable[[], object] = lambda: None
    backing: Path | None = None  # vcfs only: its store, for the fsck workload
    env: dict[str, str] | None = None
    restart: Callable[[], object] | None = None  # a fresh daemon (cold caches); None: nothing to restart

    def cpu_seconds(self) -> float:
        if self.pid is None:
            return 0.0
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def peak_rss_mib(self) -> float | None:
        if self.pid is None:
            return None
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return None


class MachineLoad:
    """How busy the machine was with work that is not this benchmark's: CPU time of the whole
    machine minus the bench's own (this process, its clients such as dd and fio, the daemons of
    the targets), as a percentage of all CPUs. This machine is shared: the number says how much
    to trust a run."""

    def __init__(self, targets: list[Target]) -> None:
        self.targets = targets
        self.samples: list[float] = []
        self._start: tuple[float, float, float] | None = None

    def _now(self) -> tuple[float, float, float]:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        hz = os.sysconf("SC_CLK_TCK")
        total = sum(fields[:8]) / hz
        idle = (fields[3] + fields[4]) / hz
        t = os.times()
        ours = t.user + t.system + t.children_user + t.children_system + sum(x.cpu_seconds() for x in self.targets)
        return total, total - idle, ours

    def start(self) -> None:
        self._start = self._now()

    def stop(self) -> float:
        assert self._start is not None
        total, busy, ours = (b - a for a, b in zip(self._start, self._now(), strict=True))
        pct = max(0.0, (busy - ours) / total * 100) if total > 0 else 0.0
        self.samples.append(pct)
        return pct

    def summary(self) -> dict[str, float]:
        if not self.samples:
            return {}
        return {"other_cpu_pct_median": statistics.median(self.samples), "other_cpu_pct_max": max(self.samples),
                "loadavg_end": os.getloadavg()[0]}


def pid_of(pattern: str) -> int | None:
    res = subprocess.run(["pgrep", "-n", "-f", pattern], capture_output=True, text=True)
    return int(res.stdout.split()[0]) if res.stdout.strip() else None


def setup_targets(work: Path, names: list[str]) -> list[Target]:
    targets = []
    if "plain" in names:
        (work / "plain").mkdir()
        targets.append(Target("plain", work / "plain"))
    for name in ("vcfs", "vcfs-plain"):
        if name in names:
            targets.append(setup_vcfs(work, name, ["--plain-names"] if name == "vcfs-plain" else []))
    if "vcfs-audit" in names:  # the same daemon with an access policy and an audit trail
        env = {**os.environ, "VCFS_HOME": str(work / "vcfs-home")}
        mnt = work / "vcfs-audit-mnt"
        mnt.mkdir()
        policy = work / "bench-policy.toml"
        policy.write_text(AUDIT_POLICY.format(uid=os.getuid()))
        sh(PY, "-m", "vcfs", "init", str(work / "vcfs-audit-store"), env=env)
        sh(PY, "-m", "vcfs", "mount", str(work / "vcfs-audit-store"), str(mnt), "--policy", str(policy),
           "--audit-dir", str(work / "audit"), env=env)
        targets.append(Target("vcfs-audit", mnt, pid_of(f"vcfs mount -f .*{mnt}"),
                              lambda mnt=mnt, env=env: sh(PY, "-m", "vcfs", "umount", str(mnt), env=env)))
    if "gocryptfs" in names and shutil.which("gocryptfs"):
        cipher, mnt = work / "gc-cipher", work / "gc-mnt"
        cipher.mkdir()
        mnt.mkdir()
        sh("gocryptfs", "-init", "-q", "-extpass", "echo benchpass", str(cipher))
        sh("gocryptfs", "-q", "-extpass", "echo benchpass", "-allow_other", str(cipher), str(mnt))
        wait_mounted(mnt)
        targets.append(Target("gocryptfs", mnt, pid_of(f"gocryptfs.*{mnt}"),
                              lambda mnt=mnt: sh("fusermount3", "-u", str(mnt))))
    elif "gocryptfs" in names:
        print("bench: gocryptfs not installed (apt-get install gocryptfs); skipping it", file=sys.stderr)
    if "passthrough" in names:
        src, mnt = work / "pt-src", work / "pt-mnt"
        src.mkdir()
        mnt.mkdir()
        proc = subprocess.Popen([PY, str(ROOT / "scripts" / "bench_passthrough.py"), str(src), str(mnt)])
        wait_mounted(mnt)
        targets.append(Target("passthrough", mnt, proc.pid,
                              lambda mnt=mnt, proc=proc: (sh("fusermount3", "-u", str(mnt)), proc.wait())))
    return targets


def setup_vcfs(work: Path, name: str, init_args: list[str]) -> Target:
    env = {**os.environ, "VCFS_HOME": str(work / "vcfs-home")}
    store, mnt = work / f"{name}-store", work / f"{name}-mnt"
    mnt.mkdir()
    sh(PY, "-m", "vcfs", "init", str(store), *init_args, env=env)
    sh(PY, "-m", "vcfs", "mount", str(store), str(mnt), env=env)
    def stop() -> None:
        sh(PY, "-m", "vcfs", "umount", str(mnt), env=env)

    t = Target(name, mnt, pid_of(f"vcfs mount -f .*{mnt}"), stop, store, env)

    def restart() -> None:
        sh(PY, "-m", "vcfs", "umount", str(mnt), env=env)
        sh(PY, "-m", "vcfs", "mount", str(store), str(mnt), env=env)
        t.pid = pid_of(f"vcfs mount -f .*{mnt}")

    t.restart = restart
    return t


# ---- workloads: each returns {metric: value}; "s" suffix = seconds (lower is better) ----------


def w_seq_write(t: Target, size: int, bs: int) -> dict[str, float]:
    path = t.mnt / f"seq-{bs}"
    cpu0, t0 = t.cpu_seconds(), time.monotonic()
    sh("dd", "if=/dev/zero", f"of={path}", f"bs={bs}", f"count={size // bs}", "conv=fsync")
    wall = time.monotonic() - t0
    return {"MiB/s": size / MiB / wall, "cpu_s_per_GiB": (t.cpu_seconds() - cpu0) / (size / 2**30)}


def prepare(path: Path, cold: bool) -> None:
    """Cold: nothing cached anywhere. Warm: the file was just read once through this mount
    (other targets' runs in between drop caches, so warmth is made here, not assumed)."""
    if cold:
        drop_caches()
    else:
        sh("dd", f"if={path}", "of=/dev/null", f"bs={MiB}")


def w_seq_read(t: Target, size: int, cold: bool) -> dict[str, float]:
    path = t.mnt / f"seq-{MiB}"
    prepare(path, cold)
    cpu0, t0 = t.cpu_seconds(), time.monotonic()
    sh("dd", f"if={path}", "of=/dev/null", f"bs={MiB}")
    wall = time.monotonic() - t0
    return {"MiB/s": size / MiB / wall, "cpu_s_per_GiB": (t.cpu_seconds() - cpu0) / (size / 2**30)}


def w_rand_read(t: Target, size: int, cold: bool, count: int = 2000) -> dict[str, float]:
    path = t.mnt / f"seq-{MiB}"
    prepare(path, cold)
    rng = random.Random(7)
    offsets = [rng.randrange(0, size // 4096) * 4096 for _ in range(count)]
    fd = os.open(path, os.O_RDONLY)  # a fresh open: warm reads must survive it (keep_cache)
    try:
        t0 = time.monotonic()
        for off in offsets:
            os.pread(fd, 4096, off)
        wall = time.monotonic() - t0
    finally:
        os.close(fd)
    return {"IOPS": count / wall}


def w_fsck(t: Target) -> dict[str, float]:
    """vcfs only: vcfs fsck of the store next to cat of the same backing files, both from a cold
    cache in the same run (docs/RELIABILITY.md: fsck reads at close to disk speed)."""
    if t.backing is None:
        return {}
    files = [str(p) for p in (t.backing / "files").rglob("*") if p.is_file()]
    total = sum(os.path.getsize(p) for p in files) / MiB
    drop_caches()
    t0 = time.monotonic()
    subprocess.run(["cat", *files], stdout=subprocess.DEVNULL, check=True)
    cat = time.monotonic() - t0
    drop_caches()
    t0 = time.monotonic()
    sh(PY, "-m", "vcfs", "fsck", str(t.backing), env=t.env)
    fsck = time.monotonic() - t0
    return {"cat_MiB/s": total / cat, "fsck_MiB/s": total / fsck, "fsck_vs_cat": cat / fsck}


def w_metadata(t: Target, n: int = 5000) -> dict[str, float]:
    d = t.mnt / "meta"
    d.mkdir()
    t0 = time.monotonic()
    for i in range(n):
        (d / f"f{i}").write_bytes(b"x" * 100)
    for i in range(n):
        os.stat(d / f"f{i}")
    for i in range(n):
        os.unlink(d / f"f{i}")
    wall = time.monotonic() - t0
    d.rmdir()
    return {"s": wall}


def w_ls_lR(t: Target, dirs: int = 50, per_dir: int = 100) -> dict[str, float]:
    """``ls -lR`` over dirs x per_dir files with recording-like names (30-60 bytes).

    cold_s: a fresh daemon (empty name caches) and dropped kernel caches; warm_s: dropped kernel
    caches only, so every entry is listed and looked up again through the daemon's name caches.
    *_cpu_s: the daemon's CPU time for the same run (less at the mercy of a busy machine).
    """
    root = t.mnt / "names"
    if not root.exists():  # built once per target, outside the timing
        for d in range(dirs):
            sub = root / f"2026-11-{d % 28 + 1:02d}_channel-{d:03d}_customer-acme-{d * 7919 % 1000:03d}"
            sub.mkdir(parents=True)
            for i in range(per_dir):
                name = f"call_uid{d * per_dir + i}_meeting-{i * 31 % 997:03d}_2026-11-28T10{i % 60:02d}.mp4"
                (sub / name).write_bytes(b"")
    out: dict[str, float] = {}
    for label, restart in (("cold_s", True), ("warm_s", False)):
        if restart and t.restart is not None:
            t.restart()
        drop_caches()
        cpu0, t0 = t.cpu_seconds(), time.monotonic()
        with open(os.devnull, "wb") as devnull:
            subprocess.run(["ls", "-lR", str(root)], check=True, stdout=devnull)
        out[label] = time.monotonic() - t0
        if t.pid is not None:
            out[label.replace("_s", "_cpu_s")] = t.cpu_seconds() - cpu0
    return out


def w_ffmpeg(t: Target) -> dict[str, float]:
    out = t.mnt / "rec.mp4"
    t0 = time.monotonic()
    sh("ffmpeg", "-y", "-loglevel", "error", "-f", "lavfi", "-i", "testsrc=duration=20:size=1280x720:rate=25",
       "-f", "lavfi", "-i", "sine=duration=20", "-c:v", "mpeg4", "-q:v", "3", "-c:a", "aac", "-fflags", "+bitexact",
       "-movflags", "+faststart", str(out))
    wall = time.monotonic() - t0
    out.unlink()
    return {"s": wall}


RECORDER_RATE = 4_000_000 // 8  # bytes/s: a 4 Mbit/s stream
FSYNC_EVERY = 15  # writes: 4-64 KiB pieces average 34 KiB, so at 4 Mbit/s about one fsync a second


def _merged_percentiles(jobs: list[dict], key: str) -> tuple[float, float, float]:
    """p50, p99 and max in ms over every job's latency histogram (fio json+ bins: ns -> count)."""
    bins: dict[int, int] = {}
    top = 0.0
    for job in jobs:
        lat = job["sync" if key == "sync" else "write"]["lat_ns" if key == "sync" else "clat_ns"]
        top = max(top, float(lat.get("max", 0)))
        for ns, count in lat.get("bins", {}).items():
            bins[int(ns)] = bins.get(int(ns), 0) + count
    total = sum(bins.values())
    if not total:
        return 0.0, 0.0, 0.0
    out, seen, marks = [], 0, [0.5, 0.99]
    for ns in sorted(bins):
        seen += bins[ns]
        while marks and seen >= marks[0] * total:
            out.append(ns / 1e6)
            marks.pop(0)
    return out[0], out[1], top / 1e6


def w_recorders(t: Target, n: int, seconds: float) -> dict[str, float]:
    """n streams at 4 Mbit/s, run by fio (one thread each: a C client, so 1024 of them do not
    measure Python's GIL): 4-64 KiB write(2)s, an fsync every 15 writes (about once a second).
    Latency of each write call and of each fsync, over all streams; how many streams fell more
    than 5 % behind their rate; the daemon's CPU per GiB written."""
    if shutil.which("fio") is None:
        print("bench: fio not installed (apt-get install fio); skipping the recorder workload", file=sys.stderr)
        return {}
    d = t.mnt / "recorders"
    d.mkdir()
    cmd = ["fio", "--name=rec", f"--directory={d}", "--ioengine=psync", "--rw=write", "--bsrange=4k-64k",
           f"--rate={RECORDER_RATE}", f"--fsync={FSYNC_EVERY}", "--time_based", f"--runtime={seconds:g}",
           "--size=1g", "--fallocate=none", f"--numjobs={n}", "--thread", "--filename_format=stream.$jobnum",
           "--output-format=json+"]
    cpu0 = t.cpu_seconds()
    res = subprocess.run(cmd, capture_output=True, text=True)
    cpu = t.cpu_seconds() - cpu0
    try:
        jobs = json.loads(res.stdout[res.stdout.index("{"):])["jobs"]
    except ValueError:
        raise RuntimeError(f"fio failed on {t.name}: {res.stderr.strip()[-500:]}") from None
    shutil.rmtree(d)
    written = sum(j["write"]["io_bytes"] for j in jobs)
    behind = sum(1 for j in jobs if j["write"]["io_bytes"] < 0.95 * RECORDER_RATE * seconds)
    p50, p99, top = _merged_percentiles(jobs, "write")
    s50, s99, stop = _merged_percentiles(jobs, "sync")
    return {"p50_ms": p50, "p99_ms": p99, "max_ms": top, "fsync_p50_ms": s50, "fsync_p99_ms": s99,
            "fsync_max_ms": stop, "streams_behind": behind, "MiB/s": written / MiB / seconds,
            **({"cpu_s_per_GiB": cpu / (written / 2**30)} if t.pid is not None and written else {})}


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def soak(t: Target, n: int, seconds: float, every: float = 10.0) -> dict[str, object]:
    """The recorder workload for ``seconds`` on one target, the daemon's RSS sampled every
    ``every`` seconds: memory must stay flat (docs/PERFORMANCE.md, "Memory")."""
    assert t.pid is not None
    samples: list[tuple[float, float]] = []
    stop = threading.Event()

    def sample() -> None:
        t0 = time.monotonic()
        while not stop.wait(every):
            samples.append((round(time.monotonic() - t0, 1), rss_mib(t.pid)))  # type: ignore[arg-type]

    th = threading.Thread(target=sample)
    before = rss_mib(t.pid)
    th.start()
    try:
        result = w_recorders(t, n, seconds)
    finally:
        stop.set()
        th.join()
    return {"target": t.name, "streams": n, "seconds": seconds, "rss_before_mib": before, "rss_mib": samples,
            "rss_after_mib": rss_mib(t.pid), "recorders": result}


AUDIT_POLICY = """
[policy.principals.recorder]
uids = [{uid}]

[[policy.rules]]
paths = ["/**"]
principals = ["recorder"]
allow = ["recorder", "list", "delete"]
"""


def w_segments(t: Target, n: int, seconds: float, segment: int, rate: float | None) -> dict[str, float]:
    """n recorder streams cutting segments of ``segment`` bytes (one create, writes, close each: one audit
    session per segment), 4-64 KiB pieces, fsync every second; at ``rate`` bytes/s each, or flat out."""
    lat: list[float] = []
    total = [0, 0]  # bytes, segments
    lock = threading.Lock()

    def stream(i: int) -> None:
        rng = random.Random(i)
        mine: list[float] = []
        written = segs = 0
        start = last_sync = time.monotonic()
        f = None
        while (now := time.monotonic()) - start < seconds:
            if rate is not None and written >= (now - start) * rate:
                time.sleep(min(0.05, (written - (now - start) * rate) / rate))
                continue
            if f is None or f.tell() >= segment:
                if f is not None:
                    f.close()
                f = open(t.mnt / f"seg-{i}-{segs}", "wb", buffering=0)  # noqa: SIM115
                segs += 1
            piece = rng.randrange(4096, 65537)
            t0 = time.monotonic()
            f.write(b"\0" * piece)
            mine.append(time.monotonic() - t0)
            written += piece
            if now - last_sync >= 1.0:
                os.fsync(f.fileno())
                last_sync = now
        if f is not None:
            f.close()
        with lock:
            lat.extend(mine)
            total[0] += written
            total[1] += segs

    t0 = time.monotonic()
    threads = [threading.Thread(target=stream, args=(i,)) for i in range(n)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.monotonic() - t0
    for p in t.mnt.glob("seg-*"):
        p.unlink()
    lat.sort()
    return {"MiB/s": total[0] / MiB / wall, "segments": total[1], "p50_ms": lat[len(lat) // 2] * 1000,
            "p99_ms": lat[int(len(lat) * 0.99)] * 1000}


def audit_report(res: Results) -> dict[str, object]:
    """vcfs with vs without auditing: median of each metric and the change (targets: docs/PERFORMANCE.md)."""
    out: dict[str, object] = {}
    print(f"{'workload':<24} {'metric':<10} {'vcfs':>10} {'vcfs-audit':>11} {'change':>8}")
    for wl, by_target in res.runs.items():
        out[wl] = {}
        for m in by_target.get("vcfs", {}):
            off = statistics.median(by_target["vcfs"][m])
            on = statistics.median(by_target["vcfs-audit"][m])
            change = (on - off) / off * 100 if off else 0.0
            out[wl][m] = {"off": off, "on": on, "change_pct": change,  # type: ignore[index]
                          "off_runs": by_target["vcfs"][m], "on_runs": by_target["vcfs-audit"][m]}
            print(f"{wl:<24} {m:<10} {off:>10.2f} {on:>11.2f} {change:>+7.1f}%")
    return out


def run_audit_bench(args: argparse.Namespace, work: Path) -> dict[str, object]:
    """The recorder workload with auditing off and on, interleaved, in one run."""
    targets = setup_targets(work, ["vcfs", "vcfs-audit"])
    res = Results()
    n = int(args.audit_streams)
    plan = [
        (f"segments_flat_out_{n}", lambda t: w_segments(t, n, args.recorder_seconds, 8 * MiB, None)),
        (f"segments_4mbit_{4 * n}", lambda t: w_segments(t, 4 * n, args.recorder_seconds, 2 * MiB, 4e6 / 8)),
    ]
    try:
        for rep in range(args.repeat):
            for wl, fn in plan:
                order = targets if rep % 2 == 0 else list(reversed(targets))
                for t in order:
                    print(f"[{rep + 1}/{args.repeat}] {wl} on {t.name}", file=sys.stderr)
                    res.add(wl, t.name, fn(t))
    finally:
        for t in targets:
            t.stop()
    data = audit_report(res)
    env = {**os.environ, "VCFS_HOME": str(work / "vcfs-home")}
    check = subprocess.run([PY, "-m", "vcfs", "audit", "verify", "--json", str(work / "audit")], env=env,
                           capture_output=True, text=True)
    verdict = json.loads(check.stdout) if check.stdout else {"error": check.stderr}
    print(f"audit log of the run: {verdict.get('records')} records, verify: {verdict.get('state')}")
    return {"audit": data, "audit_log": {k: verdict.get(k) for k in ("records", "checkpoints", "state")},
            "repeat": args.repeat, "streams": n}


# ---- driver ---------------------------------------------------------------------------------


@dataclass
class Results:
    runs: dict[str, dict[str, dict[str, list[float]]]] = field(default_factory=dict)  # workload/target/metric

    def add(self, workload: str, target: str, metrics: dict[str, float]) -> None:
        slot = self.runs.setdefault(workload, {}).setdefault(target, {})
        for k, v in metrics.items():
            slot.setdefault(k, []).append(v)


HIGHER_IS_BETTER = {"MiB/s", "IOPS", "cat_MiB/s", "fsck_MiB/s", "fsck_vs_cat"}
TIME_METRICS = {"s", "cold_s", "warm_s", "cold_cpu_s", "warm_cpu_s"}
NO_RATIO = {"other_cpu_pct"}  # about the machine, not the target


def report(res: Results, extra: dict[str, object]) -> dict[str, object]:
    out: dict[str, object] = {"workloads": {}, **extra}
    lines = [f"{'workload':<26} {'metric':<14} {'target':<12} {'median':>10} {'min-max':>21}  ratios (vcfs vs)"]
    for wl, by_target in res.runs.items():
        table: dict[str, dict[str, dict[str, float]]] = {}
        for tname, metrics in by_target.items():
            for m, vals in metrics.items():
                table.setdefault(m, {})[tname] = {"median": statistics.median(vals), "min": min(vals), "max": max(vals)}
        out["workloads"][wl] = table  # type: ignore[index]
        for m, per in table.items():
            for tname, s in per.items():
                ratio = ""
                if tname == "vcfs" and m not in NO_RATIO:
                    parts = []
                    for base in ("plain", "vcfs-plain", "gocryptfs", "passthrough"):
                        if base in per and per[base]["median"] and s["median"]:
                            r = s["median"] / per[base]["median"]
                            if m not in HIGHER_IS_BETTER:
                                r = 1 / r if r else float("inf")  # >1 always means vcfs is better
                            parts.append(f"{base} {r:.2f}x")
                    ratio = ", ".join(parts)
                lines.append(f"{wl:<26} {m:<14} {tname:<12} {s['median']:>10.2f} "
                             f"{s['min']:>10.2f}-{s['max']:<10.2f}  {ratio}")
    print("\n".join(lines))
    print("(ratios: >1 means vcfs is faster/better than that baseline, for every metric)")
    return out


def chart(data: dict[str, object], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("bench: matplotlib not installed; no chart (pip install matplotlib)", file=sys.stderr)
        return
    wls = data["workloads"]  # type: ignore[index]
    rows = [(wl, m) for wl, t in wls.items() for m in t if m in HIGHER_IS_BETTER or m in TIME_METRICS]  # type: ignore[union-attr]
    fig, axes = plt.subplots(len(rows), 1, figsize=(8, 1.6 * len(rows) + 1))
    for ax, (wl, m) in zip(axes if len(rows) > 1 else [axes], rows, strict=False):
        per = wls[wl][m]  # type: ignore[index]
        names = list(per)
        ax.barh(names, [per[n]["median"] for n in names], xerr=[[per[n]["median"] - per[n]["min"] for n in names],
                                                               [per[n]["max"] - per[n]["median"] for n in names]])
        ax.set_title(f"{wl} ({m})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    print(f"chart: {path}")


def machine() -> dict[str, object]:
    """What the run ran on, for the report."""
    info: dict[str, object] = {"cpus": os.cpu_count(), "kernel": os.uname().release}
    try:
        mem = Path("/proc/meminfo").read_text().split("\n", 1)[0].split()
        info["mem_gib"] = round(int(mem[1]) / 2**20, 1)
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except (OSError, IndexError, ValueError):
        pass
    return info


def main() -> int:
    ap = argparse.ArgumentParser(prog="scripts/bench", description=__doc__)
    ap.add_argument("--size", default="1024", help="MiB for sequential workloads (default 1024)")
    ap.add_argument("--repeat", type=int, default=3, help="interleaved repetitions (default 3)")
    ap.add_argument("--targets", default="plain,vcfs,gocryptfs,passthrough")
    ap.add_argument("--recorders", default="64,256,1024", help="stream counts for the recorder workload")
    ap.add_argument("--recorder-seconds", type=float, default=10)
    ap.add_argument("--skip", default="", help="comma list of workloads to skip (seq_write_4k,recorders,...)")
    ap.add_argument("--workloads", default="", help="'audit': only the recorder workload with auditing off vs on")
    ap.add_argument("--audit-streams", default="8", help="recorder streams of the audit workload (default 8)")
    ap.add_argument("--only", default="", help="comma list of workloads to run (default: all)")
    ap.add_argument("--names", action="store_true", help="only the encrypted-names workload: "
                    "--only ls_lR_5000 --targets vcfs,vcfs-plain")
    ap.add_argument("--workdir", default="/var/tmp/vcfs-bench", help="same disk as the backing store you care about")
    ap.add_argument("--out", default="bench-results", help="directory for JSON and PNG")
    ap.add_argument("--rewrap", type=int, metavar="N", help="only the rewrap workload: N files (e.g. 10000), "
                    "headers/s against the HSM's unwrap+wrap ceiling; writes OUT/rewrap.json")
    ap.add_argument("--rewrap-jobs", type=int, default=2, metavar="J", help="worker processes for the second "
                    "rewrap of each round (default 2)")
    ap.add_argument("--ingest", type=int, metavar="N", help="only the ingest workloads: N new files on an ingest "
                    "mount vs a normal mount, then the recorder workloads (--audit-streams streams); "
                    "writes OUT/bench-ingest.json")
    ap.add_argument("--soak", type=float, metavar="SECONDS", help="only the soak: --soak-streams recorders on "
                    "vcfs for SECONDS (e.g. 600), the daemon's RSS every 10 s; writes OUT/soak.json")
    ap.add_argument("--soak-streams", type=int, default=256, help="recorder streams of the soak (default 256)")
    args = ap.parse_args()
    if args.names:
        args.only, args.targets = "ls_lR_5000", "vcfs,vcfs-plain"
    size = int(args.size) * MiB
    work = Path(args.workdir)
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    if args.workloads == "audit":
        data = run_audit_bench(args, work)
        out = Path(args.out)
        out.mkdir(exist_ok=True)
        (out / "bench-audit.json").write_text(json.dumps(data, indent=2))
        print(f"json: {out / 'bench-audit.json'}")
        shutil.rmtree(work, ignore_errors=True)
        return 0
    if args.ingest:
        sys.path.insert(0, str(ROOT / "scripts"))
        import bench_ingest

        data = bench_ingest.run(work, args.repeat, args.ingest, int(args.audit_streams), args.recorder_seconds)
        out = Path(args.out)
        out.mkdir(exist_ok=True)
        (out / "bench-ingest.json").write_text(json.dumps(data, indent=2))
        print(f"json: {out / 'bench-ingest.json'}")
        shutil.rmtree(work, ignore_errors=True)
        return 0
    if args.rewrap:
        sys.path.insert(0, str(ROOT / "scripts"))
        import bench_rewrap

        data = bench_rewrap.run(work, args.rewrap, args.repeat, args.rewrap_jobs)
        out = Path(args.out)
        out.mkdir(exist_ok=True)
        (out / "rewrap.json").write_text(json.dumps(data, indent=2))
        print(f"json: {out / 'rewrap.json'}")
        shutil.rmtree(work, ignore_errors=True)
        return 0
    if args.soak:
        (t,) = setup_targets(work, ["vcfs"])
        try:
            data = soak(t, args.soak_streams, args.soak)
        finally:
            t.stop()
        data["machine"] = machine()
        out = Path(args.out)
        out.mkdir(exist_ok=True)
        (out / "soak.json").write_text(json.dumps(data, indent=2))
        rss = [r for _, r in data["rss_mib"]] or [data["rss_after_mib"]]  # type: ignore[union-attr]
        print(f"soak: {args.soak_streams} streams for {args.soak:g} s; daemon RSS {data['rss_before_mib']:.0f} MiB "
              f"before, {min(rss):.0f}-{max(rss):.0f} MiB during, {data['rss_after_mib']:.0f} after; "
              f"{data['recorders']}")
        print(f"json: {out / 'soak.json'}")
        shutil.rmtree(work, ignore_errors=True)
        return 0
    skip = set(filter(None, args.skip.split(",")))
    only = set(filter(None, args.only.split(",")))
    targets = setup_targets(work, args.targets.split(","))
    res = Results()
    try:
        plan: list[tuple[str, Callable[[Target], dict[str, float]]]] = [
            ("seq_write_1M", lambda t: w_seq_write(t, size, MiB)),
            ("seq_write_4k", lambda t: w_seq_write(t, size, 4096)),
            ("seq_read_cold", lambda t: w_seq_read(t, size, cold=True)),
            ("seq_read_warm", lambda t: w_seq_read(t, size, cold=False)),
            ("rand_4k_read_cold", lambda t: w_rand_read(t, size, cold=True)),
            ("rand_4k_read_warm", lambda t: w_rand_read(t, size, cold=False)),
            ("fsck", w_fsck),
            ("metadata_5000", w_metadata),
            ("ls_lR_5000", w_ls_lR),
            ("ffmpeg_record_20s", w_ffmpeg),
        ]
        for n in filter(None, args.recorders.split(",")):
            plan.append((f"recorders_{n}", lambda t, n=int(n): w_recorders(t, n, args.recorder_seconds)))
        load = MachineLoad(targets)
        for rep in range(args.repeat):
            for wl, fn in plan:
                if wl in skip or wl.split("_")[0] in skip or (only and wl not in only):
                    continue
                order = targets if rep % 2 == 0 else list(reversed(targets))
                for t in order:
                    print(f"[{rep + 1}/{args.repeat}] {wl} on {t.name}", file=sys.stderr)
                    load.start()
                    metrics = fn(t)
                    metrics["other_cpu_pct"] = load.stop()
                    res.add(wl, t.name, metrics)
        extra = {"peak_rss_mib": {t.name: t.peak_rss_mib() for t in targets}, "size_mib": size // MiB,
                 "repeat": args.repeat, "machine": machine(), "load": load.summary()}
    finally:
        for t in targets:
            try:
                t.stop()
            except subprocess.CalledProcessError as exc:
                print(f"bench: could not stop {t.name}: {exc.stderr}", file=sys.stderr)
    data = report(res, extra)
    print("peak daemon RSS (MiB):", extra["peak_rss_mib"])
    out = Path(args.out)
    out.mkdir(exist_ok=True)
    (out / "bench.json").write_text(json.dumps(data, indent=2))
    print(f"json: {out / 'bench.json'}")
    chart(data, out / "bench.png")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
