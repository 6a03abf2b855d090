"""RegularizedStep in a plain loop, the HF TrainerCallback and the Lightning Callback: the same step."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from normswap.errors import OptionError
from normswap.regularizers import NonFiniteGradientWarning, OrthogonalRegularizer, RegularizedStep


def tiny_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))


def batches(n: int = 6):
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 6, generator=gen), torch.randint(0, 3, (8,), generator=gen)) for _ in range(n)]


def test_plain_loop_trains_and_equals_doing_it_by_hand():
    a, b = tiny_net(), tiny_net()
    step = RegularizedStep(a, OrthogonalRegularizer(a, 1e-2), clip={"mode": "agc", "clip_factor": 0.05})
    reg_b = OrthogonalRegularizer(b, 1e-2)
    opt_a, opt_b = torch.optim.SGD(a.parameters(), lr=0.1), torch.optim.SGD(b.parameters(), lr=0.1)
    from normswap.regularizers import clip_gradients

    losses = []
    for x, y in batches():
        for net, opt in ((a, opt_a), (b, opt_b)):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(net(x), y)
            loss.backward()
            if net is a:
                logs = step()
                losses.append(loss.item())
            else:
                reg_b.apply_()
                clip_gradients(b, "agc", clip_factor=0.05)
            opt.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb)
    assert set(logs) == {"grad_norm", "orthogonal_penalty", "skipped"} and not logs["skipped"]
    assert all(torch.isfinite(torch.tensor(losses)))


def test_plain_loop_skips_a_non_finite_step():
    net = tiny_net()
    step = RegularizedStep(net, clip={"mode": "norm", "max_norm": 1.0, "skip_nonfinite": True})
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    before = copy.deepcopy(net.state_dict())
    x, y = batches(1)[0]
    (nn.functional.cross_entropy(net(x), y) * float("nan")).backward()
    with pytest.warns(NonFiniteGradientWarning):
        logs = step()
    opt.step()
    assert logs["skipped"]
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k])


def test_bad_step_arguments_are_reported_up_front():
    net = tiny_net()
    with pytest.raises(OptionError, match="unknown clip option"):
        RegularizedStep(net, clip={"mode": "norm", "max_nrm": 1.0})
    with pytest.raises(OptionError, match="needs max_norm"):
        RegularizedStep(net, clip={"mode": "norm"})
    with pytest.raises(OptionError, match="another model"):
        RegularizedStep(net, OrthogonalRegularizer(tiny_net()))


def test_hf_trainer_callback(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from normswap.regularizers.hf import RegularizerCallback

    config = transformers.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, num_labels=2, max_position_embeddings=16)
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config)
    gen = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(0, 40, (8,), generator=gen), "labels": int(i % 2)} for i in range(16)]
    callback = RegularizerCallback(model, OrthogonalRegularizer(model, 1e-3), clip={"mode": "agc"})
    logged = []

    class Recorder(transformers.TrainerCallback):  # runs after ours: sees the logs it filled in
        def on_log(self, args, state, control, logs=None, **kwargs):
            if "loss" in logs:
                logged.append(dict(logs))

    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4,
                                          logging_steps=1, save_strategy="no", report_to=[], max_grad_norm=0.0,
                                          use_cpu=True, disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[callback, Recorder()])
    trainer.train()
    assert callback.step.orthogonal.step == 3  # once per optimizer step
    assert len(logged) == 3
    assert all(h["grad_norm_pre"] > 0 and h["orthogonal_penalty"] > 0 and h["steps_skipped"] == 0 for h in logged)


@pytest.mark.filterwarnings("ignore:.*LeafSpec.*is deprecated")
def test_lightning_callback():
    lightning = pytest.importorskip("lightning")
    from normswap.regularizers.lightning import RegularizerCallback

    class Module(lightning.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = tiny_net()

        def training_step(self, batch, _):
            x, y = batch
            return nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    module = Module()
    callback = RegularizerCallback(module.net, OrthogonalRegularizer(module.net, 1e-3),
                                   clip={"mode": "norm", "max_norm": 1.0})
    trainer = lightning.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                                enable_progress_bar=False, enable_model_summary=False, callbacks=[callback])
    x, y = map(torch.cat, zip(*batches(3)))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    trainer.fit(module, train_dataloaders=loader)
    assert callback.step.orthogonal.step == 3 and callback.last["grad_norm"] > 0
    assert "orthogonal_penalty" in trainer.callback_metrics
