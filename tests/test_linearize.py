"""Tests for ntk_torch.linearize: f_lin(x; θ) = f(x; θ0) + J(x; θ0)(θ - θ0) as an nn.Module."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev

import test_kernel_hygiene as hygiene
from ntk_torch.functional import call_arguments, map_inputs
from ntk_torch.linearize import LinearizedModel, linearize
from reference import jacobian_rows
from zoo import ZOO_NAMES, ZooCase, make_zoo

DTYPE = torch.float64


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    # Tiny tensors: intra-op threads only add contention on a shared machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------------------
# A small zoo
# --------------------------------------------------------------------------------------
def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))


class NormDropout(nn.Module):
    """BatchNorm and Dropout: train and eval mode differ."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 8)
        self.norm = nn.BatchNorm1d(8)
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(8, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.drop(torch.relu(self.norm(self.fc(x)))))


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 3), nn.Linear(2, 3)

    def forward(self, x: Tensor, z: Tensor) -> Tensor:
        return torch.tanh(self.a(x)) * self.b(z)


class DictOutput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body, self.mean, self.scale = nn.Linear(4, 5), nn.Linear(5, 2), nn.Linear(5, 1)

    def forward(self, x: Tensor) -> dict:
        h = torch.sin(self.body(x))
        return {"mean": self.mean(h), "scale": torch.exp(self.scale(h))}


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encode, self.decode = nn.Linear(4, 3, bias=False), nn.Linear(3, 4, bias=False)
        self.decode.weight = self.encode.weight  # one (3, 4) Parameter under two names

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(self.encode(x)) @ self.decode.weight


class Frozen(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed, self.head = nn.Linear(4, 6), nn.Linear(6, 2)
        self.embed.requires_grad_(False)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.embed(x)))


