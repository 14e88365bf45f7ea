"""The synthetic spoken commands, the WAV folder reader, the log-mel features and the keyword spotters."""

import wave

import numpy as np
import pytest
import torch

from ntk_torch import data, models, speech
from ntk_torch.kernel import empirical_ntk
from ntk_torch.spotters import GRULayer


def test_spoken_commands_are_deterministic_per_seed_and_shaped():
    a = data.load("spoken_commands", n_train=20, n_test=10, seed=3)
    b = data.load("spoken_commands", n_train=20, n_test=10, seed=3)
    c = data.load("spoken_commands", n_train=20, n_test=10, seed=4)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    assert not torch.equal(a.x_train, c.x_train)
    assert a.x_train.shape == (20, 32, speech.frames_of(0.5)) and a.num_classes == 10
    assert np.bincount(torch.cat([a.y_train, a.y_test]).numpy()).tolist() == [3] * 10
    assert a.info["source"].startswith("synthetic")


@pytest.mark.slow
def test_spoken_commands_are_learnable_by_a_small_conv_spotter():
    split = data.load("spoken_commands", n_train=150, n_test=50, seconds=0.3, seed=0)
    model = models.build("conv_spotter", data=split, channels=[16, 16], seed=0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(30):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(split.x_train), split.y_train).backward()
        optimizer.step()
    accuracy = (model(split.x_test).argmax(1) == split.y_test).double().mean().item()
    assert accuracy > 0.5  # chance is 0.1


def test_spoken_commands_features_separate_the_words_linearly():
    split = data.load("spoken_commands", n_train=100, n_test=60, seed=1)
    x, y = split.x_train.flatten(1).double(), split.y_train
    # nearest class mean on the training split's features: well above chance (0.1)
    means = torch.stack([x[y == c].mean(0) for c in range(10)])
    guess = torch.cdist(split.x_test.flatten(1).double(), means).argmin(1)
    assert (guess == split.y_test).double().mean().item() > 0.3


def _write_wav(path, samples, rate=16000):
    with wave.open(str(path), "wb") as handle:
        handle.setnchannels(1)
        handle.setsampwidth(2)
        handle.setframerate(rate)
        handle.writeframes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())


def test_audio_folder_reads_the_speech_commands_layout(tmp_path):
    rng = np.random.default_rng(0)
    for label, frequency in (("no", 300.0), ("yes", 900.0)):
        (tmp_path / label).mkdir()
        for i in range(5):
            rate = 8000 if i == 0 else 16000  # one file resampled
            t = np.arange(int(0.4 * rate)) / rate
            _write_wav(tmp_path / label / f"{i}.wav", 0.5 * np.sin(2 * np.pi * frequency * t) + 0.01 * rng.standard_normal(t.size), rate)
    (tmp_path / "_background_noise_").mkdir()
    _write_wav(tmp_path / "_background_noise_" / "n.wav", rng.standard_normal(100) * 0.1)
    split = data.load("audio_folder", path=str(tmp_path), seconds=0.5, test_size=4, n_mels=16)
    assert split.info["labels"] == ["no", "yes"] and split.num_classes == 2
    assert split.n_train == 6 and split.n_test == 4
    assert split.x_train.shape[1:] == (16, speech.frames_of(0.5))
    assert torch.bincount(split.y_test).tolist() == [2, 2]


def test_read_wav_pads_and_resamples(tmp_path):
    _write_wav(tmp_path / "a.wav", np.full(800, 0.5), rate=8000)  # 0.1 s at 8 kHz
    out = speech.read_wav(tmp_path / "a.wav", 4000)
    assert out.shape == (4000,) and abs(out[100] - 0.5) < 1e-3 and out[1700:].max() == 0.0


def test_audio_folder_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="is not a folder"):
        data.load("audio_folder", path=str(tmp_path / "missing"))
    (tmp_path / "only").mkdir()
    _write_wav(tmp_path / "only" / "a.wav", np.zeros(10))
    with pytest.raises(ValueError, match="at least 2 needed"):
        data.load("audio_folder", path=str(tmp_path))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.wav").write_bytes(b"not a wav")
    with pytest.raises(ValueError, match="not a readable WAV"):
        data.load("audio_folder", path=str(tmp_path))


def test_mel_filterbank_rows_are_triangles_peaking_at_one():
    bank = speech.mel_filterbank(8, 256)
    assert bank.shape == (8, 129) and torch.all(bank >= 0)
    assert torch.allclose(bank.max(dim=1).values, torch.ones(8), atol=0.15)


def test_gru_layer_matches_torch_gru():
    layer = GRULayer(5, 7)
    reference = torch.nn.GRU(5, 7, batch_first=True)
    with torch.no_grad():
        reference.weight_ih_l0.copy_(layer.input.weight)
        reference.bias_ih_l0.copy_(layer.input.bias)
        reference.weight_hh_l0.copy_(layer.recurrent.weight)
        reference.bias_hh_l0.copy_(layer.recurrent.bias)
    x = torch.randn(3, 4, 5)
    torch.testing.assert_close(layer(x), reference(x)[0])


@pytest.mark.parametrize("name, options", [("conv_spotter", {"channels": [4, 4]}), ("gru_spotter", {"hidden": 4})])
def test_spotters_are_built_from_the_data_and_have_kernels(name, options):
    split = data.load("spoken_commands", n_train=10, n_test=10, seconds=0.25)
    model = models.build(name, data=split, seed=0, **options).double()
    again = models.build(name, data=split, seed=0, **options).double()
    x = split.x_train[:3].double()
    assert torch.equal(model(x), again(x)) and model(x).shape == (3, 10)
    K = empirical_ntk(model, x, mode="trace")
    assert K.shape == (3, 3) and torch.allclose(K, K.T)
    with pytest.raises(ValueError, match="expects log-mel inputs"):
        model(x[:, :5])
