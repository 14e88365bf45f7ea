"""The functional view of an ``nn.Module``: ``f(params, inputs) -> (N, O)``.

Every kernel engine works on a :class:`FunctionalModel`, which

* selects the trainable parameters (``requires_grad``, each tied tensor once, optionally
  narrowed with ``params=``) and groups them by owning module for per-layer kernels;
* holds everything else the forward needs (frozen parameters, buffers) as constants;
* casts parameters, buffers and floating inputs to a compute ``dtype`` without touching
  the user's model;
* calls the module through :func:`torch.func.functional_call`, applies ``output_fn`` and
  flattens the output to ``(N, O)``.

Inputs are a Tensor or nested tuples, lists and dicts of Tensors batched on dim 0
(:func:`input_tensors`, :func:`map_inputs`, :func:`check_compatible`); arguments that are
not batched travel separately as ``call_kwargs``. :func:`call_arguments` is the call
convention, :func:`unwrap_model` finds the module inside compile and distribution
wrappers.

:func:`evaluation_context` puts the module in eval mode and forks the RNG for the duration
of a kernel computation or a forward pass of :class:`~ntk_torch.linearize.LinearizedModel`,
restoring both afterwards, also on error.
"""

from __future__ import annotations

import contextlib
import fnmatch
import sys
from dataclasses import dataclass
from typing import Any, Callable, Dict, Hashable, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from .failures import Failure, expectation, locate

Inputs = Any
"""A Tensor, or nested tuples, lists and dicts (any ``Mapping``) of Tensors, every Tensor
batched on dim 0 (see :func:`call_arguments` for how the model is called)."""
ParamSelector = Union[str, nn.Module, Sequence[Union[str, nn.Module]], None]

ROOT_GROUP = "(root)"

_INPUT_FORMS = (
    "a Tensor, a tuple of Tensors or a dict of Tensors (nested tuples, lists and dicts of "
    "Tensors too)"
)


# ---------------------------------------------------------------------------------------
# Inputs: nested structures of Tensors batched on dim 0
# ---------------------------------------------------------------------------------------

def _leaves(x: Any, label: str) -> Iterator[Tuple[str, Any]]:
    """``(label, leaf)`` of every leaf of a nested structure, depth first."""
    if isinstance(x, Mapping):
        for key, value in x.items():
            yield from _leaves(value, f"{label}[{key!r}]")
    elif isinstance(x, (tuple, list)):
        for index, value in enumerate(x):
            yield from _leaves(value, f"{label}[{index}]")
    else:
        yield label, x


def input_tensors(x: Inputs, name: str) -> List[Tuple[str, torch.Tensor]]:
    """The tensors of an input structure with their labels, e.g. ``[("x1[0]['ids']", t), ...]``.

    Raises ``TypeError``/``ValueError`` naming ``name`` when ``x`` is not a Tensor or a
    (nested) tuple, list or dict of Tensors, or holds no Tensor.
    """
    if not isinstance(x, (torch.Tensor, tuple, list, Mapping)):
        raise TypeError(f"{name} must be {_INPUT_FORMS}, got {type(x).__name__}")
    items = list(_leaves(x, name))
    if not items:
        raise ValueError(f"{name} is an empty {type(x).__name__}; expected at least one Tensor")
    for label, t in items:
        if not isinstance(t, torch.Tensor):
            raise TypeError(
                f"{label} must be a Tensor batched on dim 0, got {type(t).__name__}; pass "
                "arguments that are not batched with call_kwargs"
            )
    return items


def batch_size(x: Inputs, name: str) -> int:
    """The common size of dim 0 of every tensor in ``x`` (> 0), with clear errors."""
    items = input_tensors(x, name)
    sizes = {}
    for label, t in items:
        if t.is_meta:
            raise ValueError(
                f"{label} is on the meta device (a tensor without data); give it on the CPU or a GPU"
            )
        if t.dim() == 0:
            raise ValueError(
                f"{label} is a scalar; inputs must be batched on dim 0 (pass arguments that "
                "are not batched with call_kwargs)"
            )
        sizes[label] = t.shape[0]
    if len(set(sizes.values())) > 1:
        listed = ", ".join(f"{label}: {n}" for label, n in sizes.items())
        raise ValueError(f"the tensors of {name} have different batch sizes ({listed})")
    n = next(iter(sizes.values()))
    if n == 0:
        raise ValueError(f"{name} is an empty batch (size 0 on dim 0); expected at least one example")
    return n


