r"""The first-order Taylor expansion of a network, as a trainable ``nn.Module``.

.. math::  f_{lin}(x; \theta) = f(x; \theta_0) + J(x; \theta_0)\,(\theta - \theta_0)

Lee et al. 2019 ("Wide neural networks of any depth evolve as linear models under gradient
descent", eq. 6) show that wide networks train like this model. Trained with any optimizer,
minibatches and schedule, it is the exact reference for the function-space predictions of
:mod:`ntk_torch.predict` (which cover full-batch SGD) and the model to compare a real
network against when the kernel moves.

Each forward pass is one Jacobian-vector product (:func:`torch.func.jvp`, or with
``forward_ad=True`` dual tensors of :mod:`torch.autograd.forward_ad`) through
:func:`torch.func.functional_call` of the original network at :math:`\theta_0`: it returns
:math:`f(x; \theta_0)` and :math:`J(x; \theta_0)(\theta - \theta_0)` together, without ever
forming :math:`J`; backpropagating through it gives :math:`J^\top \nabla_f L`, the exact
gradient of the linear model.
"""

from __future__ import annotations

from functools import reduce
from typing import Any, Dict, Tuple

import torch
from torch import Tensor, nn
from torch.autograd import forward_ad as dual_tensors

from .functional import call_arguments, evaluation_context

__all__ = ["linearize", "LinearizedModel"]

_REFERENCE = "linearization_point"


def linearize(model: nn.Module, *, forward_ad: bool = False) -> "LinearizedModel":
    r"""Returns the linearisation of ``model`` around its current parameters.

    Shorthand for :class:`LinearizedModel` ``(model, forward_ad=forward_ad)``; see there.

    Example::

        lin = ntk_torch.linearize(model)
        optimizer = torch.optim.Adam(lin.parameters(), lr=1e-3)
        loss = nn.functional.cross_entropy(lin(x), y)   # f(x; θ0) + J(x; θ0)(θ - θ0)
    """
    return LinearizedModel(model, forward_ad=forward_ad)


