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
    assert len(s.train) + len(s.val) == 40 and 4 <= len(s.val) <= 16 and len(s.general) == 1  # ~25 % by hash
    assert {e.key for e in s.train}.isdisjoint({e.key for e in s.val})
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


def test_splits_follow_the_rows_not_the_reading_order(tok, tmp_path):
    """The validation split, the replay pick and the training order come from each row's content
    hash: the same rows whatever order the file (or a cluster of readers) delivers them in."""
    import random as rnd

    rows = [json.dumps(r) for r in arithmetic_problems(60, seed=4)]
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("\n".join(rows) + "\n")
    rnd.Random(1).shuffle(rows)
    b.write_text("\n".join(rows) + "\n")
    split = {p: load_splits(tok, DataConfig(train=str(p), val_fraction=0.2, max_length=512)) for p in (a, b)}
    assert [e.key for e in split[a].val] == [e.key for e in split[b].val]
    assert [e.key for e in split[a].train] == [e.key for e in split[b].train]  # the training order too


def test_packed_examples_keep_their_own_attention_and_loss(tiny_base):
    """Several examples in one sequence: the base's states of each equal its states alone (1e-5),
    and the loss per example is unchanged."""
    import torch

    from carryon_ray.data import Example, pack_examples, padding_share
    from carryon_ray.embedding import collate_rows, token_rows

    tok = tiny_base.tokenizer
    texts = ["one two three four", "a much longer sentence with many more words in it", "short", "x y"]
    exs = []
    for i, t in enumerate(texts):
        ids = tok(t, add_special_tokens=False)["input_ids"]
        exs.append(Example(ids, [-100] + ids[1:], key=f"k{i}"))
    packed = pack_examples(exs, max_length=24)
    assert sum(len(p.segments) for p in packed) == 4 and all(len(p.input_ids) <= 24 for p in packed)
    batch = collate_rows(token_rows(packed), tok.pad_token_id)
    mask = tiny_base.prepare_mask(batch["attn_mask"])
    states, _ = tiny_base.hidden_states(batch["input_ids"], mask, [], position_ids=batch["position_ids"])
    alone = iter(exs)
    for row, p in enumerate(packed):
        at = 0
        for n in p.segments:
            e = next(alone)
            ref, _ = tiny_base.hidden_states(torch.tensor([e.input_ids]), torch.ones(1, n, dtype=torch.long), [])
            assert torch.allclose(states[0][row, at : at + n], ref[0][0], atol=1e-5)
            # the loss of this example: the same scored positions and targets as unpacked
            assert p.labels[at + 1 : at + n] == e.labels[1:] and p.labels[at] == -100
            at += n
    lengths = [len(e.input_ids) for e in exs]
    assert padding_share([len(p.input_ids) for p in packed], 4) < padding_share(lengths, 4)


def test_pack_in_order_streams_each_kind_into_its_own_sequences():
    """data.pack_examples as one streaming pass: every example exactly once, customization and replay
    never in one sequence, each kind in its training order, no sequence over max_length, and the
    list version (pack_examples) is the same rule."""
    from carryon_ray.data import Example, pack_examples, pack_in_order

    lengths = [5, 9, 3, 7, 2, 8, 4, 6, 1, 9, 3]
    tagged = [(Example(list(range(n)), list(range(n)), key=f"k{i}"), i % 3 == 0) for i, n in enumerate(lengths)]
    out = list(pack_in_order(iter(tagged), max_length=12))
    assert all(len(e.input_ids) <= 12 for e, _ in out)
    for replay in (False, True):
        want = [len(e.input_ids) for e, r in tagged if r == replay]
        got = [n for e, r in out if r == replay for n in e.segments]
        assert got == want  # each kind's examples once, in order, never mixed
    assert sum(len(e.segments) for e, _ in out) == len(tagged)
    plain = [e for e, _ in tagged]
    assert [e.segments for e in pack_examples(plain, 12)] == [e.segments for e, _ in pack_in_order(
        ((e, False) for e in plain), 12)]
    assert [e.segments for e in pack_examples(plain, 12)] == [[5], [9, 3], [7, 2], [8, 4], [6, 1], [9, 3]]


def test_every_source_of_a_plan_is_a_valid_config_on_its_own():
    """A Ray worker rebuilds each source's DataConfig from JSON (validating it): the plan's general and
    replay sources must validate even when the run packs (data.pack needs format text; they are read
    row by row, scored on every token), so `carryon train` and the job read them alike."""
    from carryon_ray.config import DataConfig
    from carryon_ray.data import RowPlan

    d = DataConfig(train="docs.txt", format="text", pack=True, replay="general.txt", general_val="general.txt")
    sources = {s.role: s for s in RowPlan(d, seed=3).sources()}
    assert set(sources) == {"train", "general", "replay"}
    for s in sources.values():
        again = DataConfig(**s.cfg.model_dump(mode="json"))  # what the tokenize actors do
        assert again == s.cfg
    assert sources["train"].cfg.pack and not sources["replay"].cfg.pack and not sources["general"].cfg.pack
    assert sources["replay"].seed == 5 and sources["general"].limit == d.general_rows