def nonfinite_input(x: Inputs, name: str) -> Optional[str]:
    """``"x1 (example 3)"``: the first floating tensor of ``x`` holding NaN or inf and
    the first example where it does, or None when every input is finite."""
    for label, t in input_tensors(x, name):
        if t.is_floating_point() or t.is_complex():
            bad = ~torch.isfinite(t.detach())
            if bad.any():
                example = int(bad.reshape(bad.shape[0], -1).any(dim=1).nonzero()[0]) if t.dim() else 0
                return f"{label} (example {example})"
    return None


def structure(x: Inputs) -> Hashable:
    """The nesting of an input structure, without its tensors: containers (tuples and lists
    alike) and keys."""
    if isinstance(x, Mapping):
        return ("dict", tuple((key, structure(value)) for key, value in x.items()))
    if isinstance(x, (tuple, list)):
        return ("sequence", tuple(structure(value) for value in x))
    return "tensor"


def check_compatible(x1: Inputs, x2: Inputs, names: Tuple[str, str] = ("x1", "x2")) -> None:
    """Raise a ``ValueError``/``TypeError`` unless ``x2`` has the structure, feature shapes
    and dtypes of ``x1`` (the batch sizes may differ); ``names`` are theirs in messages."""
    n1, n2 = names
    _check_same(x1, x2, n1, n2)
    input_tensors(x2, n2)
    for (l1, t1), (l2, t2) in zip(input_tensors(x1, n1), input_tensors(x2, n2)):
        if tuple(t1.shape[1:]) != tuple(t2.shape[1:]):
            raise ValueError(
                f"{l2} has feature shape {tuple(t2.shape[1:])} but {l1} has {tuple(t1.shape[1:])}"
            )
        if t1.dtype != t2.dtype:
            raise TypeError(f"{l2} has dtype {t2.dtype} but {l1} has {t1.dtype}")


def _kind(x: Any) -> str:
    if isinstance(x, Mapping):
        return "dict"
    return "sequence" if isinstance(x, (tuple, list)) else "leaf"


def _check_same(a: Any, b: Any, label_a: str, label_b: str) -> None:
    """The containers and keys of ``b`` are those of ``a``, recursively."""
    if _kind(a) != _kind(b):
        raise TypeError(f"{label_b} is a {type(b).__name__} but {label_a} is a {type(a).__name__}")
    if isinstance(a, Mapping):
        if set(a) != set(b):
            raise ValueError(f"{label_b} has keys {sorted(map(str, b))} but {label_a} has {sorted(map(str, a))}")
        for key in a:
            _check_same(a[key], b[key], f"{label_a}[{key!r}]", f"{label_b}[{key!r}]")
    elif isinstance(a, (tuple, list)):
        if len(a) != len(b):
            raise ValueError(f"{label_b} has {len(b)} entries but {label_a} has {len(a)}")
        for index, (value_a, value_b) in enumerate(zip(a, b)):
            _check_same(value_a, value_b, f"{label_a}[{index}]", f"{label_b}[{index}]")


def map_inputs(x: Inputs, fn: Callable[[torch.Tensor], torch.Tensor]) -> Inputs:
    """Apply ``fn`` to every tensor of an input structure, keeping the structure (tuples,
    named tuples and lists stay what they are; a ``Mapping`` becomes a ``dict``); leaves
    that are not Tensors are kept as they are."""
    if isinstance(x, torch.Tensor):
        return fn(x)
    if isinstance(x, Mapping):
        return {k: map_inputs(v, fn) for k, v in x.items()}
    if isinstance(x, tuple) and hasattr(x, "_fields"):
        return type(x)(*(map_inputs(v, fn) for v in x))
    if isinstance(x, (tuple, list)):
        return type(x)(map_inputs(v, fn) for v in x)
    return x


