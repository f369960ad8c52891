"""A small XEmbed system-tray manager for tests, on ``$DISPLAY``.

It owns the ``_NET_SYSTEM_TRAY_S<screen>`` selection the way a desktop panel
does. Every icon window that sends ``SYSTEM_TRAY_REQUEST_DOCK`` is
reparented into a 24x24 slot of its own window and mapped, so a pystray icon
really docks and draws. It prints one JSON object per line on stdout:

    {"event": "ready", "window": <manager window id>}
    {"event": "dock", "window": <icon window id>, "title": <WM_NAME>}
    {"event": "title", "window": <icon window id>, "title": <WM_NAME>}
    {"event": "gone", "window": <icon window id>}

Run it as ``DISPLAY=:N python xembed_tray.py``; SIGTERM stops it.
"""

from __future__ import annotations

import json
import signal
import sys
from types import FrameType

import Xlib.display
import Xlib.error
import Xlib.protocol.event
import Xlib.X
import Xlib.Xatom

SLOT = 24
REQUEST_DOCK = 0


def _say(event: str, **fields: object) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


def _stop(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


def _title(window: object) -> str | None:
    try:
        name = window.get_wm_name()  # type: ignore[attr-defined]
    except Xlib.error.XError:
        return None
    if isinstance(name, bytes):
        return name.decode("utf-8", "replace")
    return name


def _parent(window: object) -> int | None:
    try:
        return int(window.query_tree().parent.id)  # type: ignore[attr-defined]
    except Xlib.error.XError:
        return None


def main() -> int:
    signal.signal(signal.SIGTERM, _stop)
    display = Xlib.display.Display()
    screen = display.screen()
    root = screen.root
    selection = display.intern_atom(f"_NET_SYSTEM_TRAY_S{display.get_default_screen()}")
    opcode = display.intern_atom("_NET_SYSTEM_TRAY_OPCODE")
    manager = root.create_window(
        0,
        0,
        SLOT * 8,
        SLOT,
        0,
        screen.root_depth,
        background_pixel=screen.white_pixel,
        event_mask=Xlib.X.SubstructureNotifyMask | Xlib.X.StructureNotifyMask,
    )
    manager.map()
    manager.set_selection_owner(selection, Xlib.X.CurrentTime)
    # The MANAGER announcement: icons that started before the tray dock now.
    root.send_event(
        Xlib.protocol.event.ClientMessage(
            window=root,
            client_type=display.intern_atom("MANAGER"),
            data=(32, [Xlib.X.CurrentTime, selection, manager.id, 0, 0]),
        ),
        event_mask=Xlib.X.StructureNotifyMask,
    )
    display.sync()
    _say("ready", window=manager.id)

    docked: dict[int, object] = {}
    while True:
        event = display.next_event()
        if (
            event.type == Xlib.X.ClientMessage
            and event.client_type == opcode
            and event.data[1][1] == REQUEST_DOCK
        ):
            wid = event.data[1][2]
            icon = display.create_resource_object("window", wid)
            # pystray sends the request again on every icon change. A known id
            # that is no longer in the tray is a new window reusing the id.
            if wid in docked and _parent(icon) == manager.id:
                continue
            try:
                icon.change_attributes(
                    event_mask=Xlib.X.PropertyChangeMask | Xlib.X.StructureNotifyMask
                )
                icon.reparent(manager, SLOT * len(docked), 0)
                icon.configure(width=SLOT, height=SLOT)
                icon.map()
                display.sync()
            except Xlib.error.XError as err:
                print(f"could not dock {wid}: {err}", file=sys.stderr, flush=True)
                continue
            docked[wid] = icon
            _say("dock", window=wid, title=_title(icon))
        elif (
            event.type == Xlib.X.PropertyNotify
            and event.atom == Xlib.Xatom.WM_NAME
            and event.window.id in docked
        ):
            _say("title", window=event.window.id, title=_title(event.window))
        elif event.type == Xlib.X.DestroyNotify and event.window.id in docked:
            docked.pop(event.window.id)
            _say("gone", window=event.window.id)
        elif (
            event.type == Xlib.X.ReparentNotify
            and event.window.id in docked
            and event.parent.id != manager.id
        ):
            # The icon undocked itself (pystray does on hide).
            docked.pop(event.window.id)
            _say("gone", window=event.window.id)


if __name__ == "__main__":
    sys.exit(main())
