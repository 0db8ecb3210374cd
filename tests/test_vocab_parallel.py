"""vocab_parallel_logprob_entropy against a float64 full-vocabulary reference.

Every rank builds the same seeded full (padded) logits, keeps its own ``[tokens,
vocab/tp]`` shard and runs the fused op; the test process recomputes log-probs,
entropies and gradients with plain float64 autograd on the unsharded logits and
compares. One launch per TP size runs all cases (see ``_rank_body``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import partial

import pytest
import torch

from covrl.ops import vocab_parallel_logprob_entropy
from covrl.parallel import SINGLE_PROCESS
from tests.harness import launch, run_checks


@dataclass(frozen=True)
class Case:
    dtype: torch.dtype = torch.float32
    vocab: int = 1000  # true vocabulary size (not a multiple of 16 * tp: padding)
    multiple: int = 16  # megatron pads the vocabulary to a multiple of this x tp
    tokens: int = 37  # prime: no chunk size divides it
    temperature: float = 1.0
    chunk: int | None = None  # None: the op's default
    entropy_grad: bool = False
    inplace: bool = False
    offset: float = 12.0  # mean logit


CASES = {
    "fp32_T0.7_chunk5_entgrad": Case(temperature=0.7, chunk=5, entropy_grad=True),
    "fp32_T1_chunk16_metric": Case(chunk=16),
    "fp32_T1.5_chunk1_entgrad": Case(
        vocab=333, multiple=32, tokens=11, temperature=1.5, chunk=1, entropy_grad=True
    ),
    "fp32_chunk_default_inplace_entgrad": Case(temperature=0.9, entropy_grad=True, inplace=True),
    "fp32_chunk64_inplace_metric": Case(chunk=64, inplace=True),
    # 40 real tokens padded to 64 * tp: at TP > 1 whole ranks hold only padding.
    "fp32_mostly_padding": Case(
        vocab=40, multiple=64, tokens=19, temperature=0.8, chunk=8, entropy_grad=True
    ),
    # Half-precision logits near 0: their own rounding stays below 1%.
    "bf16_T1.3_chunk37_entgrad": Case(
        dtype=torch.bfloat16, temperature=1.3, chunk=37, entropy_grad=True, offset=0.0
    ),
    "bf16_chunk7_metric_inplace": Case(dtype=torch.bfloat16, chunk=7, inplace=True, offset=0.0),
    "fp16_chunk10_entgrad": Case(
        dtype=torch.float16, vocab=500, tokens=23, temperature=1.1, chunk=10, entropy_grad=True
    ),
}


def _padded_vocab(case: Case, tp: int) -> int:
    step = case.multiple * tp
    return math.ceil(case.vocab / step) * step


def _full_inputs(case: Case, tp: int, seed: int):
    """Seeded full-vocabulary inputs, identical on every rank and in the test process.

    Returns float64 logits ``[tokens, padded_vocab]`` (already rounded to the case's
    dtype), targets ``[tokens]`` and the two upstream gradients ``[tokens]``.
    """
    gen = torch.Generator().manual_seed(seed)
    n, vocab, padded = case.tokens, case.vocab, _padded_vocab(case, tp)
    # Spread and an offset: a softmax without max-subtraction would overflow in fp16.
    logits = 2.5 * torch.randn(n, padded, generator=gen, dtype=torch.float64) + case.offset
    # A few very confident rows, so entropies span small to large.
    logits[::5, 3] += 25.0
    # Padding holds large values: any leak into the softmax changes every result.
    logits[:, vocab:] = 60.0
    target = torch.randint(0, vocab, (n,), generator=gen)
    # Ids at the edges of the vocabulary and of the shards.
    target[0], target[1], target[2] = 0, vocab - 1, min(vocab - 1, padded // tp)
    grad_logp = torch.randn(n, generator=gen, dtype=torch.float64)
    grad_entropy = torch.randn(n, generator=gen, dtype=torch.float64)
    return logits.to(case.dtype).double(), target, grad_logp, grad_entropy


def _run_case(case: Case, group, tp_rank: int, tp: int, data_seed: int) -> dict:
    """One case on this rank's shard: outputs, gradient and the storage checks."""
    full, target, grad_logp, grad_entropy = _full_inputs(case, tp, data_seed)
    local = full.shape[1] // tp
    shard = full[:, tp_rank * local : (tp_rank + 1) * local].to(case.dtype).contiguous()
    logits = shard.clone().requires_grad_()
    storage = logits.data_ptr()
    logp, entropy = vocab_parallel_logprob_entropy(
        logits,
        target,
        tp_group=group,
        vocab_size=case.vocab,
        temperature=case.temperature,
        chunk_size=case.chunk,
        entropy_requires_grad=case.entropy_grad,
        inplace=case.inplace,
    )
    unchanged_after_forward = torch.equal(logits.detach(), shard)
    loss = (logp * grad_logp.float()).sum()
    if case.entropy_grad:
        loss = loss + (entropy * grad_entropy.float()).sum()
    loss.backward()
    return dict(
        logp=logp.detach(),
        entropy=entropy.detach(),
        grad=logits.grad,
        entropy_has_grad_fn=entropy.grad_fn is not None,
        entropy_requires_grad=entropy.requires_grad,
        unchanged_after_forward=unchanged_after_forward,
        unchanged_after_backward=torch.equal(logits.detach(), shard),
        grad_in_logits_storage=logits.grad.data_ptr() == storage,
    )


