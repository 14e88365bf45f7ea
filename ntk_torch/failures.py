"""Where a call of a model failed: the layer, the torch operation and the model's source line.

:func:`locate` watches a block of code that runs a model. Forward pre- and post-hooks on
every submodule keep the stack of module calls (with each call's input shape and dtype),
and a ``TorchFunctionMode`` notes the first torch function that raises, with the module
stack at that moment. The exception's traceback gives the model's own source line: the
innermost frame outside torch and ntk_torch (the user's model, or a library such as
Hugging Face transformers). :meth:`Locator.failure` turns all of it into a
:class:`Failure`, which errors print in one line::

    layer 'rnn' (LSTM), operation torch._VF.lstm, at model.py:12 `h, _ = self.rnn(x)`:
    RuntimeError: output with shape [1, 16] doesn't match the broadcast shape [3, 1, 16]

Nothing is kept beyond descriptions (no tensors), and every hook and the mode are removed
when the block ends, also when it raises.
"""

from __future__ import annotations

import contextlib
import linecache
import os
import sys
import traceback
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__))
_OWN_DIR = os.path.dirname(os.path.abspath(__file__))


@dataclass(frozen=True)
class LayerCall:
    """One module call on the stack: its path, type and first input's shape and dtype."""

    path: str
    module_type: str
    input_shape: Optional[Tuple[int, ...]]
    input_dtype: Optional[torch.dtype]

    @property
    def label(self) -> str:
        return f"layer '{self.path}' ({self.module_type})" if self.path else f"the root module ({self.module_type})"


@dataclass(frozen=True)
class Failure:
    """Why and where a model call failed.

    Attributes:
        error: the exception's type and first line, e.g. ``"RuntimeError: ..."``.
        layer: the innermost module call when it failed (None outside any module).
        operation: the torch function that raised (``"torch._VF.lstm"``), or the first
            torch function the model's source line called; ``""`` when the model itself
            raised.
        source: ``"file.py:12 `code`"``, the model's innermost source line, or ``""``.
    """

    error: str
    layer: Optional[LayerCall]
    operation: str
    source: str

    @property
    def where(self) -> str:
        """``"layer 'rnn' (LSTM), operation torch._VF.lstm, at model.py:12 `...`"``."""
        parts = [self.layer.label] if self.layer is not None else []
        if self.operation:
            parts.append(f"operation {self.operation}")
        if self.source:
            parts.append(f"at {self.source}")
        return ", ".join(parts) or "outside any layer"

    def __str__(self) -> str:
        return f"{self.where}: {self.error}"


def first_line(error: BaseException) -> str:
    """``"TypeName: first line of the message"``; a line over :data:`MAX_LINE` characters
    is cut after its first sentence (or at the limit)."""
    lines = str(error).strip().splitlines()
    line = lines[0] if lines else ""
    if len(line) > MAX_LINE:
        end = line.find(". ", 40, MAX_LINE)
        line = line[: end + 1] if end > 0 else line[:MAX_LINE] + "..."
    return f"{type(error).__name__}: {line}".rstrip(": ")


_RENAMED = {"TensorBase.": "Tensor.", "_VariableFunctionsClass.": "torch."}
# Decorators and context managers of torch's own, never the operation that failed.
_WRAPPER_FILES = (
    "_compile.py", "_jit_internal.py", os.path.join("utils", "_contextlib.py"), os.path.join("_dynamo", "eval_frame.py"),
)
MAX_LINE = 200


def _function_name(func: Any) -> str:
    name = getattr(func, "__qualname__", None) or getattr(func, "__name__", None) or repr(func)
    for prefix, replacement in _RENAMED.items():
        if name.startswith(prefix):
            return replacement + name[len(prefix):]
    module = getattr(func, "__module__", None)
    return f"{module}.{name}" if module and not name.startswith(module) else name


def _is_torch_frame(filename: str) -> bool:
    return os.path.abspath(filename).startswith(_TORCH_DIR)


def _is_own_frame(filename: str) -> bool:
    return os.path.abspath(filename).startswith(_OWN_DIR)


def _is_model_frame(filename: str) -> bool:
    return not (_is_torch_frame(filename) or _is_own_frame(filename) or filename.startswith("<"))


def _summary(args: Tuple) -> Tuple[Optional[Tuple[int, ...]], Optional[torch.dtype]]:
    first = args[0] if args else None
    if isinstance(first, torch.Tensor):
        return tuple(first.shape), first.dtype
    return None, None


