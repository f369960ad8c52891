"""The tray icon: the daemon's status at a glance, and a small menu.

``Tray`` is a worker. Its thread picks a pystray backend, runs pystray's loop
in a second thread, and then applies ``DaemonState`` changes (icon, title,
menu) and menu clicks as they come. Each status has its own icon, drawn with
Pillow at run time, that differs in shape and glyph as well as in colour:

    secure   green shield with a check mark
    exposed  red warning triangle with "!"
    locked   blue rounded square with a padlock
    error    orange octagon with a cross
    paused   grey circle with two bars

The title (tooltip) describes the status in words, for example
``npmguard: 1 exposed token in ~/.npmrc``. It contains no credential value,
because ``Snapshot`` has none. A stored token that leaked shows the
exposed icon, and a failed rotation the error icon ("rotation failed");
the menu's "Rotate exposed tokens" rotates and revokes leaked tokens.

Backends: pystray uses appindicator or gtk where PyGObject (``gi``) is
importable, and these show the menu. Otherwise it falls back to xorg, which
has no menu and no notifications, and the tray logs once how to get the
menu. With no display at all the tray runs headless: a worker that does
nothing until stopped.

pystray's xorg backend shares one python-xlib connection between its loop
thread and the threads that change the icon, and python-xlib loses wake-ups
between threads. On Xvfb, 4 of 40 fresh starts hung for good while showing
the icon, waiting for a reply another thread had read, and about a quarter
of the stops left the loop waiting for its window's destruction. So every
call into pystray runs with a time limit. When it runs out, one more round
trip on that connection ("a nudge") wakes the stuck reader, and the call is
waited for again. After each call the connection is flushed as well: in one
test, one title change in six never reached the X server without it.
"""

from __future__ import annotations

import functools
import logging
import os
import queue
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from npmguard.commands.common import display_path
from npmguard.daemon.state import (
    ERROR,
    EXPOSED,
    LOCKED,
    PAUSED,
    SECURE,
    DaemonState,
    Snapshot,
)
from npmguard.daemon.worker import Worker
from npmguard.notify import Notifier, where

if TYPE_CHECKING:
    from PIL import Image

log = logging.getLogger(__name__)

STATUSES = (SECURE, EXPOSED, LOCKED, ERROR, PAUSED)
HEADLESS = "headless"
ICON_SIZE = 64
# Windows cuts tooltips at 127 characters, and longer ones are hard to read
# elsewhere too.
TITLE_LIMIT = 127

# On xorg, the wait for one call into pystray before a nudge, and the number
# of nudges. Calls take a few ms, and a stuck one never ends without a nudge.
# Stopping (one call, then the loop's end) stays within the 1 s of ``join``.
XORG_CALL_WAIT = 0.05
XORG_NUDGES = 4
# The other backends hand calls to their own main loop and are not nudged.
CALL_WAIT = 0.5
# Starting the backend's loop can take longer (a gtk or appindicator import).
READY_TIMEOUT = 5.0


class TrayActions(Protocol):
    """Callbacks for the menu items, implemented by the daemon.

    They run on the tray's own thread, one at a time, so each must return
    quickly (starting longer work elsewhere) and must not join the tray.
    """

    def secure_now(self) -> None: ...

    def rotate_exposed(self) -> None: ...

    def pause(self) -> None: ...

    def resume(self) -> None: ...

    def open_log(self) -> None: ...

    def quit(self) -> None: ...


# --------------------------------------------------------------------------
# Platform and backend choices, all in this one place


def display_available(
    platform: str = sys.platform, env: Mapping[str, str] | None = None
) -> bool:
    """Return whether a tray icon can be shown on this platform and session."""
    if platform in ("darwin", "win32"):
        # Their pystray backends need no display variable, because a
        # logged-in session always has a menu bar or a notification area.
        return True
    env = os.environ if env is None else env
    return bool(env.get("DISPLAY") or env.get("WAYLAND_DISPLAY"))


def backend_name(icon_class: type) -> str:
    """Return pystray's backend name (``xorg``, ``gtk``...) for its Icon class."""
    module = icon_class.__module__.rsplit(".", 1)[-1]
    return module.lstrip("_")


# Logged once per tray when the backend has no menu. It names what would
# provide one.
MENU_HINT = (
    "the tray menu is unavailable with pystray's {backend} backend (the icon "
    "and its title still show the status); for the menu, install PyGObject "
    "(Debian: python3-gi with gir1.2-ayatanaappindicator3-0.1, or "
    "`pip install PyGObject` in npmguard's environment) so pystray uses its "
    "appindicator or gtk backend"
)


