"""A seeded multi-domain corpus generated in code, plus a word-order multiple-choice task.

Why generated: the reference MoE must train offline in minutes, and clearly different domains
(arithmetic, code, prose, records, markup, list algorithms) give experts something to specialise on,
so pruning criteria have real structure to find. Same seed → byte-identical corpus.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from pathlib import Path

from pydantic import BaseModel

from moecompress.errors import UserError


class Doc(BaseModel):
    """One training/eval document and the domain it came from."""

    text: str
    domain: str


class MCRow(BaseModel):
    """A multiple-choice item: `choices[label]` is the real text, the others are word shuffles of it."""

    choices: list[str]
    label: int
    domain: str


# --- vocabularies -------------------------------------------------------------------------------------------

_NAMES = ["ada", "bruno", "chen", "dara", "emil", "fatima", "goran", "hana", "ivan", "julia", "kofi", "lena",
          "mateo", "nora", "omar", "priya", "quinn", "rosa", "sven", "tara", "umar", "vera", "wen", "yara", "zane"]
_CITIES = ["paris", "lagos", "lima", "oslo", "delhi", "tokyo", "cairo", "quito", "rome", "seoul", "perth",
           "dakar", "hanoi", "kyiv", "bern", "austin", "porto", "accra", "riga", "sofia"]
_JOBS = ["baker", "nurse", "pilot", "farmer", "painter", "teacher", "miner", "tailor", "chef", "clerk", "judge",
         "sailor", "welder", "dentist", "poet"]
_COLORS = ["red", "blue", "green", "black", "white", "yellow", "grey", "orange", "purple", "brown"]

_SUBJECTS = ["the farmer", "a young teacher", "my neighbour", "the old captain", "a tired nurse", "the children",
             "our cat", "the mayor", "a quiet student", "the baker", "her brother", "the small dog",
             "a curious girl", "the soldiers", "my grandmother", "the new doctor", "the fisherman", "a stranger"]
_ADJ = ["heavy", "bright", "broken", "ancient", "wooden", "tiny", "warm", "strange", "empty", "shiny",
        "fragile", "wet", "golden", "dusty", "enormous", "quiet"]
_OBJECTS = ["basket", "letter", "lamp", "bicycle", "map", "kettle", "box", "violin", "bottle", "coat",
            "book", "ladder", "key", "blanket", "boat", "clock"]
# (base, past) so templates can use either form.
_VERBS = [("carry", "carried"), ("find", "found"), ("paint", "painted"), ("sell", "sold"), ("repair", "repaired"),
          ("hide", "hid"), ("clean", "cleaned"), ("open", "opened"), ("borrow", "borrowed"), ("buy", "bought"),
          ("drop", "dropped"), ("build", "built"), ("wrap", "wrapped"), ("lose", "lost")]
_PLACES = ["to the market", "in the garden", "near the river", "behind the school", "at the station",
           "on the hill", "under the bridge", "in the kitchen", "across the field", "into the forest"]
_TIMES = ["yesterday", "in the morning", "after dinner", "last winter", "on sunday", "before sunrise",
          "every evening", "at noon"]
_ADVERBS = ["slowly", "carefully", "quickly", "proudly", "quietly", "happily", "angrily", "gently"]
_STATES = ["tired", "hungry", "late", "cold", "lonely", "excited", "worried", "curious"]
_REASONS = ["it was raining", "the shop was closed", "nobody was home", "the road was blocked",
            "the bus was late", "it was too dark"]

_VARS = ["price", "count", "total", "value", "index", "width", "height", "factor", "rate", "score", "limit",
         "size", "offset", "weight", "speed", "level"]
_LISTS = ["items", "values", "scores", "prices", "names", "rows", "words", "points"]
_FVERBS = ["compute", "scale", "update", "check", "count", "merge", "load", "parse", "clamp", "sum", "find",
           "filter"]
_OPS = ["+", "-", "*"]
_TAGS = ["item", "entry", "product", "record"]
_FIELDS = ["name", "color", "price", "size", "owner", "city"]
_WORDS = ["apple", "pear", "fig", "plum", "cat", "dog", "owl", "fox", "sun", "moon", "star", "tree", "rock",
          "salt", "milk", "rain", "snow", "wind"]


# --- domain generators --------------------------------------------------------------------------------------

def _arithmetic(rng: random.Random) -> str:
    lines = []
    for _ in range(rng.randint(5, 10)):
        op = rng.choice(_OPS)
        if op == "*":
            a, b = rng.randint(2, 12), rng.randint(2, 12)
            c = a * b
        elif op == "+":
            a, b = rng.randint(1, 99), rng.randint(1, 99)
            c = a + b
        else:
            a = rng.randint(10, 99)
            b = rng.randint(1, a)
            c = a - b
        lines.append(f"{a} {op} {b} = {c}")
    return "\n".join(lines)


def _code(rng: random.Random) -> str:
    funcs = []
    for _ in range(rng.randint(1, 3)):
        v1, v2 = rng.sample(_VARS, 2)
        seq = rng.choice(_LISTS)
        name = f"{rng.choice(_FVERBS)}_{rng.choice(_VARS)}"
        n = rng.randint(1, 20)
        kind = rng.randrange(4)
        if kind == 0:
            body = [f"def {name}({v1}, {v2}):", f"    result = {v1} {rng.choice(_OPS)} {v2}",
                    f"    if result > {n}:", f"        return result - {n}", "    return result"]
        elif kind == 1:
            body = [f"def {name}({seq}):", "    total = 0", f"    for {v1} in {seq}:",
                    f"        total += {v1}", "    return total"]
        elif kind == 2:
            body = [f"def {name}({seq}, {v1}):", f"    return [x for x in {seq} if x > {v1}]"]
        else:
            body = [f"def {name}({v1}):", f"    while {v1} < {n * 10}:", f"        {v1} = {v1} * 2",
                    f"    return {v1}"]
        funcs.append("\n".join(body))
    return "\n\n".join(funcs)


def _prose(rng: random.Random) -> str:
    sentences = []
    for _ in range(rng.randint(3, 6)):
        subj, adj, obj = rng.choice(_SUBJECTS), rng.choice(_ADJ), rng.choice(_OBJECTS)
        base, past = rng.choice(_VERBS)
        kind = rng.randrange(4)
        if kind == 0:
            s = f"{subj} {rng.choice(_ADVERBS)} {past} the {adj} {obj} {rng.choice(_PLACES)}."
        elif kind == 1:
            s = f"{rng.choice(_TIMES)}, {subj} {past} a {adj} {obj}."
        elif kind == 2:
            s = f"{subj} wanted to {base} the {obj}, but {rng.choice(_REASONS)}."
        else:
            s = f"because {subj} was {rng.choice(_STATES)}, the {adj} {obj} stayed {rng.choice(_PLACES)}."
        sentences.append(s[0].upper() + s[1:])
    return " ".join(sentences)


def _records(rng: random.Random) -> str:
    people = rng.sample(_NAMES, rng.randint(3, 5))
    facts = {p: (rng.choice(_CITIES), rng.randint(18, 90), rng.choice(_JOBS)) for p in people}
    lines = [f"name: {p} ; city: {c} ; age: {a} ; job: {j}" for p, (c, a, j) in facts.items()]
    for p in rng.sample(people, 2):
        key = rng.randrange(3)
        field, val = [("city", facts[p][0]), ("age", facts[p][1]), ("job", facts[p][2])][key]
        lines.append(f"lookup: {field} of {p} -> {val}")
    return "\n".join(lines)


def _markup(rng: random.Random) -> str:
    tag = rng.choice(_TAGS)
    parts = [f"<{tag}s>"]
    for i in range(rng.randint(2, 4)):
        fields = rng.sample(_FIELDS, rng.randint(2, 3))
        inner = []
        for f in fields:
            val = {"name": rng.choice(_OBJECTS), "color": rng.choice(_COLORS), "price": str(rng.randint(1, 500)),
                   "size": rng.choice(["small", "medium", "large"]), "owner": rng.choice(_NAMES),
                   "city": rng.choice(_CITIES)}[f]
            inner.append(f"<{f}>{val}</{f}>")
        parts.append(f'  <{tag} id="{i + 1}">' + "".join(inner) + f"</{tag}>")
    parts.append(f"</{tag}s>")
    return "\n".join(parts)


def _lists(rng: random.Random) -> str:
    lines = []
    for _ in range(rng.randint(3, 6)):
        kind = rng.randrange(3)
        if kind == 0:
            nums = [rng.randint(0, 99) for _ in range(rng.randint(3, 6))]
            lines.append(f"sort: {' '.join(map(str, nums))} -> {' '.join(map(str, sorted(nums)))}")
        elif kind == 1:
            words = rng.sample(_WORDS, rng.randint(3, 5))
            lines.append(f"reverse: {' '.join(words)} -> {' '.join(reversed(words))}")
        else:
            words = [rng.choice(_WORDS) for _ in range(rng.randint(2, 7))]
            lines.append(f"count: {' '.join(words)} -> {len(words)}")
    return "\n".join(lines)


DOMAINS: dict[str, Callable[[random.Random], str]] = {
    "arithmetic": _arithmetic,
    "code": _code,
    "prose": _prose,
    "records": _records,
    "markup": _markup,
    "lists": _lists,
}


def generate_corpus(n_docs: int, seed: int = 0, domains: Sequence[str] | None = None) -> list[Doc]:
    """`n_docs` documents with domains in equal shares, in a seeded random order."""
    names = list(domains) if domains is not None else list(DOMAINS)
    unknown = [d for d in names if d not in DOMAINS]
    if unknown:
        raise UserError(f"unknown corpus domain(s) {unknown}; choose from {', '.join(DOMAINS)}")
    if n_docs < 0:
        raise UserError(f"n_docs must be ≥ 0, got {n_docs}")
    rng = random.Random(seed)
    order = [names[i % len(names)] for i in range(n_docs)]
    rng.shuffle(order)
    return [Doc(text=DOMAINS[d](rng), domain=d) for d in order]


def split_docs(docs: Sequence[Doc], val_fraction: float, seed: int = 0) -> tuple[list[Doc], list[Doc]]:
    """Hold out `val_fraction` of each domain (stratified, so every domain has val data)."""
    rng = random.Random(seed + 7919)
    train: list[Doc] = []
    val: list[Doc] = []
    for domain in dict.fromkeys(d.domain for d in docs):
        group = [d for d in docs if d.domain == domain]
        n_val = max(1, round(len(group) * val_fraction)) if len(group) > 1 else 0
        idx = set(rng.sample(range(len(group)), n_val))
        for i, d in enumerate(group):
            (val if i in idx else train).append(d)
    rng.shuffle(train)
    return train, val


def text_file_docs(path: Path, target_chars: int = 600) -> list[Doc]:
    """Split a local UTF-8 text file into documents of domain "text" (paragraphs packed to ~target_chars)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"text file {path} does not exist; pass an existing UTF-8 .txt file to --text")
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path} is not UTF-8 text ({exc.reason}); convert it with `iconv -t utf-8`") from exc
    paragraphs = [p.strip() for p in raw.replace("\r\n", "\n").split("\n\n") if p.strip()]
    if not paragraphs:
        raise UserError(f"{path} contains no text; pass a file with at least a few paragraphs")
    docs: list[str] = []
    buf = ""
    for para in paragraphs:
        for piece in _chunks(para, 2 * target_chars):
            buf = f"{buf}\n\n{piece}" if buf else piece
            if len(buf) >= target_chars:
                docs.append(buf)
                buf = ""
    if buf:
        docs.append(buf)
    return [Doc(text=t, domain="text") for t in docs]


