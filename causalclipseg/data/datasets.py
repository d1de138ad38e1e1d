"""Dataset readers: the three published layouts of text-annotated segmentation data, read into one record format.

Every reader returns a :class:`DatasetIndex`: the usable records, each ``{"image": abs path, "label": abs path,
"prompt": str}`` (the input of :func:`causalclipseg.data.pipelines.get_train_transforms` and its siblings), plus a
:class:`Problem` for every row that could not be used and every data file that no row uses. Nothing is dropped
silently: :func:`read_dataset` raises on problems unless ``strict=False``, and ``causalclipseg verify-data``
(:mod:`causalclipseg.data.verify`) prints them all.

Laterality: each layout declares whose side its captions name (:attr:`DatasetIndex.prompt_side`; see
:mod:`causalclipseg.data.prompts`). The SGSeg and LViT releases (QaTa-COV19, MosMedData+) name the viewer's side; a
datalist names the patient's side unless it says ``"prompt_side": "viewer"`` at its top level.
:func:`read_dataset` translates the prompts into the convention a model was trained with when asked to.

Layouts:

``sgseg``
    The SGSeg release of QaTa-COV19: ``prompts/annotation.json`` ``{"train": [...], "valid": [...]}`` with entries
    ``{"image_path": "mask_<name>.png", "caption": ...}``; image ``images/<split>/images/<name>.png``, mask
    ``images/<split>/masks/mask_<name>.png``.
``lvit``
    The LViT release of QaTa-COV19 and MosMedData+: ``<Split>_Folder/img/<name>``, ``<Split>_Folder/labelcol/<mask>``
    and a ``<Split>_text.xlsx`` (in the split folder, as LViT ships it, or next to it) whose columns ``Image`` (the
    MASK file name) and ``Description`` give the prompt. QaTa masks are ``mask_<name>.png`` for image ``<name>.png``;
    MosMedData+ image and mask share their name.
``datalist``
    A MONAI datalist JSON ``{"training": [{"image", "label", "prompt"}], "validation": [...], "test": [...]}`` with
    paths relative to the JSON's folder.

File and folder names are matched case-insensitively (copies of QaTa differ: ``Covid_1.PNG`` vs ``covid_1.png``);
an exact match wins, and a name matching several files that differ only by case is a problem.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from .prompts import check_prompt_side, to_model_side

logger = logging.getLogger(__name__)

__all__ = [
    "LAYOUTS",
    "dataset_prompt_side",
    "DatasetIndex",
    "Problem",
    "detect_layout",
    "index_dataset",
    "normalize_split",
    "read_datalist",
    "read_dataset",
    "read_lvit",
    "read_sgseg",
]

#: Layout names returned by :func:`detect_layout`.
LAYOUTS = ("sgseg", "lvit", "datalist")
#: Whose side each layout's captions name (a datalist may say otherwise with its own ``prompt_side``): the LViT
#: annotations of QaTa-COV19 and MosMedData+, as released by LViT and normalised by SGSeg, name the viewer's
_LAYOUT_SIDES = {"sgseg": "viewer", "lvit": "viewer", "datalist": "patient"}

_SPLIT_ALIASES = {
    "train": "train", "training": "train",
    "valid": "valid", "val": "valid", "validation": "valid",
    "test": "test", "testing": "test",
}
# Names each layout uses for a canonical split, in order of preference.
_SGSEG_SPLITS = {"train": ("train",), "valid": ("valid", "val", "validation"), "test": ("test",)}
_LVIT_FOLDERS = {"train": ("Train_Folder",), "valid": ("Val_Folder", "Valid_Folder", "Validation_Folder"),
                 "test": ("Test_Folder",)}
_LVIT_XLSX_PREFIXES = {"train": ("train",), "valid": ("val",), "test": ("test",)}
_DATALIST_KEYS = {"train": ("training", "train"), "valid": ("validation", "valid", "val"), "test": ("test", "testing")}
_DATALIST_NAMES = ("datalist.json", "dataset.json")
_MASK_PREFIX = "mask_"
_SUMMARY_PROBLEMS = 3


@dataclass(frozen=True)
class Problem:
    """One unusable row or file: where it is and why.

    Attributes:
        path: the file (or ``file:row N`` for a spreadsheet row, ``file[split][i]`` for a JSON entry).
        reason: what is wrong, in words.
    """

    path: str
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


@dataclass
class DatasetIndex:
    """Records read from one split of a dataset, and the problems met while reading it.

    Attributes:
        records: usable records ``{"image", "label", "prompt"}``, absolute paths, in the file's order.
        problems: every row that was not usable and every data file that no row uses.
        layout: one of :data:`LAYOUTS`.
        split: canonical split name, ``train``, ``valid`` or ``test``.
        source: the annotation file the records come from.
        prompt_side: whose side the prompts' "left" and "right" name: ``patient`` or ``viewer``.
    """

    records: list[dict[str, str]]
    problems: list[Problem] = field(default_factory=list)
    layout: str = ""
    split: str = ""
    source: str = ""
    prompt_side: str = "patient"

    def summary(self, max_problems: int = _SUMMARY_PROBLEMS) -> str:
        """One line: counts, and the first ``max_problems`` problems."""
        first = "; ".join(str(p) for p in self.problems[:max_problems])
        more = f" (and {len(self.problems) - max_problems} more)" if len(self.problems) > max_problems else ""
        return (f"{self.source} [{self.split}]: {len(self.records)} usable records, {len(self.problems)} problems: "
                f"{first}{more}")


class _CaseInsensitiveFS:
    """Resolves paths whose components may differ in case from the files on disk; caches directory listings."""

    def __init__(self) -> None:
        self._listings: dict[Path, dict[str, list[str]]] = {}

    def listing(self, directory: Path) -> dict[str, list[str]]:
        """Lower-cased name -> actual names in ``directory`` (empty if it is not a readable directory)."""
        if directory not in self._listings:
            names: dict[str, list[str]] = {}
            try:
                for entry in os.scandir(directory):
                    names.setdefault(entry.name.lower(), []).append(entry.name)
            except OSError:
                pass
            self._listings[directory] = names
        return self._listings[directory]

    def resolve(self, path: Path) -> tuple[Path | None, str]:
        """The existing path matching ``path`` case-insensitively, or ``None`` and the reason."""
        if path.exists():
            return path, ""
        if path.parent == path:
            return None, f"{path} does not exist"
        parent, reason = self.resolve(path.parent)
        if parent is None:
            return None, reason
        matches = self.listing(parent).get(path.name.lower(), [])
        if path.name in matches:
            return parent / path.name, ""
        if len(matches) == 1:
            return parent / matches[0], ""
        if len(matches) > 1:
            return None, f"several files match {path.name!r} case-insensitively in {parent}: {sorted(matches)}"
        return None, f"not found ({path.name!r} in {parent})"

    def files(self, directory: Path) -> list[Path]:
        """Regular files in ``directory``, sorted by name."""
        return sorted(directory / n for names in self.listing(directory).values() for n in names
                      if (directory / n).is_file())


def normalize_split(split: str) -> str:
    """Canonical split name (``train``, ``valid``, ``test``) for an alias such as ``val`` or ``validation``.

    Raises:
        ValueError: if ``split`` is not a known split name.
    """
    if not isinstance(split, str) or split.lower() not in _SPLIT_ALIASES:
        raise ValueError(f"split must be one of {sorted(_SPLIT_ALIASES)}, got {split!r}")
    return _SPLIT_ALIASES[split.lower()]


def _find_datalist(path: Path) -> Path | None:
    """The datalist JSON at ``path`` (a file, or a folder holding ``datalist.json``/``dataset.json``)."""
    if path.is_file():
        return path if path.suffix.lower() == ".json" else None
    listing = _CaseInsensitiveFS().listing(path)
    for name in _DATALIST_NAMES:
        if name in listing:
            return path / listing[name][0]
    return None


def detect_layout(path: str | os.PathLike) -> str:
    """Which layout ``path`` holds: ``sgseg``, ``lvit`` or ``datalist`` (see the module docstring).

    Args:
        path: a dataset root folder, or a datalist JSON file.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: if ``path`` holds none of the layouts.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"dataset path {str(path)!r} does not exist")
    if path.is_dir():
        fs = _CaseInsensitiveFS()
        if fs.resolve(path / "prompts" / "annotation.json")[0] is not None:
            return "sgseg"
        listing = fs.listing(path)
        if any(name.lower() in listing for names in _LVIT_FOLDERS.values() for name in names):
            return "lvit"
    datalist = _find_datalist(path)
    if datalist is not None:
        return "datalist"
    raise ValueError(
        f"path {str(path)!r} holds no known dataset layout: expected prompts/annotation.json (SGSeg), "
        f"Train_Folder/Val_Folder/Test_Folder (LViT), or a datalist JSON file or folder with one of "
        f"{list(_DATALIST_NAMES)} (MONAI datalist)"
    )