def _load_pystray() -> tuple[Any | None, str]:
    """Import pystray, or return None and the reason it cannot reach a display."""
    try:
        import pystray  # type: ignore[import-untyped]
    except Exception as err:  # noqa: BLE001 - Xlib raises DisplayNameError and others
        return None, f"pystray could not start: {type(err).__name__}"
    return pystray, ""


class _Backend:
    """Workarounds for one pystray backend (only xorg needs any)."""

    def __init__(self, icon_class: type) -> None:
        self.icon: Any = None
        self.name = backend_name(icon_class)
        self.has_menu = bool(getattr(icon_class, "HAS_MENU", False))
        self.has_notification = bool(getattr(icon_class, "HAS_NOTIFICATION", False))
        xorg = self.name == "xorg"
        self.call_wait = XORG_CALL_WAIT if xorg else CALL_WAIT
        self.nudges = XORG_NUDGES if xorg else 0

    def unreachable(self) -> str | None:
        """Return why the backend cannot reach its display, or None."""
        if self.name != "xorg":
            return None
        # pystray checks the X connection only on its first import. A later
        # failure inside Icon() leaves a half-built icon whose __del__ raises.
        import Xlib.display  # type: ignore[import-untyped]

        try:
            Xlib.display.Display().close()
        except Exception as err:  # noqa: BLE001 - DisplayConnectionError and kin
            return f"cannot connect to the X display: {type(err).__name__}"
        return None

    def prepare(self, image: Image.Image) -> Image.Image:
        """Return ``image`` in the form this backend draws cleanly."""
        if self.name != "xorg":
            return image
        # XEmbed icons have no transparency. pystray drops the alpha channel,
        # which leaves coloured fringes on half-transparent edges; on black,
        # the background pystray leaves anyway, the edges stay smooth.
        from PIL import Image

        background = Image.new("RGBA", image.size, (0, 0, 0, 255))
        return Image.alpha_composite(background, image).convert("RGB")

    def loop_started(self) -> bool:
        """Return whether calls from other threads can reach the loop yet."""
        if self.name != "xorg":
            return True
        # The xorg loop marks itself ready (which starts setup callbacks)
        # one statement before it records its own thread, which its
        # cross-thread calls compare against.
        return getattr(self.icon, "_thread", None) is not None

    def flush(self) -> None:
        """Send what a call queued on the backend's X connection."""
        display = getattr(self.icon, "_display", None) if self.name == "xorg" else None
        if display is None:
            return
        # pystray's calls queue X requests (a new title, the icon's pixels)
        # without sending them, and its loop may not send them while it
        # waits for a lost wake-up. A flush sends them without waiting for
        # any reply.
        _quietly(display.flush)()

    def nudge(self) -> None:
        """Make one round trip on the backend's X connection (see the module doc)."""
        display = getattr(self.icon, "_display", None) if self.name == "xorg" else None
        if display is None:
            return
        # In a thread of its own, because the round trip may get stuck in the
        # same way. The next nudge wakes it.
        thread = threading.Thread(
            target=_quietly(display.sync), name="npmguard-tray-nudge", daemon=True
        )
        thread.start()
        thread.join(self.call_wait)


def _quietly(function: Callable[[], object]) -> Callable[[], None]:
    @functools.wraps(function)
    def inner() -> None:
        try:
            function()
        except Exception:  # noqa: BLE001 - a nudge on a closed connection is moot
            log.debug("tray nudge failed", exc_info=True)

    return inner


# --------------------------------------------------------------------------
# Icons and words


