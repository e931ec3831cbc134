"""check.generate_params both ways: correct answers written differently pass, each mistake fails with its reason."""

from __future__ import annotations

import math

import pytest
import torch

from course import check
from course.nola import GenerateParams, basis_chunks, random_basis

# ---------------------------------------------------------------------------
# Correct answers, written differently
# ---------------------------------------------------------------------------


class OneMatrixAtATime(torch.autograd.Function):
    """Chunks of one basis matrix, matmul instead of einsum, shape and seed saved as a small tensor."""

    @staticmethod
    def forward(ctx, coefficients, rows, cols, seed):
        ctx.save_for_backward(coefficients, torch.tensor([rows, cols, seed]))
        out = torch.zeros(rows * cols, dtype=coefficients.dtype)
        for where, block in basis_chunks(len(coefficients), rows, cols, seed, chunk_size=1, dtype=coefficients.dtype):
            out += coefficients[where] @ block.reshape(1, -1)
        return out.reshape(rows, cols)

    @staticmethod
    def backward(ctx, grad_output):
        coefficients, shape = ctx.saved_tensors
        rows, cols, seed = (int(v) for v in shape)
        grads = [block.reshape(1, -1) @ grad_output.reshape(-1)
                 for _, block in basis_chunks(len(coefficients), rows, cols, seed, chunk_size=1,
                                              dtype=coefficients.dtype)]
        return torch.cat(grads), None, None, None


class WholeBasisThenFreed(torch.autograd.Function):
    """The reference code's structure with the course's generator: the whole basis in each pass, none kept."""

    @staticmethod
    def forward(ctx, coefficients, out_dim, in_dim, seed):
        ctx.save_for_backward(coefficients)
        ctx.params = (out_dim, in_dim, seed)
        W = random_basis(len(coefficients), out_dim, in_dim, seed, dtype=coefficients.dtype)
        return torch.einsum("b,boi->oi", coefficients, W)

    @staticmethod
    def backward(ctx, grad_output):
        (coefficients,) = ctx.saved_tensors
        out_dim, in_dim, seed = ctx.params
        W = random_basis(len(coefficients), out_dim, in_dim, seed, dtype=coefficients.dtype)
        W = W.permute(1, 2, 0).reshape(-1, len(coefficients))
        return torch.einsum("d,dl->l", grad_output.flatten(), W), None, None, None


@pytest.mark.parametrize("answer", [GenerateParams.apply, OneMatrixAtATime.apply, WholeBasisThenFreed.apply],
                         ids=["reference", "one-matrix-at-a-time", "whole-basis-then-freed"])
def test_correct_answers_pass(answer):
    result = check.generate_params.run(answer)
    assert result.status == "passed", result.message


# ---------------------------------------------------------------------------
# Typical mistakes
# ---------------------------------------------------------------------------


def _explicit(c, rows, cols, seed):
    return torch.einsum("k,kij->ij", c, random_basis(len(c), rows, cols, seed, dtype=c.dtype))


def _grad(c, rows, cols, seed, grad_output):
    return random_basis(len(c), rows, cols, seed, dtype=c.dtype).flatten(1) @ grad_output.flatten()


class Good(torch.autograd.Function):
    """A correct base for the mistakes below: each overrides one thing."""

    @staticmethod
    def forward(ctx, c, rows, cols, seed):
        ctx.save_for_backward(c)
        ctx.rows, ctx.cols, ctx.seed = rows, cols, seed
        return _explicit(c, rows, cols, seed)

    @staticmethod
    def backward(ctx, grad_output):
        (c,) = ctx.saved_tensors
        return _grad(c, ctx.rows, ctx.cols, ctx.seed, grad_output), None, None, None


class KeepsBasis(Good):
    @staticmethod
    def forward(ctx, c, rows, cols, seed):
        basis = random_basis(len(c), rows, cols, seed, dtype=c.dtype)
        ctx.save_for_backward(c, basis)
        ctx.rows, ctx.cols, ctx.seed = rows, cols, seed
        return torch.einsum("k,kij->ij", c, basis)

    @staticmethod
    def backward(ctx, grad_output):
        c, basis = ctx.saved_tensors
        return basis.flatten(1) @ grad_output.flatten(), None, None, None


