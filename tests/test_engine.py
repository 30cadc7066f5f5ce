"""The training core's device choices: autocast dtype and memory format per device."""
from __future__ import annotations

import pytest
import torch

import engine
from checkpoints import Checkpoint, DataSpec, ModelSpec, Precision
from engine import resolve_amp
from metrics import BCEDiceLoss
from models import build_model

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.mark.parametrize("native_bf16, expected", [(True, torch.bfloat16), (False, None)])
def test_cpu_auto_uses_bf16_only_where_the_cpu_computes_it(monkeypatch, native_bf16, expected):
    monkeypatch.setattr(engine, "cpu_has_native_bf16", lambda: native_bf16)
    assert resolve_amp("auto", CPU) == expected
    assert resolve_amp("bf16", CPU) == torch.bfloat16  # asked for explicitly: honoured, even if emulated
    assert resolve_amp("off", CPU) is None


def test_fp16_on_cpu_falls_back_to_fp32_and_says_so(capsys):
    assert resolve_amp("fp16", CPU) is None
    assert "--amp fp16 is CUDA-only" in capsys.readouterr().out


@pytest.mark.parametrize("bf16_gpu, expected", [(True, torch.bfloat16), (False, torch.float16)])
def test_cuda_auto_prefers_bf16_and_falls_back_to_fp16(monkeypatch, bf16_gpu, expected):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16_gpu)
    assert resolve_amp("auto", CUDA) == expected
    assert resolve_amp("off", CUDA) is None


@pytest.mark.parametrize("trained, amp, native, on_cpu, on_cuda", [
    ("float32", "auto", True, None, None),  # trained in fp32 on a CPU without bf16: fp32 on a bf16 GPU too
    ("bfloat16", "auto", True, torch.bfloat16, torch.bfloat16),
    ("bfloat16", "bf16", False, None, None),  # only emulated here: fp32
    ("float16", "fp16", True, None, torch.float16),  # no fp16 autocast on a CPU
    ("not recorded", "auto", True, torch.bfloat16, torch.bfloat16),  # format 1: the setting, resolved per device
])
def test_a_checkpoint_runs_in_the_dtype_it_trained_in(monkeypatch, trained, amp, native, on_cpu, on_cuda):
    monkeypatch.setattr(engine, "cpu_has_native_bf16", lambda: native)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: native or including_emulation)
    record = Checkpoint(kind="segmentation", model=ModelSpec("unet", {}),
                        data=DataSpec(input_size=(8, 8), norm_mean=0.5, norm_std=0.25), precision=Precision(amp, trained))
    assert engine.checkpoint_amp(record, CPU) == on_cpu
    assert engine.checkpoint_amp(record, CUDA) == on_cuda


