"""Untrusted dataset files: copying a dataset folder without following symlinks out of it, and
unpacking its archives without letting them write outside their folder or fill the disk.

Every file that is not copied comes back as a {path, reason} row (paths relative to the dataset),
so the bucket stage can list it in skipped.parquet: nothing is lost silently.
"""

from __future__ import annotations

import os
import shutil
import tarfile
import zipfile
from pathlib import Path, PurePosixPath

ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")
# Images barely compress (they are compressed already), while a zip bomb expands a thousandfold.
MAX_COMPRESSION_RATIO = 200
CHUNK = 1 << 20


def printable(name: str) -> str:
    """A file name as UTF-8 text; bytes that are not UTF-8 are shown as \\xNN escapes."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def dataset_files(root: Path, allowed: Path | None) -> tuple[list[tuple[str, Path]], list[dict]]:
    """(relative name, real file) for every file under `root`, and {path, reason} for the rest.

    A symlink is followed only when its target lies inside `allowed` (None: anywhere); a broken one,
    a loop, a FIFO or a device is reported, as is a name that is not UTF-8 (DVC and Parquet store
    names as UTF-8 text)."""
    files: list[tuple[str, Path]] = []
    skipped: list[dict] = []
    allowed = allowed.resolve() if allowed else None

    def walk(directory: Path, prefix: str, stack: tuple[Path, ...]) -> None:
        for entry in sorted(os.scandir(directory), key=lambda e: e.name):
            relative, path = prefix + entry.name, Path(entry.path)
            if printable(entry.name) != entry.name:
                skipped.append({"path": printable(relative), "reason": "name_not_utf8 (rename the file)"})
                continue
            if entry.is_symlink():
                try:
                    target = path.resolve(strict=True)
                except (OSError, RuntimeError):
                    skipped.append({"path": relative, "reason": "broken_symlink"})
                    continue
                if allowed is not None and not target.is_relative_to(allowed):
                    skipped.append(
                        {"path": relative, "reason": "symlink_outside_dataset (download.allow_symlinks)"}
                    )
                    continue
                path = target
            if path.is_dir():
                real = path.resolve()
                if real in stack:
                    skipped.append({"path": relative, "reason": "symlink_loop"})
                else:
                    walk(path, relative + "/", (*stack, real))
            elif path.is_file():
                files.append((relative, path))
            else:
                skipped.append({"path": relative, "reason": "not_a_regular_file"})

    walk(root, "", (root.resolve(),))
    return files, skipped


def copy_dataset(source: Path, target: Path, allowed: Path | None, max_extracted_gb: float) -> list[dict]:
    """Copy (hard-link where possible) the files of `source` into `target`, unpacking archives into
    a folder named after them; returns the skipped rows."""
    files, skipped = dataset_files(source, allowed)
    for relative, path in files:
        if ".cache" in PurePosixPath(relative).parts:  # huggingface_hub's download metadata
            continue
        destination = target / relative
        destination.parent.mkdir(parents=True, exist_ok=True)
        if relative.lower().endswith(ARCHIVE_SUFFIXES):
            skipped += extract_archive(path, relative, target, int(max_extracted_gb * 2**30))
            continue
        try:
            os.link(path, destination)
        except OSError:
            try:
                shutil.copy2(path, destination)
            except OSError as err:
                destination.unlink(missing_ok=True)  # a copy cut short is not the file
                skipped.append({"path": relative, "reason": f"unreadable: {err.strerror}"})
    return skipped


def archive_folder(relative: str) -> str:
    """photos.tar.gz -> photos: where an archive's members go."""
    lower = relative.lower()
    return relative[: -len(next(s for s in ARCHIVE_SUFFIXES if lower.endswith(s)))]


def member_problem(name: str) -> str | None:
    """Why an archive member name may not be extracted, if it may not."""
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if name.startswith(("/", "\\")) or (parts and parts[0].endswith(":")):
        return f"archive_path_traversal: member '{name}' is an absolute path"
    if ".." in parts:
        return f"archive_path_traversal: member '{name}' leaves the archive's folder"
    return None


def extract_archive(archive: Path, relative: str, target: Path, max_bytes: int) -> list[dict]:
    """Unpack `archive` into target/<its name without suffix>. An archive with a member that would
    land outside that folder, or whose contents exceed `max_bytes` or MAX_COMPRESSION_RATIO times its
    own size, is refused whole (one skipped row); links and devices inside it are skipped."""
    limit = min(max_bytes, MAX_COMPRESSION_RATIO * max(archive.stat().st_size, 1))
    folder = target / archive_folder(relative)
    try:
        if zipfile.is_zipfile(archive):
            return _extract_zip(archive, relative, folder, limit)
        with tarfile.open(archive) as tar:
            return _extract_tar(tar, relative, folder, limit)
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as err:
        shutil.rmtree(folder, ignore_errors=True)
        return [{"path": relative, "reason": f"unreadable_archive: {err}"}]


def _too_large(total: int, limit: int) -> str:
    return (
        f"archive_too_large: {total / 2**20:.0f} MiB unpacked exceeds {limit / 2**20:.0f} MiB "
        f"(download.max_extracted_gb, or {MAX_COMPRESSION_RATIO}x the archive)"
    )


def refusal(names: list[str], total: int, limit: int) -> str | None:
    """Why a whole archive (its member names, their declared total size) may not be unpacked."""
    problems = (member_problem(name) for name in names)
    return next((p for p in problems if p), None) or (_too_large(total, limit) if total > limit else None)


def _extract_zip(archive: Path, relative: str, folder: Path, limit: int) -> list[dict]:
    with zipfile.ZipFile(archive) as zf:
        members = [m for m in zf.infolist() if not m.is_dir()]
        total = sum(m.file_size for m in members)
        if problem := refusal([m.filename for m in members], total, limit):
            return [{"path": relative, "reason": problem}]
        written = 0
        for member in members:
            destination = folder / member.filename
            destination.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(member) as src, open(destination, "wb") as dst:
                # The sizes in a zip's directory are not to be trusted: count what actually comes out.
                while chunk := src.read(CHUNK):
                    written += len(chunk)
                    if written > limit:
                        shutil.rmtree(folder, ignore_errors=True)
                        return [{"path": relative, "reason": _too_large(written, limit)}]
                    dst.write(chunk)
    return []


def _extract_tar(tar: tarfile.TarFile, relative: str, folder: Path, limit: int) -> list[dict]:
    members = tar.getmembers()
    total = sum(m.size for m in members if m.isfile())
    if problem := refusal([m.name for m in members], total, limit):
        return [{"path": relative, "reason": problem}]
    skipped = [
        {"path": f"{relative}/{m.name}", "reason": "archive_member_not_a_file"}
        for m in members
        if not (m.isfile() or m.isdir())
    ]
    folder.mkdir(parents=True, exist_ok=True)
    # tar sizes are exact (the stream is read member by member); the data filter is a second guard.
    tar.extractall(folder, members=[m for m in members if m.isfile() or m.isdir()], filter="data")
    return skipped
