"""Data formats, loss masks, and malformed rows counted by reason."""

import json

import pytest

from carryon_ray.config import DataConfig
from carryon_ray.data import DataError, arithmetic_problems, collate, load_examples, load_splits
from carryon_ray.loss import IGNORE


@pytest.fixture(scope="module")
def tok(tiny_base):
    return tiny_base.tokenizer


def test_builtin_problems_are_deterministic_and_correct():
    rows = arithmetic_problems(50, seed=3)
    assert rows == arithmetic_problems(50, seed=3)
    for r in rows:
        answer = r["answer"].rsplit("####", 1)[1].strip()
        for step in r["answer"].split("<<")[1:]:
            expr, result = step.split(">>")[0].split("=")
            assert eval(expr) == float(result)  # the worked steps are arithmetic that checks out
        assert answer.lstrip("-").isdigit()


def test_qa_masks_the_prompt(tok):
    cfg = DataConfig(train="builtin:arithmetic", builtin_size=5)
    exs, rep = load_examples("builtin:arithmetic", tok, cfg)
    assert rep.kept == 5 and rep.bad == 0
    for ex in exs:
        n_prompt = sum(1 for lab in ex.labels if lab == IGNORE)
        prompt = tok.decode(ex.input_ids[:n_prompt])
        assert prompt.startswith("Question:") and prompt.endswith("Answer:")
        assert ex.labels[-1] == tok.eos_token_id
        assert ex.labels[n_prompt:] == ex.input_ids[n_prompt:]


def test_malformed_rows_are_counted(tmp_path, tok):
    p = tmp_path / "d.jsonl"
    good = [json.dumps({"prompt": f"Say {i}:", "completion": f" {i}"}) for i in range(8)]
    bad = [
        b"{not json",
        json.dumps([1, 2]).encode(),
        json.dumps({"foo": 1}).encode(),
        json.dumps({"text": "   "}).encode(),
        json.dumps({"prompt": "x", "completion": "word " * 400}).encode(),
        b'{"text": "caf\xe9"}',
        json.dumps({"prompt": 3, "completion": "x"}).encode(),
    ]
    p.write_bytes(b"\n".join([g.encode() for g in good] + bad) + b"\n\n")
    cfg = DataConfig(train=str(p), max_length=64, max_bad_fraction=0.5)
    exs, rep = load_examples(str(p), tok, cfg)
    assert rep.rows == 15 and rep.kept == 8 and len(exs) == 8
    assert dict(rep.skipped) == {"bad_json": 1, "not_an_object": 1, "missing_fields": 2, "empty": 1,
                                 "too_long": 1, "bad_encoding": 1}
    assert "7 skipped" in rep.summary()
    with pytest.raises(DataError, match="too many malformed rows"):
        load_examples(str(p), tok, DataConfig(train=str(p), max_length=64, max_bad_fraction=0.2))


def test_missing_file_and_unknown_builtin(tok):
    with pytest.raises(DataError, match="not found"):
        load_examples("/nope/x.jsonl", tok, DataConfig(train="/nope/x.jsonl"))
    with pytest.raises(DataError, match="unknown built-in"):
        load_examples("builtin:poetry", tok, DataConfig(train="builtin:poetry"))


def test_chat_rows_train_on_the_reply_only(tmp_path, tok):
    p = tmp_path / "chat.jsonl"
    msgs = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "It is 4."}]
    p.write_text(json.dumps({"messages": msgs}) + "\n")
    (ex,), _ = load_examples(str(p), tok, DataConfig(train=str(p)))
    target = tok.decode([t for t, lab in zip(ex.input_ids, ex.labels) if lab != IGNORE])
    assert "It is 4." in target and "2+2" not in target


def test_text_and_gsm8k_files(tmp_path, tok):
    p = tmp_path / "t.txt"
    p.write_text("first line of text\n\nsecond line\n")
    exs, rep = load_examples(str(p), tok, DataConfig(train=str(p)))
    assert rep.kept == 2 and all(ex.labels == ex.input_ids for ex in exs)
    from conftest import ROOT

    gsm = ROOT / "tests" / "data" / "gsm8k" / "train-head50.jsonl"  # vendored (MIT, LICENSE beside it)
    exs, rep = load_examples(str(gsm), tok, DataConfig(train=str(gsm), max_length=512), limit=50)
    assert rep.rows == 50 and rep.kept >= 48


def test_splits_and_collate(tok, tmp_path):
    cfg = DataConfig(train="builtin:arithmetic", builtin_size=40, val_fraction=0.25, general_val=str(tmp_path / "g.txt"))
    (tmp_path / "g.txt").write_text("The quick brown fox jumps over the lazy dog.\n")
    s = load_splits(tok, cfg)
    assert len(s.train) == 30 and len(s.val) == 10 and len(s.general) == 1
    b = collate(s.train[:3], tok.pad_token_id)
    assert b["input_ids"].shape == b["labels"].shape == b["attention_mask"].shape
    assert ((b["attention_mask"] == 0) <= (b["labels"] == IGNORE)).all()  # padding carries no loss


def test_builtin_topics_train_and_heldout_never_share_a_prompt():
    from carryon_ray.data import BUILTINS, TOPICS, heldout_rows, topic_rows

    train, held = topic_rows(600, seed=3), topic_rows(150, seed=3, split="heldout")
    assert {r["prompt"] for r in train}.isdisjoint({r["prompt"] for r in held})
    assert len({r["prompt"] for r in train}) == 600  # no duplicates either
    assert {r["completion"].strip() for r in held} == set(TOPICS)
    assert heldout_rows("builtin:topics-heldout", 10, 3) == topic_rows(10, seed=3, split="heldout")
    assert "builtin:topics" in BUILTINS
    with pytest.raises(DataError, match="fewer than"):
        topic_rows(100_000)


def test_heldout_answers_are_scored_by_their_kind():
    from carryon_ray.evaluation import answer_of, is_correct

    assert is_correct(" music", "music\nTopic: x") and not is_correct(" music", "Music")
    assert is_correct("so 3 + 4 = 7\n#### 7", "7 apples\n#### 7.0") and not is_correct("#### 7", "#### 8")
    assert answer_of({"question": "q?", "answer": "#### 2"}, "Q: {question}") == ("Q: q?", "#### 2")
    assert answer_of({"text": "x"}, "{question}") is None
