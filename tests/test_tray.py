"""The tray icon on Xvfb, docked in a real XEmbed tray manager.

tests/xembed_tray.py owns the system-tray selection on the ``display``
fixture's Xvfb and logs every dock and title change. The pixels are read
from the docked window through the test's own X connection. Headless runs
use no display at all.
"""

from __future__ import annotations

import itertools
import json
import logging
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import realparts
from notify_server import NotificationServer
from PIL import Image
from realparts import Canary, Keychain, VirtualDisplay

from npmguard.daemon.state import (
    ERROR,
    EXPOSED,
    LOCKED,
    PAUSED,
    SECURE,
    DaemonState,
    Exposure,
    Snapshot,
)
from npmguard.files import read_config
from npmguard.npmrc.credentials import find_credentials
from npmguard.tray import STATUSES, Tray, describe, render_icon

TRAY_MANAGER = Path(__file__).with_name("xembed_tray.py")
REGISTRY = "//registry.npmjs.org/"


@dataclass
class Recorder:
    """The daemon's side of the menu: records which actions ran."""

    calls: list[str] = field(default_factory=list)
    ran: threading.Event = field(default_factory=threading.Event)

    def _record(self, name: str) -> None:
        self.calls.append(name)
        self.ran.set()

    def secure_now(self) -> None:
        self._record("secure_now")

    def pause(self) -> None:
        self._record("pause")

    def resume(self) -> None:
        self._record("resume")

    def open_log(self) -> None:
        self._record("open_log")

    def quit(self) -> None:
        self._record("quit")


@dataclass
class TrayManager:
    """The XEmbed tray manager process and the events it logged."""

    process: realparts.ManagedProcess

    def events(self) -> list[dict[str, Any]]:
        lines = self.process.log_path.read_text().splitlines()
        return [json.loads(line) for line in lines if line.startswith("{")]

    def wait_for(self, event: str, **fields: object) -> dict[str, Any]:
        found: list[dict[str, Any]] = []

        def seen() -> bool:
            found[:] = [
                e
                for e in self.events()
                if e["event"] == event and all(e.get(k) == v for k, v in fields.items())
            ]
            return bool(found)

        realparts.wait_until(
            seen, timeout=5.0, what=f"tray event {event} {fields}", proc=self.process
        )
        return found[-1]


@pytest.fixture
def tray_manager(display: VirtualDisplay, tmp_path: Path) -> Iterator[TrayManager]:
    state_dir = tmp_path / "xembed-tray"
    state_dir.mkdir()
    env = realparts.isolated_env(state_dir / "home", DISPLAY=display.display)
    proc = realparts.spawn(
        "xembed-tray",
        [sys.executable, TRAY_MANAGER],
        log_path=state_dir / "xembed-tray.log",
        env=env,
    )
    manager = TrayManager(proc)
    try:
        manager.wait_for("ready")
        yield manager
    finally:
        proc.stop()


@pytest.fixture
def trays() -> Iterator[list[Tray]]:
    """Trays a test started; each must stop within a second."""
    started: list[Tray] = []
    yield started
    for tray in started:
        tray.stop()
    for tray in started:
        assert tray.join(1.0), "the tray did not stop within 1 s"


def start_tray(
    trays: list[Tray], state: DaemonState, actions: Recorder | None = None
) -> Tray:
    tray = Tray(state, actions or Recorder())
    trays.append(tray)
    tray.start()
    return tray


def shown_tray(trays: list[Tray], state: DaemonState, **kwargs: Any) -> Tray:
    tray = start_tray(trays, state, **kwargs)
    assert tray.shown.wait(5.0), "the tray icon was not shown"
    return tray


def exposures_in(path: Path) -> tuple[Exposure, ...]:
    config = read_config(path)
    return tuple(
        Exposure(str(f.path), f.line, f.registry, f.kind, f.fingerprint, "ask")
        for f in find_credentials(path, config.document)
        if f.state == "plaintext"
    )


def exposed_npmrc(home: Path, token: str, name: str = ".npmrc") -> Path:
    path = home / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{REGISTRY}:_authToken={token}\n")
    return path


def on_screen(display: VirtualDisplay, window: int) -> Image.Image:
    """What the docked icon window shows on the X server."""
    import Xlib.display
    import Xlib.X

    connection = Xlib.display.Display(display.display)
    try:
        target = connection.create_resource_object("window", window)
        geometry = target.get_geometry()
        size = (geometry.width, geometry.height)
        raw = target.get_image(0, 0, *size, Xlib.X.ZPixmap, 0xFFFFFFFF)
        return Image.frombytes("RGB", size, raw.data, "raw", "BGRX")
    finally:
        connection.close()


def as_docked(status: str, size: tuple[int, int]) -> Image.Image:
    """The icon as the xorg backend should draw it: on black, scaled."""
    black = Image.new("RGBA", render_icon(status).size, (0, 0, 0, 255))
    flat = Image.alpha_composite(black, render_icon(status)).convert("RGB")
    return flat.resize(size, Image.Resampling.LANCZOS)


