"""The segments file of a dub job: time ranges on the picture's timeline to lip-sync, each with its face and
optionally its own audio. Pure parsing and validation (files are only read, audio files only checked to
exist); :mod:`shards.dub` turns the ranges into frames and assembles the dub's audio track.

Three formats, chosen by the file's suffix:

- ``.json``: a list of objects ``{"start": ..., "end": ..., "face": ..., "audio": ..., "offset": ...}``;
- ``.csv``: a header naming ``start,end`` and any of ``face,audio,offset``, one range per row (empty cells
  take the default);
- ``.srt``: blocks separated by blank lines: an optional index line, a time line
  ``00:00:01,000 --> 00:00:03,500``, then optionally a line of ``key=value`` pairs (``face=left
  audio=take2.wav offset=0.5``; quote a path with spaces); other lines (a subtitle's text) are ignored.

Times are seconds (``1.5``) or ``[HH:]MM:SS`` with optional ``.mmm`` or ``,mmm``. ``face`` is a face
spec (:func:`face_problem`; default: the job's), ``audio`` a file (relative to the segments file's
directory) placed at the range's start from ``offset`` seconds into it. Every problem is reported as one
line naming the file, the line or entry, and the fix.
"""

from __future__ import annotations

import csv
import json
import re
import shlex
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

from shards.errors import InputError

FACE_RULES = ("largest", "left", "right", "center")
FIELDS = ("start", "end", "face", "audio", "offset")
_CLOCK = re.compile(r"(?:(\d+):)?(\d{1,2}):(\d{1,2})(?:[.,](\d{1,3}))?")
_SECONDS = re.compile(r"\d+(?:\.\d+)?")
_ARROW = re.compile(r"\s*(\S+)\s*-->\s*(\S+)\s*")


def parse_select(spec: object) -> str | int:
    """A face choice (``face.select``, a range's ``face``) as a rule name or a track id (int); ValueError
    names the accepted values. The one grammar of face choices (musetalk.tracks applies them)."""
    if isinstance(spec, bool):
        raise ValueError(f"face.select must be one of {', '.join(FACE_RULES)} or a track id, got {spec!r}")
    if isinstance(spec, int):
        track = spec
    elif isinstance(spec, str) and spec.strip().lstrip("+").isdigit():
        track = int(spec)
    elif isinstance(spec, str) and spec in FACE_RULES:
        return spec
    else:
        raise ValueError(
            f"face.select must be one of {', '.join(FACE_RULES)} or a track id (an integer >= 1, listed by "
            f"`python -m cluster.faces VIDEO`), got {spec!r}"
        )
    if track < 1:
        raise ValueError(f"face.select: track ids start at 1, got {spec!r}")
    return track


def face_problem(spec: str) -> str | None:
    """The problem with a range's face spec (:func:`parse_select`), if any. Whether a track id exists is
    checked once the video's tracks are known."""
    try:
        parse_select(spec)
    except ValueError:
        return (
            f"face {spec!r} is not a face spec; use one of {', '.join(FACE_RULES)} or a track id "
            "(an integer >= 1, listed by `python -m cluster.faces VIDEO`)"
        )
    return None


def parse_time(text: str) -> Fraction:
    """Seconds (``1.5``) or ``[HH:]MM:SS[.mmm|,mmm]`` as an exact number of seconds (ValueError otherwise)."""
    text = text.strip()
    if _SECONDS.fullmatch(text):
        return Fraction(text)
    m = _CLOCK.fullmatch(text)
    if m is None or int(m[3]) >= 60 or (m[1] is not None and int(m[2]) >= 60):
        raise ValueError(f"unparsable time {text!r}")
    hours, minutes, seconds = int(m[1] or 0), int(m[2]), int(m[3])
    millis = Fraction(int(m[4]), 10 ** len(m[4])) if m[4] else Fraction(0)
    return hours * 3600 + minutes * 60 + seconds + millis


@dataclass(frozen=True)
class TimeRange:
    """One range of a segments file: ``[start, end)`` seconds on the picture's timeline, the face to dub
    (None: the job's), its own audio (None: the job's) read from ``offset`` seconds into it; ``where``
    names its place in the file for error messages ("line 3", "entry 2")."""

    start: Fraction
    end: Fraction
    face: str | None = None
    audio: Path | None = None
    offset: Fraction = Fraction(0)
    where: str = ""


def load_ranges(path: str | Path) -> tuple[TimeRange, ...]:
    """The ranges of a segments file, sorted by start; InputError listing every problem (unreadable file,
    unknown format, unparsable time, end <= start, overlapping ranges, a missing audio file, a bad face)."""
    path = Path(path)
    readers = {".json": _json_rows, ".csv": _csv_rows, ".srt": _srt_rows}
    if path.suffix.lower() not in readers:
        raise InputError(f"segments file {path}: unknown format; name it .json, .csv or .srt")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"segments file {path} cannot be read ({err}); check task.segments") from err
    problems: list[str] = []
    ranges = []
    for where, row in readers[path.suffix.lower()](text, problems):
        r = _range(where, row, path.parent, problems)
        if r is not None:
            ranges.append(r)
    ranges.sort(key=lambda r: r.start)
    for a, b in zip(ranges, ranges[1:], strict=False):
        if b.start < a.end:
            problems.append(
                f"{b.where} overlaps {a.where} (starts at {float(b.start):g} s, before {float(a.end):g} s); "
                "make the ranges disjoint"
            )
    if not ranges and not problems:
        problems.append("holds no range; add at least one (or leave task.segments unset)")
    if problems:
        raise InputError(f"segments file {path}: " + "; ".join(problems))
    return tuple(ranges)