def call_arguments(x: Any, call_kwargs: Optional[Mapping[str, Any]] = None) -> Tuple[Tuple[Any, ...], Dict[str, Any]]:
    """``(args, kwargs)`` of the model call for ``x``: ``model(*x)`` for a tuple or list,
    ``model(**x)`` for a dict (any ``Mapping``), ``model(x)`` for a Tensor or any other
    object (which only :class:`~ntk_torch.linearize.LinearizedModel` lets through; the
    kernels check their inputs first). So ``(batch_dict,)`` calls ``model(batch_dict)``.
    ``call_kwargs`` (arguments that are not batched) are added to the keywords."""
    if isinstance(x, (tuple, list)):
        args, kwargs = tuple(x), {}
    elif isinstance(x, Mapping):
        args, kwargs = (), dict(x)
    else:
        args, kwargs = (x,), {}
    if call_kwargs:
        kwargs.update(call_kwargs)
    return args, kwargs


def check_call_kwargs(call_kwargs: Optional[Mapping[str, Any]], name: str = "call_kwargs") -> Dict[str, Any]:
    """A copy of ``call_kwargs`` (keyword arguments passed unchanged to every call), checked
    to be a mapping with string keys."""
    if call_kwargs is None:
        return {}
    if not isinstance(call_kwargs, Mapping):
        raise TypeError(f"{name} must be a dict of keyword arguments, got {type(call_kwargs).__name__}")
    for key in call_kwargs:
        if not isinstance(key, str):
            raise TypeError(f"{name} keys must be argument names (str), got {key!r}")
    return dict(call_kwargs)


def check_no_overlap(x: Inputs, call_kwargs: Mapping[str, Any], name: str) -> None:
    """A dict input and ``call_kwargs`` must not give the same argument."""
    if isinstance(x, Mapping):
        both = sorted(set(x) & set(call_kwargs))
        if both:
            raise ValueError(f"{name} and call_kwargs both give {', '.join(map(repr, both))}")


def select_output(out: Any, output_fn: Optional[Callable[[Any], torch.Tensor]]) -> torch.Tensor:
    """``output_fn(out)`` (or ``out``), checked to be a Tensor."""
    if output_fn is not None:
        out = output_fn(out)
    if not isinstance(out, torch.Tensor):
        hint = "" if output_fn is not None else "; pass output_fn to select a Tensor"
        raise TypeError(
            f"the model returned a {type(out).__name__}, not a Tensor{hint} "
            "(e.g. output_fn=lambda out: out['logits'])"
        )
    return out


def summed_output_fn(output_fn: Optional[Callable[[Any], torch.Tensor]]) -> Callable[[Any], torch.Tensor]:
    """``output_fn`` then the summed logits ``sum_a f_a / sqrt(O)`` ``(N, 1)``, ``O`` the
    size of one example's output: the function whose kernel is the pNTK
    (:data:`ntk_torch.layout.PNTK`).

    Raises:
        TypeError: ``output_fn`` is neither None nor callable.
    """
    if output_fn is not None and not callable(output_fn):
        raise TypeError(f"output_fn must be callable, got {type(output_fn).__name__}")

    def summed(out: Any) -> torch.Tensor:
        y = select_output(out, output_fn)
        y = y.reshape(y.shape[0], -1)
        return y.sum(dim=1, keepdim=True) * (float(y.shape[1]) ** -0.5)

    return summed


def slice_inputs(x: Inputs, start: int, stop: int) -> Inputs:
    """Examples ``start:stop`` of every tensor in ``x``."""
    return map_inputs(x, lambda t: t[start:stop])


# ---------------------------------------------------------------------------------------
# Parameters
# ---------------------------------------------------------------------------------------

