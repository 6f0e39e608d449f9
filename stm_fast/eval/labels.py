"""Label files for a flat folder of ImageNet validation images, and the canonical class order.

Class indices always follow the canonical ImageNet-1k order (the 1000 WordNet IDs sorted, shipped in
``stm_fast/data/imagenet_synsets.txt``). Accepted files:

* a CSV with a header naming an image column (``filename``, ``file``, ``image``, ``ImageId`` or ``path``)
  and a label column (``label``, ``class``, ``synset``, ``wnid`` or ``PredictionString``, whose first token
  is used, as in Kaggle's ``LOC_val_solution.csv``); a label is a wnid or a 0-based canonical index. Text
  in UTF-8 (with or without a byte-order mark) or UTF-16 with a byte-order mark is read as such; any other
  bytes are read as Windows-1252 (Latin-1), and the error messages say so;
* the official ``ILSVRC2012_validation_ground_truth.txt`` (one ILSVRC2012_ID, 1..1000, per line for
  ILSVRC2012_val_00000001.JPEG, ...) with ``--devkit`` (the devkit folder or its ``data/meta.mat``).

Every problem is a ``DataError`` naming the file, the line and the fix: a row without a label, a label
that is not a class, two rows that give one image different labels, two images that differ only by
extension (a label row could not tell them apart).
"""

from __future__ import annotations

import codecs
import csv
import os
import re

__all__ = ["DataError", "SYNSETS", "SYNSET_INDEX", "read_labels"]

_WNID = re.compile(r"^n\d{8}$")


class DataError(ValueError):
    """A dataset problem found before any work starts; the message names the problem and the fix."""


def _load_synsets():
    path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "data", "imagenet_synsets.txt")
    with open(path) as f:
        ids = f.read().split()
    assert len(ids) == 1000 and ids == sorted(ids), "corrupt package data: imagenet_synsets.txt"
    return ids


SYNSETS = _load_synsets()
SYNSET_INDEX = {w: i for i, w in enumerate(SYNSETS)}


