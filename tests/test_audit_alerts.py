"""Anomaly rules with an injected clock: synthetic traffic fires them, a recording day does not."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime

from vcfs.audit.alerts import Detector
from vcfs.audit.config import AlertConfig, parse_alerts
from vcfs.caller import Caller
from vcfs.tomllines import Problems

MiB = 1 << 20


class Clock:
    """The detector's injectable clock (seconds since the epoch)."""

    def __init__(self, when: str) -> None:
        self.t = datetime.fromisoformat(when).timestamp()

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


def who(uid: int = 2002, exe: str = "/usr/bin/vlc") -> Caller:
    return Caller(uid, uid, 900, 900, exe, "x", "x")


BASE = AlertConfig(
    window_seconds=600, bulk_read_bytes=100 * MiB, bulk_read_files=20, first_read=False, cooldown_seconds=1800,
    working_hours=None,
)  # fmt: skip


def rules(alerts: list) -> list[str]:  # type: ignore[type-arg]
    return [a.rule for a in alerts]


def test_bulk_read_by_bytes_within_the_window() -> None:
    clock = Clock("2026-11-24T10:00:00+00:00")
    d = Detector(BASE, clock)
    fired = []
    for _ in range(12):  # 12 x 9 MiB in 6 minutes: 108 MiB > 100 MiB
        fired += d.bytes_read(who(), 9 * MiB)
        clock.advance(30)
    assert rules(fired) == ["bulk_read_bytes"]
    assert fired[0].fields["bytes"] > 100 * MiB and fired[0].principal == "uid=2002 exe=/usr/bin/vlc"
    # the same amount spread over more than the window stays quiet (another principal)
    fired = []
    for _ in range(12):
        fired += d.bytes_read(who(2003), 9 * MiB)
        clock.advance(120)
    assert fired == []


def test_bulk_read_by_distinct_files_and_cooldown() -> None:
    clock = Clock("2026-11-24T10:00:00+00:00")
    d = Detector(BASE, clock)
    fired = []
    for _ in range(20):
        fired += d.read_opened(who(), "/cam/same.mp4")  # one file read again and again is not bulk
        clock.advance(1)
    assert fired == []
    for i in range(25):
        fired += d.read_opened(who(), f"/cam/{i}.mp4")
        clock.advance(1)
    assert rules(fired) == ["bulk_read_files"]  # once, not on every further file
    clock.advance(1800)
    for i in range(25):
        fired += d.read_opened(who(), f"/cam/b{i}.mp4")
    assert rules(fired) == ["bulk_read_files", "bulk_read_files"]  # again after the cooldown


def _hours(text: str, days: list[str], zone: str) -> AlertConfig:
    p = Problems("t", None)
    cfg = parse_alerts({"working_hours": text, "working_days": days, "timezone": zone}, p)
    assert not p.items
    return replace(cfg, first_read=False)


def test_off_hours_in_the_configured_time_zone_with_dst() -> None:
    cfg = _hours("07:00-19:00", ["mon", "tue", "wed", "thu", "fri"], "Europe/Berlin")
    # 05:30 UTC is 06:30 in Berlin in winter (off hours) but 07:30 after the switch to summer time
    before = Clock("2026-03-27T05:30:00+00:00")  # Friday, CET
    after = Clock("2026-03-30T05:30:00+00:00")  # Monday, CEST
    assert rules(Detector(cfg, before).read_opened(who(), "/cam/a.mp4")) == ["off_hours"]
    assert Detector(cfg, after).read_opened(who(), "/cam/a.mp4") == []
    saturday = Clock("2026-03-28T10:00:00+00:00")
    alert = Detector(cfg, saturday).read_opened(who(), "/cam/a.mp4")
    assert rules(alert) == ["off_hours"] and "Sat 11:00 CET" in alert[0].message
    # deletes count too by default; recording (create, write) does not
    night = Clock("2026-03-25T01:00:00+00:00")
    d = Detector(cfg, night)
    assert d.operation(who(), "create", "/cam/n.mp4") == [] and d.operation(who(), "write", "/cam/n.mp4") == []
    assert rules(d.operation(who(), "delete", "/cam/n.mp4")) == ["off_hours"]