def unwrap_model(model: nn.Module) -> nn.Module:
    """The module that computes, inside the wrappers that only distribute or compile it:
    ``torch.compile``'s ``OptimizedModule`` (``._orig_mod``), ``DistributedDataParallel``,
    ``DataParallel`` and ``FullyShardedDataParallel`` (``.module``), nested in any order.

    Kernels and the tracker's evaluations call the unwrapped module eagerly, so they never
    trigger a recompilation of the compiled one nor a collective of a distributed one.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    wrappers = [nn.parallel.DistributedDataParallel, nn.DataParallel]
    # Only a model built with them can be wrapped by them: never import them here (FSDP
    # takes seconds to import).
    fsdp = sys.modules.get("torch.distributed.fsdp")
    if fsdp is not None:
        wrappers.append(fsdp.FullyShardedDataParallel)
    dynamo = sys.modules.get("torch._dynamo.eval_frame")
    compiled = (dynamo.OptimizedModule,) if dynamo is not None else ()
    while True:
        if isinstance(model, tuple(wrappers)):
            model = model.module
        elif compiled and isinstance(model, compiled):
            model = model._orig_mod
        else:
            return model


def group_of(param_name: str) -> str:
    """The parameter group of a parameter: the path of its owning module."""
    module_path, _, _ = param_name.rpartition(".")
    return module_path or ROOT_GROUP


def _selected_names(trainable: Dict[str, nn.Parameter], params: ParamSelector) -> List[str]:
    """Names of the trainable parameters picked by ``params`` (glob patterns or modules)."""
    if params is None:
        return list(trainable)
    if isinstance(params, (str, nn.Module)):
        selectors = [params]
    elif isinstance(params, Iterable) and not isinstance(params, Iterator):  # a generator reads once
        selectors = list(params)
    else:
        raise TypeError(
            "params must be a name pattern (str), an nn.Module, a list of them or None, "
            f"got {type(params).__name__}"
        )
    if not selectors:
        raise ValueError("params is empty; pass None to use every trainable parameter")
    by_identity = {id(p): name for name, p in trainable.items()}
    chosen: Dict[str, None] = {}
    for selector in selectors:
        if isinstance(selector, str):
            matches = [n for n in trainable if fnmatch.fnmatchcase(n, selector)]
            if not matches:
                matches = [
                    n for n in trainable if fnmatch.fnmatchcase(group_of(n), selector)
                ]
            if not matches:
                raise ValueError(
                    f"params pattern {selector!r} matches no trainable parameter; "
                    f"trainable parameters are: {', '.join(trainable)}"
                )
        elif isinstance(selector, nn.Module):
            matches = [
                by_identity[id(p)] for p in selector.parameters() if id(p) in by_identity
            ]
            if not matches:
                raise ValueError(
                    f"params module {type(selector).__name__} has no trainable parameter of the model"
                )
        else:
            raise TypeError(
                f"params entries must be name patterns (str) or nn.Module, got {type(selector).__name__}"
            )
        chosen.update(dict.fromkeys(matches))
    return [n for n in trainable if n in chosen]


@dataclass(frozen=True)
class ParamGroup:
    """A per-layer group: the parameters owned by one module."""

    name: str
    param_names: Tuple[str, ...]


class FunctionalModel:
    """``f(params, inputs) -> (N, O)`` for an ``nn.Module``.

    Args:
        model: any ``nn.Module``.
        params: ``None`` (every trainable parameter), a glob pattern on parameter names or
            module paths, a module, or a sequence of these.
        output_fn: applied to the model's output to get a Tensor ``(N, *out)``.
        dtype: compute dtype for parameters, buffers and floating inputs (``None`` keeps
            the model's own).
        call_kwargs: keyword arguments that are not batched, passed to every call of the
            model (:func:`check_call_kwargs`); Tensors among them are moved to the model's
            device, floating ones cast to ``dtype`` like the buffers, nothing else changes.

    Attributes:
        params: ``{name: tensor}`` of the selected parameters, detached (cast to ``dtype``).
        groups: the per-layer :class:`ParamGroup` list, in parameter order.
        device: the device the model lives on.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        params: ParamSelector = None,
        output_fn: Optional[Callable[[Any], torch.Tensor]] = None,
        dtype: Optional[torch.dtype] = None,
        call_kwargs: Optional[Mapping[str, Any]] = None,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if output_fn is not None and not callable(output_fn):
            raise TypeError(f"output_fn must be callable, got {type(output_fn).__name__}")
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"dtype must be a floating torch.dtype or None, got {dtype!r}")
        self.model = model
        self.output_fn = output_fn

        all_params = dict(model.named_parameters())  # tied tensors appear once
        trainable = {n: p for n, p in all_params.items() if p.requires_grad}
        if not trainable:
            raise ValueError(
                f"model ({type(model).__name__}) has no trainable parameters "
                "(none with requires_grad=True)"
            )
        selected = _selected_names(trainable, params)

        first = next(iter(all_params.values()))
        self.device = first.device
        self.dtype = dtype if dtype is not None else _float_dtype(all_params.values())

        def cast(t: torch.Tensor) -> torch.Tensor:
            t = t.detach()
            return t.to(self.dtype) if t.is_floating_point() and dtype is not None else t

        self.params: Dict[str, torch.Tensor] = {n: cast(trainable[n]) for n in selected}
        self.constants: Dict[str, torch.Tensor] = {
            n: cast(p) for n, p in all_params.items() if n not in self.params
        }
        self.constants.update({n: cast(b) for n, b in model.named_buffers()})
        self.call_kwargs = map_inputs(check_call_kwargs(call_kwargs), self._convert)

        groups: Dict[str, List[str]] = {}
        for name in self.params:
            groups.setdefault(group_of(name), []).append(name)
        self.groups = [ParamGroup(g, tuple(names)) for g, names in groups.items()]

    @property
    def num_params(self) -> int:
        """P, the number of scalar parameters the kernel differentiates."""
        return sum(p.numel() for p in self.params.values())

    def _convert(self, t: torch.Tensor) -> torch.Tensor:
        dtype = self.dtype if t.is_floating_point() else t.dtype
        return t.to(device=self.device, dtype=dtype)

    def prepare_inputs(self, x: Inputs) -> Inputs:
        """Inputs on the model's device, floating tensors in the compute dtype; integer and
        bool tensors (token ids, masks) keep their dtype."""
        return map_inputs(x, self._convert)

    def raw_output(self, params: Mapping[str, torch.Tensor], x: Inputs) -> torch.Tensor:
        """The model's output after ``output_fn``, checked to be a Tensor."""
        args, kwargs = call_arguments(x, self.call_kwargs)
        out = functional_call(self.model, {**self.constants, **params}, args, kwargs)
        return select_output(out, self.output_fn)

    def __call__(self, params: Mapping[str, torch.Tensor], x: Inputs) -> torch.Tensor:
        """``f(params, x)``: the output flattened to ``(N, O)``."""
        return _flat(self.raw_output(params, x))

    def single(self, params: Mapping[str, torch.Tensor], x: Inputs) -> torch.Tensor:
        """``f`` on one example (no batch dim in ``x``): the output ``(O,)``, for ``vmap``."""
        batched = map_inputs(x, lambda t: t.unsqueeze(0))
        return self(params, batched)[0]

    def with_output(self, params: Mapping[str, torch.Tensor], x: Inputs, then: Callable[[torch.Tensor], Any]) -> Any:
        """``then(f(params, x))``, run while ``params`` are still in the module.

        Backward passes inside ``then`` see the same parameters as the forward, also where
        the model recomputes part of its forward during backward
        (``torch.utils.checkpoint``), which a backward after ``functional_call`` returned
        would run with the module's own parameters.
        """
        wrapper = _Evaluate(self, then)
        tensors = {f"model.{name}": t for name, t in {**self.constants, **params}.items()}
        return functional_call(wrapper, tensors, (x,))

    def output_size(self, x: Inputs, n: int, name: str = "x1") -> int:
        """O, checking that the output of a batch of ``n`` examples is ``(n, *out)``.

        An exception the model raises is raised again (the same type where it can be)
        naming ``name``, the layer, operation and source line where it happened and, where
        the layer's type tells, what it expects (:func:`model_error`).
        """
        with torch.no_grad():
            with locate(self.model) as locator:
                try:
                    args, kwargs = call_arguments(x, self.call_kwargs)
                    out = functional_call(self.model, {**self.constants, **self.params}, args, kwargs)
                except Exception as error:
                    raise model_error(error, locator.failure(error), self.model, x, name) from error
            out = select_output(out, self.output_fn)
        if out.dim() == 0 or out.shape[0] != n:
            raise ValueError(
                f"the model's output has shape {tuple(out.shape)} but its first dimension "
                f"must be the batch size {n}; use output_fn to return a (N, *out) Tensor"
            )
        if not out.is_floating_point():
            raise TypeError(f"the model's output has dtype {out.dtype}; expected floating point")
        return int(out[0].numel())


