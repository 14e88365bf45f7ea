"""A config's kernel written to a file: ``ntk-torch kernel CONFIG --out FILE``.

:func:`kernel_file` computes the kernel of a config's model (at initialisation, or at
weights saved with ``torch.save``) on a whole split of its data and writes it to a ``.npy``
file tile by tile (resumable), in one process or across the processes of ``torchrun``.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .config import ConfigError, RunConfig
from .experiment import build
from .kernel import NTK


SPLITS = ("train", "test")


class CheckpointError(ValueError):
    """A weights file that is not a state dict of the config's model."""


@dataclass
class KernelFile:
    """A kernel written by :func:`kernel_file`.

    Attributes:
        path: the ``.npy`` file.
        shape: the kernel's shape (``(N, N)`` in ``trace`` mode, ...).
        mode: its layout.
        split: the data split it is over (all its examples, in the data's order).
        weights: the weights file it was computed at (None: at initialisation).
        ranks: the processes that computed it.
        seconds: the wall-clock time of the computation (on rank 0).
        main: whether this process is rank 0 (the one that reports).
    """

    path: Path
    shape: Tuple[int, ...]
    mode: str
    split: str
    weights: Optional[Path]
    ranks: int
    seconds: float
    main: bool


@contextlib.contextmanager
def _process_group(device: str) -> Iterator[bool]:
    """Under ``torchrun`` (``WORLD_SIZE`` > 1): the default process group, initialised
    here if need be (NCCL for CUDA, gloo otherwise; each rank on GPU ``LOCAL_RANK``) and
    destroyed after; yields whether the computation is distributed."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 and not (dist.is_available() and dist.is_initialized()):
        yield False
        return
    created = not dist.is_initialized()
    if created:
        cuda = torch.device(device).type == "cuda"
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo")
    try:
        yield True
    finally:
        if created:
            dist.destroy_process_group()


def load_weights(model: nn.Module, path: Union[str, Path], device: torch.device) -> None:
    """Load a state dict saved with ``torch.save`` (read with ``weights_only=True``) into
    ``model``; a checkpoint dict holding it under ``"model"``, ``"model_state_dict"`` or
    ``"state_dict"`` is accepted too.

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: the file is not a state dict of this model.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--weights {path}: no such file")
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as error:  # pickle, zip and weights_only errors alike
        raise CheckpointError(f"--weights {path}: not a torch.save file of tensors ({type(error).__name__}: "
                              f"{error})".splitlines()[0]) from None
    for key in ("model", "model_state_dict", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict):
        raise CheckpointError(f"--weights {path}: holds a {type(state).__name__}, not a state dict")
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise CheckpointError(f"--weights {path}: does not fit the config's model: "
                              f"{str(error).strip().splitlines()[-1].strip()}") from None


def kernel_file(
    config: RunConfig,
    out: Union[str, Path],
    *,
    split: str = "train",
    mode: Optional[str] = None,
    weights: Union[str, Path, None] = None,
    resume: bool = False,
    memory_budget: Optional[str] = None,
    progress: bool = True,
    allow_imports: Sequence[str] = (),
) -> KernelFile:
    """The eNTK of ``config``'s model on every example of a data split, written to ``out``.

    The model is the config's at initialisation (seeded from ``config.seed``), or with
    ``weights`` loaded (:func:`load_weights`); the inputs are all of ``split`` (``"train"``
    or ``"test"``, in the data's order); ``mode`` defaults to the config's
    ``track.mode``, the method is ``track.method``. The kernel is written tile by tile to
    the ``.npy`` file ``out`` (``empirical_ntk(..., out=out, resume=resume)``): it need not
    fit in memory, and an interrupted computation continues with ``resume``. Launched with
    ``torchrun --nproc_per_node=K``, the K processes share the tiles (one machine; gloo on
    CPU, NCCL with one GPU per process for a CUDA ``train.device``); a progress bar with
    the tiles done and an ETA shows on rank 0. ``allow_imports``: the modules trusted for
    import paths in the config (:func:`ntk_torch.experiment.build`).

    Raises:
        ConfigError: the config cannot be built, or ``split`` is unknown.
        CheckpointError / FileNotFoundError: the weights file does not fit the model.
        FileExistsError / KernelStoreError: ``out`` exists without ``resume``, or its
            progress record belongs to another computation or is corrupt.
    """
    if split not in SPLITS:
        raise ConfigError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    with _process_group(config.train.device) as distributed:
        import torch.distributed as dist

        rank = dist.get_rank() if distributed else 0
        ranks = dist.get_world_size() if distributed else 1
        setup = build(config, allow_imports=allow_imports)
        if weights is not None:
            load_weights(setup.model, weights, setup.device)
        x = setup.split.x_train if split == "train" else setup.split.x_test
        mode = config.track.mode if mode is None else mode
        kernel = NTK(setup.model, mode=mode, method=config.track.method, memory_budget=memory_budget,
                     progress=progress, distributed=distributed, gather="rank0", out=out, resume=resume)
        started = time.perf_counter()
        result = kernel(x)
        seconds = time.perf_counter() - started
    shape = tuple(result.shape) if result is not None else ()
    return KernelFile(Path(out), shape, mode, split, None if weights is None else Path(weights), ranks, seconds,
                      rank == 0)
