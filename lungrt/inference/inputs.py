"""Finding a run's inputs (files, folders, globs, fetched PACS studies) and naming each one's outputs:
a stable order, a unique stem per input, never a path that climbs out of the output folder."""

from __future__ import annotations

import fnmatch
import glob
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lungrt.core.errors import LungrtError
from lungrt.data.io import DICOM_SUFFIXES, IMAGE_SUFFIXES, is_special_file, is_supported


@dataclass(frozen=True)
class Item:
    source: Path
    rel: Path  # output path stem relative to the output folder, without suffix
    error: str = ""  # known before reading (a broken link, an unreadable folder): becomes its row
    where: Path | None = None  # the file from any working folder (a Ray worker's is not the driver's)
    array: np.ndarray | None = field(default=None, compare=False, repr=False)  # an image given as pixels (the API)

    @property
    def file(self) -> Path:
        return self.where or self.source


OUTPUT_SUFFIXES = (".mask.png", ".overlay.png", ".prob.png", ".seg.dcm")


MAX_NAME_BYTES = 160  # leaves room for ".overlay.png" and the temp-file affixes under NAME_MAX (255)


def display_path(path) -> str:
    """A path as text that any encoder accepts: undecodable bytes of a file name shown as \\xNN."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _safe_part(part: str) -> str:
    """One output path component: valid UTF-8, no control characters, not hidden, not too long."""
    text = os.fsencode(part).decode("utf-8", "replace").replace("\ufffd", "_")
    text = "".join("_" if ord(c) < 32 or ord(c) == 127 else c for c in text)
    if text.startswith("."):
        text = "_" + text
    if len(text.encode()) > MAX_NAME_BYTES:
        digest = hashlib.sha1(os.fsencode(part)).hexdigest()[:8]
        text = text.encode()[: MAX_NAME_BYTES - 9].decode("utf-8", "ignore") + "~" + digest
    return text or "_"


def _safe_rel(rel: Path) -> Path:
    """Relative path that cannot climb out of the output folder or hide as a dotfile."""
    parts = [_safe_part(p) for p in rel.parts if p not in ("", ".", "..", "/")]
    return Path(*parts) if parts else Path("_")


def _walk_files(folder: Path):
    """(path, error) for every file under `folder`, following folder links once each (a link loop
    is visited once, never forever); unreadable folders and broken links come with their error."""
    seen: set[str] = set()
    errors: list[tuple[Path, str]] = []
    for root, dirs, files in os.walk(
        folder,
        followlinks=True,
        onerror=lambda e: errors.append((Path(e.filename), f"unreadable folder ({e.strerror})")),
    ):
        real = os.path.realpath(root)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = sorted(
            d for d in dirs if not d.startswith(".") and os.path.realpath(os.path.join(root, d)) not in seen
        )
        for name in sorted(files):
            f = Path(root) / name
            if name.startswith("."):
                continue
            if os.path.islink(f) and not os.path.exists(f):
                yield f, "broken symbolic link (dangling, or a loop)"
            elif is_special_file(f):  # never opened: a FIFO would block the listing forever
                yield f, "not a regular file (a FIFO, socket or device); never read"
            elif is_supported(f):
                yield f, ""
    yield from errors


def _glob_base(spec: str) -> Path:
    """The longest leading folder of a glob without wildcards."""
    parts = Path(spec).parts
    k = next((i for i, p in enumerate(parts) if glob.has_magic(p)), len(parts))
    return Path(*parts[:k]) if k else Path(".")


def _match_parts(parts: tuple[str, ...], pats: tuple[str, ...]) -> bool:
    if not pats:
        return not parts
    if pats[0] == "**":
        return any(_match_parts(parts[i:], pats[1:]) for i in range(len(parts) + 1))
    return bool(parts) and fnmatch.fnmatchcase(parts[0], pats[0]) and _match_parts(parts[1:], pats[1:])


def _glob_files(spec: str):
    """Files matching a glob; `**` walks folders without ever looping through links."""
    base = _glob_base(spec)
    pats = Path(spec).parts[len(base.parts) :] if base != Path(".") else Path(spec).parts
    if "**" not in pats:
        for f in sorted(glob.glob(spec)):
            if os.path.isfile(f) or os.path.islink(f):
                yield Path(f), ("" if os.path.exists(f) else "broken symbolic link (dangling, or a loop)")
        return
    if not base.is_dir():
        return
    for f, err in _walk_files(base):
        rel = f.relative_to(base).parts if not err.startswith("unreadable") else ()
        if err.startswith("unreadable") or _match_parts(rel, tuple(pats)):
            yield f, err


def _is_own_output(f: Path, out_dir: Path | None) -> bool:
    if out_dir is None or not f.name.endswith(OUTPUT_SUFFIXES):
        return False
    root = os.path.abspath(out_dir)
    return os.path.abspath(f).startswith(root + os.sep)


def collect_inputs(inputs: list[str], out_dir: str | Path | None = None) -> list[Item]:
    """Files, folders (recursive) and globs, in a stable order, each with a unique output stem:
    the input's path relative to the common folder of all inputs (siteA/images/x and
    siteB/images/x stay apart). lungrt's own outputs inside `out_dir` are never inputs."""
    found: dict[str, tuple[Path, Path, str]] = {}  # real path -> (source, anchor folder, error)

    def add(f: Path, anchor: Path, error: str) -> None:
        if not _is_own_output(f, Path(out_dir) if out_dir is not None else None):
            found.setdefault(os.path.realpath(f) if not error else os.path.abspath(f), (f, anchor, error))

    for spec in inputs:
        if not spec:
            raise LungrtError("an input is an empty string; give files, folders or globs")
        p = Path(spec)
        if p.is_dir():
            anchor = Path(os.path.abspath(p)).parent
            for f, err in _walk_files(p):
                add(f, anchor, err)
        elif os.path.lexists(p):  # a file, or a link that leads nowhere (its row says so)
            add(p, Path(os.path.abspath(p)).parent, "" if p.exists() else "broken symbolic link (dangling, or a loop)")
        elif glob.has_magic(spec):
            anchor = Path(os.path.abspath(_glob_base(spec)))
            for f, err in _glob_files(spec):
                add(f, anchor, err)
        else:
            raise LungrtError(f"{display_path(spec)}: no such file, folder or glob match")
    if not found:
        return []
    root = Path(os.path.commonpath([str(a) for _, a, _ in found.values()]))
    items, taken = [], set()
    for source, _, error in found.values():
        rel = _safe_rel(Path(os.path.abspath(source)).relative_to(root))
        if _image_suffix(source) and not error.startswith("unreadable"):  # CR.1.2.840.99.5457.1 keeps its UID whole
            rel = rel.with_name(rel.name.removesuffix(source.suffix))
        if rel in taken:  # a.png beside a.dcm, or names made equal by sanitising
            alt = rel.with_name(f"{rel.name}_{source.suffix.lstrip('.')}") if _image_suffix(source) else rel
            if alt in taken or alt == rel:
                alt = rel.with_name(f"{rel.name}_{hashlib.sha1(os.fsencode(source)).hexdigest()[:8]}")
            rel = alt
        taken.add(rel)
        items.append(Item(source, rel, error))
    return sorted(items, key=lambda it: str(it.rel))