class _Evaluate(nn.Module):
    """``then(f(x))`` as one module call, for :meth:`FunctionalModel.with_output`."""

    def __init__(self, fmodel: FunctionalModel, then: Callable[[torch.Tensor], Any]):
        super().__init__()
        self.model = fmodel.model
        self.fmodel = fmodel
        self.then = then

    def forward(self, x: Inputs) -> Any:
        args, kwargs = call_arguments(x, self.fmodel.call_kwargs)
        return self.then(_flat(select_output(self.model(*args, **kwargs), self.fmodel.output_fn)))


def _flat(out: torch.Tensor) -> torch.Tensor:
    return out.reshape(out.shape[0], -1) if out.dim() > 0 else out


def model_error(error: Exception, failure: Failure, model: nn.Module, x: Inputs, name: str) -> Exception:
    """``error``, raised by the model on the first examples of input ``name``, as an
    exception of the same type (a ``RuntimeError`` where that type cannot be built from a
    message) whose message names ``name``, where it happened (:class:`Failure`) and, for
    an error inside a torch operation, what the failing layer expects or else ``name``'s
    feature shapes and dtypes."""
    raised = f"the model raised {type(error).__name__} on {name}'s first examples in {failure.where}: {error}"
    message = f"{name}: {raised}"
    if failure.operation:
        modules = dict(model.named_modules(remove_duplicate=False))
        layer = failure.layer
        expected = expectation(layer, modules.get(layer.path) if layer is not None else None)
        features = ", ".join(
            f"{label} has feature shape {tuple(t.shape[1:])} and dtype {t.dtype}" for label, t in _leaves(x, name)
            if isinstance(t, torch.Tensor)
        )
        if expected:
            message = f"{name}: {expected} ({features}); {raised}"
        else:
            message += f"; {features}: is that what the model expects?"
    try:
        wrapped = type(error)(message)
    except Exception:
        wrapped = RuntimeError(message)
    return wrapped


