"""`OUT/report.html`: one self-contained static page for a finished `lungrt infer` run.

No server and no network: plots and overlay thumbnails are embedded (base64), the table's rows are
embedded as JSON and rendered by a few lines of JavaScript (sortable by any column, filterable,
100 rows a page). For large runs the page stays usable: thumbnails are capped (flagged images
first, then failed, then a sample of the rest; `MAX_THUMBS` in all), the table pages through every
row, and results.csv stays the full record.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import logging
from pathlib import Path

import cv2
import numpy as np

from lungrt.core.errors import LungrtError, one_line
from lungrt.inference.journal import read_records, records_folder
from lungrt.core.plots import figure
from lungrt.inference.infer import REPORT_COLUMNS

log_ = logging.getLogger(__name__)
MAX_THUMBS = 240
THUMB_PX = 180
TABLE_COLUMNS = REPORT_COLUMNS  # a subset of results.csv's own columns (lungrt.inference.infer.CSV_FIELDS)


def script_json(value) -> str:
    """JSON to embed in a <script> element: every <, > and & as a \\u escape, so no file name (`<!--`,
    `</script>`, `<script>`) can end the element or switch the HTML parser into another state."""
    return json.dumps(value).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _inside(folder: Path, path: Path) -> bool:
    root, real = folder.resolve(), path.resolve()
    return real == root or root in real.parents


def _rows(out_dir: Path) -> list[dict]:
    """The run's rows: results.csv, or, when it is missing, unreadable, not lungrt's or shorter than
    the journal (a run stopped before writing it, a file cut short), the journal's own lines, which
    every finished input has (said in one log line)."""
    journal = sorted(read_records(out_dir).values(), key=lambda r: str(r.get("rel", "")))
    path = out_dir / "results.csv"
    try:
        with open(path, encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f))
        why = None if rows and {"path", "status"} <= set(rows[0]) else "is not a lungrt results table"
    except FileNotFoundError:
        rows, why = [], "is missing"
    except (OSError, csv.Error, UnicodeDecodeError) as e:
        rows, why = [], f"is unreadable ({one_line(e, 120)})"
    if why is None and len(rows) >= len(journal):
        return rows
    if not journal:
        raise LungrtError(
            f"{path}: {why or 'holds no rows'}, and {out_dir} has no lungrt journal; run `lungrt infer ... "
            f"--out {out_dir}` first"
        )
    log_.warning(
        "%s %s; the report is built from the journal's %d rows",
        path,
        why or f"holds {len(rows)} rows of the journal's {len(journal)} (cut short?)",
        len(journal),
    )
    return [{k: "" if r.get(k) is None else r.get(k) for k in r} for r in journal]


def _float(v) -> float | None:
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def _png_b64(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    return base64.b64encode(buf.getvalue()).decode()


def _distributions(rows: list[dict]) -> str:
    ok = [r for r in rows if r["status"] == "ok"]
    panels = [("lung fraction of the image", "lung_fraction"), ("right / left lung area", "ratio")]
    if any(_float(r.get("qc_shape_dice")) is not None for r in ok):  # a model with a shape model
        panels.append(("estimated Dice: mask against its plausible shape", "qc_shape_dice"))
    fig = figure(figsize=(5 * len(panels), 3.2))
    axes = fig.subplots(1, len(panels))
    for ax, (label, key) in zip(axes, panels):

        def value(r):
            if key == "ratio":
                right, left = _float(r["right_lung_px"]), _float(r["left_lung_px"])
                return right / left if right is not None and left else None
            return _float(r.get(key))

        normal = [v for r in ok if r.get("qc") == "ok" and (v := value(r)) is not None]
        flagged = [v for r in ok if r.get("qc") not in ("ok", None) and (v := value(r)) is not None]
        bins = np.histogram_bin_edges(normal + flagged or [0.0, 1.0], bins=40)
        ax.hist(normal, bins=bins, color="tab:blue", alpha=0.8, label=f"QC ok ({len(normal)})")
        ax.hist(flagged, bins=bins, color="tab:red", alpha=0.8, label=f"flagged ({len(flagged)})")
        ax.set(xlabel=label, ylabel="images")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return _png_b64(fig)


def _thumbnail(out_dir: Path, row: dict, run_sources: set[str]) -> str | None:
    """A small overlay (red outline of the mask on the X-ray) as a base64 JPEG: only of an input this run's
    journal names and a mask inside the output folder (a hand-edited results.csv reaches nothing else)."""
    from lungrt.data.io import read_xray

    if row.get("path") not in run_sources:
        return None
    mask_path = out_dir / str(row.get("mask") or "")
    if not row.get("mask") or not _inside(out_dir, mask_path):
        return None
    try:
        gray = read_xray(row["path"]).gray8
    except Exception:
        return None
    mask = cv2.imread(str(mask_path), cv2.IMREAD_GRAYSCALE)
    scale = THUMB_PX / max(gray.shape)
    size = (max(1, round(gray.shape[1] * scale)), max(1, round(gray.shape[0] * scale)))
    rgb = cv2.cvtColor(cv2.resize(gray, size, interpolation=cv2.INTER_AREA), cv2.COLOR_GRAY2BGR)
    if mask is not None:
        small = cv2.resize(mask, size, interpolation=cv2.INTER_NEAREST)
        contours, _ = cv2.findContours((small > 127).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(rgb, contours, -1, (40, 40, 240), 1)
    ok, buf = cv2.imencode(".jpg", rgb, [cv2.IMWRITE_JPEG_QUALITY, 80])
    return base64.b64encode(buf.tobytes()).decode() if ok else None


def _ordered_for_thumbs(rows: list[dict]) -> list[dict]:
    flagged = [r for r in rows if r["status"] == "ok" and r.get("qc", "ok") != "ok"]
    failed = [r for r in rows if r["status"] != "ok"]
    rest = [r for r in rows if r["status"] == "ok" and r.get("qc", "ok") == "ok"]
    room = max(0, MAX_THUMBS - len(flagged) - len(failed))
    step = max(1, len(rest) // room) if room else len(rest) + 1
    return (flagged + failed)[:MAX_THUMBS] + rest[::step][:room]


def write_report(out_dir: str | Path) -> Path:
    """Write OUT/report.html for the run in `out_dir`; returns its path."""
    out_dir = Path(out_dir)
    rows = _rows(out_dir)
    summary_path = records_folder(out_dir) / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    n_ok = sum(r["status"] == "ok" for r in rows)
    n_failed = sum(r["status"] == "error" for r in rows)  # "skipped" (header screening) is neither
    n_flagged = sum(r["status"] == "ok" and r.get("qc", "ok") != "ok" for r in rows)
    models = sorted({r.get("model", "") for r in rows if r.get("model")})
    backends = sorted({r.get("backend", "") for r in rows if r.get("backend")})
    cards = []
    run_sources = {str(r.get("path")) for r in read_records(out_dir).values() if r.get("status") == "ok"}
    for r in _ordered_for_thumbs(rows):
        thumb = _thumbnail(out_dir, r, run_sources) if r["status"] == "ok" else None
        reason = {"ok": r.get("qc", ""), "skipped": f"skipped by header screening: {r.get('qc', '')}"}.get(
            r["status"], f"failed: {r.get('error', '')}"
        )
        kind = "failed" if r["status"] != "ok" else ("flagged" if reason != "ok" else "ok")
        img = f'<img src="data:image/jpeg;base64,{thumb}" alt="">' if thumb else '<div class="noimg">no image</div>'
        cards.append(
            f'<figure class="card {kind}">{img}<figcaption><b>{html.escape(Path(r["path"]).name)}</b><br>'
            f"{html.escape(reason)}</figcaption></figure>"
        )
    order = lambda r: 0 if r["status"] == "ok" and r.get("qc", "ok") != "ok" else (1 if r["status"] != "ok" else 2)  # noqa: E731
    table = [[r.get(c, "") for c in TABLE_COLUMNS] for r in sorted(rows, key=order)]
    speed = summary.get("run", {}).get("images_per_second") if "run" in summary else summary.get("images_per_second")
    page = _TEMPLATE.format(
        title=html.escape(f"lungrt run report: {out_dir.name}"),
        total=len(rows),
        ok=n_ok,
        flagged=n_flagged,
        failed=n_failed,
        model=html.escape(", ".join(models) or "?"),
        backend=html.escape(", ".join(backends) or "?"),
        speed="n/a"
        if speed is None
        else f"{speed:.1f} img/s"
        + (
            f" over {len(summary['run']['invocations'])} invocations"
            if len(summary.get("run", {}).get("invocations", [])) > 1
            else ""
        ),
        dist=_distributions(rows) if n_ok else "",
        shown=len(cards),
        max_thumbs=MAX_THUMBS,
        cards="\n".join(cards),
        columns=script_json(TABLE_COLUMNS),
        data=script_json(table),
    )
    path = out_dir / "report.html"
    from lungrt.data.io import atomic_write_bytes

    try:
        atomic_write_bytes(path, page.encode(), durable=False)
    except OSError as e:
        raise LungrtError(f"{path}: cannot write the report ({e.strerror or one_line(e)})") from None
    return path


_TEMPLATE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }}
.summary span {{ display: inline-block; margin-right: 1.5em; font-size: 1.1em; }}
.flagged-count {{ color: #c0392b; font-weight: bold; }}
.cards {{ display: flex; flex-wrap: wrap; gap: 8px; }}
.card {{ margin: 0; width: 190px; border: 3px solid #ccc; padding: 3px; font-size: 12px; }}
.card.flagged {{ border-color: #e74c3c; }} .card.failed {{ border-color: #555; background: #eee; }}
.card img {{ width: 180px; }} .noimg {{ width: 180px; height: 60px; color: #888; }}
.card figcaption {{ overflow-wrap: anywhere; }}
table {{ border-collapse: collapse; font-size: 12px; margin-top: .5em; }}
th, td {{ border: 1px solid #ccc; padding: 2px 6px; }} th {{ cursor: pointer; background: #f4f4f4; }}
tr.flag td {{ background: #fdecea; }} tr.fail td {{ background: #eee; }}
</style></head><body>
<h1>{title}</h1>
<p class="summary"><span>{total} images</span><span>{ok} ok</span>
<span class="flagged-count" id="flagged-count">{flagged} flagged by QC</span><span>{failed} failed</span>
<span>model: {model}</span><span>backend: {backend}</span><span>speed: {speed}</span></p>
<h2>Distributions (red: flagged)</h2>
<img alt="distributions" src="data:image/png;base64,{dist}">
<h2>Look at these first</h2>
<p>Flagged masks first (red frame), then failed inputs, then a sample of the rest: {shown} thumbnails
(at most {max_thumbs}; the table below lists every image). Red outline: the predicted lung field.</p>
<div class="cards" id="cards">{cards}</div>
<h2>All images</h2>
<p><input id="filter" placeholder="filter (any column)" size="40"> <span id="pageinfo"></span>
<button id="prev">&lt;</button> <button id="next">&gt;</button> (click a column to sort)</p>
<table id="results"><thead></thead><tbody></tbody></table>
<script>
const COLS = {columns};
const DATA = {data};
const PAGE = 100;
let rows = DATA.slice(), page = 0, sortCol = -1, asc = true;  // as written: flagged first
const num = v => (v === "" || isNaN(Number(v))) ? null : Number(v);
function cmp(a, b) {{
  const x = a[sortCol], y = b[sortCol], nx = num(x), ny = num(y);
  const r = (nx !== null && ny !== null) ? nx - ny : String(x).localeCompare(String(y));
  return asc ? r : -r;
}}
function render() {{
  const f = document.getElementById("filter").value.toLowerCase();
  rows = DATA.filter(r => !f || r.join(" ").toLowerCase().includes(f));
  if (sortCol >= 0) rows.sort(cmp);
  const pages = Math.max(1, Math.ceil(rows.length / PAGE));
  page = Math.min(page, pages - 1);
  document.querySelector("#results thead").innerHTML = "<tr>" + COLS.map((c, i) =>
    `<th data-i="${{i}}">${{c}}${{i === sortCol ? (asc ? " \u25b2" : " \u25bc") : ""}}</th>`).join("") + "</tr>";
  const body = rows.slice(page * PAGE, (page + 1) * PAGE).map(r => {{
    const cls = r[1] !== "ok" ? "fail" : (r[2] !== "ok" ? "flag" : "");
    const cell = v => `<td>${{String(v).replace(/&/g, "&amp;").replace(/</g, "&lt;")}}</td>`;
    return `<tr class="${{cls}}">` + r.map(cell).join("") + "</tr>";
  }});
  document.querySelector("#results tbody").innerHTML = body.join("");
  document.getElementById("pageinfo").textContent = `${{rows.length}} rows, page ${{page + 1}} of ${{pages}}`;
  document.querySelectorAll("#results th").forEach(th => th.onclick = () => {{
    const i = Number(th.dataset.i); asc = (i === sortCol) ? !asc : true; sortCol = i; render(); }});
}}
document.getElementById("filter").oninput = () => {{ page = 0; render(); }};
document.getElementById("prev").onclick = () => {{ page = Math.max(0, page - 1); render(); }};
document.getElementById("next").onclick = () => {{ page += 1; render(); }};
render();
</script></body></html>
"""
