"""bench/gpu_check.py, the prepared GPU measurement, runs end to end at tiny shapes on CPU, without
Ray or MLflow importable (a lent GPU box has neither), and writes every figure it promises."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import ROOT


def test_gpu_check_smoke_runs_without_ray_or_mlflow(tmp_path):
    out = tmp_path / "gpu.json"
    code = ("import runpy, sys\n"
            "sys.modules['ray'] = None; sys.modules['mlflow'] = None  # importing either now fails\n"
            f"sys.argv = ['gpu_check.py', '--smoke', '--device', 'cpu', '--out', {str(out)!r}]\n"
            "runpy.run_path('bench/gpu_check.py', run_name='__main__')\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    r = json.loads(out.read_text())["tiny"]
    assert r["invariant"] == {"dtype": "torch.float32", "alpha0_bit_exact": True, "alpha1_differs": True}
    prod = r["producer"]["batch2x32"]
    assert min(prod["hf_forward_with_logits_tok_s"], prod["backbone_only_tok_s"], prod["producer_tok_s"]) > 0
    assert r["train"]["carryon"]["step_s"] > 0 and r["train"]["lora"]["step_s"] > 0
    assert r["train"]["carryon"]["trainable_params"] < r["train"]["lora"]["trainable_params"] * 100
    d = r["decode"]
    for key in ("base_tok_s", "mlp_tok_s", "transformer_tok_s", "distinct8_tok_s", "distinct4_tok_s"):
        assert d[key] > 0, key
    e = r["engine"]
    assert e["flat"]["forwards"] == e["flat"]["steps"] and e["padded"]["forwards"] > e["padded"]["steps"]
    assert e["flat"]["itl_ratio"] > 0 and e["padded"]["step_s"] > 0
