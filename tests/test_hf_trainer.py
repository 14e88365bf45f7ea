"""The Hugging Face Trainer callback: a real transformers.Trainer on a tiny config model
(never downloaded) gives the records of a plain loop with the same seed; dict batches; the
logits picked; a missing transformers named."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import Dataset

from ntk_torch import load_run
from ntk_torch.tracker import NTKTracker

from _integration_helpers import assert_missing_library_names_the_extra, assert_records_match

FIELDS = ("relative_change", "kernel_distance", "param_distance", "probe_loss", "probe_accuracy")


def _model(transformers):
    torch.manual_seed(0)
    config = transformers.DistilBertConfig(
        vocab_size=16, pad_token_id=0, n_layers=1, n_heads=2, dim=8, hidden_dim=12, max_position_embeddings=8,
        num_labels=3, dropout=0.0, attention_dropout=0.0, seq_classif_dropout=0.0)
    return transformers.DistilBertForSequenceClassification(config)


def _data():
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 16, (12, 6), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, torch.randint(0, 3, (12,), generator=generator)


class _Batches(Dataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {**{k: v[i] for k, v in self.x.items()}, "labels": self.y[i]}


def _plain_loop(transformers, steps):
    x, y = _data()
    model = _model(transformers)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    tracker = NTKTracker(model, (x, y), probe_size=6, every=2, progress=False, forecast=None,
                         output_fn=lambda out: out.logits)
    model.train()
    with tracker.attach(optimizer):
        for _ in range(steps):
            optimizer.zero_grad()
            model(**x, labels=y).loss.backward()
            optimizer.step()
    return tracker.records


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:method='auto'.*vmap cannot run this model:RuntimeWarning")
def test_a_trainer_run_records_what_a_plain_loop_records_and_logs_them(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from ntk_torch.integrations.transformers import NTKCallback

    transformers.logging.set_verbosity_error()
    x, y = _data()
    steps = 4
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"), report_to=[], use_cpu=True, max_steps=steps, per_device_train_batch_size=12,
        learning_rate=0.5, optim="sgd", lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0,
        save_strategy="no", logging_strategy="no", remove_unused_columns=False, disable_tqdm=True, seed=0,
        dataloader_num_workers=0,
    )
    seen = []

    class Logger(transformers.TrainerCallback):  # as TensorBoard's and W&B's callbacks see what the Trainer logs
        def on_log(self, args, state, control, logs=None, **kwargs):
            seen.append((state.global_step, dict(logs)))

    trainer = transformers.Trainer(model=_model(transformers), args=args, train_dataset=_Batches(x, y),
                                   callbacks=[Logger()])
    NTKCallback.add_to(trainer, train={**x, "labels": y}, every=2, probe_size=6, forecast=None,
                       run_dir=tmp_path / "run")
    trainer.train()

    expected = _plain_loop(transformers, steps)
    run = load_run(tmp_path / "run")
    assert_records_match(run, expected, FIELDS, [0, 2, 4], rel=1e-4, abs=1e-6)
    logged = [(step, logs) for step, logs in seen if "ntk/relative_change" in logs]
    assert [step for step, _ in logged] == [0, 2, 4]  # each record at its optimizer step
    for (_, logs), record in zip(logged, run.records):
        assert logs["ntk/relative_change"] == pytest.approx(record["relative_change"])
        assert logs["ntk/probe_loss"] == pytest.approx(record["probe_loss"])
    history = [entry for entry in trainer.state.log_history if "ntk/kernel_distance" in entry]
    assert [entry["step"] for entry in history] == [0, 2, 4]
    with pytest.raises(TypeError, match="trainer must be a transformers.Trainer"):
        NTKCallback(train={**x, "labels": y}, trainer=object())


@pytest.mark.slow  # importing transformers takes seconds
def test_logits_are_picked_from_outputs():
    from ntk_torch.integrations.transformers import logits

    t = torch.ones(2, 3)
    assert logits(t) is t and logits({"logits": t}) is t
    assert logits(type("Out", (), {"logits": t})()) is t
    with pytest.raises(ValueError, match="has no logits; pass output_fn="):
        logits({"loss": t})


def test_missing_transformers_names_the_extra(monkeypatch):
    assert_missing_library_names_the_extra(monkeypatch, "transformers", "ntk_torch.integrations.transformers",
                                           "transformers")
