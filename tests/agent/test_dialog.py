"""The consent dialog for real: a Tk window on an X server (Xvfb), clicked with xdotool.

Each test opens the real window on a private Xvfb display, waits until it is mapped (the
dialog's ``on_shown``), and then acts as the shopper with real X input: xdotool moves the
pointer onto a button and clicks, or types a key. Screenshots of the window (Pillow's
``ImageGrab`` from the X display) go to ``artifacts/agent-dialog-{en,zh}.png``; the copies
in ``docs/img/`` come from there.

Without Xvfb, xdotool or tkinter the tests skip, unless CI=true, where they fail.
"""

from __future__ import annotations

import asyncio
import os
import select
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.card.support import make_state
from tests.reader.remote_support import load, merchant_app, purchase, serve
from webpurse.agent.dialog import DEFAULT_TIMEOUT, Shown, ask, dialog_consent, system_language
from webpurse.agent.guard import ConsentRequest, Kind
from webpurse.card.image import ImageFile
from webpurse.reader.messages import Outcome
from webpurse.reader.remote import ReaderHub

ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts"
ORIGIN = "https://shop.example"
LIE = "Tea House\x1b[2A\x1b[8G¥1.00 (100 fen CNY) …"


def _need(condition: bool, reason: str) -> None:
    if condition:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true and {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def xvfb() -> Iterator[str]:
    """A private X server; yields its DISPLAY (``:N``, the number Xvfb chose itself)."""
    _need(shutil.which("Xvfb") is not None, "Xvfb not found (apt-get install xvfb)")
    _need(shutil.which("xdotool") is not None, "xdotool not found (apt-get install xdotool)")
    try:
        import tkinter  # noqa: F401
    except ImportError:
        _need(False, "this Python has no tkinter (apt-get install tk-dev python3-tk)")
    read, write = os.pipe()
    server = subprocess.Popen(
        ["Xvfb", "-displayfd", str(write), "-screen", "0", "1024x768x24", "-nolisten", "tcp"],
        pass_fds=[write],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    os.close(write)
    try:
        ready, _, _ = select.select([read], [], [], 20)
        number = os.read(read, 64).decode().strip() if ready else ""
        assert number.isdigit(), "Xvfb did not report its display"
        yield f":{number}"
    finally:
        os.close(read)
        server.terminate()
        server.wait(10)


@pytest.fixture
def display(xvfb: str, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("DISPLAY", xvfb)
    return xvfb


def xdotool(display: str, *args: str) -> None:
    subprocess.run(["xdotool", *args], env={**os.environ, "DISPLAY": display}, check=True)


@dataclass
class OnScreen:
    """What the dialog showed, read inside Tk's own thread (Tk objects stay in that thread)."""

    title: str
    labels: list[str]
    go: tuple[str, int, int]
    cancel: tuple[str, int, int]
    """(text, x, y of the centre on the screen) of each button."""
    focus_on_cancel: bool
    window: int
    box: tuple[int, int, int, int]


def _read(dialog: Shown) -> OnScreen:
    root = dialog.root
    root.update()  # geometry settled before the positions are read

    def centre(button: Any) -> tuple[str, int, int]:
        return (
            str(button.cget("text")),
            button.winfo_rootx() + button.winfo_width() // 2,
            button.winfo_rooty() + button.winfo_height() // 2,
        )

    frame = root.winfo_children()[0]
    labels = [str(w.cget("text")) for w in frame.winfo_children() if w.winfo_class() == "Label"]
    x, y = root.winfo_rootx(), root.winfo_rooty()
    return OnScreen(
        title=root.title(),
        labels=labels,
        go=centre(dialog.go),
        cancel=centre(dialog.cancel),
        focus_on_cancel=root.focus_get() is dialog.cancel,
        window=root.winfo_id(),
        box=(x, y, x + root.winfo_width(), y + root.winfo_height()),
    )


def click(display: str, button: tuple[str, int, int]) -> None:
    """A real pointer click in the middle of the button."""
    _, x, y = button
    xdotool(display, "mousemove", "--sync", str(x), str(y), "click", "1")


def run_dialog(
    request: ConsentRequest,
    act: Callable[[OnScreen], None],
    *,
    language: str = "en",
    timeout: float = DEFAULT_TIMEOUT,
    in_tk: Callable[[Shown], None] | None = None,
) -> bool:
    """Show the dialog in a worker thread (as the agent does); ``act`` once it is on screen.

    ``act`` runs in the test's thread while the dialog's event loop runs, so the X input it
    sends is handled by the window like a person's; ``in_tk`` runs in Tk's thread.
    """
    seen: list[OnScreen] = []
    on_screen = threading.Event()
    result: list[bool] = []

    def on_shown(dialog: Shown) -> None:
        seen.append(_read(dialog))
        if in_tk is not None:
            in_tk(dialog)
        on_screen.set()

    def worker() -> None:
        result.append(ask(request, language=language, timeout=timeout, on_shown=on_shown))

    thread = threading.Thread(target=worker)
    thread.start()
    assert on_screen.wait(20), "the dialog did not appear"
    act(seen[0])
    thread.join(30)
    assert not thread.is_alive(), "the dialog did not close"
    return result[0]


def screenshot(display: str, shown: OnScreen, path: Path) -> None:
    from PIL import ImageGrab

    path.parent.mkdir(exist_ok=True)
    ImageGrab.grab(bbox=shown.box, xdisplay=display).save(path)


PURCHASE = ConsentRequest(Kind.PURCHASE, 50_000, ORIGIN, LIE)


def test_clicking_pay_answers_yes_and_the_window_shows_the_trusted_facts(display: str) -> None:
    seen: list[OnScreen] = []

    def act(shown: OnScreen) -> None:
        seen.append(shown)
        screenshot(display, shown, ARTIFACTS / "agent-dialog-en.png")
        click(display, shown.go)

    assert run_dialog(PURCHASE, act) is True
    (shown,) = seen
    assert (shown.go[0], shown.cancel[0], shown.focus_on_cancel) == ("Pay", "Cancel", True)
    assert shown.labels == [
        "Pay: ¥500.00 (50000 fen CNY)",
        "Merchant site: https://shop.example",
        r"The merchant says: Tea House\x1b[2A\x1b[8G¥1.00 (100 fen CNY) …",
    ]


def test_clicking_cancel_answers_no_in_chinese(display: str) -> None:
    request = ConsentRequest(Kind.PURCHASE, 4_150, ORIGIN, "茶馆 Tea House：龙井茶 + 包子")

    seen: list[OnScreen] = []

    def act(shown: OnScreen) -> None:
        seen.append(shown)
        screenshot(display, shown, ARTIFACTS / "agent-dialog-zh.png")
        click(display, shown.cancel)

    assert run_dialog(request, act, language="zh") is False
    (shown,) = seen
    assert (shown.title, shown.go[0], shown.cancel[0]) == ("webpurse：请确认", "付款", "取消")
    assert shown.labels[0] == "付款: ¥41.50 (4150 分 CNY)"


@pytest.mark.parametrize("key", ["Return", "space", "Escape"])
def test_the_keyboard_cancels_by_default(display: str, key: str) -> None:
    def act(shown: OnScreen) -> None:
        xdotool(display, "key", key)

    assert run_dialog(PURCHASE, act) is False


def test_closing_the_window_cancels(display: str) -> None:
    def close(dialog: Shown) -> None:
        # What a window manager's close button sends: WM_DELETE_WINDOW.
        dialog.root.after(0, dialog.root.tk.call, dialog.root.protocol("WM_DELETE_WINDOW"))

    assert run_dialog(PURCHASE, lambda _shown: None, in_tk=close) is False


def test_no_answer_within_the_timeout_cancels(display: str) -> None:
    assert run_dialog(PURCHASE, lambda _dialog: None, timeout=0.3) is False


def test_loads_and_sharing_have_their_own_buttons(display: str) -> None:
    seen: list[tuple[str, str]] = []

    def act(shown: OnScreen) -> None:
        seen.append((shown.title, shown.go[0]))
        click(display, shown.go)

    load = ConsentRequest(Kind.LOAD, 5_000, ORIGIN, None)
    share = ConsentRequest(Kind.SHARE, 0, ORIGIN, None, files=(0x16,))
    assert run_dialog(load, act) is True
    assert run_dialog(share, act, language="zh_CN.UTF-8") is True
    assert seen == [("webpurse: confirm", "Load"), ("webpurse：请确认", "提供")]


async def test_the_agent_stopping_to_wait_closes_the_dialog_as_cancel(display: str) -> None:
    consent = dialog_consent(language="en", timeout=60)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(consent(PURCHASE), 1.0)
    # The window is gone: a second dialog opens and answers at once on its timeout.
    assert await dialog_consent(language="en", timeout=0.2)(PURCHASE) is False


def test_the_language_follows_the_system_locale() -> None:
    assert system_language({"LANG": "zh_CN.UTF-8"}) == "zh"
    assert system_language({"LC_ALL": "en_GB.UTF-8", "LANG": "zh_CN.UTF-8"}) == "en"
    assert system_language({"LANG": "de_DE.UTF-8"}) == "en"
    assert system_language({}) == "en"


def test_tab_then_space_presses_pay(display: str) -> None:
    def act(shown: OnScreen) -> None:
        xdotool(display, "key", "Tab", "space")

    assert run_dialog(PURCHASE, act) is True


def click_go_in_window(display: str) -> None:
    """As a person would: find the dialog on the screen and click its go-ahead button (the
    right-hand one, in the bottom right corner: 28 px side and 22 px bottom padding)."""
    env = {**os.environ, "DISPLAY": display}
    found = subprocess.run(
        ["xdotool", "search", "--sync", "--onlyvisible", "--name", "^webpurse: confirm$"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout.split()
    geometry = subprocess.run(
        ["xdotool", "getwindowgeometry", "--shell", found[0]],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    values = dict(line.split("=", 1) for line in geometry.split())
    x = int(values["X"]) + int(values["WIDTH"]) - 28 - 20
    y = int(values["Y"]) + int(values["HEIGHT"]) - 22 - 10
    xdotool(display, "mousemove", "--sync", str(x), str(y), "click", "1")


async def test_the_agent_process_asks_in_the_dialog_and_clicks_let_the_load_and_debit_through(
    display: str, tmp_path: Path
) -> None:
    """``webpurse agent --consent dialog`` as a process: each CREDIT/DEBIT waits for the
    window; a real click on its go-ahead button lets it through."""
    image = tmp_path / "card.json"
    ImageFile(image).create(make_state())
    hub = ReaderHub()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    async with serve(merchant_app(hub)) as base:
        process = await asyncio.create_subprocess_exec(
            str(Path(sys.executable).with_name("webpurse")),
            "agent",
            "--reader",
            f"sim:{image}",
            "--consent",
            "dialog",
            "--language",
            "en",
            "--allow-origin",
            base,
            "--port",
            str(port),
            "--once",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env={**os.environ, "DISPLAY": display},
        )
        try:
            pairing = hub.issue("pay_dialog", display="Tea House")
            async with httpx.AsyncClient(timeout=10) as client:
                loop = asyncio.get_running_loop()
                deadline = loop.time() + 15
                while True:  # bounded wait until the agent process listens
                    try:
                        paired = await client.post(
                            f"http://127.0.0.1:{port}/pair",
                            json={"token": pairing.token, "server": f"{base}/reader"},
                            headers={"Origin": base},
                        )
                        break
                    except httpx.TransportError:
                        assert process.returncode is None and loop.time() < deadline
                        await asyncio.sleep(0.05)
            assert paired.status_code == 200, paired.text
            remote = await hub.wait_for_reader("pay_dialog", 5)
            loading = asyncio.create_task(load(remote, 3000))
            await asyncio.to_thread(click_go_in_window, display)
            await asyncio.wait_for(loading, 20)
            paying = asyncio.create_task(purchase(remote, 1000))
            await asyncio.to_thread(click_go_in_window, display)
            await asyncio.wait_for(paying, 20)
            await remote.end(Outcome.SUCCEEDED, "paid", 1000)
            out, _ = await asyncio.wait_for(process.communicate(), 20)
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
            await hub.close()
    assert process.returncode == 0, out.decode()
    assert ImageFile(image).load().balance == 2000
