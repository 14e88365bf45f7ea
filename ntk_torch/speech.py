r"""Speech features offline: a source-filter synthesiser of command words, log-mel features
with ``torch.stft``, and a reader of WAV folders (stdlib ``wave``, no audio library).

The synthetic words (:data:`WORDS`) are **synthetic**, not recordings: each is a sequence
of formant targets (F1, F2, F3 in Hz, and a voicing level: 1 voiced, 0 a noise burst or
fricative) interpolated over the word's duration. An utterance is

* a glottal source: a pulse train at a per-speaker pitch (80..260 Hz) with a slow pitch
  contour and cycle-to-cycle jitter, mixed with aspiration noise where the word is
  unvoiced;
* filtered frame by frame (20 ms, Hann overlap-add) by the spectral envelope of three
  resonators at the interpolated formants, scaled by a per-speaker vocal-tract factor
  (0.85..1.15);
* placed at a random onset with a random duration stretch (0.8..1.2, timing jitter), plus
  white noise at a random signal-to-noise ratio.

Features: :func:`log_mel` (power spectrogram from ``torch.stft``, a triangular mel
filterbank built by :func:`mel_filterbank`, ``log(mel + 1e-6)``): ``(N, n_mels, frames)``.
Everything is drawn from one ``numpy`` Generator seeded by ``seed``: the same options give
the same waveforms on every machine.
"""

from __future__ import annotations

import wave
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

SAMPLE_RATE = 16_000
"""Samples per second of the synthesiser and of :func:`read_wav_folder`'s output."""

# Formant keyframes (F1, F2, F3, voicing) of each word, spread evenly over its duration.
WORDS: Dict[str, Tuple[Tuple[float, float, float, float], ...]] = {
    "yes": ((300, 2200, 3000, 1), (550, 1800, 2500, 1), (500, 1800, 2500, 1), (400, 5000, 6000, 0)),
    "no": ((280, 1500, 2400, 1), (500, 900, 2400, 1), (450, 850, 2400, 1), (350, 700, 2300, 1)),
    "up": ((650, 1200, 2500, 1), (620, 1150, 2450, 1), (300, 900, 2200, 0)),
    "down": ((250, 1700, 2600, 0), (700, 1200, 2500, 1), (450, 900, 2400, 1), (300, 1400, 2500, 1)),
    "left": ((350, 1100, 2600, 1), (550, 1800, 2500, 1), (500, 1700, 2500, 1), (300, 4000, 5500, 0)),
    "right": ((350, 1100, 1600, 1), (750, 1200, 1900, 1), (400, 2000, 2600, 1), (300, 1800, 3000, 0)),
    "on": ((700, 1000, 2500, 1), (600, 950, 2450, 1), (300, 1500, 2500, 1)),
    "off": ((650, 1000, 2500, 1), (600, 950, 2450, 1), (400, 3500, 5000, 0), (400, 3500, 5000, 0)),
    "stop": ((400, 4500, 6000, 0), (300, 1500, 2500, 0), (650, 1050, 2450, 1), (300, 900, 2300, 0)),
    "go": ((300, 1200, 2300, 0), (500, 900, 2400, 1), (400, 750, 2400, 1), (350, 700, 2300, 1)),
}
BANDWIDTHS = (90.0, 120.0, 180.0)
"""Resonator bandwidths (Hz) of F1, F2, F3."""
FRAME = 320  # 20 ms at 16 kHz: the synthesis frame (hop FRAME // 2)


def synthesise(labels: Sequence[int], *, seconds: float, rng: np.random.Generator,
               snr_db: Tuple[float, float] = (10.0, 30.0)) -> np.ndarray:
    """Waveforms ``(len(labels), round(seconds * SAMPLE_RATE))`` float32 in about [-1, 1],
    one utterance of ``list(WORDS)[label]`` each, by a new speaker each (module docstring)."""
    words = list(WORDS.values())
    length = int(round(seconds * SAMPLE_RATE))
    hop = FRAME // 2
    frames = length // hop + 1
    out = np.zeros((len(labels), length), dtype=np.float64)
    for row, label in enumerate(labels):
        pitch = rng.uniform(80.0, 260.0)
        tract = rng.uniform(0.85, 1.15)
        stretch = rng.uniform(0.8, 1.2)
        span = min(0.55 * seconds * stretch, 0.9 * seconds)
        onset = rng.uniform(0.02, seconds - span - 0.02)
        envelope = _formant_track(words[label], frames, hop, onset, span, tract)
        source = _source(length + FRAME, pitch, rng)
        signal = _overlap_add(source, envelope, length)
        signal /= np.abs(signal).max() + 1e-12
        snr = rng.uniform(*snr_db)
        noise = rng.standard_normal(length) * np.sqrt(np.mean(signal**2) / 10 ** (snr / 10))
        out[row] = signal + noise
    return out.astype(np.float32)