def _chunks(text: str, max_chars: int) -> list[str]:
    """Cut an overlong paragraph at line (else word) boundaries so no document grows without bound."""
    if len(text) <= max_chars:
        return [text]
    out: list[str] = []
    cur: list[str] = []
    size = 0
    sep = "\n" if "\n" in text else " "
    for unit in text.split(sep):
        if cur and size + len(unit) > max_chars:
            out.append(sep.join(cur))
            cur, size = [], 0
        cur.append(unit)
        size += len(unit) + 1
    if cur:
        out.append(sep.join(cur))
    return out


# --- word-order multiple choice -----------------------------------------------------------------------------

def _snippets(doc: Doc) -> list[str]:
    """Units a document could start with, verbatim: sentences of prose, a function's first two lines, lines.

    Items are scored from an eos prefix, i.e. as if they began a document; a line taken from the middle
    of a function ("    while x < 90:") is out of distribution there and the model's choice becomes noise.
    """
    if doc.domain in ("prose", "text"):
        units = re.split(r"(?<=[.!?])\s+", doc.text.strip())
    elif doc.domain == "code":
        units = ["\n".join(block.split("\n")[:2]) for block in doc.text.split("\n\n")]
    else:
        units = doc.text.split("\n")
    return [u.strip() for u in units if 4 <= len(u.split()) <= 24]


