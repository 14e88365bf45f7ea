r"""Keyword spotters: small networks on log-mel features ``(N, n_mels, frames)``
(:func:`ntk_torch.data.spoken_commands`, :func:`ntk_torch.data.audio_folder`).

* :class:`ConvSpotter` (``model: {name: conv_spotter}``): 1-D convolutions over time, the
  mel bands as input channels, then a mean over time and a linear head;
* :class:`GRUSpotter` (``model: {name: gru_spotter}``): a GRU (written with ``nn.Linear`` so
  that ``vmap`` runs it) over the frames, the last hidden state through a linear head.

Both use PyTorch's default initialisation (standard parametrisation), are seeded like the
other built-in models, and read ``n_mels`` and ``num_classes`` from the data.
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from ._options import check_choice, check_int, initialisation_rng

SPOTTER_ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU}


def _spotter_data_options(data: Any) -> Dict[str, Any]:
    shape = tuple(data.input_shape)
    found: Dict[str, Any] = {"num_classes": data.output_dim}
    if len(shape) == 2:
        found["n_mels"] = shape[0]
    return found


def _check_input(x: Tensor, n_mels: int, name: str) -> None:
    if x.dim() != 3 or x.shape[1] != n_mels:
        raise ValueError(f"{name} expects log-mel inputs (N, {n_mels}, frames), got shape {tuple(x.shape)}")


class ConvSpotter(nn.Module):
    r"""A 1-D convolutional keyword spotter.

    ``(N, n_mels, T) -> conv(k, stride 1) -> act -> [conv(k, stride 2) -> act]* ->
    mean over time -> Linear -> (N, num_classes)``; ``channels`` lists each conv's output
    channels (padding ``k // 2``). Layers ``convs.{i}`` and ``head``.

    Args:
        n_mels: mel bands (input channels).
        num_classes: outputs.
        channels: output channels per conv block (at least one).
        kernel_size: the convolutions' kernel size (odd keeps the length).
        activation: ``relu``, ``tanh`` or ``gelu``.
        seed: parameters drawn from this seed (the global RNG is left as it was).
    """

    def __init__(self, n_mels: int = 32, num_classes: int = 10, channels: Union[int, Sequence[int]] = (32, 32), *,
                 kernel_size: int = 5, activation: str = "relu", seed: Optional[int] = None):
        super().__init__()
        n_mels, num_classes = check_int("n_mels", n_mels, minimum=1), check_int("num_classes", num_classes, minimum=1)
        channels = [channels] if isinstance(channels, int) else list(channels)
        if not channels:
            raise ValueError("channels must list at least one conv block's channels, got []")
        channels = [check_int("channels", c, minimum=1) for c in channels]
        kernel_size = check_int("kernel_size", kernel_size, minimum=1)
        check_choice("activation", activation, tuple(SPOTTER_ACTIVATIONS))
        self.n_mels = n_mels
        self.config = dict(n_mels=n_mels, num_classes=num_classes, channels=channels, kernel_size=kernel_size,
                           activation=activation, seed=seed)
        with initialisation_rng(seed):
            self.convs = nn.ModuleList(
                nn.Conv1d(c_in, c_out, kernel_size, stride=1 if i == 0 else 2, padding=kernel_size // 2)
                for i, (c_in, c_out) in enumerate(zip([n_mels] + channels[:-1], channels))
            )
            self.head = nn.Linear(channels[-1], num_classes)
        self.activation = SPOTTER_ACTIVATIONS[activation]()

    @classmethod
    def data_options(cls, data: Any, options: Mapping[str, Any]) -> Dict[str, Any]:
        """``n_mels`` and ``num_classes`` of log-mel data ``(N, n_mels, frames)``."""
        return _spotter_data_options(data)

    def forward(self, x: Tensor) -> Tensor:
        _check_input(x, self.n_mels, "ConvSpotter")
        for conv in self.convs:
            x = self.activation(conv(x))
        return self.head(x.mean(dim=2))


class GRULayer(nn.Module):
    r"""One GRU layer over ``(N, T, F)`` inputs, written with two ``nn.Linear`` maps so that
    ``torch.func.vmap`` (the kernel's fast engines) runs it; the equations of ``nn.GRU``:
    :math:`r, z = \sigma(W_{ir} x + W_{hr} h), \sigma(W_{iz} x + W_{hz} h)`,
    :math:`n = \tanh(W_{in} x + r \odot (W_{hn} h))`, :math:`h' = (1 - z) \odot n + z \odot h`
    (biases in both maps), :math:`h_0 = 0`; PyTorch's GRU initialisation
    :math:`U(-1/\sqrt H, 1/\sqrt H)`. Returns every step's hidden state ``(N, T, H)``."""

    def __init__(self, features: int, hidden: int):
        super().__init__()
        self.hidden = hidden
        self.input = nn.Linear(features, 3 * hidden)
        self.recurrent = nn.Linear(hidden, 3 * hidden)
        bound = hidden ** -0.5
        for parameter in self.parameters():
            nn.init.uniform_(parameter, -bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        gates_x = self.input(x)
        h = x.new_zeros(x.shape[0], self.hidden)
        states = []
        for t in range(x.shape[1]):
            xr, xz, xn = gates_x[:, t].chunk(3, dim=-1)
            hr, hz, hn = self.recurrent(h).chunk(3, dim=-1)
            r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
            h = (1 - z) * torch.tanh(xn + r * hn) + z * h
            states.append(h)
        return torch.stack(states, dim=1)


class GRUSpotter(nn.Module):
    r"""A GRU keyword spotter: ``(N, n_mels, T)`` read as ``T`` frames of ``n_mels``
    features by ``layers`` stacked :class:`GRULayer` (``hidden`` wide), the last frame's
    hidden state through ``Linear(hidden, num_classes)``. Layers ``grus.{i}`` and ``head``.

    Args:
        n_mels, num_classes, seed: as for :class:`ConvSpotter`.
        hidden: the GRU's hidden size.
        layers: stacked GRU layers.
    """

    def __init__(self, n_mels: int = 32, num_classes: int = 10, hidden: int = 32, *, layers: int = 1,
                 seed: Optional[int] = None):
        super().__init__()
        n_mels, num_classes = check_int("n_mels", n_mels, minimum=1), check_int("num_classes", num_classes, minimum=1)
        hidden, layers = check_int("hidden", hidden, minimum=1), check_int("layers", layers, minimum=1)
        self.n_mels = n_mels
        self.config = dict(n_mels=n_mels, num_classes=num_classes, hidden=hidden, layers=layers, seed=seed)
        with initialisation_rng(seed):
            self.grus = nn.ModuleList(GRULayer(n_mels if i == 0 else hidden, hidden) for i in range(layers))
            self.head = nn.Linear(hidden, num_classes)

    @classmethod
    def data_options(cls, data: Any, options: Mapping[str, Any]) -> Dict[str, Any]:
        """``n_mels`` and ``num_classes`` of log-mel data ``(N, n_mels, frames)``."""
        return _spotter_data_options(data)

    def forward(self, x: Tensor) -> Tensor:
        _check_input(x, self.n_mels, "GRUSpotter")
        h = x.transpose(1, 2)
        for gru in self.grus:
            h = gru(h)
        return self.head(h[:, -1])
