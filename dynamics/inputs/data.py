"""Preference pairs: one record type, validation, loaders, and a quality summary.

Every loader returns a `PairList` (a list of `PreferencePair`) that went
through `validate_pairs`. Sources:

- generic files: JSONL / JSON / CSV / Parquet with a column mapping (`load_pairs`);
- Hugging Face datasets (`load_hf_dataset`, needs `datasets` and network);
- the OpenAI summarize-from-feedback comparisons, TL;DR (`load_tldr`);
- the sentiment task of seed 004, section 4.2, with its three response styles,
  from the Kaggle tweet CSV (`load_tweets`) or from the built-in statements
  (`builtin_sentiment_pairs`, offline); `sentiment_pairs` picks one.

Responses start with a space and prompts end without one, so that
`prompt + response` is the text the model sees (seed 004 and the TL;DR
convention both do this).
"""
from __future__ import annotations

import json
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from dynamics.inputs import statements
from dynamics.errors import InputError


@dataclass(frozen=True)
class PreferencePair:
    """One prompt with a preferred (`chosen`, y_w) and a dispreferred (`rejected`, y_l) response."""

    id: str
    prompt: str
    chosen: str
    rejected: str
    metadata: Mapping = field(default_factory=dict, hash=False)


class PairList(list):
    """A list of pairs plus `skipped`: `(id, reason)` for each input a loader left out."""

    def __init__(self, pairs: Iterable[PreferencePair] = (), skipped: Iterable[tuple[str, str]] = ()):
        super().__init__(pairs)
        self.skipped: list[tuple[str, str]] = list(skipped)


ON_INVALID = ("raise", "skip")
CORE_FIELDS = ("id", "prompt", "chosen", "rejected")

# --------------------------------------------------------------------------- validation


def _pair_problem(pair: PreferencePair) -> str | None:
    for name in CORE_FIELDS:
        value = getattr(pair, name)
        if not isinstance(value, str):
            return f"non-text {name} ({type(value).__name__}: {value!r})"
        if not value.strip():
            return f"empty {name}"
    return "chosen identical to rejected" if pair.chosen == pair.rejected else None


