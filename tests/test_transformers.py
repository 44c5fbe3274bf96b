"""The Hugging Face Trainer callback, against the real transformers.Trainer (a tiny model built
from a config: nothing is downloaded)."""

from __future__ import annotations

import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from gradwatch import AttentionCollapseWarning, GradWatch, GradWatchWarning  # noqa: E402
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
    # The Trainer's optimizer (accelerate's wrapper of AdamW) was handed over: update ratios, and the tiny
    # BERT's gradients per weight, 1e-4 of the classifier's, are not taken for vanishing (AdamW steps
    # every layer by a like share of its weights).
    assert rep.params["bert.encoder.layer.0.attention.self.value.weight"].update_ratio > 0 and not watch.findings
    logs = tmp_path / "out" / "runs" / "gradwatch"
    assert any(p.name.startswith("events.out.tfevents") for p in logs.iterdir()) and (logs / "gradwatch.json").exists()
    assert not any(m._forward_hooks for m in model.modules())  # detached after train()


# ---------------------------------------------------------------- the real models, built from a config
def tiny(kind, seed=0):
    """GPT-2, BERT and Llama (grouped-query: 2 key heads for 4 query heads) at width 64, 2 layers,
    their default attention implementation (SDPA)."""
    torch.manual_seed(seed)
    if kind == "gpt2":
        return transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=64, n_positions=16, n_embd=64, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0))
    if kind == "llama":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=16))
    return transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=16, num_labels=2))


ATTENTION = {"gpt2": "transformer.h.{}.attn", "llama": "model.layers.{}.self_attn",
             "bert": "bert.encoder.layer.{}.attention.self"}


def collapse(model, kind, layer=1, scale=30.0):
    """The query and key projections of one layer scaled up: one-hot attention."""
    with torch.no_grad():
        if kind == "gpt2":
            attn = model.transformer.h[layer].attn
            attn.c_attn.weight[:, :2 * attn.embed_dim] *= scale  # Conv1D: (in, 3 * out), q and k first
        elif kind == "llama":
            attn = model.model.layers[layer].self_attn
            attn.q_proj.weight.mul_(scale)
            attn.k_proj.weight.mul_(scale)
        else:
            attn = model.bert.encoder.layer[layer].attention.self
            attn.query.weight.mul_(scale)
            attn.key.weight.mul_(scale)
    return model


def fit(model, kind, steps, **watch):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 64, (128, 16), generator=g)
    labels = (ids[:, 1] > 31).long()  # BERT: is the first token after [CLS] in the upper half
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    with GradWatch(model, quiet=True, optimizer=opt, **watch) as w:
        for i in range(steps):
            rows = slice((i * 16) % 128, (i * 16) % 128 + 16)
            out = model(input_ids=ids[rows], labels=labels[rows] if kind == "bert" else ids[rows])
            opt.zero_grad()
            out.loss.backward()
            opt.step()
            losses.append(out.loss.item())
    return w, losses


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["gpt2", "bert", "llama"])
def test_healthy_training_of_a_real_model_is_silent_with_attention_rows_per_head(kind):
    model = tiny(kind)
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradWatchWarning)  # a finding or a note raised as a warning fails
        watch, losses = fit(model, kind, 60, every=5)
    assert not watch.findings and losses[-1] < losses[0]
    layers = watch.report().layers
    for i in (0, 1):
        ls = layers[ATTENTION[kind].format(i)]
        assert len(ls.attention_heads) == 4  # query heads (Llama: 2 key heads shared)
        assert 0.5 < ls.attention_entropy_normalised <= 1.0 and ls.attention_saturated_fraction < 0.5
    tied = {"gpt2": "transformer.wte.weight", "llama": "lm_head.weight", "bert": "classifier.weight"}[kind]
    assert watch.report().params[tied].update_ratio > 0  # GPT-2's lm_head is the tied embedding


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["gpt2", "bert", "llama"])
def test_a_planted_collapse_in_a_real_model_is_named_at_its_layer(kind):
    model = collapse(tiny(kind), kind, layer=1)
    with pytest.warns(AttentionCollapseWarning):
        watch, _ = fit(model, kind, 3, every=1)
    assert {f.layer for f in watch.findings if f.kind.value == "attention_collapse"} == {ATTENTION[kind].format(1)}
    assert watch.report().layers[ATTENTION[kind].format(0)].attention_saturated_fraction < 0.1


# ---------------------------------------------------------------- the Trainer hands its optimizer over
def _trainer(tmp_path, lr, steps=10):
    config = transformers.BertConfig(vocab_size=100, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=32, num_labels=2)
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config)
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=steps,
                                          per_device_train_batch_size=8, learning_rate=lr,
                                          lr_scheduler_type="constant", report_to=[], use_cpu=True,
                                          save_strategy="no", disable_tqdm=True)
    callback = GradWatchCallback(every=1, quiet=True)
    transformers.Trainer(model=model, args=args, train_dataset=Rows(80), callbacks=[callback]).train()
    return callback.watch


@pytest.mark.slow
def test_the_trainers_optimizer_gives_update_ratios_and_names_a_learning_rate_100x_too_high(tmp_path):
    watch = _trainer(tmp_path, 1e-4)  # AdamW at BERT's pre-training rate
    assert not watch.findings
    params = watch.report().params
    assert params and all(p.update_ratio is not None and p.learning_rate == 1e-4 for p in params.values())
    assert 1e-4 < params["classifier.weight"].update_ratio < 1e-2
    watch = _trainer(tmp_path, 1e-2)  # 100x
    found = [f for f in watch.findings if f.kind.value == "learning_rate"]
    assert found and "learning rate 0.01" in found[0].advice
