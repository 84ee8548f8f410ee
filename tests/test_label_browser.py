"""The labeling page in a real browser: Playwright drives headless Chromium (Debian's ``chromium``, not
Playwright's download) against the app served by uvicorn on loopback. Two labelers rank with the mouse (drag,
best/worst boxes) and the keyboard, skip, flag, reload mid-item and come back in a new browser; the database
then holds exactly the rankings that were clicked, and ``label export`` writes the pairs they imply."""

from __future__ import annotations

import json
import shutil
import sqlite3

import pytest

pytest.importorskip("uvicorn")
sync_api = pytest.importorskip(
    "playwright.sync_api", reason="playwright is not installed (pip install -e .[test]): browser tests skipped"
)
CHROMIUM = shutil.which("chromium")
if CHROMIUM is None:
    pytest.skip("no chromium on PATH (apt-get install chromium): browser tests skipped", allow_module_level=True)

from _serving import serving  # noqa: E402
from test_label import setup  # noqa: E402, F401  (the fixture: input file, database, tokens)

from alignkit.labeling.app import create_app  # noqa: E402
from alignkit.stages import load_stage  # noqa: E402


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield browser
        browser.close()


@pytest.fixture
def served(setup):  # noqa: F811
    path, engine, tokens = setup
    with serving(create_app(engine)) as url:
        yield path, url, tokens


class Labeler:
    """One labeler's browser context (its own cookies); records any dialog or console error the page raises."""

    def __init__(self, browser, url: str, token: str):
        self.context = browser.new_context()
        self.page = self.context.new_page()
        self.problems: list[str] = []
        self.page.on("dialog", lambda d: (self.problems.append(f"dialog: {d.message}"), d.dismiss()))
        self.page.on("console", lambda m: m.type == "error" and self.problems.append(f"console: {m.text}"))
        self.page.goto(url + "/")  # not logged in: sent to /login
        self.page.fill("input[name=token]", token)
        with self.page.expect_navigation():
            self.page.click("button:text-is('Log in')")

    def card(self, n: int):
        return self.page.locator(f'.resp[data-n="{n}"]')

    def drag(self, n: int, onto: int, above: bool) -> None:
        """Drag response n with the mouse onto the upper (above) or lower half of response ``onto``."""
        box = self.card(onto).bounding_box()
        y = 4 if above else box["height"] - 4
        self.card(n).drag_to(self.card(onto), source_position={"x": 8, "y": 8}, target_position={"x": 8, "y": y})

    def preview(self) -> str:
        return " ".join(self.page.inner_text("#preview").split())

    def header(self) -> str:
        return self.page.inner_text("body").split("\n")[0]

    def key(self, *keys: str) -> None:
        for k in keys:
            self.page.keyboard.press(k)

    def sends(self, action) -> None:
        """Run ``action`` (a click or key that posts the form) and wait for the next page to load."""
        with self.page.expect_navigation():
            action()


def stored(path) -> dict:
    """(labeler, item) -> the ranking stored, or the kind of a label without one."""
    con = sqlite3.connect(path.with_name("prefs.export.label.db"))
    rows = con.execute(
        "SELECT labelers.name, labels.item_id, labels.kind, labels.ranking FROM labels "
        "JOIN labelers ON labelers.id = labels.labeler_id"
    ).fetchall()
    con.close()
    return {(name, item): json.loads(ranking) if ranking else kind for name, item, kind, ranking in rows}


def test_two_labelers_rank_by_mouse_and_keyboard_and_export_what_they_clicked(browser, served, tmp_path):
    path, url, tok = served
    ana = Labeler(browser, url, tok["tokens"]["ana"])
    assert "ana · item 1 of 3" in ana.header()
    assert ana.preview() == "1 = 2 = 3"  # nothing decided yet: a bare submit would be all ties, no pairs
    # Item 0 (hi, hello there, go), mouse: drag 2 above 1 -> the list order 2, 1, 3 is the ranking.
    ana.drag(2, onto=1, above=True)
    assert [ana.card(n).evaluate("c => [...c.parentNode.children].indexOf(c)") for n in (2, 1, 3)] == [0, 1, 2]
    assert ana.preview() == "2 > 1 > 3"
    ana.sends(lambda: ana.page.click("#submit"))
    assert "item 2 of 3" in ana.header()

    # Item 1 (red, blue, <script>...), keyboard: select 2 and move it up, then select 3 and tie it with 1.
    assert ana.card(3).inner_text().endswith("<script>alert(1)</script>")  # shown as text, never run
    ana.key("ArrowDown", "u")
    assert ana.preview() == "2 > 1 > 3"
    ana.page.reload()  # mid-item: the unsent order is gone, the submitted item stays done
    assert "item 2 of 3" in ana.header() and ana.preview() == "1 = 2 = 3"
    assert stored(path) == {("ana", 0): [[2], [1], [3]]}
    ana.key("ArrowDown", "u", "ArrowDown", "ArrowDown", "t")
    assert ana.preview() == "2 > 1 = 3"
    ana.sends(lambda: ana.key("Enter"))
    assert "item 3 of 3" in ana.header()
    assert ana.problems == []
    ana.context.close()  # the browser closed mid-way: a new one carries on where ana was
    ana = Labeler(browser, url, tok["tokens"]["ana"])
    assert "item 3 of 3" in ana.header()
    ana.sends(lambda: ana.key("s"))
    assert "All done, ana" in ana.page.inner_text("h1")

    # A second labeler starts at item 0 with their own progress.
    ben = Labeler(browser, url, tok["tokens"]["ben"])
    assert "ben · item 1 of 3" in ben.header()
    ben.card(1).locator("input.best").click()  # mouse: 1 best
    ben.key("Shift+Digit3")  # keyboard: 3 worst; 2 is left in the middle
    assert ben.preview() == "1 > 2 > 3"
    ben.sends(lambda: ben.key("Enter"))
    ben.sends(lambda: ben.key("f"))  # item 1: flagged unsafe
    assert "item 3 of 3" in ben.header()
    ben.drag(1, onto=2, above=False)  # item 2 (1 2 3, one): 1 dropped below 2
    assert ben.preview() == "2 > 1"
    ben.sends(lambda: ben.page.click("#submit"))
    assert "All done, ben" in ben.page.inner_text("h1")
    assert ana.problems == [] and ben.problems == []  # no CSP refusal, no script error, no alert ran

    assert stored(path) == {
        ("ana", 0): [[2], [1], [3]], ("ana", 1): [[2], [1, 3]], ("ana", 2): "skip",
        ("ben", 0): [[1], [2], [3]], ("ben", 1): "flag", ("ben", 2): [[2], [1]],
    }  # fmt: skip
    summary = load_stage("label").run(action="export", input=str(path))
    rows = [json.loads(line) for line in (tmp_path / "prefs.export.pairs.jsonl").read_text().splitlines()]
    # Item 0: best-vs-worst candidates 2-3 (ana) and 1-3 (ben); both labelers put 1 and 2 over 3: both
    # written. Item 1: ben flagged it, left out. Item 2: ana skipped, ben put 2 ("one") over 1.
    assert [(r["prompt_row"], r["chosen"], r["rejected"]) for r in rows] == [
        (4, "hi", "go"), (4, "hello there", "go"), (9, "one", "1 2 3")]  # fmt: skip
    assert (summary["pairs"], summary["items_flagged"]) == (3, 1)