def _check_prompt(prompt: object) -> str:
    """Reason ``prompt`` is unusable, or ``""``."""
    if prompt is None:
        return "no prompt"
    if not isinstance(prompt, str):
        return f"prompt must be text, got {type(prompt).__name__} {prompt!r}"
    if not prompt.strip():
        return "empty prompt"
    return ""


def _unused_files(fs: _CaseInsensitiveFS, directory: Path, used: Iterable[Path], what: str) -> list[Problem]:
    """A problem for each file in ``directory`` that no record uses."""
    used_lower = {p.name.lower() for p in used}
    return [Problem(str(f), f"{what} file not used by any annotation row") for f in fs.files(directory)
            if f.name.lower() not in used_lower and not f.name.startswith(".")]


def _image_name_for_mask(mask_name: str) -> list[str]:
    """Candidate image names for a mask name: without the ``mask_`` prefix first, then the same name."""
    if mask_name.lower().startswith(_MASK_PREFIX):
        return [mask_name[len(_MASK_PREFIX):], mask_name]
    return [mask_name]


def _resolve_pair(fs: _CaseInsensitiveFS, image_dir: Path, mask_dir: Path, mask_name: str,
                  where: str) -> tuple[Path, Path] | Problem:
    """Existing (image, mask) paths for ``mask_name``, or the problem."""
    mask, reason = fs.resolve(mask_dir / mask_name)
    if mask is None:
        return Problem(where, f"mask {reason}")
    image, reason = None, ""
    for name in _image_name_for_mask(mask_name):
        image, candidate_reason = fs.resolve(image_dir / name)
        reason = reason or candidate_reason
        if image is not None:
            break
    if image is None:
        return Problem(where, f"image {reason}")
    return image, mask