@functools.cache
def render_icon(status: str, size: int = ICON_SIZE) -> Image.Image:
    """Draw the icon for ``status`` at 4x and scale it down for smooth edges."""
    from PIL import Image, ImageDraw

    if status not in STATUSES:
        raise ValueError(f"unknown tray status {status!r}")
    big = 256
    image = Image.new("RGBA", (big, big), (0, 0, 0, 0))
    draw = ImageDraw.Draw(image)
    white = (255, 255, 255, 255)
    if status == SECURE:
        shield = [(128, 12), (228, 44), (220, 140), (128, 244), (36, 140), (28, 44)]
        draw.polygon(shield, fill=(46, 160, 67, 255))
        draw.line(
            [(78, 130), (114, 170), (182, 88)], fill=white, width=26, joint="curve"
        )
    elif status == EXPOSED:
        draw.polygon([(128, 10), (248, 236), (8, 236)], fill=(217, 48, 37, 255))
        draw.rounded_rectangle((114, 78, 142, 172), radius=10, fill=white)
        draw.ellipse((112, 186, 144, 218), fill=white)
    elif status == LOCKED:
        draw.rounded_rectangle((20, 20, 236, 236), radius=44, fill=(26, 115, 232, 255))
        draw.arc((84, 52, 172, 156), start=180, end=360, fill=white, width=22)
        draw.line([(95, 104), (95, 124)], fill=white, width=22)
        draw.line([(161, 104), (161, 124)], fill=white, width=22)
        draw.rounded_rectangle((68, 118, 188, 208), radius=12, fill=white)
        draw.ellipse((116, 146, 140, 170), fill=(26, 115, 232, 255))
    elif status == ERROR:
        octagon = [
            (84, 12), (172, 12), (244, 84), (244, 172),
            (172, 244), (84, 244), (12, 172), (12, 84),
        ]  # fmt: skip
        draw.polygon(octagon, fill=(227, 116, 0, 255))
        draw.line([(82, 82), (174, 174)], fill=white, width=28)
        draw.line([(174, 82), (82, 174)], fill=white, width=28)
    else:
        draw.ellipse((14, 14, 242, 242), fill=(128, 134, 139, 255))
        draw.rounded_rectangle((86, 70, 116, 186), radius=6, fill=white)
        draw.rounded_rectangle((140, 70, 170, 186), radius=6, fill=white)
    return image.resize((size, size), Image.Resampling.LANCZOS)


def _tokens(count: int) -> str:
    return "1 exposed token" if count == 1 else f"{count} exposed tokens"


def _exposure_words(snapshot: Snapshot) -> str:
    files = list(dict.fromkeys(e.path for e in snapshot.exposures))
    words = []
    if files:
        place = (
            display_path(Path(files[0])) if len(files) == 1 else f"{len(files)} files"
        )
        words.append(f"{_tokens(len(snapshot.exposures))} in {place}")
    leaks = len(snapshot.leaks)
    if leaks:
        words.append(
            "1 stored token leaked, rotate it"
            if leaks == 1
            else f"{leaks} stored tokens leaked, rotate them"
        )
    return "; ".join(words)


def _failure_words(snapshot: Snapshot) -> str:
    registries = list(dict.fromkeys(f.registry for f in snapshot.rotation_failures))
    if not registries:
        return ""
    where = registries[0] if len(registries) == 1 else f"{len(registries)} registries"
    return f"rotation failed for {where}, old token still in use"


def describe(snapshot: Snapshot) -> str:
    """Return the status in words, as the title shows it: ``npmguard: ...``."""
    status = snapshot.status
    exposed = _exposure_words(snapshot)
    if status == EXPOSED:
        text = exposed
    elif status == ERROR and not snapshot.error:
        text = _failure_words(snapshot)
        if exposed:
            text += f"; {exposed}"
    elif status == SECURE:
        text = "all npm tokens are secure"
        if snapshot.secured_count:
            text += f" ({snapshot.secured_count} moved to the keychain)"
    else:
        text = {
            PAUSED: "paused, not watching npm config files",
            LOCKED: "keychain locked, unlock it to secure tokens",
            ERROR: f"error: {' '.join((snapshot.error or '').split())}",
        }[status]
        if exposed:
            text += f"; {exposed}"
    title = f"npmguard: {text}"
    if len(title) > TITLE_LIMIT:
        title = title[: TITLE_LIMIT - 1] + "…"
    return title


def status_report(snapshot: Snapshot) -> tuple[str, str]:
    """Return the summary and body of the Status item's notification."""
    lines = [describe(snapshot).removeprefix("npmguard: ")]
    lines += [where(e) for e in snapshot.exposures[:3]]
    if len(snapshot.exposures) > 3:
        lines.append(f"and {len(snapshot.exposures) - 3} more")
    lines += [f"leaked: {leak.registry} (fingerprint {leak.fingerprint}), "
              f"{leak.reason}" for leak in snapshot.leaks[:3]]
    lines += [f"rotation failed: {f.registry}: {f.message}"
              for f in snapshot.rotation_failures[:3]]
    lines.append(f"{snapshot.secured_count} secured since the daemon started")
    return "npmguard status", "\n".join(lines)


# --------------------------------------------------------------------------
# The worker

_REFRESH = "refresh"
_STOP = "stop"