def _formant_track(keys: Sequence[Tuple[float, ...]], frames: int, hop: int, onset: float, span: float,
                   tract: float) -> np.ndarray:
    """``(frames, 5)``: F1, F2, F3 (Hz), voicing and loudness of each synthesis frame; loudness
    0 outside ``[onset, onset + span]`` seconds, a raised-cosine ramp inside."""
    times = np.arange(frames) * hop / SAMPLE_RATE
    inside = (times - onset) / span
    keys_arr = np.asarray(keys, dtype=np.float64)
    knots = np.linspace(0.0, 1.0, len(keys_arr))
    position = np.clip(inside, 0.0, 1.0)
    track = np.stack([np.interp(position, knots, keys_arr[:, j]) for j in range(4)], axis=1)
    track[:, :3] *= tract
    loud = np.where((inside >= 0) & (inside <= 1), np.sin(np.pi * np.clip(inside, 0, 1)) ** 0.5, 0.0)
    return np.concatenate([track, loud[:, None]], axis=1)


def _source(length: int, pitch: float, rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
    """A pulse train (a slow pitch contour, 2% cycle jitter) and white noise, ``(length,)`` each."""
    t = np.arange(length) / SAMPLE_RATE
    contour = pitch * (1.0 + 0.1 * np.sin(2 * np.pi * rng.uniform(1.0, 3.0) * t + rng.uniform(0, 2 * np.pi)))
    pulses = np.zeros(length)
    position = rng.uniform(0, SAMPLE_RATE / pitch)
    while position < length:
        pulses[int(position)] = 1.0
        position += SAMPLE_RATE / contour[int(position)] * (1.0 + 0.02 * rng.standard_normal())
    return pulses - pulses.mean(), rng.standard_normal(length) * 0.05


def _overlap_add(source: Tuple[np.ndarray, np.ndarray], track: np.ndarray, length: int) -> np.ndarray:
    """Filter the source frame by frame through the resonators of ``track`` (Hann overlap-add)."""
    pulses, noise = source
    hop = FRAME // 2
    window = np.hanning(FRAME + 1)[:-1]
    index = np.arange(track.shape[0])[:, None] * hop + np.arange(FRAME)[None, :]
    voicing, loud = track[:, 3:4], track[:, 4:5]
    excitation = (voicing * pulses[index] + (1.0 - voicing) * 8.0 * noise[index] + 0.1 * noise[index]) * window
    spectrum = np.fft.rfft(excitation, axis=1)
    freqs = np.fft.rfftfreq(FRAME, 1.0 / SAMPLE_RATE)[None, :]
    gain = np.zeros_like(spectrum.real)
    for j, bandwidth in enumerate(BANDWIDTHS):
        centre = track[:, j:j + 1]
        gain += 1.0 / (1.0 + ((freqs - centre) / (bandwidth / 2)) ** 2) / (j + 1)
    frames = np.fft.irfft(spectrum * gain * loud, n=FRAME, axis=1)
    out = np.zeros(index[-1, -1] + 1)
    np.add.at(out, index, frames)
    return out[:length]


def mel_filterbank(n_mels: int, n_fft: int, sample_rate: int = SAMPLE_RATE, f_min: float = 20.0,
                   f_max: float = None) -> Tensor:
    r"""``(n_mels, n_fft // 2 + 1)`` triangular filters evenly spaced on the mel scale
    :math:`m = 2595 \log_{10}(1 + f / 700)` between ``f_min`` and ``f_max`` (default
    ``sample_rate / 2``), each peaking at 1 (HTK-style, no area normalisation)."""
    f_max = sample_rate / 2 if f_max is None else f_max
    mel = lambda f: 2595.0 * np.log10(1.0 + f / 700.0)  # noqa: E731
    hz = lambda m: 700.0 * (10 ** (m / 2595.0) - 1.0)  # noqa: E731
    edges = hz(np.linspace(mel(f_min), mel(f_max), n_mels + 2))
    freqs = np.linspace(0, sample_rate / 2, n_fft // 2 + 1)
    lower, centre, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (freqs[None, :] - lower) / (centre - lower)
    falling = (upper - freqs[None, :]) / (upper - centre)
    return torch.as_tensor(np.clip(np.minimum(rising, falling), 0.0, None), dtype=torch.float32)


def log_mel(waveforms: Tensor, *, n_mels: int = 32, n_fft: int = 512, hop: int = 160, win: int = 400) -> Tensor:
    r"""Log-mel features ``(N, n_mels, 1 + L // hop)`` of waveforms ``(N, L)`` at
    :data:`SAMPLE_RATE`: :math:`\log(M |STFT(x)|^2 + 10^{-6})` with a Hann window of ``win``
    samples (25 ms), hop ``hop`` (10 ms), ``torch.stft(center=True)``, ``M`` =
    :func:`mel_filterbank`."""
    window = torch.hann_window(win, dtype=waveforms.dtype)
    stft = torch.stft(waveforms, n_fft=n_fft, hop_length=hop, win_length=win, window=window,
                      center=True, return_complex=True)
    power = stft.abs() ** 2
    bank = mel_filterbank(n_mels, n_fft).to(waveforms.dtype)
    return torch.log(torch.einsum("mf,nft->nmt", bank, power) + 1e-6)


def read_wav(path: Path, length: int) -> np.ndarray:
    """One 16-bit PCM WAV file as float32 ``(length,)`` at :data:`SAMPLE_RATE` (channels
    averaged, linearly resampled, zero-padded or cut at the end).

    Raises:
        ValueError: the file is not 16-bit PCM WAV (naming the file).
    """
    try:
        with wave.open(str(path), "rb") as handle:
            width, channels, rate = handle.getsampwidth(), handle.getnchannels(), handle.getframerate()
            raw = handle.readframes(handle.getnframes())
    except (wave.Error, EOFError) as error:
        raise ValueError(f"{path}: not a readable WAV file ({error})") from None
    if width != 2:
        raise ValueError(f"{path}: {8 * width}-bit samples; only 16-bit PCM WAV is read")
    samples = np.frombuffer(raw, dtype="<i2").astype(np.float64).reshape(-1, channels).mean(axis=1) / 32768.0
    if rate != SAMPLE_RATE and samples.size > 1:
        times = np.arange(int(round(samples.size * SAMPLE_RATE / rate))) / SAMPLE_RATE
        samples = np.interp(times, np.arange(samples.size) / rate, samples)
    out = np.zeros(length, dtype=np.float32)
    out[: min(length, samples.size)] = samples[:length]
    return out


def read_wav_folder(root: Path, length: int) -> Tuple[np.ndarray, np.ndarray, List[str]]:
    """Every ``root/<label>/*.wav`` (the Speech Commands layout; sub-folders starting with
    ``_`` such as ``_background_noise_`` are skipped): waveforms ``(N, length)``, labels
    ``(N,)`` int64 indexing the sorted label names, and the label names.

    Raises:
        ValueError: ``root`` is not a folder, or it has fewer than two labels with WAV files.
    """
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"path {str(root)!r} is not a folder (expected one sub-folder of .wav files per label)")
    labels = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("_")
                    and any(d.glob("*.wav")))
    if len(labels) < 2:
        raise ValueError(f"path {str(root)!r} has {len(labels)} label sub-folders with .wav files; at least 2 needed")
    waves, ys = [], []
    for index, label in enumerate(labels):
        for file in sorted((root / label).glob("*.wav")):
            waves.append(read_wav(file, length))
            ys.append(index)
    return np.stack(waves), np.asarray(ys, dtype=np.int64), labels