def _rank_body(ctx, data_seed: int):
    """Runs every case on this rank's shard (each a named check of its own)."""
    from megatron.core import parallel_state

    group = parallel_state.get_tensor_model_parallel_group() if ctx.tp > 1 else SINGLE_PROCESS
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    checks = {
        name: partial(_run_case, case, group, tp_rank, ctx.tp, data_seed)
        for name, case in CASES.items()
    }
    checks["errors"] = partial(_collective_errors, group, tp_rank, ctx.tp)
    return run_checks(checks)


def _collective_errors(group, tp_rank: int, tp: int) -> dict:
    """Non-finite logits on the LAST rank only: every rank must raise, none may hang."""
    errors = {}
    for label, value in (("nan", float("nan")), ("+inf", float("inf")), ("-inf", float("-inf"))):
        logits = torch.randn(6, 8)
        if tp_rank == tp - 1:
            logits[4, 7] = value
        try:
            vocab_parallel_logprob_entropy(
                logits, torch.zeros(6, dtype=torch.long), tp_group=group, vocab_size=8 * tp
            )
            errors[label] = None
        except ValueError as exc:
            errors[label] = str(exc)
    return errors


SEED = 20261121


@pytest.fixture(scope="module", params=[1, 2, 4], ids=lambda tp: f"tp{tp}")
def run(request):
    tp = request.param
    return tp, launch(_rank_body, world_size=tp, tp=tp, data_seed=SEED)


def _reference(full: torch.Tensor, target, grad_logp, grad_entropy, case):
    """Float64 log_softmax / gather / -sum p log p on the unsharded valid vocabulary."""
    logits = full.clone().requires_grad_()
    x = logits[:, : case.vocab] / case.temperature
    logprobs = torch.log_softmax(x, dim=-1)
    logp = logprobs.gather(1, target.unsqueeze(1)).squeeze(1)
    entropy = -(logprobs.exp() * logprobs).sum(-1)
    loss = (logp * grad_logp).sum()
    if case.entropy_grad:
        loss = loss + (entropy * grad_entropy).sum()
    loss.backward()
    return logp.detach(), entropy.detach(), logits.grad


def _gather(results, name, key):
    return torch.cat([r[name][key] for r in results], dim=1)