class LinearizedModel(nn.Module):
    r"""``f_lin(x; θ) = f(x; θ0) + J(x; θ0)(θ - θ0)`` for an ``nn.Module`` ``f``.

    **Parameters.** θ is registered on this module as ``nn.Parameter`` copies of the
    model's trainable parameters (those with ``requires_grad``, each tied tensor once),
    initialised at θ0 and with the *same dotted names* as in the model — the module tree
    is mirrored by empty container modules, so ``lin.named_parameters()`` yields
    ``"0.weight"``, ``"encoder.fc.bias"``, ... exactly as ``model.named_parameters()``
    does. Any optimizer, parameter group, minibatch schedule or learning-rate scheduler
    can train them.

    **Fixed tensors.** θ0, the model's frozen parameters (``requires_grad=False``, which
    therefore stay constant) and its buffers are copied into buffers under
    ``linearization_point.<same name>``; they are saved in ``state_dict`` and move with
    ``.to()``.

    **The original model** is only used for its structure: it is not registered as a
    submodule (its parameters must not reach an optimizer through ``lin.parameters()``),
    and every tensor it uses comes from this module, so training ``lin`` never modifies
    it, and changing it afterwards does not change ``lin``. Plain tensor attributes of the
    model that are neither parameters nor buffers are used as they are.

    **Mode.** The linearisation is of the model in eval mode — BatchNorm on its running
    statistics, Dropout off — so that ``f_lin(x)`` depends on ``x`` alone and matches the
    kernels of :func:`ntk_torch.empirical_ntk`: each forward pass runs in the same
    :func:`ntk_torch.functional.evaluation_context`. The model is put in eval mode and
    every submodule's own ``training`` flag is restored afterwards, also on error;
    ``lin.train()``/``lin.eval()`` change nothing. The fused attention kernels of
    ``nn.MultiheadAttention``/``nn.TransformerEncoderLayer``, which have no forward-mode
    derivative, are switched off for the duration.

    **Randomness.** A forward pass draws from a fork of the global RNG (CPU, and the CUDA
    device of ``lin``'s parameters), so it never advances the global streams: training
    ``lin`` consumes no random numbers, and a model that does draw in eval mode sees the
    same numbers on every call until something else advances the global RNG.

    **Inputs.** The call convention of :func:`ntk_torch.functional.call_arguments`, as for
    :func:`ntk_torch.empirical_ntk`: ``lin(x)`` with ``x`` a tuple or list calls
    ``model(*x)``, a dict ``model(**x)``, a Tensor (or anything else) ``model(x)``.
    Several positional or any keyword arguments are passed on as they are:
    ``lin(a, b, mask=m)`` calls ``model(a, b, mask=m)``. The output has the model's output
    structure (Tensor, tuple or dict of Tensors), each Tensor ``(N, *out)`` as the
    model's.

    **The product.** By default :func:`torch.func.jvp`, which composes with the other
    ``torch.func`` transforms (kernels of ``lin`` itself, ``vmap``). ``forward_ad=True``
    computes it with the dual tensors of :mod:`torch.autograd.forward_ad` instead: the same
    formulas without the transform's overhead, about a third cheaper at small batch
    sizes, but it cannot run inside a ``torch.func`` transform or another dual level (the
    linearised twin of :mod:`ntk_torch.twin` uses it).

    Args:
        model: the network; its current parameters are θ0.
        forward_ad: compute the product with dual tensors (above).
    """

    def __init__(self, model: nn.Module, *, forward_ad: bool = False) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        named = dict(model.named_parameters())
        names = [*named, *(name for name, _ in model.named_buffers())]
        if any(name.split(".")[0] == _REFERENCE for name in names):
            raise ValueError(
                f"cannot linearize: the model has a top-level submodule or tensor named "
                f"{_REFERENCE!r}, the name LinearizedModel keeps θ0 and buffers under"
            )
        trainable = [name for name, p in named.items() if p.requires_grad]
        if not trainable:
            raise ValueError(
                "model has no parameters with requires_grad=True: there is nothing to "
                "linearize (its linearisation would be the model itself)"
            )
        reference = nn.Module()
        with torch.no_grad():
            for name, tensor in [*named.items(), *model.named_buffers()]:
                _register(reference, name, tensor.detach().clone(), parameter=False)
            _register(self, _REFERENCE, reference, parameter=False, module=True)
            for name in trainable:
                _register(self, name, nn.Parameter(named[name].detach().clone()), parameter=True)
        # Kept out of nn.Module's registries on purpose: see the class docstring.
        object.__setattr__(self, "_wrapped_model", model)
        self._trainable_names: Tuple[str, ...] = tuple(trainable)
        if not isinstance(forward_ad, bool):
            raise TypeError(f"forward_ad must be True or False, got {forward_ad!r}")
        self._forward_ad = forward_ad
        self._fixed_names: Tuple[str, ...] = tuple(
            name for name, _ in reference.named_buffers() if name not in set(trainable)
        )

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """``f(x; θ0) + J(x; θ0)(θ - θ0)``, with the model's output structure.

        One Jacobian-vector product at θ0 with tangent ``θ - θ0``; gradients reach this
        module's parameters through the tangent, giving ``J(x; θ0)ᵀ ∇_f L``.
        """
        theta0 = self._initial_parameters()
        delta = {name: _lookup(self, name) - theta0[name] for name in self._trainable_names}
        output, change = self._jvp(args, kwargs, theta0, delta)
        return _map(torch.add, output, change)

    def jacobian_theta0(self, *args: Any, **kwargs: Any) -> Any:
        r"""``J(x; θ0) θ0``: the Jacobian at θ0 applied to θ0 itself, detached.

        This is what :func:`ntk_torch.predict.gd` needs as ``jtheta0`` / ``jtheta0_test``
        under weight decay, whose gradient ``wd θ = wd (θ0 + δ)`` moves the outputs by
        ``J θ0`` as well as ``J δ``. It has the model's output structure, each Tensor
        ``(N, *out)``; reshape it to ``(N, O)``. Inputs as for :meth:`forward`.
        """
        theta0 = self._initial_parameters()
        with torch.no_grad():
            return self._jvp(args, kwargs, theta0, theta0)[1]

    def extra_repr(self) -> str:
        count = sum(_lookup(self, n).numel() for n in self._trainable_names)
        return f"model={type(self._wrapped_model).__name__}, trainable_parameters={count}"

    def _initial_parameters(self) -> Dict[str, Tensor]:
        reference = getattr(self, _REFERENCE)
        return {name: _lookup(reference, name) for name in self._trainable_names}

    def _jvp(
        self,
        args: Tuple[Any, ...],
        kwargs: Dict[str, Any],
        primals: Dict[str, Tensor],
        tangents: Dict[str, Tensor],
    ) -> Tuple[Any, Any]:
        """``(f(x; primals), J(x; primals) tangents)`` in the evaluation context, both with
        the model's output structure; ``x`` is the call's ``(args, kwargs)``."""
        if len(args) == 1 and not kwargs:
            args, kwargs = call_arguments(args[0])
        reference = getattr(self, _REFERENCE)
        fixed = {name: _lookup(reference, name) for name in self._fixed_names}
        model = self._wrapped_model
        device = next(iter(primals.values())).device

        def f(parameters: Dict[str, Tensor]) -> Any:
            return torch.func.functional_call(model, {**parameters, **fixed}, args, kwargs)

        with evaluation_context(model, device):
            if not self._forward_ad:
                return torch.func.jvp(f, (primals,), (tangents,))
            with dual_tensors.dual_level():
                output = f({name: dual_tensors.make_dual(primals[name], tangents[name]) for name in primals})
                return _map(_primal, output), _map(_tangent, output)