class KeepsBasisOnCtx(Good):
    @staticmethod
    def forward(ctx, c, rows, cols, seed):
        ctx.basis = random_basis(len(c), rows, cols, seed, dtype=c.dtype)
        return torch.einsum("k,kij->ij", c, ctx.basis)

    @staticmethod
    def backward(ctx, grad_output):
        return ctx.basis.flatten(1) @ grad_output.flatten(), None, None, None


def plain_autograd(c, rows, cols, seed):
    return _explicit(c, rows, cols, seed)


class ReseedsGlobalGenerator(Good):
    """Right values, but the reference code's reseeding dance around them."""

    @staticmethod
    def forward(ctx, c, rows, cols, seed):
        rand_seed = torch.randint(int(1e10), (1,))
        torch.manual_seed(seed)
        out = Good.forward(ctx, c, rows, cols, seed)
        torch.manual_seed(int(rand_seed))
        return out


class DifferentBasisInBackward(Good):
    @staticmethod
    def backward(ctx, grad_output):
        (c,) = ctx.saved_tensors
        return _grad(c, ctx.rows, ctx.cols, ctx.seed + 1, grad_output), None, None, None


class BackwardSwapsRowsAndCols(Good):
    @staticmethod
    def backward(ctx, grad_output):
        (c,) = ctx.saved_tensors
        basis = random_basis(len(c), ctx.cols, ctx.rows, ctx.seed, dtype=c.dtype)
        return basis.flatten(1) @ grad_output.T.flatten(), None, None, None


class WrongGradientLayout(Good):
    """The reference code's backward without its permute."""

    @staticmethod
    def backward(ctx, grad_output):
        (c,) = ctx.saved_tensors
        W = random_basis(len(c), ctx.rows, ctx.cols, ctx.seed, dtype=c.dtype).reshape(-1, len(c))
        return torch.einsum("d,dl->l", grad_output.flatten(), W), None, None, None


class GradientAsColumn(Good):
    @staticmethod
    def backward(ctx, grad_output):
        grad, *rest = Good.backward(ctx, grad_output)
        return (grad[:, None], *rest)


class IgnoresGradOutput(Good):
    @staticmethod
    def backward(ctx, grad_output):
        return Good.backward(ctx, torch.ones_like(grad_output))


class TorchGeneratorBasis(Good):
    """A local torch.Generator: the global state is safe, but the numbers are torch's, not the course's."""

    @staticmethod
    def forward(ctx, c, rows, cols, seed):
        generator = torch.Generator().manual_seed(seed)
        basis = torch.rand(len(c), rows, cols, generator=generator, dtype=c.dtype) * 2 - 1
        ctx.save_for_backward(c)
        ctx.rows, ctx.cols, ctx.seed = rows, cols, seed
        return torch.einsum("k,kij->ij", c, basis)


class TransposedOutput(Good):
    @staticmethod
    def forward(ctx, c, rows, cols, seed):
        return Good.forward(ctx, c, rows, cols, seed).T.contiguous()


class SwappedBasisShape(Good):
    @staticmethod
    def forward(ctx, c, rows, cols, seed):
        ctx.save_for_backward(c)
        ctx.rows, ctx.cols, ctx.seed = rows, cols, seed
        return _explicit(c, cols, rows, seed).T.contiguous()


def detached(c, rows, cols, seed):
    return _explicit(c.detach(), rows, cols, seed)


class Float32Output(Good):
    @staticmethod
    def forward(ctx, c, rows, cols, seed):
        return Good.forward(ctx, c, rows, cols, seed).float()


