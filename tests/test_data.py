"""Tests for dynamics.inputs.data: loaders, validation, sentiment styles, quality summary."""
import json
import math
from pathlib import Path

import pandas as pd
import pytest

from dynamics.inputs import data, statements
from dynamics.inputs.data import PreferencePair

SHARED = (Path(__file__).resolve().parents[1] / ".." / "shared" / "data").resolve()


class WhitespaceTokenizer:
    """Stand-in with the Hugging Face call interface; one token per whitespace-separated word."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": text.split()}


def sample_pairs():
    return [
        PreferencePair("a", "Q1:", " yes", " no", {"source": "x", "score": 1.5}),
        PreferencePair("b", "Q2:", " good answer", " bad answer", {"source": "y", "score": -2.0}),
        PreferencePair("c", "Q3 with, comma \"quote\"\nnewline:", " ünïcode", " ascii", {"source": "z", "score": 0.0}),
    ]


# --------------------------------------------------------------------------- round trips


def test_jsonl_round_trip(tmp_path):
    pairs = sample_pairs()
    path = data.save_pairs(pairs, tmp_path / "sub" / "pairs.jsonl")
    assert data.load_pairs(path) == pairs


def test_json_list_and_lines(tmp_path):
    rows = [{"q": "Q:", "good": " a", "bad": " b"}, {"q": "R:", "good": " c", "bad": " d"}]
    (tmp_path / "list.json").write_text(json.dumps(rows))
    (tmp_path / "lines.json").write_text("\n".join(map(json.dumps, rows)) + "\n")
    a = data.load_pairs(tmp_path / "list.json", prompt="q", chosen="good", rejected="bad")
    b = data.load_pairs(tmp_path / "lines.json", prompt="q", chosen="good", rejected="bad")
    assert [(p.prompt, p.chosen, p.rejected) for p in a] == [(p.prompt, p.chosen, p.rejected) for p in b]
    expected = [("list-0", "Q:", " a", " b"), ("list-1", "R:", " c", " d")]
    assert [(p.id, p.prompt, p.chosen, p.rejected) for p in a] == expected
    assert a[0].metadata == {}


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_frame_round_trip_with_column_mapping(tmp_path, suffix):
    pairs = sample_pairs()
    df = data.pairs_to_frame(pairs).rename(
        columns={"id": "uid", "prompt": "question", "chosen": "win", "rejected": "lose"})
    path = tmp_path / f"pairs{suffix}"
    df.to_csv(path, index=False) if suffix == ".csv" else df.to_parquet(path)
    got = data.load_pairs(path, prompt="question", chosen="win", rejected="lose", id="uid")
    assert [(p.id, p.prompt, p.chosen, p.rejected) for p in got] == [
        (p.id, p.prompt, p.chosen, p.rejected) for p in pairs]
    if suffix == ".parquet":  # typed columns survive; CSV reads every cell as text
        assert got == pairs
    else:
        assert got[1].metadata == {"source": "y", "score": "-2.0"}


def test_limit_and_generated_ids(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": f"P{i}", "chosen": " a", "rejected": " b"}) for i in range(5)))
    got = data.load_pairs(path, limit=2)
    assert [p.id for p in got] == ["p-0", "p-1"]


def test_missing_column_lists_missing_and_available(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"question": "Q", "chosen": " a", "bad": " b"}))
    with pytest.raises(ValueError) as e:
        data.load_pairs(path)
    msg = str(e.value)
    assert "missing" in msg and "'prompt'" in msg and "'rejected'" in msg
    assert "available" in msg and "'question'" in msg and "'bad'" in msg


def test_unsupported_suffix_names_supported(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("x")
    with pytest.raises(ValueError, match=r"\.jsonl.*\.json.*\.csv.*\.parquet"):
        data.load_pairs(path)


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize("pair, problem", [
    (PreferencePair("bad", "", " a", " b"), "empty prompt"),
    (PreferencePair("bad", "  \n\t", " a", " b"), "empty prompt"),
    (PreferencePair("bad", "Q", "", " b"), "empty chosen"),
    (PreferencePair("bad", "Q", " a", "   "), "empty rejected"),
    (PreferencePair("bad", "Q", " same", " same"), "chosen identical to rejected"),
    (PreferencePair("bad", None, " a", " b"), "non-text prompt"),
    (PreferencePair("bad", "Q", math.nan, " b"), "non-text chosen"),
    (PreferencePair("bad", "Q", " a", 3), "non-text rejected"),
    (PreferencePair(None, "Q", " a", " b"), "non-text id"),
])
def test_validation_errors_name_problem_and_pair(pair, problem):
    pairs = [PreferencePair("ok", "Q", " a", " b"), pair]
    with pytest.raises(ValueError, match=problem) as e:
        data.validate_pairs(pairs)
    assert "item 1" in str(e.value) and repr(pair.id) in str(e.value)
    skipped = data.validate_pairs(pairs, on_invalid="skip")
    assert [p.id for p in skipped] == ["ok"] and problem in skipped.skipped[0][1]


def test_duplicate_id():
    pairs = [PreferencePair("x", "Q", " a", " b"), PreferencePair("x", "R", " a", " b")]
    with pytest.raises(ValueError, match=r"'x' \(item 1\): duplicate id \(first seen at item 0\)"):
        data.validate_pairs(pairs)


def test_nan_cell_from_parquet_is_non_text(tmp_path):
    path = tmp_path / "p.parquet"
    pd.DataFrame({"prompt": ["Q", "R"], "chosen": [" a", None], "rejected": [" b", " c"]}).to_parquet(path)
    with pytest.raises(ValueError, match=r"'p-1' \(item 1\): non-text chosen"):
        data.load_pairs(path)


def test_empty_csv_cell_is_empty(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("prompt,chosen,rejected\nQ,a,b\nR,,c\n")
    with pytest.raises(ValueError, match=r"'p-1' \(item 1\): empty chosen"):
        data.load_pairs(path)


def test_bad_on_invalid():
    with pytest.raises(ValueError, match="known: raise, skip"):
        data.validate_pairs([], on_invalid="ignore")


def test_pair_defaults_not_shared_and_hashable():
    a, b = PreferencePair("a", "Q", " x", " y"), PreferencePair("b", "Q", " x", " y")
    assert a.metadata == {} and a.metadata is not b.metadata
    assert len({a, b}) == 2


# --------------------------------------------------------------------------- hf datasets path


def test_rows_from_hf_dataset_object():
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({
        "question": ["Q1", "Q2"], "response_j": [" good", " fine"], "response_k": [" bad", " poor"], "n": [1, 2]})
    got = data.pairs_from_rows(ds, prompt="question", chosen="response_j", rejected="response_k", source="hf")
    assert got == [PreferencePair("hf-0", "Q1", " good", " bad", {"n": 1}),
                   PreferencePair("hf-1", "Q2", " fine", " poor", {"n": 2})]


# --------------------------------------------------------------------------- sentiment


EXPECTED = {
    "single_token": (" positive", " negative"),
    "short_suffix": (" It has a positive sentiment.", " It has a negative sentiment."),
    "long_suffix": (" It has a positive sentiment based on my judgement.",
                    " It has a negative sentiment based on my judgement."),
}


def test_statements_balanced_unique():
    pos, neg = statements.POSITIVE, statements.NEGATIVE
    assert len(pos) >= 100 and len(neg) >= 100 and len(pos) + len(neg) >= 200
    everything = [s.strip().lower() for s in pos + neg]
    assert len(set(everything)) == len(everything)
    assert all(s == " ".join(s.split()) and 10 < len(s) < 100 for s in pos + neg)


@pytest.mark.parametrize("style", list(EXPECTED))
def test_builtin_pairs_per_style(style):
    pairs = data.builtin_sentiment_pairs(style)
    assert len(pairs) == 2 * min(len(statements.POSITIVE), len(statements.NEGATIVE))
    pos, neg = EXPECTED[style]
    for p in pairs:
        label = p.metadata["label"]
        assert (p.chosen, p.rejected) == ((pos, neg) if label == "positive" else (neg, pos))
        assert p.metadata["style"] == style
        assert p.prompt == data.DEFAULT_TEMPLATE.replace("{text}", p.metadata["text"])
        assert (label == "positive") == (p.metadata["text"] in statements.POSITIVE)
    labels = [p.metadata["label"] for p in pairs]
    assert labels.count("positive") == labels.count("negative")


def test_builtin_pairs_deterministic_and_balanced_prefix():
    a = data.builtin_sentiment_pairs(n=10, seed=3)
    assert a == data.builtin_sentiment_pairs(n=10, seed=3)
    assert [p.id for p in a] != [p.id for p in data.builtin_sentiment_pairs(n=10, seed=4)]
    assert [p.metadata["label"] for p in a].count("positive") == 5
    assert len(data.builtin_sentiment_pairs(n=7)) == 7


def test_sentiment_pair_template_and_errors():
    p = data.sentiment_pair("t", "  great\n  day ", "negative", "single_token", template=data.PAPER_TEMPLATE)
    assert (p.prompt, p.chosen, p.rejected) == ("great day", " negative", " positive")
    with pytest.raises(ValueError, match="known: single_token, short_suffix, long_suffix"):
        data.sentiment_pair("t", "x", "positive", "medium")
    with pytest.raises(ValueError, match="known: positive, negative"):
        data.sentiment_pair("t", "x", "neutral")
    with pytest.raises(ValueError, match="{text}"):
        data.sentiment_pair("t", "x", "positive", template="no placeholder")


def test_load_tweets_small_file(tmp_path):
    path = tmp_path / "tweets.csv"
    pd.DataFrame({
        "textID": ["a", "b", "c", "d", "e", "f", "g"],
        "text": ["  so   happy ", "sad day", "meh", "", "love it", "great", "awful"],
        "selected_text": ["x"] * 7,
        "sentiment": ["positive", "negative", "neutral", "negative", "positive", "positive", "negative"],
    }).to_csv(path, index=False)
    got = data.load_tweets(path, "single_token", seed=1)
    labels = [p.metadata["label"] for p in got]
    assert len(got) == 4 and labels.count("positive") == 2  # c neutral, d empty dropped; 3 pos cut to 2
    assert {p.id for p in got} <= {"a", "b", "e", "f", "g"} and {"b", "g"} <= {p.id for p in got}
    assert len(data.load_tweets(path, balanced=False)) == 5
    assert got == data.load_tweets(path, "single_token", seed=1)
    happy = data.load_tweets(path, template="{text}", balanced=False)
    assert "so happy" in [p.prompt for p in happy]
    assert data.sentiment_pairs(path, "single_token", seed=1) == got


def test_sentiment_pairs_dispatch(tmp_path):
    assert data.sentiment_pairs(limit=4) == data.builtin_sentiment_pairs(n=4)
    path = data.save_pairs(data.builtin_sentiment_pairs("short_suffix", n=6), tmp_path / "s.jsonl")
    assert data.sentiment_pairs(path) == data.builtin_sentiment_pairs("short_suffix", n=6)


def test_split_pairs():
    pairs = data.builtin_sentiment_pairs(n=20)
    train, ev = data.split_pairs(pairs, 0.25, seed=1)
    assert len(ev) == 5 and len(train) == 15
    assert sorted(p.id for p in train + ev) == sorted(p.id for p in pairs)
    assert data.split_pairs(pairs, 0.25, seed=1) == (train, ev)
    assert data.split_pairs(pairs, n_eval=5, seed=1) == (train, ev)
    assert [pairs.index(p) for p in ev] == sorted(pairs.index(p) for p in ev)  # input order kept
    assert len(data.split_pairs(pairs)[1]) == 2
    with pytest.raises(ValueError, match="not both"):
        data.split_pairs(pairs, 0.1, n_eval=2)
    with pytest.raises(ValueError, match="n_eval"):
        data.split_pairs(pairs, n_eval=21)


# --------------------------------------------------------------------------- quality summary


@pytest.mark.parametrize("a, b, expected", [
    ([], [], (0, 0)),
    ([1, 2, 3], [1, 2, 3], (3, 0)),            # identical: all prefix, no double count
    ([1, 2, 3], [1, 2, 3, 4], (3, 0)),         # a is a prefix of b
    ([2, 3], [1, 2, 3], (0, 2)),               # a is a suffix of b
    ([1, 2, 1], [1, 2, 2, 1], (2, 1)),         # prefix + suffix <= min length
    ([1, 9, 3, 4], [1, 8, 3, 4], (1, 2)),
    ([9], [8], (0, 0)),
    ([1, 1, 1], [1, 1], (2, 0)),
])
def test_shared_prefix_suffix(a, b, expected):
    assert data.shared_prefix_suffix(a, b) == expected
    assert sum(data.shared_prefix_suffix(a, b)) <= min(len(a), len(b))


@pytest.mark.parametrize("style, prefix, suffix, length", [
    ("single_token", 0, 0, 1), ("short_suffix", 3, 1, 5), ("long_suffix", 3, 5, 9)])
def test_quality_summary_styles(style, prefix, suffix, length):
    pairs = data.builtin_sentiment_pairs(style, n=10)
    s = data.quality_summary(pairs, WhitespaceTokenizer())
    assert s["n_pairs"] == 10 and s["n_unique_prompts"] == 10
    assert s["n_one_token_diff"] == 10
    assert (s["shared_prefix_tokens_min"], s["shared_prefix_tokens_max"]) == (prefix, prefix)
    assert (s["shared_suffix_tokens_min"], s["shared_suffix_tokens_mean"]) == (suffix, suffix)
    assert s["chosen_tokens_mean"] == s["rejected_tokens_max"] == length
    assert s["chosen_chars_min"] == len(EXPECTED[style][0])


def test_quality_summary_counts():
    pairs = [PreferencePair("a", "P", " x y", " x z"), PreferencePair("b", "P", " x y z", " q")]
    s = data.quality_summary(pairs, WhitespaceTokenizer())
    assert s["n_unique_prompts"] == 1 and s["n_one_token_diff"] == 1 and s["n_chosen_longer"] == 1
    assert (s["shared_prefix_tokens_mean"], s["shared_prefix_tokens_max"]) == (0.5, 1)
    assert "chosen_tokens_mean" not in data.quality_summary(pairs)
    with pytest.raises(ValueError, match="at least one"):
        data.quality_summary([])


# --------------------------------------------------------------------------- real data (../shared/data)


def require(path: Path) -> Path:
    if not path.is_file():
        pytest.skip(f"shared data not present: {path}")
    return path


def test_shared_data_helpers():
    root = Path(__file__).resolve().parents[1]
    if data.shared_data_dir(root) is None:
        assert data.default_tweets_path(root) is None
        pytest.skip("shared data not present")
    assert data.shared_data_dir(root) == SHARED
    assert data.default_tweets_path(root) == SHARED / "tweets" / "train.csv"
    assert data.shared_data_dir(root / "nowhere" / "deeper") is None


def test_load_tldr_batch13():
    pairs = data.load_tldr(require(SHARED / "tldr" / "batch13.json"))
    assert len(pairs) + len(pairs.skipped) == 1097 and len(pairs) > 1050
    rows = [json.loads(line) for line in (SHARED / "tldr" / "batch13.json").open()]
    p, row = pairs[0], rows[0]
    info = row["info"]
    assert p.id == f"{info['id']}-0"
    assert p.prompt == f"SUBREDDIT: r/{info['subreddit']}\nTITLE: {info['title']}\nPOST: {info['post']}\nTL;DR:"
    assert p.chosen == row["summaries"][row["choice"]]["text"]
    assert p.rejected == row["summaries"][1 - row["choice"]]["text"]
    assert all(q.chosen.startswith(" ") and q.prompt.endswith("TL;DR:") for q in pairs)
    assert len(data.load_tldr(SHARED / "tldr" / "batch13.json", limit=10)) == 10


def test_load_tldr_edit_file_and_identical_summaries(tmp_path):
    pairs = data.load_tldr(require(SHARED / "tldr" / "edit_b2_eval_test.json"))
    assert len(pairs) == 5 and pairs[0].id == "edit_b2_eval_test-0" and pairs[0].chosen.startswith(" ")
    row = json.loads((SHARED / "tldr" / "batch13.json").open().readline())
    row["summaries"][1]["text"] = row["summaries"][0]["text"]
    path = tmp_path / "dup.json"
    path.write_text(json.dumps(row) + "\n")
    got = data.load_tldr(path)
    assert len(got) == 0 and got.skipped == [(f"{row['info']['id']}-0", "chosen identical to rejected")]
    with pytest.raises(ValueError, match="identical"):
        data.load_tldr(path, on_invalid="raise")


def test_load_tweets_real():
    path = require(SHARED / "tweets" / "train.csv")
    pairs = data.load_tweets(path, "short_suffix")
    labels = [p.metadata["label"] for p in pairs]
    assert labels.count("positive") == labels.count("negative") == 7781
    assert all(p.metadata["text"] and p.metadata["style"] == "short_suffix" for p in pairs)
    few = data.load_tweets(path, limit=50, seed=7)
    assert len(few) == 50 and [p.metadata["label"] for p in few].count("negative") == 25
    assert few == data.load_tweets(path, limit=50, seed=7)
    assert data.sentiment_pairs(path, limit=50, seed=7) == few


def test_hf_sentiment_dataset_with_class_labels(monkeypatch):
    import datasets

    feats = datasets.Features({"id": datasets.Value("string"), "text": datasets.Value("string"),
                               "label": datasets.ClassLabel(names=["negative", "neutral", "positive"])})
    ds = datasets.Dataset.from_dict({"id": ["a", "b", "c", "d"], "text": ["I hate  rain", "ok", "love it", ""],
                                     "label": [0, 1, 2, 2]}, features=feats)
    calls = []
    monkeypatch.setattr(datasets, "load_dataset", lambda name, split: calls.append((name, split)) or ds)
    got = data.sentiment_pairs("hf:someone/tweets:test", "single_token", seed=0)
    assert calls == [("someone/tweets", "test")]
    assert {p.id: (p.metadata["text"], p.metadata["label"]) for p in got} == \
        {"a": ("I hate rain", "negative"), "c": ("love it", "positive")}  # neutral and empty dropped
    assert all(p.chosen != p.rejected for p in got)
    # same rows through the tweets CSV loader give the same pairs
    csv_like = data._labelled_texts_to_pairs(["a", "c"], ["I hate  rain", "love it"], ["negative", "positive"],
                                             "single_token", limit=None, seed=0, balanced=True,
                                             template=data.DEFAULT_TEMPLATE)
    assert sorted(got, key=lambda p: p.id) == sorted(csv_like, key=lambda p: p.id)
    monkeypatch.setattr(datasets, "load_dataset", lambda name, split: ds.remove_columns("label"))
    with pytest.raises(ValueError, match="label column"):
        data.sentiment_pairs("hf:someone/tweets", "single_token")