@pytest.mark.parametrize("name", list(CASES))
def test_values_and_gradients_match_float64_reference(run, name):
    tp, results = run
    case = CASES[name]
    full, target, grad_logp, grad_entropy = _full_inputs(case, tp, SEED)
    ref_logp, ref_entropy, ref_grad = _reference(full, target, grad_logp, grad_entropy, case)

    for rank, res in enumerate(r[name] for r in results):
        assert res["logp"].dtype == torch.float32 and res["entropy"].dtype == torch.float32
        # The reference sees the same (dtype-rounded) logits, so all cases are held to
        # float32 accuracy of the computation itself.
        torch.testing.assert_close(
            res["logp"].double(), ref_logp, atol=1e-5, rtol=1e-5, msg=f"logp, rank {rank}"
        )
        torch.testing.assert_close(
            res["entropy"].double(), ref_entropy, atol=1e-5, rtol=1e-5, msg=f"H, rank {rank}"
        )
    # Logits ~ N(offset, 2.5) with spikes: a non-trivial mix of entropies.
    assert ref_entropy.max() > 1.0 and ref_entropy.min() < 0.1

    grad = _gather(results, name, "grad").double()
    assert grad.shape == full.shape
    assert torch.all(grad[:, case.vocab :] == 0), "padded columns must get zero gradient"
    if case.dtype == torch.float32:
        torch.testing.assert_close(grad, ref_grad, atol=1e-5, rtol=1e-4)
    else:
        # The gradient is returned in the logits' half-precision dtype.
        scale = ref_grad.abs().max()
        torch.testing.assert_close(grad, ref_grad, atol=1e-2 * scale, rtol=1e-2)


@pytest.mark.parametrize("name", [n for n in CASES if CASES[n].dtype == torch.bfloat16])
def test_bf16_within_one_percent_of_unrounded_reference(run, name):
    tp, results = run
    case = CASES[name]
    # The same seeded logits before rounding to bfloat16.
    gen_case = replace(case, dtype=torch.float64)
    full, target, grad_logp, grad_entropy = _full_inputs(gen_case, tp, SEED)
    ref_logp, ref_entropy, _ = _reference(full, target, grad_logp, grad_entropy, case)
    res = results[0][name]
    torch.testing.assert_close(res["logp"].double(), ref_logp, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(res["entropy"].double(), ref_entropy, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("name", list(CASES))
def test_logits_untouched_unless_inplace(run, name):
    _, results = run
    case = CASES[name]
    for res in (r[name] for r in results):
        assert res["unchanged_after_forward"], "forward must never write the logits"
        if case.inplace:
            assert res["grad_in_logits_storage"]
        else:
            assert res["unchanged_after_backward"]
            assert not res["grad_in_logits_storage"]


@pytest.mark.parametrize("name", list(CASES))
def test_entropy_grad_path_only_when_requested(run, name):
    _, results = run
    for res in (r[name] for r in results):
        assert res["entropy_has_grad_fn"] == CASES[name].entropy_grad
        assert res["entropy_requires_grad"] == CASES[name].entropy_grad


def test_outputs_identical_across_tp_ranks(run):
    _, results = run
    for name in CASES:
        for res in results[1:]:
            assert torch.equal(res[name]["logp"], results[0][name]["logp"]), name
            assert torch.equal(res[name]["entropy"], results[0][name]["entropy"]), name


def test_non_finite_logits_raise_on_every_rank(run):
    _, results = run
    for res in results:
        for label, message in res["errors"].items():
            assert message is not None, f"{label} logits were accepted"
            assert "logits" in message and "token 4" in message, message


# Single-process checks: no launch needed.


def _single(logits, target, **kwargs):
    """One process holding the whole vocabulary; every column is a real token unless
    ``vocab_size`` says otherwise."""
    options = {"tp_group": SINGLE_PROCESS, "vocab_size": logits.shape[-1], **kwargs}
    return vocab_parallel_logprob_entropy(logits, target, **options)


def test_float64_gradcheck_with_padding_and_temperature():
    gen = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(9, 24, generator=gen, dtype=torch.float64)).requires_grad_()
    target = torch.randint(0, 20, (9,), generator=gen)

    def both(z):
        return _single(
            z, target, vocab_size=20, temperature=0.6, chunk_size=4, entropy_requires_grad=True
        )

    assert torch.autograd.gradcheck(both, (logits,))


def test_metric_only_entropy_saves_nothing_for_it():
    logits = torch.randn(5, 16, requires_grad=True)
    target = torch.randint(0, 16, (5,))
    logp, entropy = _single(logits, target)
    assert entropy.grad_fn is None and not entropy.requires_grad
    # Saved: logits (a reference, not a copy), target and the per-token logsumexp.
    saved = logp.grad_fn.saved_tensors
    assert [tuple(t.shape) for t in saved] == [(5, 16), (5,), (5,)]
    assert saved[0].data_ptr() == logits.data_ptr()
    with pytest.raises(RuntimeError):
        torch.autograd.grad(entropy.sum(), logits)


def test_leading_dimensions_are_flattened():
    logits = torch.randn(3, 4, 10, requires_grad=True)
    target = torch.randint(0, 10, (3, 4))
    logp, entropy = _single(logits, target, entropy_requires_grad=True)
    assert logp.shape == entropy.shape == (3, 4)
    flat_logp, flat_entropy = _single(logits.reshape(12, 10), target.flatten())
    assert torch.equal(logp.flatten(), flat_logp) and torch.equal(entropy.flatten(), flat_entropy)
    (logp.sum() + entropy.sum()).backward()
    assert logits.grad.shape == logits.shape


def test_inplace_backward_twice_is_refused():
    logits = torch.randn(4, 8, requires_grad=True)
    logp, _ = _single(logits, torch.zeros(4, dtype=torch.long), inplace=True)
    logp.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="inplace"):
        logp.sum().backward()


