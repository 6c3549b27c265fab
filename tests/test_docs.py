"""The documentation site: its results tables equal what the committed results files give, it builds strictly
(offline), and its pages render in a real headless Chromium."""

from __future__ import annotations

import functools
import http.server
import json
import math
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from scipy import stats

from metricsearch.analysis.docs_tables import (
    LOAD_TEST_FILES,
    DocsSources,
    compare_table,
    generate_tables,
    marker_names,
    render_markers,
    stale_tables,
    update_pages,
)
from metricsearch.analysis.files import read_csv
from metricsearch.cli.docs import docs_pages, main_docs_tables
from tests.helpers import REPO_ROOT
from tests.test_browser import CHROMIUM, CHROMIUM_ARGS

SOURCES = DocsSources.of_repository(REPO_ROOT)
PAGES = docs_pages(REPO_ROOT)


def test_every_committed_table_equals_what_the_results_files_give():
    assert stale_tables(PAGES, SOURCES) == []


def test_each_table_appears_where_a_reader_looks_for_it():
    found = {name: [p.relative_to(REPO_ROOT).as_posix() for p in PAGES if name in marker_names(p.read_text())]
             for name in generate_tables(SOURCES)}  # fmt: skip
    assert found == {
        "compare": ["README.md", "docs/comparison.md"],
        "reproduce": ["docs/comparison.md"],
        "options": ["docs/recipes.md"],
        "recipes": ["docs/recipes.md"],
        "performance": ["docs/performance.md"],
        "postprocess": ["docs/postprocess.md"],
        "supervision": ["docs/supervision.md"],
        "supervision_cifar": ["docs/supervision.md"],
        "search_backends": ["docs/search_backends.md"],
        "search_latency": ["docs/search.md"],
        "load_test": ["docs/search_backends.md"],
    }


def test_a_changed_results_file_makes_the_page_stale_until_regenerated(tmp_path):
    root = tmp_path / "repo"
    shutil.copytree(REPO_ROOT / "results", root / "results", ignore=shutil.ignore_patterns("runs", "search", "final"))
    shutil.copytree(REPO_ROOT / "conf" / "experiment", root / "conf" / "experiment")
    (root / "docs").mkdir()
    shutil.copy(REPO_ROOT / "docs" / "comparison.md", root / "docs" / "comparison.md")
    (root / "README.md").write_text(
        "# x\n\n<!-- generated: reproduce -->\nhand-typed\n<!-- end generated: reproduce -->\n"
    )
    sources, pages = DocsSources.of_repository(root), docs_pages(root)
    assert stale_tables(pages, sources) == [f"{root / 'README.md'}: reproduce"]

    results = root / "results" / "results.csv"
    results.write_text(results.read_text().replace("0.4025,", "0.4125,", 1))  # multi-similarity's R@1: 40.2 -> 41.2
    assert sorted(stale_tables(pages, sources)) == [f"{root / 'README.md'}: reproduce", f"{pages[1]}: reproduce"]
    assert sorted(update_pages(pages, sources)) == sorted(pages)
    assert stale_tables(pages, sources) == []
    assert "| multi_similarity | 3 | 41.2 ± 2.8 |" in pages[1].read_text()
    assert "hand-typed" not in pages[0].read_text()


def test_the_load_test_table_gives_each_query_kind_and_the_total_of_the_reports_samples():
    from metricsearch.analysis.docs_tables import format_load_test_rows
    from metricsearch.benchmarks.load_test import LoadTestSettings, Sample, summarize

    samples = [Sample("path", s, None) for s in (0.010, 0.020, 0.030)] + [Sample("upload", 0.5, "HTTP 503")]
    samples += [Sample("upload", s, None) for s in (0.4, 0.6)]
    info = {"count": 1999, "index_kind": "flat", "backend": "milvus"}
    report = summarize(samples, 2.0, LoadTestSettings(clients=4), "http://x", info)
    rows = {row[1]: row for row in format_load_test_rows(report)}
    assert rows["gallery path (search only)"] == ["Milvus Lite (flat, 1,999 images)", "gallery path (search only)",
                                                  "3", "0", "1.5", "20.0", "28.0", "29.8"]  # fmt: skip
    # The failed upload counts as a request and an error, and its latency stays out of the percentiles.
    assert rows["upload (decode, embed, search)"][2:] == ["3", "1", "1.5", "500.0", "580.0", "598.0"]
    assert rows["all"][2:6] == ["6", "1", "3.0", "30.0"]


def test_the_committed_load_tests_held_at_16_clients_on_both_backends():
    for name, backend in zip(LOAD_TEST_FILES, ("faiss", "milvus"), strict=True):
        report = json.loads((REPO_ROOT / "results" / "benchmark" / name).read_text())
        assert (report["index"]["backend"] or "faiss") == backend, name
        assert report["clients"] == 16 and report["mode"] == "mixed", name
        assert report["requests"] > 0 and report["errors"] == 0 and report["error_kinds"] == {}, name
        assert set(report["by_kind"]) == {"path", "upload"}, name
        assert report["command"].startswith("python scripts/load_test.py index=") and report["machine"]["cpu"], name