def _record(image: Path, mask: Path, prompt: str) -> dict[str, str]:
    return {"image": os.path.abspath(image), "label": os.path.abspath(mask), "prompt": prompt}


def read_sgseg(root: str | os.PathLike, split: str) -> DatasetIndex:
    """Read one split of the SGSeg layout.

    Args:
        root: the folder holding ``prompts/annotation.json`` and ``images/``.
        split: ``train``, ``valid`` (or ``val``/``validation``) or ``test``.

    Raises:
        FileNotFoundError: if the annotation file is missing.
        ValueError: if the split is not in the annotation file.
        TypeError: if the annotation file does not hold a JSON object.
    """
    split = normalize_split(split)
    root = Path(root)
    fs = _CaseInsensitiveFS()
    annotation, reason = fs.resolve(root / "prompts" / "annotation.json")
    if annotation is None:
        raise FileNotFoundError(f"SGSeg annotation file prompts/annotation.json under {str(root)!r}: {reason}")
    with open(annotation, encoding="utf-8") as f:
        content = json.load(f)
    if not isinstance(content, dict):
        raise TypeError(f"{annotation} must hold a JSON object keyed by split, got {type(content).__name__}")
    key = next((k for k in _SGSEG_SPLITS[split] if k in content), None)
    if key is None:
        raise ValueError(f"split {split!r} not in {annotation}: it has {sorted(content)}, "
                         f"looked for {list(_SGSEG_SPLITS[split])}")
    split_dir = next((d for d in (fs.resolve(root / "images" / k)[0] for k in _SGSEG_SPLITS[split]) if d), None)
    if split_dir is None:
        raise FileNotFoundError(f"no image folder for split {split!r} under {root / 'images'}: "
                                f"looked for {list(_SGSEG_SPLITS[split])}")
    image_dir = fs.resolve(split_dir / "images")[0] or split_dir / "images"
    mask_dir = fs.resolve(split_dir / "masks")[0] or split_dir / "masks"

    def rows() -> Iterable[Problem | tuple[str, str, object]]:
        for i, entry in enumerate(content[key]):
            where = f"{annotation}[{key}][{i}]"
            if not isinstance(entry, dict) or not isinstance(entry.get("image_path"), str) or not entry["image_path"]:
                yield Problem(where, f"entry has no 'image_path' file name: {entry!r:.120}")
            else:
                yield where, entry["image_path"], entry.get("caption")

    return _collect(DatasetIndex([], [], "sgseg", split, str(annotation), _LAYOUT_SIDES["sgseg"]), fs, image_dir,
                    mask_dir, rows())