RESET: dict[str, object] = {
    "paused": False,
    "vault_locked": False,
    "error": None,
    "exposures": (),
}
STATE_FOR: dict[str, dict[str, object]] = {
    SECURE: {},
    EXPOSED: {
        "exposures": (
            Exposure("/srv/app/.npmrc", 1, REGISTRY, "_authToken", "f", "ask"),
        )
    },
    LOCKED: {"vault_locked": True},
    ERROR: {"error": "watcher stopped"},
    PAUSED: {"paused": True},
}


# --------------------------------------------------------------------------
# Icons and words


def test_icons_differ_in_shape() -> None:
    masks = {s: render_icon(s).getchannel("A").tobytes() for s in STATUSES}
    for first, second in itertools.combinations(STATUSES, 2):
        assert masks[first] != masks[second], f"{first} and {second} share a shape"


def test_icon_unknown_status() -> None:
    with pytest.raises(ValueError, match="unknown tray status"):
        render_icon("sleepy")


def test_describe_secure() -> None:
    assert describe(Snapshot()) == "npmguard: all npm tokens are secure"


def test_describe_exposed_one(home: Path) -> None:
    exposure = Exposure(str(home / ".npmrc"), 1, REGISTRY, "_authToken", "f", "ask")
    title = describe(Snapshot(exposures=(exposure,)))
    assert title == "npmguard: 1 exposed token in ~/.npmrc"


def test_describe_exposed_files(home: Path) -> None:
    exposures = tuple(
        Exposure(str(home / d / ".npmrc"), 1, REGISTRY, "_authToken", d, "ask")
        for d in ("a", "b", "b")
    )
    title = describe(Snapshot(exposures=exposures))
    assert title == "npmguard: 3 exposed tokens in 2 files"


def test_describe_locked_with_exposure(home: Path) -> None:
    exposure = Exposure(str(home / ".npmrc"), 1, REGISTRY, "_authToken", "f", "ask")
    title = describe(Snapshot(vault_locked=True, exposures=(exposure,)))
    assert title.endswith("; 1 exposed token in ~/.npmrc")


def test_describe_long_error_clipped() -> None:
    title = describe(Snapshot(error="x" * 500))
    assert len(title) == 127


# --------------------------------------------------------------------------
# On Xvfb with a tray manager


def test_tray_docks(tray_manager: TrayManager, trays: list[Tray]) -> None:
    tray = shown_tray(trays, DaemonState())
    docked = tray_manager.wait_for("dock")
    assert (tray.backend, docked["title"]) == (
        "xorg",
        "npmguard: all npm tokens are secure",
    )


def test_tray_title_follows_state(
    tray_manager: TrayManager, trays: list[Tray], home: Path, canary: Canary
) -> None:
    state = DaemonState()
    shown_tray(trays, state)
    window = tray_manager.wait_for("dock")["window"]
    state.update(exposures=exposures_in(exposed_npmrc(home, canary)))
    tray_manager.wait_for(
        "title", window=window, title="npmguard: 1 exposed token in ~/.npmrc"
    )
    state.update(exposures=(), secured_count=1)
    tray_manager.wait_for(
        "title",
        window=window,
        title="npmguard: all npm tokens are secure (1 moved to the keychain)",
    )
    assert canary[4:16] not in tray_manager.process.log_path.read_text()


def test_tray_icon_differs_per_state(
    tray_manager: TrayManager, trays: list[Tray], display: VirtualDisplay
) -> None:
    state = DaemonState()
    shown_tray(trays, state)
    window = tray_manager.wait_for("dock")["window"]
    seen: dict[str, bytes] = {}
    for status in STATUSES:
        state.update(**{**RESET, **STATE_FOR[status]})
        assert state.snapshot.status == status

        def drawn(status: str = status) -> bool:
            shot = on_screen(display, window)
            seen[status] = shot.tobytes()
            return seen[status] == as_docked(status, shot.size).tobytes()

        realparts.wait_until(drawn, timeout=5.0, what=f"the {status} icon on screen")
    assert len(set(seen.values())) == len(STATUSES)


def test_tray_stop_leaves_no_thread(
    tray_manager: TrayManager, trays: list[Tray]
) -> None:
    before = set(threading.enumerate())
    tray = shown_tray(trays, DaemonState())
    window = tray_manager.wait_for("dock")["window"]
    tray.stop()
    assert tray.join(1.0)
    assert set(threading.enumerate()) - before == set()
    tray_manager.wait_for("gone", window=window)


def test_tray_stop_before_shown(tray_manager: TrayManager, trays: list[Tray]) -> None:
    before = set(threading.enumerate())
    tray = start_tray(trays, DaemonState())
    tray.stop()
    assert tray.join(1.0)
    assert set(threading.enumerate()) - before == set()