MISTAKES = [
    (KeepsBasis.apply, ["keeps the basis", "save_for_backward"]),
    (KeepsBasisOnCtx.apply, ["attributes of ctx", "regenerate the basis"]),
    (plain_autograd, ["plain autograd", "torch.autograd.Function"]),
    (ReseedsGlobalGenerator.apply, ["global random state", "forward"]),
    (DifferentBasisInBackward.apply, ["does not match your forward", "same seed"]),
    (WrongGradientLayout.apply, ["Wrong gradient layout", "einsum('kij,ij->k'"]),
    (GradientAsColumn.apply, ["wrong shape", "one number per basis matrix"]),
    (IgnoresGradOutput.apply, ["ignores grad_output"]),
    (TorchGeneratorBasis.apply, ["course.nola.random_basis", "not with torch's random generators"]),
    (TransposedOutput.apply, ["(cols, rows)", "should be (rows, cols)"]),
    (SwappedBasisShape.apply, ["generated as (cols, rows)"]),
    (detached, ["no gradient", "detach"]),
    (Float32Output.apply, ["keep the coefficients' dtype"]),
]


@pytest.mark.parametrize(("answer", "phrases"), MISTAKES, ids=[getattr(m[0], "__self__", m[0]).__name__
                                                              for m in MISTAKES])
def test_mistakes_fail_with_their_reason(answer, phrases):
    result = check.generate_params.run(answer)
    assert result.status == "failed"
    for phrase in phrases:
        assert phrase in result.message, result.message


def test_each_mistake_has_its_own_message():
    messages = [check.generate_params.run(answer).message for answer, _ in MISTAKES]
    assert len(set(messages)) == len(messages)


def test_a_different_basis_in_backward_of_another_shape_fails_too():
    result = check.generate_params.run(BackwardSwapsRowsAndCols.apply)
    assert result.status == "failed" and "does not match your forward" in result.message


def test_the_reference_codes_own_generate_params_fails_on_the_global_state():
    """The seed's GenerateParams, verbatim in substance: reseeds the global generator."""

    class SeedGenerateParams(torch.autograd.Function):
        @staticmethod
        def forward(ctx, coefficients, out_dim, in_dim, seed):
            rand_seed = torch.randint(int(1e10), (1,))
            torch.manual_seed(seed)
            W = torch.zeros(len(coefficients), out_dim, in_dim, dtype=coefficients.dtype)
            torch.nn.init.uniform_(W, a=-1.0, b=1.0)
            out = torch.einsum("b,boi->oi", coefficients, W)
            ctx.save_for_backward(coefficients, torch.tensor([out_dim, in_dim, seed]))
            torch.manual_seed(int(rand_seed))
            return out

        @staticmethod
        def backward(ctx, grad_output):
            raise AssertionError("not reached")

    result = check.generate_params.run(SeedGenerateParams.apply)
    assert result.status == "failed" and "global random state" in result.message


def test_stubs_are_not_attempted_and_a_backward_stub_is_named():
    class Stub(torch.autograd.Function):
        @staticmethod
        def forward(ctx, coefficients, rows, cols, seed):
            raise NotImplementedError

        @staticmethod
        def backward(ctx, grad_output):
            raise NotImplementedError

    class BackwardStub(Good):
        @staticmethod
        def backward(ctx, grad_output):
            raise NotImplementedError

    assert check.generate_params.run(Stub.apply).status == "not_attempted"
    result = check.generate_params.run(BackwardStub.apply)
    assert result.status == "failed" and "BackwardStub.backward" in result.message


def test_not_a_function():
    result = check.generate_params.run(42)
    assert result.status == "failed" and "Expected a function" in result.message


def test_check_leaves_the_global_random_state_alone_even_for_an_answer_that_reseeds():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    check.generate_params.run(ReseedsGlobalGenerator.apply)
    assert torch.equal(torch.rand(3), expected)


def test_the_solution_shown_passes(capsys):
    check.generate_params.hint()
    check.generate_params.hint(3)
    check.generate_params.solution()
    out = capsys.readouterr().out
    assert "basis_chunks" in out and "save_for_backward" in out
    namespace = {"math": math, "torch": torch, "basis_chunks": basis_chunks, "random_basis": random_basis}
    exec(check.generate_params.solution_source(), namespace)
    assert check.generate_params.run(namespace["GenerateParams"].apply).status == "passed"