def _collect(index: DatasetIndex, fs: _CaseInsensitiveFS, image_dir: Path, mask_dir: Path,
             rows: Iterable[Problem | tuple[str, str, object]]) -> DatasetIndex:
    """Resolve ``(where, mask file name, prompt)`` rows of an annotation file into ``index``'s records.

    The first row of each mask (case-insensitive) is kept; every problem (a row's own, a duplicate, a missing
    image or mask, a bad prompt, files no row uses) is collected with its location.
    """
    seen: set[str] = set()
    used_images: list[Path] = []
    used_masks: list[Path] = []
    for row in rows:
        if isinstance(row, Problem):
            index.problems.append(row)
            continue
        where, mask_name, prompt = row
        where = f"{where} {mask_name}"
        if mask_name.lower() in seen:
            index.problems.append(Problem(where, "duplicate entry for this mask; the first one is kept"))
            continue
        seen.add(mask_name.lower())
        pair = _resolve_pair(fs, image_dir, mask_dir, mask_name, where)
        if isinstance(pair, Problem):
            index.problems.append(pair)
            continue
        used_images.append(pair[0])
        used_masks.append(pair[1])
        reason = _check_prompt(prompt)
        if reason:
            index.problems.append(Problem(where, reason))
            continue
        index.records.append(_record(*pair, prompt.strip()))
    index.problems += _unused_files(fs, image_dir, used_images, "image")
    index.problems += _unused_files(fs, mask_dir, used_masks, "mask")
    return index


def _find_lvit_xlsx(fs: _CaseInsensitiveFS, root: Path, split_dir: Path, split: str) -> Path:
    """The description spreadsheet of ``split``: in the split folder first, then in the root."""
    for directory in (split_dir, root):
        candidates = [f for f in fs.files(directory) if f.suffix.lower() == ".xlsx" and not f.name.startswith("~$")
                      and f.stem.lower().startswith(_LVIT_XLSX_PREFIXES[split])]
        if len(candidates) > 1:
            with_text = [f for f in candidates if "text" in f.stem.lower()]
            candidates = with_text if with_text else candidates
        if len(candidates) == 1:
            return candidates[0]
        if len(candidates) > 1:
            raise ValueError(f"several description spreadsheets for split {split!r} in {directory}: "
                             f"{[f.name for f in candidates]}; keep one")
    raise FileNotFoundError(f"no description spreadsheet for split {split!r}: looked for "
                            f"{_LVIT_XLSX_PREFIXES[split][0].capitalize()}*.xlsx in {split_dir} and {root}")