def validate_pairs(
    pairs: Iterable[PreferencePair], *, on_invalid: str = "raise", limit: int | None = None
) -> PairList:
    """Check pairs and return them as a `PairList`.

    A pair is invalid when its id, prompt, chosen or rejected is not a string
    (None, NaN, a number) or is empty / whitespace-only, when chosen equals
    rejected exactly, or when its id was already seen. `on_invalid="raise"`
    raises ValueError naming the problem, the pair id and its position (0-based
    item of the input); `"skip"` leaves the pair out and records it in
    `.skipped`. `limit` stops after that many valid pairs (the input may be a
    lazy iterator, so the rest is never read).
    """
    if on_invalid not in ON_INVALID:
        raise ValueError(f"unknown on_invalid {on_invalid!r}; known: {', '.join(ON_INVALID)}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    out, seen = PairList(), {}
    for i, pair in enumerate(pairs):
        if limit is not None and len(out) >= limit:
            break
        if not isinstance(pair, PreferencePair):
            raise TypeError(f"item {i}: expected PreferencePair, got {type(pair).__name__}")
        problem = _pair_problem(pair)
        if problem is None and pair.id in seen:
            problem = f"duplicate id (first seen at item {seen[pair.id]})"
        if problem is None:
            seen[pair.id] = i
            out.append(pair)
        elif on_invalid == "raise":
            raise ValueError(f"pair {pair.id!r} (item {i}): {problem}")
        else:
            out.skipped.append((str(pair.id), problem))
    return out


# --------------------------------------------------------------------------- generic files


def _plain(value):
    """numpy scalars/arrays (from Parquet or pandas) -> plain Python, for metadata and JSON."""
    return value.tolist() if hasattr(value, "tolist") else value


def pairs_from_rows(
    rows: Iterable[Mapping], *, prompt: str = "prompt", chosen: str = "chosen", rejected: str = "rejected",
    id: str | None = None, source: str = "row", limit: int | None = None, on_invalid: str = "raise",
) -> PairList:
    """Turn dict-like rows (JSON objects, DataFrame records, a `datasets.Dataset`) into pairs.

    `prompt`, `chosen`, `rejected` and `id` name the columns to read. With
    `id=None` an `"id"` column is used when a row has one, otherwise the id is
    `f"{source}-{row_index}"`. Integer ids become strings. Every other column
    goes into `metadata`. A row lacking a mapped column raises ValueError
    listing the missing and the available columns.
    """
    text_cols = [prompt, chosen, rejected]

    def generate():
        for i, row in enumerate(rows):
            missing = [c for c in text_cols + ([id] if id is not None else []) if c not in row]
            if missing:
                raise ValueError(f"{source} {i}: missing column(s) {missing}; available: {sorted(map(str, row))}")
            id_col = id if id is not None else ("id" if "id" in row else None)
            pid = _plain(row[id_col]) if id_col is not None else f"{source}-{i}"
            pid = str(pid) if isinstance(pid, int) and not isinstance(pid, bool) else pid
            meta = {str(k): _plain(v) for k, v in row.items() if k not in {*text_cols, id_col}}
            yield PreferencePair(pid, *(_plain(row[c]) for c in text_cols), meta)

    return validate_pairs(generate(), on_invalid=on_invalid, limit=limit)


SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


def check_data_file(path: str | Path, *, what: str = "data file") -> Path:
    """``path`` if it is an existing, readable file; `InputError` naming it otherwise."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{what} {str(path)!r} does not exist")
    if path.is_dir():
        raise InputError(f"{what} {str(path)!r} is a directory, not a file")
    try:
        with path.open("rb") as f:
            f.read(1)
    except OSError as e:
        raise InputError(f"cannot read {what} {str(path)!r}: {e.strerror or e}") from None
    return path


def _text_problem(path: Path, raw: bytes) -> str | None:
    """Why ``raw`` (the bytes of a text file) is not UTF-8 text, naming line and byte offset."""
    def line(off: int) -> int:
        return raw.count(b"\n", 0, off) + 1

    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return (f"{path}: not UTF-8 text: byte 0x{raw[e.start]:02x} at byte offset {e.start} (line "
                f"{line(e.start)}); binary data, or save the file as UTF-8")
    nul = raw.find(b"\x00")
    if nul >= 0:
        return f"{path}: binary data, not text: NUL byte at byte offset {nul} (line {line(nul)})"
    return None


def _read_text(path: Path) -> str:
    """The UTF-8 text of ``path`` (a BOM is dropped); `InputError` naming the file, line and byte
    offset for non-UTF-8 or binary data."""
    raw = check_data_file(path).read_bytes()
    problem = _text_problem(path, raw)
    if problem:
        raise InputError(problem)
    return raw.decode("utf-8-sig")


def _read_csv(path: Path, **kwargs) -> pd.DataFrame:
    """`pd.read_csv` of a UTF-8 text file, with file-naming errors."""
    from io import StringIO

    text = _read_text(path)
    try:
        return pd.read_csv(StringIO(text), dtype=str, keep_default_na=False, **kwargs)
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise InputError(f"{path}: not a valid CSV file: {e}") from None


def _read_json_rows(path: Path) -> list[dict]:
    """A JSON list of objects (`.json` starting with `[`) or JSON lines; each row must be an object."""
    text = _read_text(path)
    if path.suffix.lower() == ".json" and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}:{e.lineno}: invalid JSON: {e.msg} (column {e.colno})") from None
    else:
        rows = []
        for lineno, line in enumerate(text.splitlines(), 1):
            try:
                rows += [json.loads(line)] if line.strip() else []
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: invalid JSON line: {e}") from None
    bad = [i for i, r in enumerate(rows) if not isinstance(r, dict)]
    if bad:
        raise ValueError(f"{path}: row {bad[0]} is not a JSON object")
    return rows


def _read_rows(path: Path) -> list[dict]:
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        return _read_json_rows(path)
    if suffix == ".csv":
        # dtype=str and no NA parsing: an empty cell stays "" (caught as empty), "NA" stays text.
        return _read_csv(path).to_dict("records")
    if suffix == ".parquet":
        check_data_file(path)
        try:
            return pd.read_parquet(path).to_dict("records")
        except (ValueError, OSError) as e:  # pyarrow.ArrowInvalid is a ValueError
            raise InputError(f"{path}: not a valid Parquet file: {e}") from None
    raise InputError(f"unsupported file suffix {path.suffix!r} for {path}; supported: {', '.join(SUFFIXES)}")


def load_pairs(
    path: str | Path, *, prompt: str = "prompt", chosen: str = "chosen", rejected: str = "rejected",
    id: str | None = None, limit: int | None = None, on_invalid: str = "raise",
) -> PairList:
    """Load pairs from a JSONL, JSON (a list of objects, or JSON lines), CSV or Parquet file.

    The format is chosen by suffix. Keyword arguments map the file's column
    names (see `pairs_from_rows`); extra columns go to `metadata`. CSV cells
    are read as text. Invalid pairs raise ValueError (`on_invalid="skip"` drops
    them into `.skipped`); `limit` keeps the first `limit` valid pairs.
    """
    path = check_data_file(path)
    return pairs_from_rows(_read_rows(path), prompt=prompt, chosen=chosen, rejected=rejected, id=id,
                           source=path.stem, limit=limit, on_invalid=on_invalid)


def load_hf_dataset(
    name: str, split: str = "train", *, config: str | None = None, limit: int | None = None,
    on_invalid: str = "raise", **columns: str | None,
) -> PairList:
    """Load pairs from a Hugging Face dataset (hub id or local path; needs `datasets`).

    `columns` are the `prompt=, chosen=, rejected=, id=` mapping of
    `pairs_from_rows`. Columns must hold plain text: conversational datasets
    (lists of messages) need flattening with the model's chat template first,
    or they fail validation as non-text.
    """
    try:
        import datasets
    except ImportError as e:
        raise ImportError("load_hf_dataset needs the `datasets` package: pip install 'dynamics[hf]'") from e
    ds = datasets.load_dataset(name, config, split=split)
    return pairs_from_rows(ds, source=f"{name}:{split}", limit=limit, on_invalid=on_invalid, **columns)


def _record(p: PreferencePair) -> dict:
    clash = [k for k in p.metadata if k in CORE_FIELDS]
    if clash:
        raise ValueError(f"pair {p.id!r}: metadata keys {clash} clash with the pair's own fields")
    return {"id": p.id, "prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected, **p.metadata}


def pairs_to_frame(pairs: Iterable[PreferencePair]) -> pd.DataFrame:
    """One row per pair: `id, prompt, chosen, rejected` then the metadata keys as columns."""
    records = [_record(p) for p in pairs]
    return pd.DataFrame(records, columns=None if records else list(CORE_FIELDS))


def save_pairs(pairs: Iterable[PreferencePair], path: str | Path) -> Path:
    """Write pairs as JSON lines (metadata flattened into the object); `load_pairs` reads it back."""
    path = Path(path)
    if path.suffix.lower() != ".jsonl":
        raise ValueError(f"save_pairs writes JSONL; got {path.name!r} (use pairs_to_frame(...).to_parquet for Parquet)")
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for p in pairs:
            f.write(json.dumps(_record(p), ensure_ascii=False) + "\n")
    return path


# --------------------------------------------------------------------------- TL;DR


TLDR_TEMPLATE = "SUBREDDIT: r/{subreddit}\nTITLE: {title}\nPOST: {post}\nTL;DR:"


def load_tldr(path: str | Path, limit: int | None = None, *, on_invalid: str = "skip") -> PairList:
    """Load OpenAI summarize-from-feedback comparisons (JSON lines, e.g. `tldr/batch13.json`).

    Prompt: `TLDR_TEMPLATE` filled from `info`; responses: the two summaries,
    `summaries[choice]` chosen. Summaries keep their leading space (one is
    added where missing, as in the edit files). Id: `f"{info.id}-{line}"`
    (`f"{file stem}-{line}"` when `info` has no id). Real comparisons contain
    pairs with identical summaries; by default these (and other invalid pairs)
    are skipped and listed in the result's `.skipped`; `on_invalid="raise"`
    makes them errors.
    """
    path = check_data_file(path)

    def generate():
        for i, row in enumerate(_read_json_rows(path)):
            info, summaries, choice = row["info"], row["summaries"], row["choice"]
            if choice not in (0, 1) or len(summaries) != 2:
                raise ValueError(f"{path}: line {i}: expected two summaries and choice 0/1, got choice={choice!r}")
            yw, yl = (summaries[choice]["text"], summaries[1 - choice]["text"])
            yw, yl = (" " + t if isinstance(t, str) and not t.startswith(" ") else t for t in (yw, yl))
            meta = {"post_id": info.get("id"), "subreddit": info.get("subreddit"), "split": row.get("split"),
                    "chosen_policy": summaries[choice].get("policy"),
                    "rejected_policy": summaries[1 - choice].get("policy"),
                    "confidence": (row.get("extra") or {}).get("confidence"), "batch": row.get("batch")}
            prompt = TLDR_TEMPLATE.format(**{k: info.get(k) for k in ("subreddit", "title", "post")})
            yield PreferencePair(f"{info.get('id', path.stem)}-{i}", prompt, yw, yl, meta)

    return validate_pairs(generate(), on_invalid=on_invalid, limit=limit)


# --------------------------------------------------------------------------- sentiment (seed 004, section 4.2)

LABELS = ("positive", "negative")
# seed 004, section 4.2: "Single token: positive", "Short suffix: It has a positive sentiment.",
# "Long suffix: It has a positive sentiment based on my judgement." A leading space joins them to the prompt.
STYLES: dict[str, str] = {
    "single_token": " {label}",
    "short_suffix": " It has a {label} sentiment.",
    "long_suffix": " It has a {label} sentiment based on my judgement.",
}
# Default prompt: the statement followed by a question whose natural answer is any of the three styles.
# The paper's prompt is the bare statement (PAPER_TEMPLATE); `{text}` is the only placeholder.
DEFAULT_TEMPLATE = "{text}\nQuestion: Is the sentiment of this text positive or negative?\nAnswer:"
PAPER_TEMPLATE = "{text}"


def sentiment_response(label: str, style: str) -> str:
    """The response (with its leading space) that states `label` in `style`."""
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}; known: {', '.join(STYLES)}")
    if label not in LABELS:
        raise ValueError(f"unknown label {label!r}; known: {', '.join(LABELS)}")
    return STYLES[style].format(label=label)


def sentiment_pair(
    id: str, text: str, label: str, style: str = "long_suffix", template: str = DEFAULT_TEMPLATE
) -> PreferencePair:
    """A sentiment pair: chosen states the true `label`, rejected the other one.

    `text` is whitespace-normalised and put into `template` at `{text}`.
    Metadata: `label`, `style`, `text`.
    """
    if "{text}" not in template:
        raise ValueError(f"template must contain '{{text}}', got {template!r}")
    chosen = sentiment_response(label, style)  # checks label and style
    rejected = sentiment_response(LABELS[1 - LABELS.index(label)], style)
    text = " ".join(str(text).split())
    return PreferencePair(id, template.replace("{text}", text), chosen, rejected,
                          {"label": label, "style": style, "text": text})


def _balanced(pos: list, neg: list, *, seed: int, balanced: bool, limit: int | None) -> list:
    """Deterministic order: shuffled with `seed`; if balanced, alternate pos/neg, equal counts."""
    rng = random.Random(seed)
    if not balanced:
        items = pos + neg
        rng.shuffle(items)
        return items[:limit]
    pos, neg = pos[:], neg[:]
    rng.shuffle(pos)
    rng.shuffle(neg)
    k = min(len(pos), len(neg))
    items = [x for pair in zip(pos[:k], neg[:k]) for x in pair]  # any prefix is balanced (±1)
    return items[:limit]


def load_tweets(
    path: str | Path, style: str = "long_suffix", *, limit: int | None = None, seed: int = 0,
    balanced: bool = True, template: str = DEFAULT_TEMPLATE,
) -> PairList:
    """Sentiment pairs from the Kaggle tweet CSV (`textID,text,selected_text,sentiment`).

    Neutral and empty tweets are dropped, whitespace is normalised. Order is a
    deterministic shuffle with `seed`; `balanced=True` keeps equally many
    positive and negative tweets, alternating, so every prefix (and `limit`)
    is balanced to within one. Ids are the `textID`s.
    """
    path = Path(path)
    df = _read_csv(path)
    missing = [c for c in ("textID", "text", "sentiment") if c not in df.columns]
    if missing:
        raise InputError(f"{path}: missing column(s) {missing}; available: {list(df.columns)}")
    return _labelled_texts_to_pairs(df["textID"], df["text"], df["sentiment"], style, limit=limit, seed=seed,
                                    balanced=balanced, template=template, source=str(path))


SKIPPED_LABELS = ("neutral",)


def _labelled_texts_to_pairs(ids, texts, labels, style: str, *, limit, seed, balanced, template,
                             source: str = "data") -> PairList:
    """(id, text, label) rows -> sentiment pairs.

    Labels are read case-insensitively (``Positive`` = ``positive``). Neutral rows, empty texts
    and, with ``balanced``, the surplus of the larger class are left out and listed in the result's
    ``.skipped``. Any other label (``mixed``) raises `InputError` with the counts of each unknown
    label, and so does a file with no positive/negative row at all: nothing is dropped silently.
    """
    if style not in STYLES:
        raise InputError(f"unknown style {style!r}; known: {', '.join(STYLES)}")
    rows, skipped, unknown = [], [], {}
    for i, t, lab in zip(ids, texts, labels):
        pid, text, label = str(i), " ".join(str(t).split()), str(lab).strip().lower()
        if label in SKIPPED_LABELS:
            skipped.append((pid, f"{label} label"))
        elif label not in LABELS:
            unknown[str(lab)] = unknown.get(str(lab), 0) + 1
        elif not text:
            skipped.append((pid, "empty text"))
        else:
            rows.append((pid, text, label))
    if unknown:
        counts = ", ".join(f"{k!r} ({v} row{'s' * (v != 1)})" for k, v in
                           sorted(unknown.items(), key=lambda kv: -kv[1])[:10])
        raise InputError(f"{source}: unknown sentiment label(s) {counts}; valid (any case): "
                         f"{', '.join(LABELS + SKIPPED_LABELS)} (neutral rows are skipped)")
    pos, neg = ([r for r in rows if r[2] == label] for label in LABELS)
    if not rows:
        raise InputError(f"{source}: no positive or negative row ({len(skipped)} rows skipped: neutral or "
                         "empty text); sentiment pairs need labelled texts")
    kept = _balanced(pos, neg, seed=seed, balanced=balanced, limit=None)
    if len(kept) < len(rows):
        kept_ids = {r[0] for r in kept}
        skipped += [(r[0], f"balancing: surplus {r[2]} row") for r in rows if r[0] not in kept_ids]
    out = validate_pairs((sentiment_pair(t, x, lab, style, template) for t, x, lab in kept), limit=limit)
    out.skipped[:0] = skipped
    return out


HF_PREFIX = "hf:"


def load_hf_sentiment(
    spec: str, style: str = "long_suffix", *, limit: int | None = None, seed: int = 0, balanced: bool = True,
    template: str = DEFAULT_TEMPLATE, text: str = "text", label: str | None = None,
) -> PairList:
    """Sentiment pairs from a Hugging Face dataset named ``"hf:NAME[:SPLIT]"`` (split default train),
    e.g. ``hf:mteb/tweet_sentiment_extraction:test``.

    ``text`` names the text column; ``label`` the label column, by default the first of
    ``sentiment``, ``label_text``, ``label`` present; integer labels are mapped through the
    column's class names. Rows labelled other than positive/negative are dropped, as in
    `load_tweets`; ids are the ``id``/``textID`` column when present, else ``NAME:SPLIT-row``.
    """
    try:
        import datasets
    except ImportError as e:
        raise ImportError("HF sentiment data needs the `datasets` package") from e
    if not spec.startswith(HF_PREFIX):
        raise ValueError(f"expected 'hf:NAME[:SPLIT]', got {spec!r}")
    name, _, split = spec[len(HF_PREFIX):].partition(":")
    split = split or "train"
    ds = datasets.load_dataset(name, split=split)
    cols = list(ds.column_names)
    label = label or next((c for c in ("sentiment", "label_text", "label") if c in cols), None)
    if text not in cols or label is None or label not in cols:
        raise ValueError(f"{spec}: needs a text column {text!r} and a label column "
                         f"({label or 'sentiment, label_text or label'}); available: {cols}")
    labels = list(ds[label])
    names = getattr(ds.features[label], "names", None)
    if names is not None:
        labels = [names[i] for i in labels]
    labels = [str(v).lower() for v in labels]
    id_col = next((c for c in ("textID", "id") if c in cols), None)
    ids = ds[id_col] if id_col else [f"{name}:{split}-{i}" for i in range(len(ds))]
    return _labelled_texts_to_pairs(ids, ds[text], labels, style, limit=limit, seed=seed, balanced=balanced,
                                    template=template, source=spec)


def builtin_sentiment_pairs(
    style: str = "long_suffix", *, n: int | None = None, seed: int = 0, template: str = DEFAULT_TEMPLATE
) -> PairList:
    """Sentiment pairs from the built-in statements (`dynamics.inputs.statements`), no data needed.

    Balanced and deterministically shuffled as in `load_tweets`; `n` keeps the
    first `n`. Ids (`pos-017`, `neg-042`) index the statement lists and do not
    depend on `seed`.
    """
    pos = [(f"pos-{i:03d}", t, "positive") for i, t in enumerate(statements.POSITIVE)]
    neg = [(f"neg-{i:03d}", t, "negative") for i, t in enumerate(statements.NEGATIVE)]
    rows = _balanced(pos, neg, seed=seed, balanced=True, limit=n)
    return validate_pairs(sentiment_pair(i, t, lab, style, template) for i, t, lab in rows)


def sentiment_pairs(
    source: str | Path | None = None, style: str = "long_suffix", *, limit: int | None = None,
    seed: int = 0, template: str = DEFAULT_TEMPLATE,
) -> PairList:
    """One entry point for the sentiment task.

    `source=None`: the built-in statements; ``"hf:NAME[:SPLIT]"``: a Hugging Face dataset of
    labelled texts (`load_hf_sentiment`); a CSV with the tweet columns: `load_tweets`; any other
    file: `load_pairs` (already-formed pairs, so `style`, `seed` and `template` do not apply).
    """
    if source is None:
        return builtin_sentiment_pairs(style, n=limit, seed=seed, template=template)
    if str(source).startswith(HF_PREFIX):
        return load_hf_sentiment(str(source), style, limit=limit, seed=seed, template=template)
    path = check_data_file(source)
    if path.suffix.lower() == ".csv" and {"textID", "text", "sentiment"} <= set(_read_csv(path, nrows=0).columns):
        return load_tweets(path, style, limit=limit, seed=seed, template=template)
    return load_pairs(path, limit=limit)


DATA_KINDS = ("sentiment", "tldr", "pairs")
"""How a data source is read: ``sentiment`` (a tweets CSV, ``hf:NAME``, or None: the built-in
statements; turned into pairs of response ``style``), ``tldr`` (OpenAI comparisons JSON),
``pairs`` (JSONL/CSV/Parquet/JSON rows with ``prompt, chosen, rejected``, or ``hf:NAME``)."""


def load_kind(kind: str, source: str | Path | None, *, style: str = "long_suffix", limit: int | None = None,
              seed: int = 0) -> list:
    """The validated pairs of ``source`` read as ``kind`` (one of `DATA_KINDS`), at most ``limit``."""
    if kind not in DATA_KINDS:
        raise InputError(f"unknown data kind {kind!r}; known: {', '.join(DATA_KINDS)}")
    if kind == "sentiment":
        return sentiment_pairs(source, style, limit=limit, seed=seed)
    if source is None:
        raise InputError(f"data kind {kind!r} needs a data file (--data)")
    if kind == "tldr":
        return load_tldr(source, limit=limit)
    return load_pairs(source, limit=limit)


def split_pairs(
    pairs: Sequence[PreferencePair], eval_fraction: float | None = None, *, n_eval: int | None = None, seed: int = 0,
) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """Deterministic (train, eval) split; give `eval_fraction` or `n_eval` (default: 10%).

    The eval indices are a `seed`-shuffled sample; both parts keep the input order.
    """
    if eval_fraction is not None and n_eval is not None:
        raise ValueError("give eval_fraction or n_eval, not both")
    if n_eval is None:
        frac = 0.1 if eval_fraction is None else eval_fraction
        if not 0 <= frac <= 1:
            raise ValueError(f"eval_fraction must be in [0, 1], got {frac}")
        n_eval = round(frac * len(pairs))
    if not 0 <= n_eval <= len(pairs):
        raise ValueError(f"n_eval must be in [0, {len(pairs)}], got {n_eval}")
    idx = list(range(len(pairs)))
    random.Random(seed).shuffle(idx)
    eval_idx = set(idx[:n_eval])
    train = [p for i, p in enumerate(pairs) if i not in eval_idx]
    return train, [p for i, p in enumerate(pairs) if i in eval_idx]


# --------------------------------------------------------------------------- paths


def shared_data_dir(root: str | Path) -> Path | None:
    """`<root>/../shared/data` (the layout of this project and its CI) or None when absent.

    `root` is the project root (the folder holding `dynamics/`). Library code
    takes it as an argument: it never reads environment variables or argv.
    """
    path = (Path(root) / ".." / "shared" / "data").resolve()
    return path if path.is_dir() else None


def _shared_file(root: str | Path, *parts: str) -> Path | None:
    base = shared_data_dir(root)
    return base.joinpath(*parts) if base is not None and base.joinpath(*parts).is_file() else None


def default_tweets_path(root: str | Path) -> Path | None:
    """`tweets/train.csv` under `shared_data_dir(root)`, or None when absent."""
    return _shared_file(root, "tweets", "train.csv")


def default_tldr_path(root: str | Path) -> Path | None:
    """`tldr/batch13.json` (TL;DR comparisons) under `shared_data_dir(root)`, or None when absent."""
    return _shared_file(root, "tldr", "batch13.json")


# --------------------------------------------------------------------------- quality summary


def shared_prefix_suffix(a: Sequence[int], b: Sequence[int]) -> tuple[int, int]:
    """Lengths of the common prefix and the common suffix of two token sequences.

    Non-overlapping: the suffix is counted only after the prefix, so
    `prefix + suffix <= min(len(a), len(b))`. Two sequences of equal length
    differ in exactly one position iff `prefix + suffix == len - 1`.
    """
    n = min(len(a), len(b))
    prefix = 0
    while prefix < n and a[prefix] == b[prefix]:
        prefix += 1
    suffix = 0
    while suffix < n - prefix and a[len(a) - 1 - suffix] == b[len(b) - 1 - suffix]:
        suffix += 1
    return prefix, suffix


def _stats(name: str, values: Sequence[float]) -> dict:
    return {f"{name}_mean": sum(values) / len(values), f"{name}_min": min(values), f"{name}_max": max(values)}


def quality_summary(pairs: Sequence[PreferencePair], tokenizer=None) -> dict:
    """A flat dict describing a pair set (one row of a report table).

    Always: `n_pairs`, `n_unique_prompts`, `n_chosen_longer` (characters), and
    `{prompt,chosen,rejected}_chars_{mean,min,max}`. With an HF-style
    `tokenizer` (`tokenizer(text, add_special_tokens=False)["input_ids"]`;
    each text tokenised on its own): `{prompt,chosen,rejected}_tokens_*`,
    `shared_prefix_tokens_*` and `shared_suffix_tokens_*` between chosen and
    rejected (see `shared_prefix_suffix`), and `n_one_token_diff`: pairs whose
    responses have equal length and differ in exactly one token (edit distance
    one by substitution, the setting of seed 004, Theorem 3).
    """
    if not pairs:
        raise ValueError("quality_summary needs at least one pair")
    out = {
        "n_pairs": len(pairs),
        "n_unique_prompts": len({p.prompt for p in pairs}),
        "n_chosen_longer": sum(len(p.chosen) > len(p.rejected) for p in pairs),
    }
    for name in ("prompt", "chosen", "rejected"):
        out.update(_stats(f"{name}_chars", [len(getattr(p, name)) for p in pairs]))
    if tokenizer is None:
        return out

    def ids(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    toks = {name: [ids(getattr(p, name)) for p in pairs] for name in ("prompt", "chosen", "rejected")}
    for name, seqs in toks.items():
        out.update(_stats(f"{name}_tokens", [len(s) for s in seqs]))
    pre_suf = [shared_prefix_suffix(yw, yl) for yw, yl in zip(toks["chosen"], toks["rejected"])]
    out.update(_stats("shared_prefix_tokens", [p for p, _ in pre_suf]))
    out.update(_stats("shared_suffix_tokens", [s for _, s in pre_suf]))
    out["n_one_token_diff"] = sum(
        len(yw) == len(yl) and p + s == len(yw) - 1
        for yw, yl, (p, s) in zip(toks["chosen"], toks["rejected"], pre_suf)
    )
    return out
