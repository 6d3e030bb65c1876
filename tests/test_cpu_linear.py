"""oneDNN small-batch linears (finemed_ray.models.cpu_linear): same results as F.linear, autograd untouched, the
same greedy text from the transformers engines, and few distinct shapes reaching oneDNN."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from finemed_ray.models import cpu_linear
from finemed_ray.models.cpu_linear import (
    MAX_ROWS,
    SmallBatchLinear,
    onednn_linear_available,
    row_bucket,
    small_batch_linear,
    use_plain_linears,
    use_small_batch_linears,
)

pytestmark = pytest.mark.skipif(not onednn_linear_available(), reason="this torch build has no oneDNN")


@pytest.fixture
def onednn_calls(monkeypatch):
    """Row counts that reached the oneDNN op (wraps the real op, which still runs)."""
    calls: list[int] = []
    real = cpu_linear._onednn_linear

    def counting(x, weight, bias):
        calls.append(x.shape[0])
        return real(x, weight, bias)

    monkeypatch.setattr(cpu_linear, "_onednn_linear", counting)
    return calls


@pytest.mark.parametrize("bias", [False, True])
def test_matches_f_linear_for_every_row_count(bias, onednn_calls):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 40, generator=g)
    b = torch.randn(48, generator=g) if bias else None
    for rows in list(range(1, MAX_ROWS + 3)) + [100]:
        x = torch.randn(rows, 40, generator=g)
        torch.testing.assert_close(small_batch_linear(x, w, b), F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    x3 = torch.randn(2, 3, 40, generator=g)  # [batch, tokens, features]: 6 rows
    torch.testing.assert_close(small_batch_linear(x3, w, b), F.linear(x3, w, b), rtol=1e-5, atol=1e-5)
    # rows 1..32 and the 3-D input went through oneDNN, padded to powers of two; 33, 34 and 100 did not
    assert sorted(set(onednn_calls)) == [1, 2, 4, 8, 16, 32]
    assert len(onednn_calls) == MAX_ROWS + 1


def test_row_buckets_are_powers_of_two():
    assert [row_bucket(r) for r in (1, 2, 3, 5, 8, 9, 17, 32)] == [1, 2, 4, 8, 8, 16, 32, 32]


def test_autograd_and_other_dtypes_keep_f_linear(onednn_calls):
    w = nn.Parameter(torch.randn(8, 6))
    x = torch.randn(3, 6, requires_grad=True)
    y = small_batch_linear(x, w)
    y.sum().backward()
    assert x.grad is not None and w.grad is not None
    torch.testing.assert_close(w.grad, torch.ones(3, 8).T @ x.detach())
    with torch.no_grad():
        small_batch_linear(x, w)  # no grad mode: the fast path, even with requires_grad tensors
    small_batch_linear(torch.randn(3, 6, dtype=torch.bfloat16), w.detach().bfloat16())
    assert onednn_calls == [4]


def test_switch_keeps_parameters_state_dict_and_is_reversible(tiny_model_dir):
    from finemed_ray.models.loading import load_model

    model = load_model(str(tiny_model_dir))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    n_linear = sum(type(m) is nn.Linear for m in model.modules())
    assert use_small_batch_linears(model) == n_linear > 0
    assert use_small_batch_linears(model) == 0  # idempotent
    assert all(isinstance(m, nn.Linear) for m in model.modules() if type(m) is SmallBatchLinear)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert use_plain_linears(model) == n_linear


def test_hf_teacher_greedy_text_unchanged(tiny_model_dir, onednn_calls):
    from finemed_ray.synth.teachers import TeacherSpec, make_teacher

    reqs = [{"key": i, "messages": [{"role": "user", "content": q}]}
            for i, q in enumerate(["What causes anaemia?", "Name a beta blocker.", "Define sepsis briefly."])]
    texts = {}
    for on in (False, True):
        t = make_teacher(TeacherSpec(backend="hf", model=str(tiny_model_dir), max_tokens=12, batch_size=3,
                                     extra={"onednn_linear": on}))
        model, _ = t.load()
        assert any(type(m) is SmallBatchLinear for m in model.modules()) == on
        onednn_calls.clear()
        texts[on] = [r["text"] for r in t.generate(reqs)]
        assert bool(onednn_calls) == on  # decode steps (3 rows -> 4) went through oneDNN only when switched on
        assert set(onednn_calls) <= {4}
    assert texts[True] == texts[False]


def test_a_failing_op_falls_back_to_f_linear_once_and_for_all(monkeypatch):
    calls = []

    def broken(x, weight, bias):
        calls.append(1)
        raise RuntimeError("_linear_pointwise() got an unexpected signature")

    monkeypatch.setattr(cpu_linear, "_onednn_linear", broken)
    monkeypatch.setattr(cpu_linear, "_DISABLED", [])
    w, x = torch.randn(8, 6), torch.randn(3, 6)
    with pytest.warns(UserWarning, match="falling back to F.linear"):
        torch.testing.assert_close(small_batch_linear(x, w), F.linear(x, w))
    torch.testing.assert_close(small_batch_linear(x, w), F.linear(x, w))
    assert calls == [1]  # not retried on every call