class Locator(TorchFunctionMode):
    """The module stack and the first failing torch function (see the module docstring)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.paths: Dict[int, str] = {id(m): p for p, m in model.named_modules(remove_duplicate=False)}
        self.stack: List[LayerCall] = []
        self.failed_stack: Optional[List[LayerCall]] = None
        self.failed_operation = ""
        self.failed_source = ""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        try:
            return func(*args, **(kwargs or {}))
        except Exception:
            if self.failed_stack is None:
                self.failed_stack = list(self.stack)
                self.failed_operation = _function_name(func)
                self.failed_source = _caller_source()
            raise

    def push(self, module: nn.Module, args: Tuple) -> None:
        shape, dtype = _summary(args)
        self.stack.append(LayerCall(self.paths.get(id(module), "?"), type(module).__name__, shape, dtype))

    def pop(self, output: Any) -> None:
        # Hooks that are always called see output None when the forward raised: keep the
        # stack as it was at the deepest point of the failure.
        if output is None and self.failed_stack is None:
            self.failed_stack = list(self.stack)
        if self.stack:
            self.stack.pop()

    def failure(self, error: BaseException) -> Failure:
        """The :class:`Failure` of ``error``, raised inside this locator's block."""
        stack = self.failed_stack if self.failed_stack is not None else self.stack
        source, operation = self.failed_source, self.failed_operation
        if not operation:
            # No torch function raised (a backward, a context manager): the model's
            # innermost frame and the torch function it called, from the traceback.
            frames = [f for f in traceback.extract_tb(error.__traceback__) if not f.filename.startswith("<")]
            inner = _innermost_caller(frames)
            if inner is not None:
                index = frames.index(inner)
                source = _format_source(inner.filename, inner.lineno, inner.line)
                called = [f for f in frames[index + 1:] if not f.filename.endswith(_WRAPPER_FILES)]
                operation = _frame_function(called[0]) if called else ""
        return Failure(first_line(error), stack[-1] if stack else None, operation, source)


def _format_source(filename: str, lineno: Optional[int], line: Optional[str]) -> str:
    code = (line or linecache.getline(filename, lineno or 0)).strip()
    short = os.path.basename(filename)
    parent = os.path.basename(os.path.dirname(filename))
    location = f"{parent}/{short}" if parent else short
    return f"{location}:{lineno} `{code}`" if code else f"{location}:{lineno}"


def _innermost_caller(frames: List[traceback.FrameSummary]) -> Optional[traceback.FrameSummary]:
    """The innermost frame outside torch, if it is the model's (not ntk_torch's own)."""
    for frame in reversed(frames):
        if not _is_torch_frame(frame.filename):
            return frame if _is_model_frame(frame.filename) else None
    return None


def _caller_source() -> str:
    """The model's source line that called a failing torch function (from inside the
    mode's ``__torch_function__``): the innermost frame outside torch, unless that is
    ntk_torch's own (then ``""``)."""
    frame = sys._getframe(2)
    while frame is not None and _is_torch_frame(frame.f_code.co_filename):
        frame = frame.f_back
    if frame is None or not _is_model_frame(frame.f_code.co_filename):
        return ""
    return _format_source(frame.f_code.co_filename, frame.f_lineno, None)


def _frame_function(frame: traceback.FrameSummary) -> str:
    """``torch.utils.checkpoint.checkpoint`` for a frame in torch's own sources."""
    path = os.path.abspath(frame.filename)
    if not path.startswith(_TORCH_DIR):
        return frame.name
    relative = os.path.relpath(os.path.splitext(path)[0], os.path.dirname(_TORCH_DIR))
    module = relative.replace(os.sep, ".").removesuffix(".__init__")
    return f"{module}.{frame.name}"


@contextlib.contextmanager
def locate(model: nn.Module) -> Iterator[Locator]:
    """Watch ``model``'s calls inside the block (see the module docstring)."""
    locator = Locator(model)
    handles = []

    def pre(module: nn.Module, args: Tuple) -> None:
        locator.push(module, args)

    def post(module: nn.Module, args: Tuple, output: Any) -> None:
        locator.pop(output)

    try:
        for module in model.modules():
            handles.append(module.register_forward_pre_hook(pre))
            handles.append(module.register_forward_hook(post, always_call=True))
        with locator:
            yield locator
    finally:
        for handle in handles:
            handle.remove()


def expectation(layer: Optional[LayerCall], module: Optional[nn.Module]) -> str:
    """What a failing layer expects of its input, where its type tells (``""`` otherwise):
    the width of a Linear layer, the channels of a convolution, the integer tokens of an
    Embedding, floating inputs for a Linear or a convolution."""
    if layer is None or module is None or layer.input_shape is None:
        return ""
    shape, dtype = layer.input_shape, layer.input_dtype
    if isinstance(module, nn.Embedding):
        if dtype is not None and dtype.is_floating_point:
            return f"{layer.label} expects integer token ids, got {dtype}"
        return ""
    if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)) and dtype is not None and not dtype.is_floating_point:
        return f"{layer.label} expects floating inputs, got {dtype}"
    if isinstance(module, nn.Linear) and shape and shape[-1] != module.in_features:
        return f"{layer.label} expects {module.in_features} features in the last dimension, got shape {shape}"
    if isinstance(module, nn.modules.conv._ConvNd):
        spatial = len(module.kernel_size)
        channels = shape[-spatial - 1] if len(shape) > spatial else None
        if channels is not None and channels != module.in_channels:
            return f"{layer.label} expects {module.in_channels} input channels, got shape {shape}"
    return ""
