"""Screenshots of `alignkit label serve` for the docs: the labeling page mid-ranking and the admin page.

    python scripts/label_screenshots.py [--out docs/images]

Serves a small made-up input with the real CLI on a free loopback port, fills in four labelers' rankings
through the storage layer (so the admin page has agreement to show), then drives Debian's chromium with
Playwright: ana drags a response into place on her next item; the admin page as "lead". Writes
label-page.png and label-admin.png. Needs the test extra (playwright) and chromium on PATH.
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from alignkit.labeling import storage

ITEMS = [  # made up for the picture: a prompt and three candidate responses each
    ("How do I keep basil alive indoors?",
     ["Give it a sunny window, at least six hours of light, and water when the top inch of soil is dry.",
      "Basil is a plant.",
      "Water it every day and keep it somewhere dark and cool so the leaves do not burn."]),
    ("Summarise: the meeting moved to Thursday at 3pm because the room was booked.",
     ["The meeting is now Thursday at 3pm; the room was taken.",
      "Meeting moved.",
      "There was a meeting, and a room, and it was booked, so the meeting moved to Thursday at 3pm."]),
    ("Write a one-line thank-you note to a neighbour who watered my plants.",
     ["Thank you so much for looking after my plants while I was away - they (and I) owe you one!",
      "Thanks.",
      "Dear neighbour, I hereby formally acknowledge your watering of the plants."]),
    ("What is 15% of 80?",
     ["12.", "15% of 80 is 12 (0.15 x 80).", "About 10."]),
    ("Suggest a name for a grey cat.",
     ["Ash, Smokey or Pebble.", "Cat.", "Mr. Whiskers the Third, Esquire."]),
]  # fmt: skip
# Best-first rankings by labeler for the first items; "cy" disagrees, so the admin page lists a low agreement.
RANKINGS = {
    "ben": [[[1], [3], [2]], [[1], [3], [2]], [[1], [3], [2]], [[2], [1], [3]]],
    "dee": [[[1], [3], [2]], [[1], [3], [2]], [[1], [3, 2]], [[2], [3], [1]]],
    "cy": [[[2], [3], [1]], [[3], [2], [1]], [[2, 3], [1]], [[3], [1], [2]]],
    "ana": [[[1], [3], [2]], [[1], [2], [3]]],
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(port: int, server: subprocess.Popen, seconds: float = 30) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"label serve exited with {server.returncode} before listening")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"label serve did not listen on port {port} within {seconds:.0f} s")


def prepare(work: Path) -> tuple[Path, dict[str, str]]:
    """The input file and its database with labels; returns (input, tokens by labeler)."""
    path = work / "prefs.export.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "responses": r}) + "\n" for p, r in ITEMS))
    engine = storage.open_db(storage.default_url(str(path)))
    storage.load_items(engine, storage.read_input(str(path)))
    tokens = {name: storage.add_labeler(engine, name) for name in RANKINGS}
    tokens["lead"] = storage.add_labeler(engine, "lead", admin=True)
    for name, rankings in RANKINGS.items():
        who = storage.session_of(engine, storage.login(engine, tokens[name])[0])
        for item_id, ranking in enumerate(rankings):
            storage.submit(engine, who.labeler_id, item_id, "ranked", ranking)
    engine.dispose()
    return path, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="docs/images", help="folder for label-page.png and label-admin.png")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        path, tokens = prepare(Path(tmp))
        port = free_port()
        server = subprocess.Popen([sys.executable, "-m", "alignkit", "label", "serve", f"input={path}",
                                   f"port={port}"], stdout=subprocess.DEVNULL)  # fmt: skip
        try:
            wait_for(port, server)
            url = f"http://127.0.0.1:{port}"
            with sync_playwright() as pw:
                browser = launch_chromium(pw)
                page = browser.new_page(viewport={"width": 1000, "height": 820})
                login(page, url, tokens["ana"])
                # ana's third item: drag the warm note to the top, the stiff one above the curt one.
                page.locator('.resp[data-n="3"]').drag_to(page.locator('.resp[data-n="2"]'),
                                                          target_position={"x": 8, "y": 4})  # fmt: skip
                page.keyboard.press("ArrowDown")
                page.screenshot(path=str(out / "label-page.png"), full_page=True)
                page = browser.new_page(viewport={"width": 1000, "height": 600})
                login(page, url, tokens["lead"])
                page.goto(url + "/admin")
                page.screenshot(path=str(out / "label-admin.png"), full_page=True)
                browser.close()
        finally:
            server.terminate()
            server.wait(10)
    print(f"wrote {out / 'label-page.png'} and {out / 'label-admin.png'}")


def launch_chromium(pw):
    """Debian's chromium, headless, driven by Playwright ``pw`` (no browser download of Playwright's own)."""
    chromium = shutil.which("chromium")
    if chromium is None:
        raise SystemExit("no chromium on PATH (apt-get install chromium)")
    return pw.chromium.launch(executable_path=chromium, headless=True)


def login(page, url: str, token: str) -> None:
    page.goto(url + "/login")
    page.fill("input[name=token]", token)
    with page.expect_navigation():
        page.click("button:text-is('Log in')")


if __name__ == "__main__":
    main()