def make(factory, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return factory().to(DTYPE)


def x_batch(n: int = 6, features: int = 4, seed: int = 1) -> Tensor:
    return torch.randn(n, features, generator=torch.Generator().manual_seed(seed), dtype=DTYPE)


def snapshot(model: nn.Module) -> dict:
    return {name: t.detach().clone() for name, t in model.state_dict().items()}


def model_jacobian(model: nn.Module, x: Tensor) -> dict:
    """d model(x) / d θ at θ0, in eval mode, for the trainable parameters."""
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    was_training = model.training
    model.eval()
    try:
        return jacrev(lambda p: functional_call(model, p, (x,)))(params)
    finally:
        model.train(was_training)


def linearized_jacobian(lin: LinearizedModel, x: Tensor) -> dict:
    params = {n: p.detach() for n, p in lin.named_parameters()}
    return jacrev(lambda p: functional_call(lin, p, (x,)))(params)


# --------------------------------------------------------------------------------------
# At θ0
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("factory", [mlp, NormDropout, Tied, Frozen])
def test_output_at_theta0_is_the_model_output_in_eval_mode(factory):
    model, x = make(factory), x_batch()
    model.train()
    lin = linearize(model)
    expected = copy.deepcopy(model).eval()(x)
    torch.testing.assert_close(lin(x), expected, rtol=0, atol=1e-14)
    assert model.training  # mode restored


def test_tuple_and_dict_inputs_and_dict_outputs():
    model, x, z = make(TwoInputs), x_batch(), x_batch(features=2, seed=2)
    lin = linearize(model)
    torch.testing.assert_close(lin((x, z)), model(x, z))
    torch.testing.assert_close(lin({"x": x, "z": z}), model(x=x, z=z))
    torch.testing.assert_close(lin(x, z), model(x, z))

    model = make(DictOutput)
    out = linearize(model)(x)
    assert isinstance(out, dict) and set(out) == {"mean", "scale"}
    for key, value in model(x).items():
        torch.testing.assert_close(out[key], value)


@pytest.mark.parametrize("factory", [mlp, NormDropout, Tied, Frozen])
def test_jacobian_of_the_linearized_model_is_the_model_jacobian_at_theta0(factory):
    model, x = make(factory), x_batch()
    model.train()
    lin = linearize(model)
    expected = model_jacobian(model, x)
    assert set(expected) == {name for name, _ in lin.named_parameters()}
    for name, block in linearized_jacobian(lin, x).items():
        torch.testing.assert_close(block, expected[name], rtol=0, atol=1e-12)


def test_linearized_model_is_affine_in_its_parameters():
    model, x = make(mlp), x_batch()
    lin = linearize(model)
    jac = model_jacobian(model, x)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        deltas = {n: 0.3 * torch.randn(p.shape, generator=g, dtype=DTYPE)
                  for n, p in lin.named_parameters()}
        for name, p in lin.named_parameters():
            p.add_(deltas[name])
    expected = model(x) + sum(
        torch.einsum("no...,...->no", jac[name], delta) for name, delta in deltas.items()
    )
    torch.testing.assert_close(lin(x), expected, rtol=0, atol=1e-12)
    # The Jacobian stays J(θ0) away from θ0, unlike the network's.
    for name, block in linearized_jacobian(lin, x).items():
        torch.testing.assert_close(block, jac[name], rtol=0, atol=1e-12)


def test_jacobian_theta0_is_the_jacobian_applied_to_theta0():
    model, x = make(NormDropout), x_batch()
    lin = linearize(model)
    jac = model_jacobian(model, x)
    expected = sum(torch.einsum("no...,...->no", jac[n], p.detach())
                   for n, p in model.named_parameters())
    value = lin.jacobian_theta0(x)
    assert not value.requires_grad
    torch.testing.assert_close(value, expected, rtol=0, atol=1e-12)


# --------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------
def test_parameters_mirror_the_model_names_and_tensors():
    model = make(NormDropout)
    lin = linearize(model)
    assert [n for n, _ in lin.named_parameters()] == [n for n, _ in model.named_parameters()]
    for (name, p), original in zip(lin.named_parameters(), model.parameters()):
        assert isinstance(p, nn.Parameter) and p.requires_grad
        assert torch.equal(p, original) and p.data_ptr() != original.data_ptr()
    # Nothing of the original model is reachable through lin.parameters().
    ptrs = {p.data_ptr() for p in model.parameters()}
    assert not ptrs & {p.data_ptr() for p in lin.parameters()}
    assert not ptrs & {b.data_ptr() for b in lin.buffers()}


def test_training_with_adam_fits_and_leaves_the_model_untouched():
    model, x = make(NormDropout), x_batch(n=16)
    model.train()
    model.norm.eval()  # a per-submodule mode that must survive
    y = torch.randn(16, 2, generator=torch.Generator().manual_seed(4), dtype=DTYPE)
    before, rng = snapshot(model), torch.get_rng_state()
    lin = linearize(model)
    theta0 = {n: b.clone() for n, b in lin.linearization_point.named_buffers()}
    optimizer = torch.optim.Adam(lin.parameters(), lr=0.1)
    losses = []
    for _ in range(60):
        loss = nn.functional.mse_loss(lin(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())

    assert losses[-1] < 0.3 * losses[0]
    for name, tensor in snapshot(model).items():
        assert torch.equal(tensor, before[name]), name
    assert all(p.grad is None for p in model.parameters())
    assert model.training and model.fc.training and not model.norm.training
    assert torch.equal(torch.get_rng_state(), rng)  # dropout off: no random numbers drawn
    for name, value in lin.linearization_point.named_buffers():
        assert torch.equal(value, theta0[name]), name
    assert any(not torch.equal(p, model.get_parameter(n)) for n, p in lin.named_parameters())


def test_frozen_parameters_stay_constant():
    model, x = make(Frozen), x_batch()
    lin = linearize(model)
    assert [n for n, _ in lin.named_parameters()] == ["head.weight", "head.bias"]
    frozen = lin.linearization_point.embed.weight.clone()
    optimizer = torch.optim.SGD(lin.parameters(), lr=0.5, weight_decay=0.1)
    for _ in range(5):
        optimizer.zero_grad()
        lin(x).square().sum().backward()
        optimizer.step()
    assert torch.equal(lin.linearization_point.embed.weight, frozen)
    # The output is affine in the head only, with the embedding at its frozen value.
    expected = model.head(torch.tanh(model.embed(x))) + nn.functional.linear(
        torch.tanh(model.embed(x)), lin.head.weight - model.head.weight,
        lin.head.bias - model.head.bias)
    torch.testing.assert_close(lin(x), expected)


def test_tied_weights_are_one_parameter():
    model, x = make(Tied), x_batch()
    lin = linearize(model)
    assert [n for n, _ in lin.named_parameters()] == ["encode.weight"]
    with torch.no_grad():
        lin.encode.weight.add_(0.1)
    # Both uses of the tied weight move: f_lin is the first-order change in both.
    eps = 1e-6
    with torch.no_grad():
        moved = copy.deepcopy(model)
        moved.encode.weight.add_(0.1 * eps)
    finite_difference = model(x) + (moved(x) - model(x)) / eps
    torch.testing.assert_close(lin(x), finite_difference, rtol=0, atol=1e-6)


def test_mode_is_restored_when_the_model_raises():
    model = make(mlp)
    model.train()
    lin = linearize(model)
    with pytest.raises(RuntimeError):
        lin(torch.randn(5, 7, dtype=DTYPE))  # wrong feature size
    assert all(module.training for module in model.modules())


def test_state_dict_round_trip_and_dtype_move():
    model, x = make(mlp), x_batch()
    lin = linearize(model)
    with torch.no_grad():
        for p in lin.parameters():
            p.mul_(1.5)
    state = lin.state_dict()
    assert {k for k in state if k.startswith("linearization_point.")} == {
        "linearization_point." + k for k in model.state_dict()}
    restored = linearize(make(mlp, seed=5))
    restored.load_state_dict(state)
    torch.testing.assert_close(restored(x), lin(x), rtol=0, atol=0)

    single = copy.deepcopy(lin).to(torch.float32)
    out = single(x.float())
    assert out.dtype == torch.float32
    assert next(model.parameters()).dtype == DTYPE  # the original is not moved
    torch.testing.assert_close(out, lin(x).float(), rtol=1e-5, atol=1e-5)


def test_forward_ad_is_the_same_model_but_does_not_nest_in_torch_func():
    model = mlp().double()
    x = torch.randn(5, 4, dtype=DTYPE)
    default, dual = linearize(model), linearize(model, forward_ad=True)
    step_parameters(default), step_parameters(dual)
    torch.testing.assert_close(dual(x), default(x), rtol=0, atol=1e-13)
    with pytest.raises(TypeError, match="forward_ad must be True or False"):
        linearize(model, forward_ad="yes")
    with pytest.raises(RuntimeError, match="Nested forward mode AD"):  # the documented limit
        torch.func.jvp(lambda inputs: dual(inputs), (x,), (torch.ones_like(x),))
    torch.func.jvp(lambda inputs: default(inputs), (x,), (torch.ones_like(x),))  # the default nests


def test_bad_models_get_clear_errors():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        linearize(lambda x: x)
    frozen = make(mlp).requires_grad_(False)
    with pytest.raises(ValueError, match="no parameters with requires_grad=True"):
        linearize(frozen)
    clash = nn.Module()
    clash.linearization_point = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="named 'linearization_point'"):
        linearize(clash)


def test_list_inputs_and_keyword_arguments_follow_the_library_convention():
    model, x, z = make(TwoInputs), x_batch(), x_batch(features=2, seed=2)
    lin = linearize(model)
    torch.testing.assert_close(lin([x, z]), model(x, z))  # as empirical_ntk(model, [x, z])
    torch.testing.assert_close(lin(x, z=z), model(x, z=z))


def test_a_model_drawing_random_numbers_in_eval_mode_does_not_advance_the_rng():
    class Noisy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x: Tensor) -> Tensor:
            return self.fc(x) + torch.randn(x.shape[0], 2, dtype=x.dtype)

    lin, x = linearize(make(Noisy)), x_batch()
    rng = hygiene.rng_states()
    first = lin(x)
    hygiene.assert_same_rng(rng)
    torch.testing.assert_close(lin(x), first, rtol=0, atol=0)  # the same fork each call


