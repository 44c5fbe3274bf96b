"""The Hugging Face Trainer callback, against the real transformers.Trainer (a tiny model built
from a config: nothing is downloaded)."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from gradwatch.integrations.transformers import GradWatchCallback  # noqa: E402


class Rows(torch.utils.data.Dataset):
    def __init__(self, n: int = 32):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, 100, (n, 12), generator=g)
        self.labels = torch.randint(0, 2, (n,), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


@pytest.mark.slow
def test_callback_watches_a_tiny_bert_with_gradient_accumulation(tmp_path):
    config = transformers.BertConfig(vocab_size=100, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=32, num_labels=2)
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config)
    callback = GradWatchCallback(every=1, quiet=True)
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=3, per_device_train_batch_size=4,
                                          gradient_accumulation_steps=2, report_to=["tensorboard"],
                                          use_cpu=True, save_strategy="no", disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Rows(), callbacks=[callback])
    trainer.train()
    watch = callback.watch
    assert trainer.state.global_step == 3 and watch.steps == 3  # one per optimizer step
    rep = watch.report()
    assert rep.layers["bert.encoder.layer.0.attention.self.query"].calls == 2  # two accumulated batches
    assert rep.params["bert.embeddings.word_embeddings.weight"].grad_norm > 0
    logs = tmp_path / "out" / "runs" / "gradwatch"
    assert any(p.name.startswith("events.out.tfevents") for p in logs.iterdir()) and (logs / "gradwatch.json").exists()
    assert not any(m._forward_hooks for m in model.modules())  # detached after train()
