"""Chunked loss equals the unchunked loss; masking excludes prompt tokens."""

import torch
import torch.nn.functional as F

from carryon_ray.loss import IGNORE, chunked_cross_entropy, select_targets


def test_chunked_equals_unchunked_with_gradients():
    torch.manual_seed(0)
    V, D = 300, 16
    W = torch.randn(V, D)
    x = torch.randn(3, 20, D, requires_grad=True)
    labels = torch.randint(0, V, (3, 20))
    labels[:, :5] = IGNORE
    h, y = select_targets(x, labels)
    ref = F.cross_entropy(F.linear(h, W), y, reduction="sum")
    (g_ref,) = torch.autograd.grad(ref, x)
    for chunk in (1, 7, 1000):
        h, y = select_targets(x, labels)
        out = chunked_cross_entropy(lambda t: F.linear(t, W), h, y, chunk)
        (g,) = torch.autograd.grad(out, x)
        assert torch.allclose(out, ref, rtol=1e-5), chunk
        assert torch.allclose(g, g_ref, atol=1e-6), chunk


def test_masked_positions_do_not_count():
    torch.manual_seed(0)
    V, D = 50, 8
    W = torch.randn(V, D)
    x = torch.randn(1, 10, D)
    labels = torch.randint(0, V, (1, 10))
    labels[0, :6] = IGNORE  # prompt
    h, y = select_targets(x, labels)
    assert y.numel() == 4  # positions 6..9 are predicted from 5..8
    loss = chunked_cross_entropy(lambda t: F.linear(t, W), h, y, 2)
    manual = sum(F.cross_entropy(F.linear(x[0, t - 1], W)[None], labels[0, t][None]) for t in range(6, 10))
    assert torch.allclose(loss, manual)
    # Changing the states at prompt-only positions (which predict prompt tokens) changes nothing.
    x2 = x.clone()
    x2[0, :5] += 100.0
    h2, y2 = select_targets(x2, labels)
    assert torch.equal(chunked_cross_entropy(lambda t: F.linear(t, W), h2, y2, 2), loss)