def check_within(ranges: tuple[TimeRange, ...], duration: Fraction, path: str | Path) -> None:
    """Every range ends within the picture (``duration`` seconds); InputError naming the first that does not."""
    for r in ranges:
        if r.end > duration:
            raise InputError(
                f"segments file {path}: {r.where} ends at {float(r.end):g} s, past the picture's end "
                f"({float(duration):g} s); end it at {float(duration):g} s or earlier"
            )


def _range(where: str, row: dict, base: Path, problems: list[str]) -> TimeRange | None:
    unknown = sorted(set(row) - set(FIELDS))
    if unknown:
        problems.append(f"{where}: unknown field {', '.join(unknown)}; the fields are {', '.join(FIELDS)}")
        return None
    values = {}
    for key in ("start", "end", "offset"):
        raw = row.get(key)
        if raw is None or str(raw).strip() == "":
            if key != "offset":
                problems.append(f"{where}: {key} is missing; give it as seconds or HH:MM:SS.mmm")
                return None
            values[key] = Fraction(0)
            continue
        try:
            values[key] = parse_time(str(raw))  # a JSON number by its shortest repr: 0.2 is 1/5
        except ValueError:
            problems.append(f"{where}: {key} {raw!r} is not a time; write seconds (1.5) or HH:MM:SS.mmm")
            return None
    if values["end"] <= values["start"]:
        problems.append(
            f"{where}: end {float(values['end']):g} s is not after start {float(values['start']):g} s; "
            "swap or fix them"
        )
        return None
    face = str(row["face"]).strip() if row.get("face") not in (None, "") else None
    if face is not None and (problem := face_problem(face)):
        problems.append(f"{where}: {problem}")
        return None
    audio = None
    if row.get("audio") not in (None, ""):
        audio = base / str(row["audio"]).strip()
        if not audio.is_file():
            problems.append(
                f"{where}: audio file not found: {audio}; check the path (relative to the segments file)"
            )
            return None
    elif values["offset"]:
        problems.append(f"{where}: offset without audio; give the range's audio file or drop the offset")
        return None
    return TimeRange(values["start"], values["end"], face, audio, values["offset"], where)


def _json_rows(text: str, problems: list[str]):
    try:
        data = json.loads(text)
    except ValueError as err:
        problems.append(f"is not valid JSON ({err}); fix the syntax")
        return
    if not isinstance(data, list):
        problems.append('must hold a JSON list of ranges ([{"start": ..., "end": ...}, ...])')
        return
    for i, item in enumerate(data, start=1):
        if not isinstance(item, dict):
            problems.append(f'entry {i}: is not an object; write {{"start": ..., "end": ...}}')
            continue
        yield f"entry {i}", item


def _csv_rows(text: str, problems: list[str]):
    reader = csv.DictReader(text.splitlines())
    header = [h.strip() for h in reader.fieldnames or []]
    if "start" not in header or "end" not in header:
        problems.append(
            f"line 1: the header must name start,end (and any of face,audio,offset), got {','.join(header)!r}"
        )
        return
    reader.fieldnames = header
    for row in reader:
        if not any((v or "").strip() for v in row.values() if isinstance(v, str)):
            continue  # a blank line
        if None in row:
            problems.append(f"line {reader.line_num}: more cells than the header names; fix the row")
            continue
        yield f"line {reader.line_num}", {k: v for k, v in row.items() if v is not None}


def _srt_rows(text: str, problems: list[str]):
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        if not lines[i].strip():
            i += 1
            continue
        if lines[i].strip().isdigit() and i + 1 < len(lines):
            i += 1  # the block's index
        m = _ARROW.fullmatch(lines[i])
        if m is None:
            problems.append(f"line {i + 1}: expected 'start --> end' (00:00:01,000 --> 00:00:03,500)")
            while i < len(lines) and lines[i].strip():
                i += 1
            continue
        row = {"start": m[1], "end": m[2]}
        where = f"line {i + 1}"
        i += 1
        while i < len(lines) and lines[i].strip():
            if "=" in lines[i]:
                try:
                    pairs = [p.split("=", 1) for p in shlex.split(lines[i])]
                except ValueError as err:
                    problems.append(f"line {i + 1}: {err}; quote a path with spaces")
                    pairs = []
                for pair in pairs:
                    if len(pair) != 2:
                        problems.append(f"line {i + 1}: {pair[0]!r} is not key=value")
                        continue
                    row[pair[0]] = pair[1]
            i += 1
        yield where, row