class Tray(Worker):
    """The tray icon as a worker: ``start()``, then ``stop()`` and ``join()``."""

    name = "tray"

    def __init__(
        self,
        state: DaemonState,
        actions: TrayActions,
        *,
        notifier: Notifier | None = None,
        app_name: str = "npmguard",
        platform: str = sys.platform,
    ) -> None:
        super().__init__()
        self.state = state
        self.actions = actions
        self.notifier = notifier if notifier is not None else Notifier()
        self.app_name = app_name
        self.platform = platform
        # The backend in use once the worker runs (a pystray name or HEADLESS).
        self.backend: str | None = None
        self.title = ""
        self.status: str | None = None
        # How often a call into pystray needed a nudge, for the log and tests.
        self.nudges = 0
        self.shown = threading.Event()
        self._commands: queue.SimpleQueue[str] = queue.SimpleQueue()
        self._ready = threading.Event()
        self._icon: Any = None
        self._backend: _Backend | None = None
        self._loop_thread: threading.Thread | None = None
        self._subscribed = False

    @property
    def icon(self) -> Any:
        """The pystray icon while it runs, else None."""
        return self._icon

    @property
    def menu(self) -> Any:
        """The pystray menu while the icon runs, else None.

        On xorg it exists too, though the backend cannot pop it up.
        """
        return None if self._icon is None else self._icon.menu

    def start(self) -> None:
        if not self._subscribed:
            self.state.subscribe(self._on_state_change)
            self._subscribed = True
        super().start()

    def stop(self) -> None:
        super().stop()
        self._commands.put(_STOP)

    def _on_state_change(self, before: Snapshot, after: Snapshot) -> None:
        if not self.stopping.is_set():
            self._commands.put(_REFRESH)

    # ---- the worker thread

    def run(self) -> None:
        pystray, why = None, "DISPLAY and WAYLAND_DISPLAY are unset"
        if display_available(self.platform):
            pystray, why = _load_pystray()
        backend = None if pystray is None else _Backend(pystray.Icon)
        icon = None
        if backend is not None:
            why = backend.unreachable() or ""
            if not why:
                icon, why = self._make_icon(pystray, backend)
        if icon is None or backend is None:
            self.backend = HEADLESS
            log.info("no display; running headless (%s)", why)
            self.stopping.wait()
            return

        self._icon = backend.icon = icon
        self._backend = backend
        self.backend = backend.name
        log.info("tray icon up with pystray's %s backend", backend.name)
        if not backend.has_menu:
            log.info(MENU_HINT.format(backend=backend.name))

        self._loop_thread = threading.Thread(
            target=self._loop, name="npmguard-tray-loop", daemon=True
        )
        self._loop_thread.start()
        try:
            if self._wait_for_loop():
                self._show()
                self._serve()
        finally:
            self._shutdown()

    def _make_icon(self, pystray: Any, backend: _Backend) -> tuple[Any | None, str]:
        snapshot = self.state.snapshot
        self.status = snapshot.status
        self.title = describe(snapshot)
        try:
            icon = pystray.Icon(
                self.app_name,
                icon=backend.prepare(render_icon(self.status)),
                title=self.title,
                menu=self._menu(pystray),
            )
        except Exception as err:  # noqa: BLE001 - e.g. the X server went away
            return None, f"the tray icon could not be created: {type(err).__name__}"
        return icon, ""

    def _menu(self, pystray: Any) -> Any:
        item = pystray.MenuItem

        def snapshot() -> Snapshot:
            return self.state.snapshot

        return pystray.Menu(
            item(
                "Secure now",
                self._clicked("secure_now"),
                enabled=lambda _: bool(snapshot().exposures),
            ),
            item(
                "Rotate exposed tokens",
                self._clicked("rotate_exposed"),
                enabled=lambda _: bool(snapshot().leaks),
            ),
            item("Status", self._clicked("status"), default=True),
            item(
                lambda _: "Resume" if snapshot().paused else "Pause",
                self._clicked("pause_or_resume"),
            ),
            item("Open log", self._clicked("open_log")),
            pystray.Menu.SEPARATOR,
            item("Quit", self._clicked("quit")),
        )

    def _clicked(self, action: str) -> Callable[..., None]:
        # pystray calls this on its loop thread. The action runs on the
        # worker thread, so a slow one cannot freeze the icon.
        def handler(*_: object) -> None:
            self._commands.put(action)

        return handler

    def _loop(self) -> None:
        try:
            self._icon.run(setup=lambda _icon: self._ready.set())
        except Exception:  # noqa: BLE001 - logged; the worker notices the loop ended
            log.exception("the tray icon's loop failed")
        finally:
            self._ready.set()

    def _loop_ready(self) -> bool:
        assert self._backend is not None
        return self._ready.is_set() and self._backend.loop_started()

    def _wait_for_loop(self) -> bool:
        """Wait until calls can reach the loop; False if stopped or it failed."""
        loop = self._loop_thread
        assert loop is not None
        deadline = time.monotonic() + READY_TIMEOUT
        while not self._loop_ready():
            if self.stopping.is_set() or not loop.is_alive():
                return False
            if time.monotonic() > deadline:
                log.error(
                    "tray: the icon's loop timed out starting after %gs", READY_TIMEOUT
                )
                return False
            time.sleep(0.005)
        return True

    def _show(self) -> None:
        def show() -> None:
            self._icon.visible = True

        if self._call(show, "show the icon"):
            self.shown.set()

    def _serve(self) -> None:
        while not self.stopping.is_set():
            commands = [self._commands.get()]
            while True:
                try:
                    commands.append(self._commands.get_nowait())
                except queue.Empty:
                    break
            if _STOP in commands or self.stopping.is_set():
                return
            if _REFRESH in commands:
                self._refresh()
            for command in commands:
                if command != _REFRESH:
                    self._act(command)

    def _refresh(self) -> None:
        backend = self._backend
        assert backend is not None
        if not self.shown.is_set():
            # Showing failed earlier, and until it succeeds no change is seen.
            self._show()
        snapshot = self.state.snapshot
        status, title = snapshot.status, describe(snapshot)
        if status != self.status:
            image = backend.prepare(render_icon(status))

            def set_image() -> None:
                self._icon.icon = image

            if self._call(set_image, "change the icon"):
                self.status = status
                log.debug("tray icon now shows %s", status)
        if title != self.title:

            def set_title() -> None:
                self._icon.title = title

            if self._call(set_title, "change the title"):
                self.title = title
        if backend.has_menu:
            self._call(self._icon.update_menu, "update the menu")

    def _act(self, command: str) -> None:
        log.info("tray menu: %s", command.replace("_", " "))
        try:
            if command == "status":
                self._show_status()
            elif command == "pause_or_resume":
                if self.state.snapshot.paused:
                    self.actions.resume()
                else:
                    self.actions.pause()
            else:
                getattr(self.actions, command)()
        except Exception:  # noqa: BLE001 - a failing action must not end the tray
            log.exception("tray action %s failed", command)

    def _show_status(self) -> None:
        summary, body = status_report(self.state.snapshot)
        if self.notifier.notify(summary, body):
            return
        if self._backend is not None and self._backend.has_notification:

            def notify() -> None:
                self._icon.notify(body, summary)

            self._call(notify, "show the status")

    def _call(self, function: Callable[[], None], what: str) -> bool:
        """Run one pystray call with a time limit and nudges (see the module doc)."""
        assert self._backend is not None
        failure: list[BaseException] = []

        def target() -> None:
            try:
                function()
            except BaseException as err:  # noqa: BLE001 - reported below
                failure.append(err)

        thread = threading.Thread(target=target, name="npmguard-tray-call", daemon=True)
        backend = self._backend
        thread.start()
        thread.join(backend.call_wait)
        nudges = 0
        while thread.is_alive() and nudges < backend.nudges:
            nudges += 1
            backend.nudge()
            thread.join(backend.call_wait)
        if nudges:
            self.nudges += nudges
            log.info("tray: %s needed %d nudge(s) of the X connection", what, nudges)
        if thread.is_alive():
            waited = backend.call_wait * (2 * nudges + 1)
            log.error("tray: %s timed out after %.2fs", what, waited)
            return False
        backend.flush()
        if failure:
            log.error(
                "tray: %s failed",
                what,
                exc_info=(type(failure[0]), failure[0], failure[0].__traceback__),
            )
            return False
        return True

    def _shutdown(self) -> None:
        loop, backend = self._loop_thread, self._backend
        assert loop is not None and backend is not None
        # pystray ignores stop() until its loop is ready. This wait leaves
        # time for the rest of the stop within the 1 s of ``join``.
        deadline = time.monotonic() + 0.3
        while loop.is_alive() and not self._loop_ready():
            if time.monotonic() > deadline:
                log.error("tray: the icon's loop never started, so it cannot stop")
                break
            time.sleep(0.005)
        if loop.is_alive():
            self._call(self._icon.stop, "stop")
            loop.join(backend.call_wait)
            for _ in range(backend.nudges):
                if not loop.is_alive():
                    break
                # The loop may wait for its window's destruction after another
                # thread read that event. A round trip wakes it.
                self.nudges += 1
                backend.nudge()
                loop.join(backend.call_wait)
            if loop.is_alive():
                log.error("tray: the icon's loop timed out stopping")
        # pystray closes the X connection when the icon is collected.
        self._icon = None