@pytest.mark.parametrize(
    "logits, target, kwargs, error, pattern",
    [
        (torch.randn(4, 8), torch.zeros(5, dtype=torch.long), {}, ValueError, "shape"),
        (torch.randn(4, 8), torch.zeros(4, 1, dtype=torch.long), {}, ValueError, "shape"),
        (torch.randn(4, 8), torch.tensor([0, 1, 8, 2]), {}, ValueError, r"target\[2\] = 8"),
        (torch.randn(4, 8), torch.tensor([0, -1, 2, 2]), {}, ValueError, r"target\[1\] = -1"),
        # Id 6 exists in the padded shard but not in the real vocabulary.
        (torch.randn(4, 8), torch.tensor([0, 6, 2, 2]), {"vocab_size": 6}, ValueError, "target"),
        (
            torch.randn(4, 8),
            torch.zeros(4, dtype=torch.long),
            {"vocab_size": 9},
            ValueError,
            "vocab_size",
        ),
        (torch.randn(4, 8), torch.zeros(4), {}, TypeError, "target"),
        (torch.randn(4, 8).int(), torch.zeros(4, dtype=torch.long), {}, TypeError, "logits"),
        (
            torch.randn(4, 8),
            torch.zeros(4, dtype=torch.long),
            {"temperature": 0.0},
            ValueError,
            "temperature",
        ),
        (
            torch.randn(4, 8),
            torch.zeros(4, dtype=torch.long),
            {"chunk_size": 0},
            ValueError,
            "chunk_size",
        ),
    ],
)
def test_bad_inputs_raise_clear_errors(logits, target, kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        _single(logits, target, **kwargs)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_logits_named(value):
    logits = torch.randn(6, 8)
    logits[3, 2] = value
    with pytest.raises(ValueError, match=r"logits .*non-finite.*token 3"):
        _single(logits, torch.zeros(6, dtype=torch.long))
    # A non-finite value in a padded column is never read.
    logits = torch.randn(6, 8)
    logits[3, 7] = value
    _single(logits, torch.zeros(6, dtype=torch.long), vocab_size=7)


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        ({"tp_group": None, "vocab_size": 8}, "tp_group=None is ambiguous"),
        ({"tp_group": SINGLE_PROCESS, "vocab_size": None}, "vocab_size is required"),
    ],
)
def test_no_silent_defaults(kwargs, pattern):
    with pytest.raises(TypeError, match=pattern):
        vocab_parallel_logprob_entropy(
            torch.randn(4, 8), torch.zeros(4, dtype=torch.long), **kwargs
        )