def _read_xlsx_rows(xlsx: Path) -> Iterable[tuple[int, object, object]]:
    """(row number, Image cell, Description cell) for each non-blank row of the first sheet after the header."""
    from openpyxl import load_workbook

    workbook = load_workbook(xlsx, read_only=True, data_only=True)
    try:
        rows = workbook.worksheets[0].iter_rows(values_only=True)
        header: list[str] = []
        header_row = 0
        for row in rows:
            header_row += 1
            if any(c is not None and str(c).strip() for c in row):
                header = [str(c).strip().lower() if c is not None else "" for c in row]
                break
        if "image" not in header or "description" not in header:
            raise ValueError(f"{xlsx} must have columns 'Image' (the mask file name) and 'Description' in its "
                             f"first row, got {header}")
        image_col, text_col = header.index("image"), header.index("description")
        for number, row in enumerate(rows, start=header_row + 1):
            cells = list(row) + [None] * (max(image_col, text_col) + 1 - len(row))
            if all(c is None or not str(c).strip() for c in cells):
                continue
            yield number, cells[image_col], cells[text_col]
    finally:
        workbook.close()


def read_lvit(root: str | os.PathLike, split: str) -> DatasetIndex:
    """Read one split of the LViT layout (QaTa-COV19 as released by LViT, MosMedData+).

    Args:
        root: the folder holding ``Train_Folder``, ``Val_Folder``, ``Test_Folder``.
        split: ``train``, ``valid`` (or ``val``/``validation``) or ``test``.

    Raises:
        FileNotFoundError: if the split folder or its spreadsheet is missing.
        ValueError: if the spreadsheet lacks the ``Image`` and ``Description`` columns, or is ambiguous.
    """
    split = normalize_split(split)
    root = Path(root)
    fs = _CaseInsensitiveFS()
    split_dir = next((d for d in (fs.resolve(root / n)[0] for n in _LVIT_FOLDERS[split]) if d), None)
    if split_dir is None:
        raise FileNotFoundError(f"no folder for split {split!r} under {str(root)!r}: looked for "
                                f"{list(_LVIT_FOLDERS[split])}")
    xlsx = _find_lvit_xlsx(fs, root, split_dir, split)
    image_dir = fs.resolve(split_dir / "img")[0] or split_dir / "img"
    mask_dir = fs.resolve(split_dir / "labelcol")[0] or split_dir / "labelcol"

    def rows() -> Iterable[Problem | tuple[str, str, object]]:
        for number, mask_cell, text in _read_xlsx_rows(xlsx):
            where = f"{xlsx}:row {number}"
            mask_name = str(mask_cell).strip() if mask_cell is not None else ""
            if not mask_name:
                yield Problem(where, f"no file name in column 'Image' (Description {text!r:.80})")
            else:
                yield where, mask_name, text

    return _collect(DatasetIndex([], [], "lvit", split, str(xlsx), _LAYOUT_SIDES["lvit"]), fs, image_dir, mask_dir,
                    rows())


def read_datalist(path: str | os.PathLike, split: str) -> DatasetIndex:
    """Read one split of a MONAI datalist JSON (paths relative to the JSON's folder, or absolute).

    Args:
        path: the JSON file, or a folder holding ``datalist.json`` or ``dataset.json``.
        split: ``train`` (key ``training``), ``valid`` (key ``validation``) or ``test`` (key ``test``).

    Raises:
        FileNotFoundError: if no datalist JSON is found.
        ValueError: if the split's key is not in the file.
    """
    split = normalize_split(split)
    path = Path(path)
    datalist = _find_datalist(path) if path.exists() else None
    if datalist is None:
        raise FileNotFoundError(f"no datalist JSON at {str(path)!r} (a .json file, or a folder with one of "
                                f"{list(_DATALIST_NAMES)})")
    with open(datalist, encoding="utf-8") as f:
        content = json.load(f)
    key = next((k for k in _DATALIST_KEYS[split] if isinstance(content, dict) and k in content), None)
    if key is None:
        found = sorted(content) if isinstance(content, dict) else type(content).__name__
        raise ValueError(f"split {split!r} not in {datalist}: looked for keys {list(_DATALIST_KEYS[split])}, "
                         f"got {found}")
    # Not monai.data.load_decathlon_datalist: it also turns any other string value that names an existing path
    # relative to the JSON's folder into that path, so an empty prompt becomes the folder's path.
    base = datalist.parent
    fs = _CaseInsensitiveFS()
    side = check_prompt_side(content.get("prompt_side", _LAYOUT_SIDES["datalist"]),
                             f"datalist {datalist}: 'prompt_side'")
    index = DatasetIndex([], [], "datalist", split, str(datalist), side)
    entries = content[key] if isinstance(content[key], list) else []
    if not isinstance(content[key], list):
        index.problems.append(Problem(f"{datalist}[{key}]", f"must be a list of entries, got {content[key]!r:.80}"))
    for i, entry in enumerate(entries):
        where = f"{datalist}[{key}][{i}]"
        if not isinstance(entry, dict):
            index.problems.append(Problem(where, f"entry must be an object with image, label, prompt: {entry!r:.80}"))
            continue
        resolved: dict[str, Path] = {}
        for name in ("image", "label"):
            value = entry.get(name)
            if not isinstance(value, str) or not value:
                index.problems.append(Problem(where, f"'{name}' must be one file path, got {value!r:.120}"))
                break
            file, reason = fs.resolve(base / value)
            if file is None:
                index.problems.append(Problem(f"{where} {value}", f"{name} {reason}"))
                break
            resolved[name] = file
        if len(resolved) < 2:
            continue
        prompt = entry.get("prompt")
        reason = _check_prompt(prompt)
        if reason:
            index.problems.append(Problem(f"{where} {resolved['label'].name}", reason))
            continue
        index.records.append(_record(resolved["image"], resolved["label"], prompt))
    return index


