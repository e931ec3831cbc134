"""The website: ``make site`` builds every chapter with its saved outputs, offline; a browser shows it.

The build runs once for the module. The browser test needs Debian's ``chromium`` and
``chromium-driver`` (``.ci/run`` installs them); without them it is skipped and says so.
"""

from __future__ import annotations

import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import nbformat
import pytest

from course import notebooks, site

pytestmark = pytest.mark.notebook


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.title, self.h1, self.images, self.links, self._in = "", [], [], [], None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag in ("title", "h1"):
            self._in = tag
            if tag == "h1":
                self.h1.append("")
        elif tag == "img":
            self.images.append(attrs.get("src", ""))
        elif tag == "a":
            self.links.append(attrs.get("href", ""))

    def handle_endtag(self, tag):
        if tag == self._in:
            self._in = None

    def handle_data(self, data):
        if self._in == "title":
            self.title += data
        elif self._in == "h1":
            self.h1[-1] += data


def parse(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text(encoding="utf-8"))
    return page


@pytest.fixture(scope="module")
def built():
    html, warnings = site.build(quiet=True)
    return html, warnings


def test_the_build_has_no_warnings(built):
    _, warnings = built
    assert warnings == [], "\n".join(warnings)


@pytest.mark.parametrize("solution", notebooks.solution_paths(), ids=lambda p: p.stem)
def test_every_chapter_has_its_page_title_figures_and_links(built, solution):
    html, _ = built
    page_path = html / "chapters" / f"{solution.stem}.html"
    assert page_path.is_file(), f"no page for {solution.name}"
    page = parse(page_path)
    title = next(line[2:] for line in nbformat.read(solution, as_version=4).cells[0].source.splitlines()
                 if line.startswith("# "))
    def plain(text):  # Sphinx's smartquotes turns ' and " into typographic quotes
        return text.translate(str.maketrans({"\u2019": "'", "\u2018": "'", "\u201c": '"', "\u201d": '"'}))
    assert any(plain(title) in plain(h) for h in page.h1), (title, page.h1)
    figures = sum(1 for cell in nbformat.read(solution, as_version=4).cells if cell.cell_type == "code"
                  for output in cell.get("outputs", []) if "image/png" in output.get("data", {}))
    local = [src for src in page.images if not src.startswith(("http:", "https:", "data:"))]
    for src in local:
        assert (page_path.parent / src).is_file(), f"{solution.stem}: image {src} is not in the build"
    assert len(local) >= figures + 1, f"{solution.stem}: {figures} figures and the badge, {len(local)} images"
    assert any(f"/blob/main/notebooks/{solution.name}" in link for link in page.links), "no link to the student version"
    assert any("colab.research.google.com/github/" in link for link in page.links), "no Colab link"
    text = page_path.read_text(encoding="utf-8")
    assert "interactive(children=" not in text and "\x1b[" not in text


def test_the_landing_page_is_the_course_map_with_every_chapter_linked(built):
    html, _ = built
    landing = parse(html / "intro.html")
    assert "Parameter-efficient fine-tuning" in landing.title
    for solution in notebooks.solution_paths():
        assert any(link.endswith(f"chapters/{solution.stem}.html") for link in landing.links), solution.stem
    assert (html / "index.html").is_file()


def test_a_new_chapter_needs_no_site_configuration(tmp_path, monkeypatch):
    solutions = tmp_path / "solutions"
    shutil.copytree(notebooks.SOLUTIONS, solutions)
    extra = nbformat.read(solutions / "00_welcome.ipynb", as_version=4)
    extra.cells[0].source = extra.cells[0].source.replace("# 00 · Welcome", "# 99 · A new chapter")
    nbformat.write(extra, solutions / "99_new_chapter.ipynb")
    monkeypatch.setattr(site, "SOLUTIONS", solutions)
    monkeypatch.setattr(site, "SITE", tmp_path / "site")
    chapters = site.generate()
    assert chapters[-1].name == "99_new_chapter.ipynb"
    toc = (tmp_path / "site" / "_toc.yml").read_text()
    assert re.search(r"chapters/99_new_chapter", toc)
    assert "chapters/99_new_chapter.ipynb" in (tmp_path / "site" / "intro.md").read_text()


def _browser_missing() -> str | None:
    missing = [name for name in ("chromium", "chromedriver") if shutil.which(name) is None]
    if missing:
        return (f"{' and '.join(missing)} not installed: `apt-get install chromium chromium-driver` (as .ci/run does) "
                "to run the browser test")
    return None


@pytest.mark.skipif(_browser_missing() is not None, reason=_browser_missing() or "")
@pytest.mark.parametrize("page", ["intro.html", "chapters/02_lora_from_scratch.html"])
def test_a_real_browser_renders_the_pages(built, page):
    html, _ = built
    shot = html.parent / "screenshots" / (Path(page).stem + ".png")
    found = site.browse(html / page, shot)
    assert "Parameter-efficient fine-tuning" in found["title"]
    assert found["headings"] and all(h.strip() for h in found["headings"])
    assert found["images"], "the page shows images"
    for image in found["images"]:
        assert image["width"] > 0 and image["height"] > 0, f"{image['src']} did not load"
    assert shot.is_file() and shot.stat().st_size > 10_000, "a screenshot for a person to look at"


@pytest.mark.skipif(_browser_missing() is not None, reason=_browser_missing() or "")
def test_the_maths_is_typeset_with_no_network(built):
    """Chapter 03's formulas typeset by the MathJax the site serves itself; no host name resolves."""
    html, _ = built
    assert (html / "_static" / "mathjax" / "tex-chtml.js").is_file()
    page = html / "chapters" / "03_dora.html"
    assert "\\frac" in page.read_text(encoding="utf-8"), "chapter 03 has formulas to typeset"
    found = site.browse(page, html.parent / "screenshots" / "03_dora.png", offline=True)
    assert found["remote"] == [], f"scripts from the network: {found['remote']}"
    assert found["typeset"] >= 5, f"only {found['typeset']} formulas typeset"
    assert found["raw"] == [], f"formulas left as raw LaTeX: {found['raw'][:3]}"
