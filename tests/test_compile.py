"""The compiled step on the CPU: it follows the eager step, compiles once per shape (evaluation
included), falls back to the uncompiled step in one line when compiling fails, and keeps its
kernels in a stable Inductor cache.

Inductor on the CPU compiles C++ with gcc: a small network here (about 15 s with a warm cache,
two minutes cold on 2 cores, hence marked slow); ResNet-18 through the whole trainer is the
slowest test, at the end. The fallback tests compile nothing and run in the fast suite.
"""
import json
import os

import pytest
import torch

from nla_fast import NLAConfig, engine, evaluation, train
from nla_fast.augment import TrainAugment
from nla_fast.engine import StepOptions, TrainStep, augmentation_generator, epoch_permutation, make_optimizer, shard
from nla_fast.placement import DeviceResident
from nla_fast.settings import TrainSettings

BATCH, SAMPLES, NATIVE, SIZE, CLASSES = 4, 16, 20, 16, 7
CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("stable_inductor_cache")  # conftest: a cache kept between runs


class SmallNet(torch.nn.Module):
    """Conv, BatchNorm, ReLU, a residual add, pooling and a linear head: what ResNet-18 is made of."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False),
                                        torch.nn.BatchNorm2d(8), torch.nn.ReLU())
        self.block = torch.nn.Sequential(torch.nn.Conv2d(8, 8, 3, padding=1, bias=False), torch.nn.BatchNorm2d(8))
        self.fc = torch.nn.Linear(8, CLASSES)

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(x + self.block(x))
        return self.fc(x.mean(dim=(2, 3)))


def make_step(compile: bool, loss: str = "nla", samples: int = SAMPLES) -> TrainStep:
    torch.manual_seed(0)
    model = SmallNet().to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model, 1e-2, 1e-4, CPU)
    data = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (samples, NATIVE, NATIVE, 3), dtype=torch.uint8, generator=data)
    labels = torch.randint(0, CLASSES, (samples,), generator=data)
    options = StepOptions(batch_size=BATCH, amp="off", backend="reference", loss=loss, compile=compile)
    steps = samples // BATCH
    step = TrainStep(model, optimizer, DeviceResident(images, labels, CPU), TrainAugment(SIZE),
                     augmentation_generator(CPU, 2), options, NLAConfig(), CLASSES, steps)
    step.start_epoch(shard(epoch_permutation(samples, 0, 0), 0, 1, BATCH), lr=1e-2, eps=0.4)
    return step


def run_epoch(step) -> torch.Tensor:
    losses, previous = [], 0.0
    for _ in range(step.steps_per_epoch):
        step()
        total = float(step.totals.loss_sum)
        losses.append(total - previous)
        previous = total
    return torch.tensor(losses, dtype=torch.float64)


def eval_split(samples: int = 10):
    data = torch.Generator().manual_seed(5)
    images = torch.randint(0, 256, (samples, NATIVE, NATIVE, 3), dtype=torch.uint8, generator=data)
    return images, torch.randint(0, CLASSES, (samples,), generator=data)


def eval_transform(batch):
    return torch.nn.functional.interpolate(batch.permute(0, 3, 1, 2).float() / 255, size=(SIZE, SIZE))


def unique_graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


# ----------------------------------------------------------------------------------------------
def test_compile_is_the_default_on_cuda_only():
    assert TrainSettings().resolve(torch.device("cuda")).compile is True
    assert TrainSettings().resolve(CPU).compile is False
    assert TrainSettings(compile=False).resolve(torch.device("cuda")).compile is False  # --no-compile
    assert TrainSettings(compile=True).resolve(CPU).compile is True
    with pytest.raises(ValueError, match="compile_mode"):
        StepOptions(batch_size=4, compile=True, compile_mode="reduce-overhead")  # graphs inside our graph


def test_inductor_cache_is_a_stable_folder_unless_the_user_chose_one(monkeypatch, tmp_path):
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setenv("NLA_FAST_CACHE", str(tmp_path / "cache"))
    assert engine.inductor_cache_dir() == str(tmp_path / "cache" / "inductor")
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "cache" / "inductor")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    assert engine.inductor_cache_dir() == str(tmp_path / "mine")


@pytest.mark.slow  # about 15 s with a warm Inductor cache, two minutes cold
@pytest.mark.parametrize("loss", ["nla", "ce"])
def test_compiled_step_follows_the_eager_step(loss):
    eager_step, compiled_step = make_step(compile=False, loss=loss), make_step(compile=True, loss=loss)
    from torch._dynamo.utils import counters

    counters.clear()
    eager, compiled = run_epoch(eager_step), run_epoch(compiled_step)
    assert compiled_step.compiled and compiled_step.note is None
    assert not counters["graph_break"], dict(counters["graph_break"])  # one region: forward + loss + statistics
    assert compiled_step.first_step_s > 0 and eager_step.first_step_s > 0
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)
    a, b = eager_step.totals.state_dict(), compiled_step.totals.state_dict()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5, msg=name)
    for (name, p), q in zip(eager_step.model.named_parameters(), compiled_step.model.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-3, atol=1e-5, msg=name)
    # the next epoch reuses the compiled code: no new graph
    graphs = unique_graphs()
    compiled_step.start_epoch(shard(epoch_permutation(SAMPLES, 0, 1), 0, 1, BATCH), lr=5e-3, eps=0.6)
    run_epoch(compiled_step)
    assert unique_graphs() == graphs


@pytest.mark.slow
def test_compiled_evaluation_pads_the_last_batch_and_compiles_once():
    step = make_step(compile=True)
    run_epoch(step)
    images, labels = eval_split(10)  # batches of 4: 4, 4 and a remainder of 2
    plain = evaluation.evaluate(step.eval_model, images, labels, eval_transform, CLASSES, batch_size=4)
    first = step.evaluate(images, labels, eval_transform, CLASSES, batch_size=4)
    graphs = unique_graphs()
    again = step.evaluate(images, labels, eval_transform, CLASSES, batch_size=4)
    assert unique_graphs() == graphs  # the padded remainder has the full batch's shape: nothing recompiles
    for result in (first, again):
        assert result["confusion"] == plain["confusion"] and result["num_samples"] == 10
    assert step.model.training  # evaluation put the model back in training mode


def test_the_steps_per_sample_points_are_p_gt_and_the_largest_other_probability():
    step = make_step(compile=False, loss="ce")  # "ce": the logits are those of view 1 alone
    images, labels = eval_split(BATCH)
    view1, view2 = step.augment(images, step.generator)
    with torch.no_grad():  # classes 3 and 4 score alike: a tie among the negatives
        step.model.fc.weight[3].copy_(step.model.fc.weight[4])
        step.model.fc.bias[3].copy_(step.model.fc.bias[4])
        _, _, _, points = step._forward_loss(view1, view2, labels, step.eps)
        probs = step.model(view1.contiguous(memory_format=torch.channels_last)).float().softmax(dim=1)
    for row, label, (p_gt, p_nn) in zip(probs, labels.tolist(), points.tolist()):
        others = [p for k, p in enumerate(row.tolist()) if k != label]
        assert p_gt == pytest.approx(row[label].item(), abs=1e-7) and p_nn == pytest.approx(max(others), abs=1e-7)


def test_padding_the_last_batch_changes_no_score():
    model = SmallNet().eval()
    shapes = []
    model.register_forward_hook(lambda module, args, out: shapes.append(tuple(args[0].shape)))
    images, _ = eval_split(10)
    plain = evaluation.predict_logits(model, images, eval_transform, batch_size=4)
    shapes_plain, shapes[:] = list(shapes), []
    padded = evaluation.predict_logits(model, images, eval_transform, batch_size=4, pad_last_batch=True)
    assert shapes_plain == [(4, 3, SIZE, SIZE)] * 2 + [(2, 3, SIZE, SIZE)]
    assert shapes == [(4, 3, SIZE, SIZE)] * 3 and padded.shape == (10, CLASSES)
    torch.testing.assert_close(padded, plain)
    small = evaluation.predict_logits(model, images[:3], eval_transform, batch_size=4, pad_last_batch=True)
    torch.testing.assert_close(small, plain[:3])  # a split smaller than a batch is not padded up to it


def test_a_failing_compilation_falls_back_to_the_uncompiled_step(monkeypatch, capsys):
    def broken_compile(fn, **kwargs):
        def raises(*args, **kw):
            raise RuntimeError("Inductor exploded\nwith a long traceback")
        return raises

    reference = make_step(compile=False)
    expected = run_epoch(reference)
    monkeypatch.setattr(torch, "compile", broken_compile)
    step = make_step(compile=True)
    losses = run_epoch(step)
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if "torch.compile failed" in line]
    assert lines == ["nla_fast: torch.compile failed (RuntimeError: Inductor exploded); running the uncompiled step"]
    assert not step.compiled and "torch.compile failed" in step.note
    # the failed attempt left no trace: the same random draws, the same weights, bit for bit
    assert torch.equal(losses, expected)
    for p, q in zip(reference.model.parameters(), step.model.parameters()):
        assert torch.equal(p, q)
    images, labels = eval_split(6)
    assert step.evaluate(images, labels, eval_transform, CLASSES, batch_size=4)["num_samples"] == 6


def test_a_compilation_failing_in_the_backward_is_undone(monkeypatch, capsys):
    """AOTAutograd compiles the backward at the first backward: by then the augmentation has
    drawn and the gradients are being written; the fallback must undo both."""

    class BackwardFails(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            raise RuntimeError("backward compilation failed")

    def compile_with_broken_backward(fn, **kwargs):
        if isinstance(fn, torch.nn.Module):
            return fn

        def forward(*args):
            loss, *rest = fn(*args)
            return (BackwardFails.apply(loss), *rest)
        return forward

    expected = run_epoch(make_step(compile=False))
    monkeypatch.setattr(torch, "compile", compile_with_broken_backward)
    step = make_step(compile=True)
    assert torch.equal(run_epoch(step), expected)
    assert "backward compilation failed" in capsys.readouterr().out and not step.compiled


def test_failing_evaluation_compile_falls_back(monkeypatch, capsys):
    def compile_breaks_modules(fn, **kwargs):
        if not isinstance(fn, torch.nn.Module):
            return fn

        class Broken(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.inner = fn

            def forward(self, x):
                raise RuntimeError("no C++ compiler")
        return Broken()

    monkeypatch.setattr(torch, "compile", compile_breaks_modules)
    step = make_step(compile=True)
    images, labels = eval_split(6)
    result = step.evaluate(images, labels, eval_transform, CLASSES, batch_size=4)
    plain = evaluation.evaluate(step.eval_model, images, labels, eval_transform, CLASSES, batch_size=4)
    assert result["confusion"] == plain["confusion"]
    assert "torch.compile failed for evaluation (RuntimeError: no C++ compiler)" in capsys.readouterr().out
    assert step.eval_forward is None


# ----------------------------------------------------------------------------------------------
TINY = ["--dataset", "synthetic", "--num-samples", "32", "--image-size", "32", "--batch-size", "8",
        "--limit-test", "20", "--eval-batch-size", "8", "--backend", "reference", "--device", "cpu",
        "--no-progress", "--plot-every", "0", "--seed", "3", "--compile"]
TIMING = {"samples_per_s", "seconds", "train_seconds", "eval_seconds", "first_step_s"}


@pytest.mark.slow
def test_compiled_trainer_on_cpu_resumes_exactly_and_compiles_once(tmp_path, monkeypatch, capsys):
    """ResNet-18 at 32 px through ``python -m nla_fast.train --compile``: minutes with a cold
    Inductor cache on 2 cores, about a minute warm."""
    monkeypatch.setenv("NLA_FAST_CACHE", str(tmp_path / "cache"))
    graphs_after_epoch = []
    real_record = train.record

    def record(*args, **kwargs):
        graphs_after_epoch.append(unique_graphs())
        return real_record(*args, **kwargs)

    monkeypatch.setattr(train, "record", record)
    full, part = tmp_path / "full", tmp_path / "part"
    assert train.main(TINY + ["--out", str(full), "--epochs", "2"]) == 0
    out = capsys.readouterr().out
    assert "torch.compile failed" not in out and "compiling with Inductor" in out
    assert graphs_after_epoch[1] == graphs_after_epoch[0]  # epoch 1 (and its 20 = 8 + 8 + 4 test images) recompiled nothing
    rows = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["compiled"] and rows[0]["first_step_s"] > 0 and rows[1]["first_step_s"] is None
    assert rows[0]["test_samples"] == 20

    assert train.main(TINY + ["--out", str(part), "--epochs", "1"]) == 0
    assert train.main(["--resume", str(part / "last.pt"), "--epochs", "2", "--no-progress"]) == 0
    resumed = [json.loads(line) for line in (part / "metrics.jsonl").read_text().splitlines()]
    strip = lambda rows: [{k: v for k, v in r.items() if k not in TIMING} for r in rows]  # noqa: E731
    assert strip(resumed) == strip(rows)
    a = torch.load(full / "last.pt", weights_only=True)["model"]
    b = torch.load(part / "last.pt", weights_only=True)["model"]
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_a_loss_kernel_that_inductor_rejects_falls_back_to_the_compiled_plain_loss(monkeypatch, capsys):
    """torch 2.11's Inductor rejected the Triton loss kernel (an fp64 scalar leaking into an fp32
    loop variable): the step then compiles the plain PyTorch loss, and only if that fails too
    runs uncompiled."""
    compiled_backends = []

    def compile_rejecting_fused_loss(fn, **kwargs):
        if isinstance(fn, torch.nn.Module):
            return fn
        step = fn.__self__

        def forward(*args):
            if step.loss_backend != "reference":
                raise AssertionError("Loop-carried variable acc has initial type fp32 but is re-assigned to fp64")
            compiled_backends.append(step.loss_backend)
            return fn(*args)
        return forward

    monkeypatch.setattr(torch, "compile", compile_rejecting_fused_loss)
    step = make_step(compile=True)
    step.loss_backend = "extension"  # as resolve_backend would answer on a machine with the fused kernels
    run_epoch(step)
    assert step.compiled and compiled_backends and set(compiled_backends) == {"reference"}
    out = capsys.readouterr().out
    assert "compiling the plain PyTorch loss instead" in out and "running the uncompiled step" not in out


def test_an_error_of_the_uncompiled_step_is_raised_not_retried(monkeypatch):
    def broken_compile(fn, **kwargs):
        def raises(*args, **kw):
            raise RuntimeError("compile failed")
        return raises

    monkeypatch.setattr(torch, "compile", broken_compile)
    step = make_step(compile=True)
    monkeypatch.setattr(engine, "nla_loss", lambda *a, **k: (_ for _ in ()).throw(ValueError("bad labels")))
    with pytest.raises(ValueError, match="bad labels"):
        step()
