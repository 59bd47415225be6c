"""The human-readable form of a mount's status reply (``vcfs status`` without ``--json``)."""

from __future__ import annotations

from typing import Any


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def _duration(seconds: float) -> str:
    s = int(seconds)
    days, s = divmod(s, 86400)
    hours, s = divmod(s, 3600)
    minutes, s = divmod(s, 60)
    parts = [f"{days}d"] if days else []
    parts += [f"{hours}h"] if hours or days else []
    return " ".join([*parts, f"{minutes}m", f"{s}s"])


def render_status(st: dict[str, Any]) -> str:
    keys, hsm = st["keys"], st["hsm"]
    domains = "; ".join(
        f"{d['name']}: new files under {d['current']}; "
        + ", ".join(f"v{v['version']} {v['state']}" for v in d["versions"])
        for d in keys["domains"]
    )
    if keys.get("ingest"):  # an ingest mount wraps to recipients, never under these KEKs
        domains = "ingest only, no HSM: new files to recipient " + ", ".join(keys["ingest"])
    in_use = "; ".join(
        f"{kek}: " + ", ".join(f"{n} {op}" for op, n in sorted(ops.items()))
        for kek, ops in sorted(keys["in_use"].items())
    )
    calls, errors = sum(hsm["calls"].values()), sum(hsm["errors"].values())
    hsm_line = (
        f"{hsm['state']}; {calls} calls, {errors} failed; latency last {hsm['last_latency_ms']:.2f} ms, "
        f"mean {hsm['mean_latency_ms']:.2f} ms, max {hsm['max_latency_ms']:.2f} ms"
    )
    if hsm.get("unavailable_reason"):
        hsm_line += f" ({hsm['unavailable_reason']})"
    elif hsm.get("last_error"):
        hsm_line += f"; last error {hsm['last_error_time']}: {hsm['last_error']}"
    since = f"{st['mounted_since']} (up {_duration(st['uptime_seconds'])})" if st["mounted"] else "not yet live"
    metrics = ", ".join(f"{k} {v}" for k, v in sorted(st["metrics"].items())) or "off"
    rows = [
        ("store", f"{st['backing']} (id {str(st['store_id'] or '?')[:12]})"),
        ("mounted since", since),
        ("key domains", domains or "?"),
        ("KEKs in use", in_use or "none since mount"),
        ("open files", str(st["open_files"])),
        (
            "encrypted",
            f"{_size(st['bytes_encrypted'])} ({st['bytes_encrypted']} bytes, {st['blocks_encrypted']} blocks)",
        ),
        (
            "decrypted",
            f"{_size(st['bytes_decrypted'])} ({st['bytes_decrypted']} bytes, {st['blocks_decrypted']} blocks)",
        ),
        ("auth failures", str(st["auth_failures"])),
        ("HSM", hsm_line),
        ("audit alerts", str(st["audit_alerts"])),
        ("metrics", metrics),
    ]
    head = f"vcfs mount {st['mountpoint']} (daemon pid {st['pid']}, uid {st['owner_uid']}, vcfs {st['version']})"
    return "\n".join([head, *(f"  {name:<14} {value}" for name, value in rows)])