def test_tray_fresh_starts(
    tray_manager: TrayManager, trays: list[Tray], caplog: pytest.LogCaptureFixture
) -> None:
    # Starting and stopping is where python-xlib loses wake-ups between the
    # threads sharing the icon's connection. Each start must still show the
    # icon, and each stop must end every thread.
    caplog.set_level(logging.INFO, logger="npmguard.tray")
    before = set(threading.enumerate())
    shown = 0
    for _ in range(25):
        tray = start_tray(trays, DaemonState())
        shown += tray.shown.wait(5.0)
        tray.stop()
        assert tray.join(1.0)
        trays.remove(tray)
    assert shown == 25
    assert set(threading.enumerate()) - before == set()
    assert "did not" not in caplog.text


def test_tray_menu_hint_once(
    tray_manager: TrayManager, trays: list[Tray], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="npmguard.tray")
    state = DaemonState()
    shown_tray(trays, state)
    state.update(paused=True)
    state.update(paused=False)
    hints = [r for r in caplog.records if "menu is unavailable" in r.getMessage()]
    assert len(hints) == 1
    assert "PyGObject" in hints[0].getMessage()


def test_tray_menu_actions(tray_manager: TrayManager, trays: list[Tray]) -> None:
    # The xorg backend cannot pop the menu up, so its items are invoked the
    # way pystray's other backends invoke them on a click.
    actions = Recorder()
    state = DaemonState()
    tray = shown_tray(trays, state, actions=actions)
    menu = tray.menu
    assert menu is not None
    items = {item.text: item for item in menu.items if item.text}
    for text in ("Secure now", "Pause", "Open log", "Quit"):
        actions.ran.clear()
        items[text](tray.icon)
        assert actions.ran.wait(5.0), f"{text} did not run"
    assert actions.calls == ["secure_now", "pause", "open_log", "quit"]


def test_tray_menu_resume_when_paused(
    tray_manager: TrayManager, trays: list[Tray]
) -> None:
    actions = Recorder()
    state = DaemonState()
    state.update(paused=True)
    tray = shown_tray(trays, state, actions=actions)
    assert tray.menu is not None
    toggle = [item for item in tray.menu.items if item.text == "Resume"]
    toggle[0](tray.icon)
    assert actions.ran.wait(5.0)
    assert actions.calls == ["resume"]


def test_tray_status_item_notifies(
    tray_manager: TrayManager,
    trays: list[Tray],
    keyring_bus: Keychain,
    tmp_path: Path,
    home: Path,
    canary: Canary,
) -> None:
    server = NotificationServer.start(keyring_bus.bus, tmp_path / "notify-server")
    try:
        state = DaemonState()
        state.update(exposures=exposures_in(exposed_npmrc(home, canary)))
        tray = shown_tray(trays, state)
        assert tray.menu is not None
        [status] = [item for item in tray.menu.items if item.text == "Status"]
        status(tray.icon)
        [shown] = server.wait_for(1)
    finally:
        server.stop()
    assert shown["summary"] == "npmguard status"
    assert f"~/.npmrc:1, registry {REGISTRY}" in shown["body"]
    assert canary[4:16] not in server.raw_text()


def test_tray_failing_action_logged(
    tray_manager: TrayManager, trays: list[Tray], caplog: pytest.LogCaptureFixture
) -> None:
    class FailingActions(Recorder):
        # Fault injection: the daemon's handler raises.
        def open_log(self) -> None:
            super().open_log()
            raise OSError("no log viewer")

    actions = FailingActions()
    tray = shown_tray(trays, DaemonState(), actions=actions)
    assert tray.menu is not None
    [item] = [i for i in tray.menu.items if i.text == "Open log"]
    item(tray.icon)
    assert actions.ran.wait(5.0)
    realparts.wait_until(
        lambda: "tray action open_log failed" in caplog.text,
        timeout=5.0,
        what="the failure in the log",
    )
    assert tray.alive()


# --------------------------------------------------------------------------
# Headless


def test_tray_headless_no_display(
    trays: list[Tray], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="npmguard.tray")
    tray = start_tray(trays, DaemonState())
    realparts.wait_until(
        lambda: tray.backend is not None, timeout=5.0, what="the backend choice"
    )
    tray.stop()
    assert tray.join(1.0)
    lines = [r for r in caplog.records if r.name == "npmguard.tray"]
    assert [r.getMessage().split(" (")[0] for r in lines] == [
        "no display; running headless"
    ]
    assert tray.backend == "headless"


def test_tray_headless_unreachable_display(
    trays: list[Tray], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="npmguard.tray")
    # A local X socket with no server ("unix:" keeps python-xlib off TCP).
    monkeypatch.setenv("DISPLAY", "unix:9999")
    tray = start_tray(trays, DaemonState())
    realparts.wait_until(
        lambda: tray.backend is not None, timeout=5.0, what="the backend choice"
    )
    assert tray.backend == "headless"
    assert "no display; running headless" in caplog.text