def test_auto_on_a_gpu_that_only_emulates_bf16_takes_fp16(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert resolve_amp("auto", CUDA) == torch.float16


def test_native_bf16_query_matches_the_cpu_flags():
    # The oneDNN query must agree with the kernel's CPU flags, so `auto` never picks emulated bf16.
    try:
        flags = set(open("/proc/cpuinfo").read().split())
    except OSError:
        pytest.skip("no /proc/cpuinfo on this platform")
    hardware = bool(flags & {"avx512_bf16", "amx_bf16"})
    assert engine.cpu_has_native_bf16() == (hardware and torch.backends.mkldnn.is_available())


def test_the_cpu_fast_path_trains_like_fp32():
    # One SGD step under the CPU fast path (resolve_amp + memory_format) moves the loss like the fp32 NCHW step.
    torch.manual_seed(0)
    x = torch.randn(2, 1, 32, 64)
    y = (x > 0.5).float()
    losses = {}
    for path in ("fp32", "fast"):
        torch.manual_seed(1)
        model = build_model("unet", base_channels=8)
        dtype = resolve_amp("bf16", CPU) if path == "fast" else None
        layout = engine.memory_format(CPU) if path == "fast" else torch.contiguous_format
        model = model.to(memory_format=layout)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        trace = []
        for _ in range(3):
            with engine.autocast(CPU, dtype):
                loss = BCEDiceLoss(1.0)(model(x.contiguous(memory_format=layout)).float(), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            trace.append(loss.item())
        losses[path] = trace
    assert losses["fast"][-1] < losses["fast"][0]
    assert losses["fast"] == pytest.approx(losses["fp32"], rel=0.03)


# ----------------------------------------------------------------------------------------------
# The Trainer's loop, with a task whose loss per step is known
# ----------------------------------------------------------------------------------------------
class Numbers(torch.utils.data.Dataset):
    """Item i is the number i + 1; the task's loss on a batch of one is that number."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self):
        return self.n

    def set_epoch(self, epoch: int) -> None:
        pass

    def __getitem__(self, index: int):
        return torch.tensor(float(index + 1))


class NumberTask:
    def __init__(self):
        self.losses = []

    def train_step(self, model, batch):
        loss = (model.weight * 0).sum() + batch.sum()  # the number, with a gradient path through the model
        self.losses.append(batch.sum().item())
        return loss, None

    def val_step(self, model, batch):
        return {"loss": batch.sum(), "count": torch.tensor(float(len(batch)))}


class Scalars:
    """A stand-in for the TensorBoard writer that keeps what is written."""

    def __init__(self):
        self.values = {}

    def add_scalar(self, tag, value, step):
        self.values.setdefault(tag, []).append((step, value))


def number_trainer(tmp_path, **kwargs) -> tuple[engine.Trainer, torch.utils.data.DataLoader]:
    model = torch.nn.Linear(1, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    record = Checkpoint(kind="segmentation", model=ModelSpec("unet", {}),
                        data=DataSpec(input_size=(8, 8), norm_mean=0.5, norm_std=0.25))
    trainer = engine.Trainer(task=NumberTask(), model=model, optimizer=optimizer, scheduler=None, device=CPU,
                             dist=engine.DistEnv(), amp_dtype=None, record=record, checkpoint_dir=tmp_path,
                             writer=Scalars(), **kwargs)
    loader = engine.make_loader(Numbers(3), batch_size=1, train=True, workers=0, dist=engine.DistEnv(), device=CPU,
                                seed=0)
    return trainer, loader


def test_batch_loss_is_the_mean_of_the_steps_since_the_last_log_across_epochs(tmp_path):
    trainer, loader = number_trainer(tmp_path, log_interval=2)
    for epoch in range(2):  # 3 steps an epoch: the log at step 4 holds the last step of epoch 1 and the first of 2
        trainer.train_epoch(loader, epoch, 2)
    losses = trainer.task.losses
    expected = [(step, sum(losses[step - 2:step]) / 2) for step in (2, 4, 6)]
    assert trainer.writer.values["train/batch_loss"] == expected  # halves of sums of small integers: exact


def test_a_resumed_run_that_had_stopped_early_trains_no_more(tmp_path, capsys):
    trainer, loader = number_trainer(tmp_path, patience=2, monitor="val/loss")
    trainer.epochs_since_best = 2  # as resume() restores it from a run that stopped
    assert trainer.fit(loader, loader, epochs=5) == []
    assert trainer.global_step == 0 and not (tmp_path / "last.pth").exists()
    assert "early stop: val/loss has not improved for 2 epochs" in capsys.readouterr().out


def test_carry_events_copies_a_resumed_runs_tensorboard_files_once_and_says_when_they_are_gone(tmp_path, capsys,
                                                                                              monkeypatch):
    from types import SimpleNamespace

    run = tmp_path / "run"
    (run / "tensorboard").mkdir(parents=True)
    (run / "tensorboard" / "events.out.tfevents.1.host.1").write_bytes(b"first")
    (run / "tensorboard" / "notes.txt").write_text("not an event file")
    resumed = SimpleNamespace(run_args={"log_dir": None}, path=run / "last.pth")
    engine.carry_events(resumed, tmp_path / "elsewhere")
    (tmp_path / "elsewhere" / "events.out.tfevents.1.host.1").write_bytes(b"written on since")
    engine.carry_events(resumed, tmp_path / "elsewhere")  # a second resume there copies nothing again
    assert {p.name: p.read_bytes() for p in (tmp_path / "elsewhere").iterdir()} == {
        "events.out.tfevents.1.host.1": b"written on since"}
    engine.carry_events(resumed, run / "tensorboard")  # the same folder: nothing to do
    assert sorted(p.name for p in (run / "tensorboard").iterdir()) == ["events.out.tfevents.1.host.1", "notes.txt"]

    capsys.readouterr()
    engine.carry_events(SimpleNamespace(run_args={"log_dir": str(tmp_path / "gone")}, path=run / "last.pth"),
                        tmp_path / "third")
    assert f"no TensorBoard files of the resumed run in {tmp_path / 'gone'}" in capsys.readouterr().out
    assert not (tmp_path / "third").exists()
    # A relative folder is not looked for where this process runs (another run's files were copied from there):
    # new runs record it absolute, and an older file's relative one is said and left.
    (tmp_path / "cwd" / "tb").mkdir(parents=True)
    (tmp_path / "cwd" / "tb" / "events.out.tfevents.2.host.2").write_bytes(b"another run")
    monkeypatch.chdir(tmp_path / "cwd")
    engine.carry_events(SimpleNamespace(run_args={"log_dir": "tb"}, path=run / "last.pth"), tmp_path / "fourth")
    assert "recorded as tb, relative to where it ran" in capsys.readouterr().out and not (tmp_path / "fourth").exists()
    import finetune_seg

    args = finetune_seg.parse_args(["--log-dir", "tb", "--checkpoint-dir", str(tmp_path / "ck")])
    assert args.log_dir == tmp_path / "cwd" / "tb"
