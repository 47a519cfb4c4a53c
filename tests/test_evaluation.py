"""The evaluation harness: answer extraction, exact match against generation, and the CLI."""

import json
import subprocess
import sys
from fractions import Fraction

import pytest

from carryon_ray.evaluation import exact_match, extract_answer, score_answers, validation_loss
from carryon_ray.generation import CarryOnModel
from conftest import ROOT


@pytest.mark.parametrize("text, want", [
    ("so 3 + 4 = 7\n#### 7", Fraction(7)),
    ("#### 1,234", Fraction(1234)),
    ("#### -2.5 dollars", Fraction(-5, 2)),
    ("#### 3/4", Fraction(3, 4)),
    ("#### $18", Fraction(18)),
    ("first #### 4 then corrected #### 5", Fraction(5)),
    ("the answer is 42", None),  # no '####': no answer, as in the paper's protocol
    ("#### seven", None),
])
def test_extract_answer(text, want):
    assert extract_answer(text) == want


def test_exact_match_scores_what_generation_says(tiny_base):
    model = CarryOnModel([tiny_base])
    rows = [{"question": "1 + 1?", "answer": "#### 2"}, {"question": "2 + 2?", "answer": "#### 4"}]
    res = exact_match(model, rows, "Question: {question}\nAnswer:", max_new_tokens=4)
    # A random tiny model never writes '#### 2': every row is scored, none is correct.
    assert res["n"] == 2 and res["correct"] == 0 and res["accuracy"] == 0.0
    assert [r["expected"] for r in res["records"]] == ["2", "4"]


def test_score_answers_counts_correct_and_formatted_answers():
    rows = [{"question": "a", "answer": "so #### 1,000"}, {"question": "b", "answer": "#### 1/2"},
            {"question": "c", "answer": "#### 3"}]
    res = score_answers(rows, ["#### 1000", "#### 0.5", "three"])
    assert (res["correct"], res["n"]) == (2, 3) and res["accuracy"] == 2 / 3
    assert res["answered"] == 2 / 3  # the third text has no '#### number'
    assert [r["correct"] for r in res["records"]] == [True, True, False]
    with pytest.raises(ValueError):  # one text per row, or nothing is scored
        score_answers(rows, ["#### 1000"])


def test_validation_loss_equals_the_base_reference(tiny_base):
    import torch

    from carryon_ray.config import DataConfig
    from carryon_ray.data import collate, load_examples

    exs, _ = load_examples("builtin:arithmetic", tiny_base.tokenizer, DataConfig(train="builtin:arithmetic", builtin_size=6))
    got = validation_loss(CarryOnModel([tiny_base]), exs)
    b = collate(exs, tiny_base.tokenizer.pad_token_id)
    logits = tiny_base.logits(b["input_ids"], b["attention_mask"])[:, :-1]
    y = b["labels"][:, 1:]
    keep = y != -100
    assert got == pytest.approx(float(torch.nn.functional.cross_entropy(logits[keep].float(), y[keep])), rel=1e-5)


def test_eval_cli_scores_base_and_adapter(tiny_base, tiny_dir, tmp_path):
    from carryon_ray.adapter import save_adapter
    from carryon_ray.bridge import Bridge
    from test_invariants import random_carryon

    m = random_carryon(tiny_base, "mlp")
    m.set_alpha(0.5)
    ad = save_adapter(tmp_path / "ad", m, [[Bridge(0), Bridge(0)]], [0], [tiny_base.fingerprint().to_dict()], "tiny")
    data = tmp_path / "qa.jsonl"
    data.write_text("\n".join(json.dumps({"question": f"{i} + 1?", "answer": f"#### {i + 1}"}) for i in range(3)))
    res = subprocess.run([sys.executable, "-m", "carryon_cli", "eval", "--base", tiny_dir, "--dtype", "float32",
                          "--adapter", str(ad), "--data", str(data), "--gsm8k", "--max-new-tokens", "3", "--no-mlflow"],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout)
    assert out["rows_scored"] == 3 and out["base"]["n"] == out["adapter"]["n"] == 3
    assert out["adapter"]["alpha"] == pytest.approx(0.5)
    assert out["adapter"]["loss"] != out["base"]["loss"]


def test_heldout_answers_report_their_decode_steps_and_match_a_silent_run(tiny_base):
    """The held-out comparison wraps its one decode run in `progress` (score_heldout passes a
    patient log pace): every step is counted against a total that bounds it, and the answers are
    the same as without progress."""
    from carryon_ray.evaluation import heldout_comparison

    rows = [{"prompt": f"Question: {i} + {i}?", "completion": f" {2 * i}"} for i in range(5)]
    seen = []

    def progress(items, desc, total):
        seen.append([desc, total, 0])
        for item in items:
            seen[-1][2] += 1
            yield item

    reported = heldout_comparison(tiny_base, None, rows, "{prompt}\nAnswer:", max_new_tokens=6, progress=progress)
    silent = heldout_comparison(tiny_base, None, rows, "{prompt}\nAnswer:", max_new_tokens=6)
    assert reported == silent
    [(desc, total, steps)] = seen
    assert desc.startswith("held-out answers of base and adapter on 5 prompts")
    assert total == 6 + 1 and 1 < steps <= total  # one prefill step for the short prompts, then up to 6 tokens