def synthetic_commands(count: int, seconds: float, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """``count`` synthetic utterances ``(count, round(seconds * SAMPLE_RATE))`` and their
    labels ``(count,)`` (``i % len(WORDS)`` shuffled: balanced), all from
    ``numpy.random.default_rng(seed)``."""
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(count) % len(WORDS)).astype(np.int64)
    return synthesise(labels, seconds=seconds, rng=rng), labels


def standardised_log_mel(waves: np.ndarray, n_train: int, n_mels: int) -> Tensor:
    """:func:`log_mel` of ``waves`` ``(N, L)`` in float64, each mel band standardised with
    the mean and standard deviation over the first ``n_train`` waveforms and all frames."""
    features = log_mel(torch.as_tensor(waves, dtype=torch.float64), n_mels=n_mels)
    train = features[:n_train]
    mean = train.mean(dim=(0, 2), keepdim=True)
    scale = train.std(dim=(0, 2), keepdim=True).clamp_min(1e-6)
    return (features - mean) / scale


def check_seconds(seconds: float) -> float:
    """``seconds`` as a float in ``[0.25, 4]`` (a synthetic word needs a quarter second)."""
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not 0.25 <= seconds <= 4:
        raise ValueError(f"seconds must be a number in [0.25, 4], got {seconds!r}")
    return float(seconds)


def frames_of(seconds: float, hop: int = 160) -> int:
    """Frames of :func:`log_mel` for a clip of ``seconds``: ``1 + round(16000 seconds) // hop``."""
    return 1 + int(round(seconds * SAMPLE_RATE)) // hop
