"""A PNG of an `alignkit compare` page (the reward-vs-KL frontier and the table), or of one element of any
alignkit page (e.g. a report's over-optimisation plot), for the docs.

    python scripts/compare_screenshot.py runs/compare/compare.html [--out docs/images/compare-quick.png]
    python scripts/compare_screenshot.py runs/ppo/report.html --element '#plot-over-optimisation' --out x.png

Renders the page as it is (it is self-contained: the frontier is an inline SVG) in Debian's headless chromium,
launched as scripts/label_screenshots.py launches it. Needs the test extra (playwright) and chromium on PATH.
Not run by the tests.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from label_screenshots import launch_chromium  # this script's folder is first on sys.path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("page", help="a compare.html written by `alignkit compare`, or a report.html")
    parser.add_argument("--out", default="docs/images/compare-quick.png", help="the PNG to write")
    parser.add_argument("--width", type=int, default=1200, help="viewport width in pixels (the table is wide)")
    parser.add_argument("--element", help="CSS selector of the one element to capture (default: the whole page)")
    args = parser.parse_args()
    page_path = Path(args.page).resolve()
    if not page_path.is_file():
        raise SystemExit(f"no page at {page_path} (run `alignkit compare ...` first)")
    from playwright.sync_api import sync_playwright

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        browser = launch_chromium(pw)
        page = browser.new_page(viewport={"width": args.width, "height": 700})
        page.goto(page_path.as_uri())
        if args.element:
            page.locator(args.element).screenshot(path=str(out))
        else:
            page.screenshot(path=str(out), full_page=True)
        browser.close()
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
