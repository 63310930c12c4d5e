"""The consent dialog: a native window (tkinter, standard library) on the shopper's screen.

Fixed layout, the same lines as the terminal prompt (:func:`webpurse.agent.display.screen`):
the amount line in large bold type, the merchant site below it, a rule, and the merchant's
own words last, in small grey type in a box of their own. Two buttons, "Cancel" and "Pay"
(or "Load" / "Share"), in Chinese or English after the system locale. The window comes up
on top with the keyboard focus on Cancel, so Return or Space cancels; Escape cancels;
closing the window cancels; no answer within the timeout cancels. Only a press of the
go-ahead button answers yes.

Tk runs in a worker thread (one dialog at a time), so the agent keeps answering the
merchant's pings while the shopper reads. If the agent stops waiting (the batch's deadline
passed), the dialog closes as Cancel.

Needs ``tkinter`` (Debian: ``python3-tk``; built into the python.org installers for Windows
and macOS) and a display; ``webpurse-agent --consent auto`` falls back to the terminal
prompt without them.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import sys
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from webpurse.agent.consent import Consent
from webpurse.agent.display import buttons, screen
from webpurse.agent.guard import ConsentRequest

if TYPE_CHECKING:
    import tkinter as tk

DEFAULT_TIMEOUT = 60.0
"""Seconds the dialog waits for the shopper before it answers Cancel."""

_POLL_MS = 100  # how often the dialog looks whether the agent stopped waiting
_one_at_a_time = threading.Lock()


class DialogUnavailable(Exception):
    """No tkinter in this interpreter, or no display to open a window on."""


def system_language(environ: Mapping[str, str] | None = None) -> str:
    """``zh`` for a Chinese system locale (``LC_ALL``, ``LC_MESSAGES``, ``LANG``), else ``en``."""
    env = os.environ if environ is None else environ
    for name in ("LC_ALL", "LC_MESSAGES", "LANG", "LANGUAGE"):
        value = env.get(name)
        if value:
            return "zh" if value.lower().startswith("zh") else "en"
    return "en"


def dialog_unavailable(environ: Mapping[str, str] | None = None) -> str | None:
    """Why no dialog can be shown here (None: it can)."""
    env = os.environ if environ is None else environ
    try:
        import tkinter  # noqa: F401
    except ImportError as exc:
        return f"this Python has no tkinter ({exc}); on Debian: apt-get install python3-tk"
    if sys.platform.startswith("linux") and not (env.get("DISPLAY") or env.get("WAYLAND_DISPLAY")):
        return "no display (DISPLAY is not set)"
    return None


@dataclass(frozen=True)
class Shown:
    """The dialog on screen, for tests (``on_shown``): the window and its two buttons."""

    root: tk.Tk
    go: tk.Button
    cancel: tk.Button


def ask(
    request: ConsentRequest,
    *,
    language: str = "en",
    timeout: float = DEFAULT_TIMEOUT,
    stop: threading.Event | None = None,
    on_shown: Callable[[Shown], None] | None = None,
) -> bool:
    """Show the dialog and wait: True only if the shopper pressed the go-ahead button.

    Blocks; call it from one thread at a time (:func:`dialog_consent` does). Raises
    :class:`DialogUnavailable` when no window can be opened.
    """
    try:
        import tkinter as tk
    except ImportError as exc:
        raise DialogUnavailable(str(exc)) from None
    with _one_at_a_time:
        try:
            root = tk.Tk(className="webpurse-agent")
        except tk.TclError as exc:
            raise DialogUnavailable(f"cannot open a window: {exc}") from None
        try:
            return _show(root, request, language, timeout, stop, on_shown)
        finally:
            with contextlib.suppress(tk.TclError):  # gone already (destroyed from outside)
                root.destroy()
            # Free the Tcl interpreter here, in the thread that made it: widgets hold
            # reference cycles, and Tcl aborts if another thread's collection frees it.
            del root
            gc.collect()


def _show(
    root: tk.Tk,
    request: ConsentRequest,
    language: str,
    timeout: float,
    stop: threading.Event | None,
    on_shown: Callable[[Shown], None] | None,
) -> bool:
    answer = [False]
    shown = _build(root, request, language, answer)
    root.after(max(1, int(timeout * 1000)), root.quit)  # no answer in time: Cancel
    if stop is not None:

        def poll() -> None:
            if stop.is_set():
                root.quit()
            else:
                root.after(_POLL_MS, poll)

        root.after(_POLL_MS, poll)
    root.wait_visibility(root)
    root.focus_force()
    shown.cancel.focus_set()
    if on_shown is not None:
        on_shown(shown)
    root.mainloop()
    return answer[0]


def _build(root: tk.Tk, request: ConsentRequest, language: str, answer: list[bool]) -> Shown:
    import tkinter
    from tkinter import font

    shown = screen(request, language)
    go_label, cancel_label = buttons(request.kind, language)
    root.title(shown.title)
    root.resizable(False, False)
    root.attributes("-topmost", True)
    base = font.nametofont("TkDefaultFont").actual()["family"]
    frame = tkinter.Frame(root, padx=28, pady=22)
    frame.pack(fill="both", expand=True)
    tkinter.Label(
        frame, text=shown.facts[0], font=(base, 18, "bold"), anchor="w", justify="left"
    ).pack(fill="x")
    for fact in shown.facts[1:]:
        tkinter.Label(frame, text=fact, font=(base, 12), anchor="w", justify="left").pack(
            fill="x", pady=(8, 0)
        )
    tkinter.Frame(frame, height=1, bg="#b0b0b0").pack(fill="x", pady=(14, 10))
    if shown.words:
        tkinter.Label(
            frame,
            text=shown.words,
            font=(base, 10),
            fg="#555555",
            anchor="w",
            justify="left",
            wraplength=460,
            relief="groove",
            padx=8,
            pady=6,
        ).pack(fill="x")
    row = tkinter.Frame(frame, pady=0)
    row.pack(fill="x", pady=(18, 0))

    def choose(value: bool) -> None:
        answer[0] = value
        root.quit()

    go = tkinter.Button(row, text=go_label, width=10, command=lambda: choose(True))
    cancel = tkinter.Button(
        row, text=cancel_label, width=10, default="active", command=lambda: choose(False)
    )
    go.pack(side="right")
    cancel.pack(side="right", padx=(0, 10))

    def press_focused(_event: object) -> None:
        focused = root.focus_get()
        (go if focused is go else cancel).invoke()

    root.bind("<Return>", press_focused)
    root.bind("<KP_Enter>", press_focused)
    root.bind("<Escape>", lambda _event: choose(False))
    root.protocol("WM_DELETE_WINDOW", lambda: choose(False))
    root.update_idletasks()
    width, height = root.winfo_reqwidth(), root.winfo_reqheight()
    x = max(0, (root.winfo_screenwidth() - width) // 2)
    y = max(0, (root.winfo_screenheight() - height) // 3)
    root.geometry(f"+{x}+{y}")
    return Shown(root, go, cancel)


def dialog_consent(
    language: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    on_shown: Callable[[Shown], None] | None = None,
) -> Consent:
    """A :data:`~webpurse.agent.consent.Consent` that asks in the dialog window.

    ``language`` defaults to the system locale's (:func:`system_language`)."""
    lang = language or system_language()

    async def consent(request: ConsentRequest) -> bool:
        stop = threading.Event()
        try:
            return await asyncio.to_thread(
                ask, request, language=lang, timeout=timeout, stop=stop, on_shown=on_shown
            )
        finally:
            stop.set()  # the agent stopped waiting (deadline, shutdown): close as Cancel

    return consent