def test_an_unknown_table_name_is_refused():
    with pytest.raises(KeyError, match="unknown generated table 'recall'"):
        render_markers("<!-- generated: recall -->\n<!-- end generated: recall -->", {"compare": "x"})


def test_the_compare_table_is_the_summary_with_welchs_verdict():
    """Each cell recomputed here from summary.csv, the verdict from scipy's Welch test on runs.csv's tuned runs."""
    summary = read_csv(REPO_ROOT / "results" / "compare" / "summary.csv")
    runs = read_csv(REPO_ROOT / "results" / "compare" / "runs.csv")
    table = compare_table(SOURCES)
    rows = {line.split(" | ")[0].strip("| "): line for line in table.splitlines() if line.startswith("| ")}
    tuned = {row["loss"]: [] for row in summary}
    for run in runs:
        if run["kind"] == "tuned" and run["current"] == "True":
            tuned[run["loss"]].append(float(run["recall@1"]))
    means = {loss: sum(v) / len(v) for loss, v in tuned.items()}
    best = max(means, key=means.get)
    for row in summary:
        if row["metric"] != "recall@1":
            continue
        half = 100 * (float(row["ci_high"]) - float(row["ci_low"])) / 2
        assert f" {100 * float(row['mean']):.1f} ± {half:.1f} " in rows[row["loss"]], row
    for loss, values in tuned.items():
        verdict = rows[loss].strip().strip("|").split("|")[-1].strip()
        if loss == best:
            assert verdict == "best"
        else:
            p = stats.ttest_ind(values, tuned[best], equal_var=False).pvalue
            assert verdict == ("≈" if p >= 0.05 or math.isnan(p) else ""), (loss, p)


def test_the_docs_tables_script_checks_and_names_a_stale_page(tmp_path, capsys):
    root = tmp_path / "repo"
    shutil.copytree(REPO_ROOT / "results", root / "results", ignore=shutil.ignore_patterns("runs", "search", "final"))
    shutil.copytree(REPO_ROOT / "conf" / "experiment", root / "conf" / "experiment")
    (root / "docs").mkdir()
    (root / "README.md").write_text("<!-- generated: options -->\nold\n<!-- end generated: options -->\n")
    check = [sys.executable, "scripts/docs_tables.py", f"root={root}", "check=true"]
    stale = subprocess.run(check, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert stale.returncode == 1 and f"stale generated table: {root / 'README.md'}: options" in stale.stdout
    assert main_docs_tables([f"root={root}"]) == 0 and "updated README.md" in capsys.readouterr().out
    assert main_docs_tables([f"root={root}", "check=true"]) == 0
    assert "| proxy_anchor | `backbone.global_pool=avg+max` |" in (root / "README.md").read_text()


# --- the site: a strict offline build, opened in Chromium ---


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out


def test_the_site_builds_strictly_with_every_page_and_picture(site):
    for page in ("index", "getting-started", "comparison", "datasets", "search", "performance", "api"):
        assert (site / f"{page}.html").is_file(), page
    assert (site / "results" / "compare" / "synthetic" / "intervals.png").is_file()
    assert (site / "search_page.png").is_file()
    api = (site / "api.html").read_text()
    assert "calc_retrieval_metrics" in api and "RetrievalMetric" in api  # read from the docstrings
    # Offline: no page asks a font or script from another host.
    for html in site.glob("*.html"):
        text = html.read_text()
        assert "fonts.googleapis.com" not in text and "fonts.gstatic.com" not in text, html.name


def test_a_strict_build_fails_on_a_broken_link(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "index.md").write_text("# Home\n\nSee [the missing page](missing.md).\n")
    (tmp_path / "mkdocs.yml").write_text("site_name: t\ntheme:\n  name: material\n  font: false\n")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=tmp_path,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0 and "missing.md" in result.stdout + result.stderr


# A picture has loaded: the browser decoded it (naturalWidth is 0 for a missing or broken file).
LOADED = '(() => { const i = document.querySelector("%s"); return i && i.complete && i.naturalWidth > 0; })()'


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def served(site):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(site)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.mark.browser
@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's Chromium: sudo apt-get install -y chromium")
def test_the_home_page_and_the_comparison_render_in_chromium(served):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.set_default_timeout(20_000)
        failed = []
        page.on("requestfailed", lambda request: failed.append(request.url))

        page.goto(served + "/index.html")
        assert "MetricSearch" in page.title()
        assert page.inner_text("article h1").strip().startswith("MetricSearch")
        page.wait_for_function(LOADED % "article img[src$='search_demo_grid.png']")
        assert page.locator("nav").first.is_visible()

        page.click("text=The fair comparison")
        page.wait_for_url("**/comparison.html")
        assert page.inner_text("article h1").removesuffix("¶").strip() == "The fair comparison"
        assert "multi_similarity" in page.inner_text("article table")
        page.wait_for_function(LOADED % "article img[src$='intervals.png']")
        browser.close()
    assert not [url for url in failed if url.startswith(served)], failed