def gather_inputs(inputs: list[str], out_dir: str | Path) -> tuple[list[Item], list]:
    """(items, PACS inputs) of a run's inputs: DICOMweb URLs fetched into the output folder
    (`dicomweb.fetch_inputs`), local files, folders and globs as they are (`collect_with_pacs`)."""
    from lungrt.inference.dicomweb import fetch_inputs, is_dicomweb_url

    urls = [i for i in inputs if is_dicomweb_url(i)]
    pacs_inputs = fetch_inputs(urls, prepare_out_dir(Path(out_dir))) if urls else []
    return collect_with_pacs([i for i in inputs if i not in urls], pacs_inputs, out_dir), pacs_inputs


def collect_with_pacs(local: list[str], pacs_inputs: list, out_dir: str | Path) -> list[Item]:
    """Local inputs as `collect_inputs` names them, and each PACS input's fetched instances under
    `pacs_HOST_PORT/STUDY/SERIES/SOP` (`dicomweb.PacsInput`): the two never share an output folder."""
    items = collect_inputs(local, out_dir) if local else []
    taken = {it.rel.parts[0] for it in items if it.rel.parts}
    for pacs in pacs_inputs:
        if pacs.label in taken:
            raise LungrtError(
                f"a local input's outputs would share {pacs.label}/ with {pacs.url}'s; rename it or "
                "run the PACS input with an --out of its own"
            )
        items += [
            Item(it.source, Path(pacs.label) / pacs.study / it.rel.relative_to(it.rel.parts[0]), it.error)
            for it in collect_inputs([str(pacs.folder)], out_dir)
        ]
    return sorted(items, key=lambda it: str(it.rel))


def _image_suffix(path: Path) -> str:
    """The file's suffix when it names an image format ('' for none, and for the dots inside a UID)."""
    suffix = path.suffix.lower()
    return suffix if suffix in IMAGE_SUFFIXES or suffix in DICOM_SUFFIXES else ""


def prepare_out_dir(out_dir: Path) -> Path:
    """The output folder, made if needed; one line when it cannot be one."""
    if str(out_dir) == "":
        raise LungrtError("--out is empty; name the output folder")
    if out_dir.exists() and not out_dir.is_dir():
        raise LungrtError(f"{out_dir}: --out exists and is not a folder")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LungrtError(f"{out_dir}: cannot create the output folder ({e.strerror})") from None
    return out_dir