def test_working_hours_may_wrap_past_midnight() -> None:
    cfg = _hours("22:00-06:00", ["mon", "tue", "wed", "thu", "fri", "sat", "sun"], "UTC")
    d = Detector(cfg, Clock("2026-11-24T23:30:00+00:00"))
    assert d.in_working_hours(datetime(2026, 11, 24, 23, 30, tzinfo=UTC).timestamp())
    assert d.in_working_hours(datetime(2026, 11, 25, 5, 59, tzinfo=UTC).timestamp())
    assert not d.in_working_hours(datetime(2026, 11, 25, 6, 0, tzinfo=UTC).timestamp())
    assert not d.in_working_hours(datetime(2026, 11, 25, 12, 0, tzinfo=UTC).timestamp())


def test_first_reader_by_uid_and_by_executable_and_its_state() -> None:
    clock = Clock("2026-11-24T10:00:00+00:00")
    cfg = replace(BASE, first_read=True, known_uids=frozenset({0}))
    d2 = Detector(cfg, clock)
    assert rules(d2.read_opened(who(0, "/usr/bin/cat"), "/a")) == ["first_reader_exe"]  # uid 0 is seeded as known
    assert rules(d2.read_opened(who(2002, "/usr/bin/cat"), "/a")) == ["first_reader_uid"]
    assert rules(d2.read_opened(who(2002, "/usr/bin/vlc"), "/b")) == ["first_reader_exe"]
    assert d2.read_opened(who(2002, "/usr/bin/vlc"), "/c") == []
    assert d2.changed
    # what the audit log persists brings it back after a remount
    d3 = Detector(cfg, clock, d2.known_state())
    assert d3.read_opened(who(2002, "/usr/bin/cat"), "/d") == []
    assert rules(d3.read_opened(who(2003, "/usr/bin/cat"), "/d")) == ["first_reader_uid"]


def test_bursts_of_denials_and_of_block_authentication_failures() -> None:
    clock = Clock("2026-11-24T10:00:00+00:00")
    d = Detector(replace(BASE, denial_burst=5, auth_failure_burst=3, burst_seconds=60), clock)
    fired = []
    for _ in range(5):
        fired += d.denied(who())
        clock.advance(20)  # 5 denials over 100 s: never more than 3 within 60 s
    assert fired == []
    for _ in range(6):
        fired += d.denied(who())
        clock.advance(1)
    assert rules(fired) == ["denial_burst"]
    for _ in range(4):
        fired += d.auth_failure()
    assert rules(fired) == ["denial_burst", "auth_failure_burst"]


def test_disabled_rules_stay_quiet() -> None:
    d = Detector(replace(BASE, enabled=False, first_read=True), Clock("2026-11-24T03:00:00+00:00"))
    assert d.read_opened(who(), "/a") == [] and d.bytes_read(who(), 10**12) == [] and d.auth_failure() == []


def test_a_day_of_recording_raises_nothing() -> None:
    """Eight cameras writing a 60 s segment each around the clock; a reviewer reads a few clips by day."""
    cfg = replace(
        _hours("07:00-19:00", ["mon", "tue", "wed", "thu", "fri"], "Europe/Berlin"),
        first_read=True, known_uids=frozenset({2002}), known_exes=frozenset({"/usr/bin/vlc"}),
        bulk_read_bytes=2 << 30, bulk_read_files=50,
    )  # fmt: skip
    clock = Clock("2026-11-24T00:00:00+01:00")
    d = Detector(cfg, clock)
    fired = []
    for minute in range(24 * 60):
        for cam in range(8):
            recorder = who(2001, "/usr/bin/ffmpeg")
            fired += d.operation(recorder, "create", f"/cam{cam}/{minute}.mp4")
            fired += d.operation(recorder, "write", f"/cam{cam}/{minute}.mp4")
        if 9 * 60 <= minute < 17 * 60 and minute % 30 == 0:
            fired += d.read_opened(who(), f"/cam1/{minute - 30}.mp4")
            fired += d.bytes_read(who(), 60 * MiB)
        clock.advance(60)
    assert fired == []
