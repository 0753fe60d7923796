"""`OUT/report.html`: self-contained, flagged images first, usable at 100,000 rows; rendered in a
real headless Chromium where one is installed (Debian's `chromium`)."""

from __future__ import annotations

import csv
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from lungrt.cli import app
from lungrt.inference.infer import CSV_FIELDS
from lungrt.data.io import write_png
from lungrt.data.phantoms import make_phantom
from lungrt.inference.report import MAX_THUMBS, write_report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="no headless Chromium here (apt-get install chromium)")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_checkpoint):
    tmp = tmp_path_factory.mktemp("report")
    src = tmp / "in"
    for i in range(6):
        write_png(src / f"p{i}.png", (make_phantom(i, 96).image * 255).astype(np.uint8))
    write_png(src / "noise.png", (np.random.default_rng(0).random((96, 96)) * 255).astype(np.uint8))  # no chest at all
    (src / "broken.png").write_bytes(b"not a png")
    out = tmp / "out"
    res = CliRunner().invoke(
        app, ["infer", str(src), "--out", str(out), "--model", str(tiny_checkpoint), "--backend", "torch", "--report"]
    )
    assert res.exit_code == 3, res.output
    return out


def _rows(out: Path) -> list[dict]:
    with open(out / "results.csv") as f:
        return list(csv.DictReader(f))


def test_report_is_self_contained_with_flagged_first(run_dir):
    page = (run_dir / "report.html").read_text()
    rows = _rows(run_dir)
    flagged = [r for r in rows if r["status"] == "ok" and r["qc"] != "ok"]
    assert flagged, "the noise image must be flagged"
    assert f"{len(flagged)} flagged by QC" in page and "1 failed" in page and f"{len(rows)} images" in page
    assert not re.search(r"""(src|href)=["']https?://""", page)  # works offline: nothing fetched
    first_card = re.search(r'<figure class="card (\w+)"', page).group(1)
    assert first_card == "flagged"
    assert page.count("data:image/jpeg;base64,") == len(rows) - 1  # every readable image, the broken one without


def test_report_command_rewrites_it(run_dir):
    (run_dir / "report.html").unlink()
    res = CliRunner().invoke(app, ["report", str(run_dir)])
    assert res.exit_code == 0 and (run_dir / "report.html").is_file()
    res = CliRunner().invoke(app, ["report", str(run_dir / "nothing")])
    assert res.exit_code == 2 and "results.csv" in res.output


def _big_run(folder: Path, n: int) -> Path:
    folder.mkdir()
    rng = np.random.default_rng(1)
    with open(folder / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        for i in range(n):
            w.writerow(
                {
                    "path": f"/data/x{i:06d}.png",
                    "status": "ok",
                    "qc": "ok" if i % 50 else "unbalanced",
                    "lung_fraction": f"{rng.uniform(0.1, 0.4):.4f}",
                    "right_lung_px": int(rng.integers(1000, 9000)),
                    "left_lung_px": int(rng.integers(1000, 9000)),
                    "width": 512,
                    "height": 512,
                    "mask": "",
                }
            )
    return folder


def test_hundred_thousand_rows_stay_usable(tmp_path):
    out = _big_run(tmp_path / "big", 100_000)
    path = write_report(out)
    size = path.stat().st_size
    assert size < 40 * 2**20, size  # a few tens of MB at most: thumbnails are capped, rows are compact JSON
    page = path.read_text()
    assert page.count('<figure class="card') == MAX_THUMBS
    assert "const PAGE = 100" in page


@needs_chromium
def test_chromium_renders_table_and_flagged_first(run_dir, tmp_path):
    dom = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", (run_dir / "report.html").as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    body = dom[dom.index("<tbody>") : dom.index("</tbody>")]
    trs = re.findall(r'<tr class="(\w*)">', body)
    assert len(trs) == len(_rows(run_dir))  # the script ran and rendered every row
    assert trs[0] == "flag" and "page 1 of 1" in dom
    shot = tmp_path / "shot.png"
    subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--window-size=1200,900",
            f"--screenshot={shot}",
            (run_dir / "report.html").as_uri(),
        ],
        capture_output=True,
        timeout=120,
    )
    assert shot.stat().st_size > 10_000