# --------------------------------------------------------------------------------------
# The shared zoo, in float64
# --------------------------------------------------------------------------------------
def zoo_case(name: str, n: int = 4) -> tuple:
    """The zoo case with its model in float64 and train mode, and its inputs in float64."""
    case = make_zoo()[name]
    case.model.double().train()
    x = map_inputs(case.make_inputs(n, 0), lambda t: t.double() if t.is_floating_point() else t)
    return case, x


def selected(case: ZooCase, output) -> Tensor:
    """The zoo's kernel output, flattened to (N, O)."""
    out = case.output_fn(output) if case.output_fn is not None else output
    return out.reshape(out.shape[0], -1)


def step_parameters(lin: LinearizedModel, scale: float = 1e-2) -> Tensor:
    """Moves lin's parameters by a seeded δ; returns δ flattened, (P,), in parameter order."""
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        steps = [scale * torch.randn(p.shape, generator=g, dtype=DTYPE) for p in lin.parameters()]
        for p, step in zip(lin.parameters(), steps):
            p.add_(step)
    return torch.cat([step.reshape(-1) for step in steps])


def reference_jacobian(case: ZooCase, lin: LinearizedModel, x) -> Tensor:
    """J(x; θ0) of the model by autograd loops, (N, O, P), columns in lin's parameter order."""
    trainable = [n for n, p in case.model.named_parameters() if p.requires_grad]
    assert [n for n, _ in lin.named_parameters()] == trainable
    return jacobian_rows(case.model, x, case.output_fn)