def _decode(path):
    """(text, encoding name) of a label file: a BOM decides, else UTF-8, else Windows-1252."""
    with open(path, "rb") as f:
        raw = f.read()
    for bom, enc in ((codecs.BOM_UTF8, "utf-8-sig"), (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16")):
        if raw.startswith(bom):
            return raw.decode(enc), enc
    try:
        return raw.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        return raw.decode("cp1252", errors="replace"), "cp1252 (not valid UTF-8)"


def _label_of(value, where):
    value = str(value).strip()
    if _WNID.match(value):
        if value not in SYNSET_INDEX:
            raise DataError(f"{where}: {value!r} is not one of the 1000 ImageNet-1k synsets")
        return SYNSET_INDEX[value]
    if value.isdigit() and int(value) < 1000:
        return int(value)
    raise DataError(f"{where}: label {value!r} is neither a synset id (nXXXXXXXX) nor a class index 0..999")


def _devkit_mapping(devkit):
    """ILSVRC2012_ID (1..1000) -> wnid, from the devkit's meta.mat."""
    from scipy.io import loadmat

    path = os.path.join(devkit, "data", "meta.mat") if os.path.isdir(devkit) else devkit
    if not os.path.isfile(path):
        raise DataError(f"--devkit {devkit}: no meta.mat found (expected the ILSVRC2012 devkit folder or data/meta.mat)")
    try:
        meta = loadmat(path, squeeze_me=True)["synsets"]
        mapping = {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in meta if int(s["ILSVRC2012_ID"]) <= 1000}
    except Exception as e:  # noqa: BLE001 - not a MATLAB file, or one without the devkit's synsets table
        raise DataError(f"--devkit {devkit}: {path} is not the ILSVRC2012 devkit's meta.mat ({type(e).__name__}: "
                        f"{str(e)[:80]}); pass the ILSVRC2012_devkit_t12 folder") from None
    if sorted(mapping) != list(range(1, 1001)) or any(w not in SYNSET_INDEX for w in mapping.values()):
        raise DataError(f"--devkit {devkit}: its synsets are not the 1000 ImageNet-1k classes of ILSVRC2012")
    return mapping


def _ground_truth(path, lines, names, devkit):
    """{filename: class index} from the official ground truth (one ILSVRC2012_ID per line) and the devkit."""
    if devkit is None:
        raise DataError(f"--labels {path} looks like the official ILSVRC2012_validation_ground_truth.txt (ILSVRC2012 IDs, "
                        f"not class indices): also pass --devkit <ILSVRC2012_devkit_t12 folder> so the IDs can be mapped")
    ids = _devkit_mapping(devkit)
    bad = [(i + 1, v.strip()) for i, v in enumerate(lines) if not v.strip().isdigit() or int(v) not in ids]
    if bad:
        raise DataError(f"--labels {path}: line {bad[0][0]} holds {bad[0][1]!r}, not an ILSVRC2012_ID in 1..1000 "
                        f"({len(bad)} such line(s)); is it the validation ground truth?")
    if len(lines) < len(names):
        raise DataError(f"--labels {path} has {len(lines)} lines but the folder has {len(names)} images")
    by_name = {f"ILSVRC2012_val_{i + 1:08d}": SYNSET_INDEX[ids[int(v)]] for i, v in enumerate(lines)}
    return {n: by_name.get(os.path.splitext(n)[0]) for n in names}


def _csv_columns(path, reader, encoding):
    fields = {k.strip().lower(): k for k in (reader.fieldnames or [])}
    img_col = next((fields[k] for k in ("filename", "file", "image", "imageid", "path") if k in fields), None)
    lab_col = next((fields[k] for k in ("label", "class", "synset", "wnid", "predictionstring") if k in fields), None)
    if img_col is None or lab_col is None:
        raise DataError(f"--labels {path}: expected a CSV header with an image column (filename/file/image/ImageId/path) "
                        f"and a label column (label/class/synset/wnid/PredictionString); found {reader.fieldnames} "
                        f"(read as {encoding})")
    return img_col, lab_col


def _csv_labels(path, lines, encoding):
    """{image stem: class index} from a CSV, every row checked."""
    reader = csv.DictReader(lines)
    img_col, lab_col = _csv_columns(path, reader, encoding)
    out, first_row = {}, {}
    for row_no, row in enumerate(reader, start=2):
        name, value = (row.get(img_col) or "").strip(), (row.get(lab_col) or "").strip()
        if not name or not value:
            raise DataError(f"--labels {path}, line {row_no}: no {'image name' if not name else 'label'} in the row "
                            f"{','.join(v or '' for v in row.values() if isinstance(v, str))!r}")
        stem = os.path.splitext(os.path.basename(name))[0]
        label = _label_of(value.split()[0], f"--labels {path}, line {row_no}")
        if stem in out and out[stem] != label:
            raise DataError(f"--labels {path}: lines {first_row[stem]} and {row_no} give {stem} two labels "
                            f"({SYNSETS[out[stem]]} and {SYNSETS[label]}); keep one of them")
        out[stem], first_row[stem] = label, first_row.get(stem, row_no)
    return out


def read_labels(path, files, devkit=None):
    """{filename: class index or None} for the images ``files`` of a flat folder (see the module docstring)."""
    if not os.path.isfile(path):
        raise DataError(f"--labels {path}: file not found")
    stems = {}
    for n in sorted(files):
        stem = os.path.splitext(n)[0]
        if stem in stems:
            raise DataError(f"--data: {stems[stem]} and {n} differ only by extension, so a label row cannot tell them "
                            f"apart; move one of them out of the folder")
        stems[stem] = n
    text, encoding = _decode(path)
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if not lines:
        raise DataError(f"--labels {path}: the file is empty")
    if all(ln.strip().isdigit() for ln in lines[:50]):  # official ground truth: one ILSVRC2012_ID per line
        return _ground_truth(path, lines, sorted(files), devkit)
    by_stem = _csv_labels(path, lines, encoding)
    return {n: by_stem.get(os.path.splitext(n)[0]) for n in files}