def _shuffle_words(text: str, rng: random.Random) -> str:
    """Permute the words but keep the whitespace between them (newlines, indentation) where it was."""
    parts = re.split(r"(\s+)", text)
    words = parts[0::2]
    rng.shuffle(words)
    parts[0::2] = words
    return "".join(parts)


def word_order_row(text: str, domain: str, rng: random.Random, n_choices: int = 4) -> MCRow | None:
    """The real word order among `n_choices - 1` distinct shuffles; None when too few distinct orders exist."""
    seen = {text}
    for _ in range(50):
        if len(seen) == n_choices:
            break
        seen.add(_shuffle_words(text, rng))
    if len(seen) < n_choices:
        return None
    fakes = sorted(seen - {text})
    rng.shuffle(fakes)
    label = rng.randrange(n_choices)
    choices = fakes[:label] + [text] + fakes[label:]
    return MCRow(choices=choices, label=label, domain=domain)


def word_order_task(docs: Sequence[Doc], seed: int = 0, per_domain: int = 50) -> list[MCRow]:
    """Up to `per_domain` word-order items per domain, one snippet per held-out document.

    Tracks quality on small models (design §5: ~86% after 20 min of training, 25% chance) where
    harder tasks stay at chance.
    """
    rng = random.Random(seed + 104729)
    rows: list[MCRow] = []
    counts: dict[str, int] = {}
    for doc in docs:
        if counts.get(doc.domain, 0) >= per_domain:
            continue
        snippets = _snippets(doc)
        if not snippets:
            continue
        row = word_order_row(rng.choice(snippets), doc.domain, rng)
        if row is not None:
            rows.append(row)
            counts[doc.domain] = counts.get(doc.domain, 0) + 1
    return rows