def _primal(dual: Tensor) -> Tensor:
    return dual_tensors.unpack_dual(dual).primal


def _tangent(dual: Tensor) -> Tensor:
    """The tangent of a dual output; zeros where the output does not depend on θ."""
    tangent = dual_tensors.unpack_dual(dual).tangent
    return torch.zeros_like(dual) if tangent is None else tangent


def _register(
    root: nn.Module, name: str, value: Any, parameter: bool, module: bool = False
) -> None:
    """Registers ``value`` at the dotted ``name`` under ``root``, creating containers."""
    *path, leaf = name.split(".")
    owner = root
    for part in path:
        child = owner._modules.get(part)
        if child is None:
            child = nn.Module()
            _register(owner, part, child, parameter=False, module=True)
        owner = child
    try:
        if module:
            owner.add_module(leaf, value)
        elif parameter:
            owner.register_parameter(leaf, value)
        else:
            owner.register_buffer(leaf, value)
    except KeyError as error:
        raise ValueError(
            f"cannot linearize: the model's name {name!r} clashes with an attribute of "
            f"LinearizedModel ({error}); rename that submodule or parameter"
        ) from None


def _lookup(root: nn.Module, name: str) -> Tensor:
    # getattr, not get_parameter: under torch.func.functional_call(lin, ...) the
    # parameters are plain tensors.
    return reduce(getattr, name.split("."), root)


def _map(fn: Any, first: Any, *rest: Any) -> Any:
    """``fn`` applied leafwise to outputs of one structure (Tensor, tuple, list, dict)."""
    if isinstance(first, Tensor):
        return fn(first, *rest)
    if isinstance(first, dict):
        return type(first)((key, _map(fn, first[key], *(r[key] for r in rest))) for key in first)
    if isinstance(first, tuple) and hasattr(first, "_fields"):
        return type(first)(*(_map(fn, *items) for items in zip(first, *rest)))
    if isinstance(first, (tuple, list)):
        return type(first)(_map(fn, *items) for items in zip(first, *rest))
    raise TypeError(f"unsupported model output type {type(first).__name__} (expected Tensors)")
