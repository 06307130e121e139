"""A record of the downloaded data files, so that a copied data folder can be checked file by file.

`python -m labutils data fetch` writes MANIFEST.json into the data folder. For each data set it lists every file
under the data set's folder with its path relative to the data folder, its size in bytes and its SHA-256.
`verify` compares the files on disk with that record and reports each missing, truncated or corrupted file.
Files and folders whose names start with a dot (such as .DS_Store) are neither recorded nor checked.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

from labutils import data

MANIFEST_NAME = "MANIFEST.json"
MANIFEST_FORMAT = 1
CHUNK_BYTES = 1 << 20


@dataclass(frozen=True)
class Problem:
    """One file, or one data set, that does not match the manifest."""

    dataset: str
    path: str  # relative to the data folder
    kind: str  # missing, truncated, size, corrupted or unrecorded
    detail: str

    def describe(self) -> str:
        """Return one line naming the file, what is wrong with it and how to fix it."""
        if self.kind == "unrecorded":
            return (f"{self.path}: {self.detail}. Run `python -m labutils data fetch {self.dataset}` on the machine "
                    "these files came from: with complete files it downloads nothing and records them.")
        return f"{self.path}: {self.detail}. Fix: {self.fix()}."

    def fix(self) -> str:
        """Return how to restore the file: each data set is restored in its own way by `data fetch`."""
        copy = "copy it again from the instructor's machine"
        fetch = f"`python -m labutils data fetch {self.dataset}`"
        parts = self.path.split("/")
        if self.dataset == "omniglot" and len(parts) > 2:
            set_folder = "/".join(parts[:2])
            return (f"delete the folder {set_folder} and run {fetch}, which extracts it again from "
                    f"{set_folder}.zip when that archive is intact or downloads it while online, or {copy}")
        if self.path.endswith((".gz", ".zip")):
            return f"{copy}; the loader does not need archives, so the data set still loads without it"
        return f"delete it if present and run {fetch} while online, or {copy}"


def dataset_folder(name: str, root: data.PathLike | None = None) -> Path:
    """Return the folder that contains the files of data set `name` (not `digits`, which ships with scikit-learn)."""
    folder = data.resolve_data_dir(root)
    if name == "omniglot":
        return folder / "omniglot-py"
    if name in data.IDX_DATASET_CLASSES:
        return folder / data.IDX_DATASET_CLASSES[name]
    raise ValueError(f"Data set {name!r} has no files in the data folder: use one of "
                     f"{', '.join(data.DATASETS[1:])}.")


def dataset_files(name: str, root: data.PathLike | None = None) -> list[Path]:
    """Return the files of data set `name`, sorted, without hidden files and folders."""
    folder = dataset_folder(name, root)
    if not folder.is_dir():
        return []
    files = []
    for directory, subfolders, names in os.walk(folder):
        subfolders[:] = sorted(sub for sub in subfolders if not sub.startswith("."))
        files.extend(Path(directory) / file_name for file_name in names if not file_name.startswith("."))
    return sorted(files)


def disk_bytes(name: str, root: data.PathLike | None = None) -> int:
    """Return the total size in bytes of the files of data set `name`, 0 when it has none."""
    return sum(path.stat().st_size for path in dataset_files(name, root))


def format_bytes(size: int) -> str:
    """Return a size in bytes as a short decimal string such as 55.1 MB."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} B"


def sha256(path: Path) -> str:
    """Return the SHA-256 of a file as hex, read in chunks so that large files need little memory."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def manifest_path(root: data.PathLike | None = None) -> Path:
    """Return the path of the manifest in the data folder."""
    return data.resolve_data_dir(root) / MANIFEST_NAME


def load_manifest(root: data.PathLike | None = None) -> dict[str, Any]:
    """Read the manifest, or return an empty one when the data folder has none.

    Raises ValueError when the file exists but is not a manifest, for example after an interrupted copy.
    """
    path = manifest_path(root)
    if not path.is_file():
        return {"format": MANIFEST_FORMAT, "datasets": {}}
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error}): copy it again, or delete it and run "
                         "`python -m labutils data fetch NAME...` to record the files again.") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("datasets"), dict):
        raise ValueError(f"{path} has no 'datasets' table, so it is not a labutils manifest: delete it and run "
                         "`python -m labutils data fetch NAME...` to record the files again.")
    return manifest


def record(names: Iterable[str], root: data.PathLike | None = None) -> Path:
    """Record the current files of data sets `names` in the manifest, keeping the entries of other data sets.

    Returns the manifest's path. The file is replaced atomically, so a reader never sees half of it.
    """
    folder = data.resolve_data_dir(root)
    manifest = load_manifest(root)
    for name in names:
        files = [{"path": path.relative_to(folder).as_posix(), "size": path.stat().st_size, "sha256": sha256(path)}
                 for path in dataset_files(name, root)]
        manifest["datasets"][name] = {"recorded": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                                      "files": files}
    manifest["format"] = MANIFEST_FORMAT
    path = manifest_path(root)
    temporary = path.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    temporary.replace(path)
    return path


def verify(root: data.PathLike | None = None, names: Iterable[str] | None = None) -> list[Problem]:
    """Compare the files on disk with the manifest and return every mismatch, an empty list when all match.

    `names` defaults to every data set in the manifest plus every data set with files on disk. A data set with
    files but no manifest entry is reported once as "unrecorded".
    """
    folder = data.resolve_data_dir(root)
    recorded = load_manifest(root)["datasets"]
    if names is None:
        names = [name for name in data.DATASETS[1:] if name in recorded or dataset_files(name, root)]
    problems: list[Problem] = []
    for name in names:
        if name not in recorded:
            if dataset_files(name, root):
                relative = dataset_folder(name, root).relative_to(folder).as_posix()
                problems.append(Problem(name, relative, "unrecorded", f"no entry in {MANIFEST_NAME}, so its files "
                                                                        "cannot be checked"))
            continue
        problems.extend(_check_file(name, folder, entry) for entry in recorded[name]["files"])
    return [problem for problem in problems if problem is not None]


def _check_file(name: str, folder: Path, entry: dict[str, Any]) -> Problem | None:
    path = folder / entry["path"]
    expected = int(entry["size"])
    if not path.is_file():
        return Problem(name, entry["path"], "missing", "missing")
    size = path.stat().st_size
    if size < expected:
        return Problem(name, entry["path"], "truncated", f"truncated, {size:,} of {expected:,} bytes")
    if size > expected:
        return Problem(name, entry["path"], "size", f"{size:,} bytes where the manifest records {expected:,}")
    if sha256(path) != entry["sha256"]:
        return Problem(name, entry["path"], "corrupted", "corrupted: its SHA-256 differs from the manifest")
    return None