def _float_dtype(tensors: Iterable[torch.Tensor]) -> torch.dtype:
    for t in tensors:
        if t.is_floating_point():
            return t.dtype
    return torch.get_default_dtype()


# ---------------------------------------------------------------------------------------
# Hygiene
# ---------------------------------------------------------------------------------------

@contextlib.contextmanager
def evaluation_context(model: nn.Module, device: torch.device) -> Iterator[None]:
    """Eval mode and a forked RNG for the duration of the block; both restored after.

    Every submodule's ``training`` flag is restored individually (a model may mix modes),
    also when the block raises. The CPU RNG (and that of ``device`` when it is CUDA) is
    forked, so a model that draws random numbers in eval mode leaves no trace. The
    inference fast path of ``nn.TransformerEncoderLayer``/``nn.MultiheadAttention`` is
    switched off and scaled dot-product attention runs on its math backend: the fused
    kernels have no forward-mode derivative and no batching rule for ``vmap``.

    Autograd stays as the caller has it: the kernels wrap the block in ``torch.no_grad()``,
    :class:`~ntk_torch.linearize.LinearizedModel` backpropagates through it.
    """
    modes = [(m, m.training) for m in model.modules()]
    devices = [device] if device.type == "cuda" else []
    mha = getattr(torch.backends, "mha", None)
    fastpath = mha.get_fastpath_enabled() if mha is not None else None
    try:
        model.eval()
        if mha is not None:
            mha.set_fastpath_enabled(False)
        with torch.random.fork_rng(devices=devices), sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        if mha is not None:
            mha.set_fastpath_enabled(fastpath)
        for module, training in modes:
            module.training = training