@pytest.mark.parametrize("name", ZOO_NAMES)
def test_zoo_output_at_theta0_is_the_eval_mode_output(name):
    case, x = zoo_case(name)
    lin = linearize(case.model)
    args, kwargs = call_arguments(x)
    expected = copy.deepcopy(case.model).eval()(*args, **kwargs)
    torch.testing.assert_close(selected(case, lin(x)), selected(case, expected), rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", ZOO_NAMES)
def test_zoo_output_change_is_the_jacobian_times_the_parameter_change(name):
    case, x = zoo_case(name)
    lin = linearize(case.model)
    with torch.no_grad():
        f0 = selected(case, lin(x))
        delta = step_parameters(lin)
        change = selected(case, lin(x)) - f0
    jacobian = reference_jacobian(case, lin, x)
    torch.testing.assert_close(change, jacobian @ delta, rtol=0, atol=1e-12)


@pytest.mark.parametrize("forward_ad", [False, True], ids=["func.jvp", "forward_ad"])
@pytest.mark.parametrize("name", ZOO_NAMES)
def test_zoo_gradient_is_the_transposed_jacobian_times_the_output_gradient(name, forward_ad):
    case, x = zoo_case(name)
    lin = linearize(case.model, forward_ad=forward_ad)
    step_parameters(lin, scale=0.3)
    out = selected(case, lin(x))
    target = torch.randn(out.shape, generator=torch.Generator().manual_seed(6), dtype=DTYPE)
    (0.5 * (out - target).square().sum()).backward()
    # Parameters that only feed outputs output_fn drops get no gradient at all.
    gradient = torch.cat([
        (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
        for p in lin.parameters()
    ])
    expected = torch.einsum("nop,no->p", reference_jacobian(case, lin, x), (out - target).detach())
    torch.testing.assert_close(gradient, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", ZOO_NAMES)
def test_zoo_forward_and_backward_leave_the_model_and_the_rngs_as_they_were(name):
    case, x = zoo_case(name)
    model = case.model
    next(model.children()).eval()  # a mixed-mode model: each module's flag is restored
    args, kwargs = call_arguments(x)
    selected(case, model(*args, **kwargs)).sum().backward()  # existing .grad must survive
    lin = linearize(model)
    before, rng = hygiene.snapshot(model), hygiene.rng_states()
    selected(case, lin(x)).square().sum().backward()
    lin.jacobian_theta0(x)
    hygiene.assert_unchanged(model, before)
    hygiene.assert_same_rng(rng)
    assert torch.backends.mha.get_fastpath_enabled()
