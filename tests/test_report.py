"""report.html: self-contained, well-formed, escaped, with the summary and every figure."""

from __future__ import annotations

import base64
import html
import re
from html.parser import HTMLParser

import pytest

from ntk_torch import plots
from ntk_torch.config import RunConfig
from ntk_torch.report import format_value, render_report, summary_table, write_report
from ntk_torch.runs import RunWriter, load_run

from test_plots import PNG_MAGIC, shared_tracked_run, synthetic_run

VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


class StrictParser(HTMLParser):
    """Collects problems html.parser lets pass: unbalanced or misnested tags, a missing
    doctype, and the page's resources (src/href values) and <img> data."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack, self.problems, self.links, self.images, self.doctype = [], [], [], [], None

    def handle_decl(self, decl):
        self.doctype = decl

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.links += [attrs[key] for key in ("src", "href") if key in attrs]
        if tag == "img":
            self.images.append(attrs)
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.handle_starttag(tag, attrs)
        if tag not in VOID:
            self.stack.pop()

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.problems.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
        else:
            self.stack.pop()


def parse(page):
    parser = StrictParser()
    parser.feed(page)
    parser.close()
    assert parser.doctype == "DOCTYPE html"
    assert not parser.problems, parser.problems
    assert not parser.stack, f"unclosed tags: {parser.stack}"
    return parser


@pytest.fixture
def real_run(tmp_path_factory):
    return shared_tracked_run(tmp_path_factory)


def small_run(path, **meta):
    """A run with two loss records: one figure to draw, so the report renders fast."""
    with RunWriter(path, meta) as writer:
        writer.append({"step": 0, "probe_loss": 2.0})
        writer.append({"step": 3, "probe_loss": 1.0})
        writer.close(status="completed")
    return load_run(path)


@pytest.mark.slow
def test_report_of_a_tracked_run_is_self_contained_and_complete(real_run):
    path = write_report(real_run.path, real_run.path.parent / "report.html")
    assert path.is_file()
    page = path.read_text(encoding="utf-8")
    parser = parse(page)

    assert "<script" not in page.lower()
    assert not re.search(r"(src|href)\s*=\s*[\"']?\s*(https?:)?//", page, re.IGNORECASE)
    assert all(link.startswith(("#", "data:image/png;base64,")) for link in parser.links)

    expected = [spec.name for spec in plots.FIGURES if spec.available(real_run)]
    assert "kernel_heatmaps" in expected and "drift" in expected
    assert len(parser.images) == len(expected)
    for name in expected:
        assert f'id="fig-{name}"' in page
    for image in parser.images:
        data = base64.b64decode(image["src"].split(",", 1)[1])
        assert data.startswith(PNG_MAGIC) and image["alt"]

    for name, value in summary_table(real_run):
        assert html.escape(name) in page and html.escape(value) in page
    assert "Sequential" in page  # the model summary from meta["model"]
    assert "probe_size" in page  # the tracker's config


def _images_by_figure(page):
    """``{figure name: PNG bytes}`` of a report page's figures."""
    found = re.findall(r'<figure id="fig-([^"]+)"><img src="data:image/png;base64,([^"]+)"', page)
    return {name: base64.b64decode(data) for name, data in found}


@pytest.mark.slow  # draws every figure but one
def test_given_pngs_are_embedded_as_they_are_and_the_rest_drawn(tmp_path):
    """``images=``: a figure the run supports is embedded from the given bytes, not drawn;
    the others are drawn, in catalogue order; one the run does not support is not added."""
    run = synthetic_run(tmp_path / "run")
    expected = [spec.name for spec in plots.FIGURES if spec.available(run)]
    given = {"drift": PNG_MAGIC + b"given drift"}
    images = _images_by_figure(render_report(run, images=given))
    assert list(images) == expected and "drift" in expected
    assert images["drift"] == given["drift"]
    assert all(png.startswith(PNG_MAGIC) and len(png) > 1000 for name, png in images.items() if name != "drift")

    losses_only = small_run(tmp_path / "small")
    supported = [spec.name for spec in plots.FIGURES if spec.available(losses_only)]
    assert "drift" not in supported
    assert list(_images_by_figure(render_report(losses_only, images=given))) == supported


def test_summary_table_reports_final_values(tmp_path):
    run = synthetic_run(tmp_path / "run")
    rows = dict(summary_table(run))
    assert rows["status"] == "completed"
    assert rows["measurements"] == "7 (steps 0–32)"
    assert rows["final train loss"] == format_value(0.8 * 2.718281828459045 ** (-3.2))
    assert rows["final train loss (predicted)"] == format_value(0.8 * 2.718281828459045 ** (-32 / 11))
    assert rows["final relative change of K"] == format_value(0.01 * 32 ** 0.5)
    assert rows["target alignment (first → last)"] == "0.2 → 0.52"
    assert rows["saved kernels"] == "2 (steps 0, 32)"
    assert "64 training points" in rows["prediction"]


def test_summary_table_of_an_unfinished_run_without_predictions(tmp_path):
    path = tmp_path / "unfinished"
    writer = RunWriter(path, {})
    writer.append({"step": 0, "probe_loss": 2.0, "relative_change": 0.0})
    writer.append({"step": 5, "probe_loss": 1.5, "relative_change": 0.25})
    writer.append({"step": 10, "finite": False, "relative_change": None, "probe_loss": 1.0})
    rows = dict(summary_table(load_run(path)))
    assert rows["status"] == "unknown (run not closed)"
    assert rows["final probe loss"] == "1"
    assert rows["final relative change of K"] == "0.25 (step 5)"  # the last finite value
    assert rows["non-finite kernels"] == "1 measurement(s)"
    assert not any("predicted" in name for name in rows)
    writer.close()


def test_text_is_escaped_everywhere(tmp_path):
    run = small_run(tmp_path / "run", model={"class": "<MLP>"})
    hostile = "<script>alert('x')</script>"
    page = render_report(
        run,
        config={"name": hostile, "train": {"lr": 0.1, "note": 'a "quoted" & <b>bold</b>'}},
        summary={"class": hostile, "modules": {"<layer>": 10}},
    )
    parse(page)
    assert "<script" not in page and "<b>bold" not in page and "<layer>" not in page
    assert html.escape(hostile) in page
    assert "&lt;b&gt;bold&lt;/b&gt;" in page and "&lt;layer&gt;" in page and "&lt;MLP&gt;" in page


@pytest.mark.slow
def test_config_dataclass_and_out_path(tmp_path):
    run = small_run(tmp_path / "run")
    assert write_report(run) == run.path / "report.html"
    out = write_report(run, tmp_path / "site" / "index.html", config=RunConfig())
    page = out.read_text(encoding="utf-8")
    parse(page)
    assert "Run configuration" in page and "batch_size" in page
    with pytest.raises(TypeError, match="config must be"):
        render_report(run, config=42)
    with pytest.raises(TypeError, match="summary must be"):
        render_report(run, summary="MLP")


def test_report_of_a_run_with_nothing_to_plot(tmp_path):
    path = tmp_path / "empty"
    RunWriter(path, {}).close(status="failed")
    page = write_report(path).read_text(encoding="utf-8")
    parse(page)
    assert "no data to plot" in page and "failed" in page


@pytest.mark.parametrize("value, text", [
    (None, "—"), (True, "yes"), (3, "3"), (2.0, "2"), (0.123456, "0.1235"),
    (1.5e-7, "1.5e-07"), (float("nan"), "nan"), (float("inf"), "inf"), ("mlp", "mlp"),
])
def test_format_value(value, text):
    assert format_value(value) == text