_READERS = {"sgseg": read_sgseg, "lvit": read_lvit, "datalist": read_datalist}


def index_dataset(root_or_file: str | os.PathLike, split: str) -> DatasetIndex:
    """Detect the layout and read one split, returning records and problems without raising on bad rows.

    Raises:
        FileNotFoundError: if the path, the split folder or the annotation file does not exist.
        ValueError: if the layout is unknown, ``split`` is not a split name, or the annotation file is unreadable.
    """
    split = normalize_split(split)
    return _READERS[detect_layout(root_or_file)](root_or_file, split)


def read_dataset(root_or_file: str | os.PathLike, split: str, strict: bool = True,
                 prompt_side: str | None = None) -> list[dict[str, str]]:
    """Records ``{"image", "label", "prompt"}`` of one split, in any of the supported layouts.

    Args:
        root_or_file: a dataset root (SGSeg, LViT) or a datalist JSON file (or its folder).
        split: ``train``, ``valid`` (``val``, ``validation``) or ``test``.
        strict: raise if any row is unusable or any data file unused. With ``strict=False`` the usable records
            are returned and the problems logged as one warning; :func:`index_dataset` returns them as a list, and
            ``causalclipseg verify-data`` prints them.
        prompt_side: the convention to word the prompts in (a model's ``prompt_side``); ``None`` keeps the
            dataset's own (:func:`dataset_prompt_side`).

    Raises:
        ValueError: in strict mode if there are problems (the message names the first ones); also see
            :func:`index_dataset`.
    """
    index = index_dataset(root_or_file, split)
    if index.problems:
        if strict:
            raise ValueError(f"{index.summary()}. Run `causalclipseg verify-data` to list them all, or read with "
                             f"strict=False to use the good records")
        logger.warning("%s", index.summary())
    if prompt_side is None or prompt_side == index.prompt_side:
        return index.records
    return [{**r, "prompt": to_model_side(r["prompt"], index.prompt_side, prompt_side)} for r in index.records]


def dataset_prompt_side(root_or_file: str | os.PathLike) -> str:
    """Whose side a dataset's captions name: its layout's convention, or a datalist's own ``prompt_side``.

    Raises:
        FileNotFoundError, ValueError: as :func:`index_dataset` for an unreadable dataset.
    """
    layout = detect_layout(root_or_file)
    if layout != "datalist":
        return _LAYOUT_SIDES[layout]
    path = Path(root_or_file)
    datalist = _find_datalist(path)
    try:
        content = json.loads(datalist.read_text(encoding="utf-8")) if datalist is not None else {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read datalist {datalist}: {err}") from err
    side = content.get("prompt_side", _LAYOUT_SIDES["datalist"]) if isinstance(content, dict) else "patient"
    return check_prompt_side(side, f"datalist {datalist}: 'prompt_side'")