@needs_chromium
def test_chromium_pages_a_hundred_thousand_rows(tmp_path):
    path = write_report(_big_run(tmp_path / "big", 100_000))
    dom = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", path.as_uri()],
        capture_output=True,
        text=True,
        timeout=180,
    ).stdout
    body = dom[dom.index("<tbody>") : dom.index("</tbody>")]
    assert body.count("<tr") == 100 and "100000 rows, page 1 of 1000" in dom


@pytest.mark.parametrize("damage", ["cut short", "not lungrt's", "missing"])
def test_report_rebuilds_from_the_journal_and_says_so(run_dir, tmp_path, damage, caplog):
    out = tmp_path / "out"
    shutil.copytree(run_dir, out)
    whole = (out / "results.csv").read_text()
    if damage == "cut short":
        (out / "results.csv").write_text("\n".join(whole.splitlines()[:3]) + "\n")
    elif damage == "not lungrt's":
        (out / "results.csv").write_text("name,value\na,1\n")
    else:
        (out / "results.csv").unlink()
    with caplog.at_level("WARNING", logger="lungrt"):
        page = write_report(out).read_text()
    assert [r for r in caplog.records if "built from the journal" in r.getMessage()]
    n = len(whole.splitlines()) - 1
    assert f"{n} images" in page and "1 failed" in page


def test_report_failures_are_one_line(run_dir, tmp_path, monkeypatch):
    from lungrt.data import io as io_mod

    def read_only(*a, **k):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(io_mod, "atomic_write_bytes", read_only)
    res = CliRunner().invoke(app, ["report", str(run_dir)])
    assert res.exit_code == 2 and "Read-only file system" in res.output and "Traceback" not in res.output
    monkeypatch.undo()
    empty = tmp_path / "empty"
    empty.mkdir()
    res = CliRunner().invoke(app, ["report", str(empty)])
    assert res.exit_code == 2 and "no lungrt journal" in " ".join(res.output.split())


@pytest.fixture(scope="module")
def hostile_run(tmp_path_factory, tiny_checkpoint):
    """Input names that try to end the page's script: the table must still hold every row."""
    tmp = tmp_path_factory.mktemp("hostile")
    src = tmp / "in"
    for i, name in enumerate(["<!--<script>.png", "</script><b>x.png", "a&amp;b.png", "plain.png"]):
        write_png(src / name, (make_phantom(i, 96).image * 255).astype(np.uint8))
    out = tmp / "out"
    res = CliRunner().invoke(
        app, ["infer", str(src), "--out", str(out), "--model", str(tiny_checkpoint), "--backend", "torch", "--report"]
    )
    assert res.exit_code == 0, res.output
    return out


@needs_chromium
def test_names_that_would_end_the_script_do_not_empty_the_table(hostile_run):
    dom = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", (hostile_run / "report.html").as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    body = dom[dom.index("<tbody>") : dom.index("</tbody>")]
    assert body.count("<tr") == 4, body[:2000]
    assert "&lt;!--&lt;script&gt;.png" in body or "&lt;!--&lt;script>.png" in body


def test_report_reads_nothing_a_hand_edited_csv_points_outside_the_run(hostile_run, tmp_path):
    secret = tmp_path / "elsewhere.png"
    write_png(secret, (make_phantom(9, 96).image * 255).astype(np.uint8))
    rows = _rows(hostile_run)
    rows[0]["path"] = str(secret)  # a source this run never read
    rows[1]["mask"] = "../../" + str(secret)  # a mask outside the output folder
    with open(hostile_run / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        w.writerows(rows)
    page = write_report(hostile_run).read_text()
    assert page.count("data:image/jpeg;base64,") == 2  # only the two untouched rows get a thumbnail


def test_one_list_of_result_columns():
    from lungrt.inference.report import TABLE_COLUMNS

    assert set(TABLE_COLUMNS) <= set(CSV_FIELDS)
    root = Path(__file__).resolve().parents[1]
    readme = "".join(p.read_text() for p in [root / "README.md", *sorted((root / "docs").glob("*.md"))])
    promised = set(re.findall(r"`(qc_[a-z_]+)`", readme))  # the columns README and docs promise
    assert promised and promised <= set(CSV_FIELDS), promised - set(CSV_FIELDS)
