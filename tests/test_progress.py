"""Progress protocol: events, the CLI text bar, combining callbacks, interruption, and the NaN/Inf step guard."""

import io
import threading

import pytest
import torch

from trust_engine.progress import (
    DivergedError,
    Interrupted,
    NanGuard,
    ProgressEvent,
    TextProgress,
    combine,
    format_seconds,
    null_progress,
    stop_flag_callback,
    text_progress,
)

torch.set_num_threads(1)


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_text_bar_shows_stage_steps_times_and_metrics():
    """A step line is '\\r' + stage, bar, step/total, elapsed, ETA and compact metrics, with no newline."""
    out, clock = io.StringIO(), FakeClock()
    bar = TextProgress(out, width=10, clock=clock)
    bar(ProgressEvent("unlearn", 0, 20))
    clock.now += 16.0
    bar(ProgressEvent("unlearn", 8, 20, {"loss": 0.123456, "lr": 1e-5}))
    lines = out.getvalue().split("\r")
    assert lines[1].rstrip() == "unlearn [..........] 0/20 0:00 eta ?"
    assert lines[2].rstrip() == "unlearn [####......] 8/20 0:16 eta 0:24 loss=0.1235 lr=1e-05"
    assert "\n" not in out.getvalue()


def test_text_bar_finishes_stage_with_newline_and_restarts_clock():
    """The last step of a stage ends the line; the next stage starts its own line and elapsed time."""
    out, clock = io.StringIO(), FakeClock()
    bar = TextProgress(out, width=4, clock=clock)
    bar(ProgressEvent("saliency", 1, 2))
    clock.now += 65
    bar(ProgressEvent("saliency", 2, 2, message="done"))
    clock.now += 3
    bar(ProgressEvent("unlearn", 1, 4))
    text = out.getvalue()
    assert "\rsaliency [####] 2/2 1:05 eta 0:00 done\n" in text
    assert text.endswith("\runlearn [#...] 1/4 0:00 eta 0:00")


def test_text_bar_pads_over_longer_previous_line_and_ends_unfinished_stage():
    """A shorter line is padded to erase the previous one; a new stage without a final event gets a newline first."""
    out, clock = io.StringIO(), FakeClock()
    bar = TextProgress(out, width=2, clock=clock)
    bar(ProgressEvent("evaluate", 1, 3, message="a long message here"))
    bar(ProgressEvent("evaluate", 2, 3))
    bar(ProgressEvent("save", 0, 0))
    first, second, third = out.getvalue().split("\r")[1:]
    assert second.endswith(" \n") and len(second) == len(first) + 1  # padded, then ended by the next stage
    assert third == "save 0 0:00"
    assert out.getvalue().count("\n") == 1 and "\n\rsave" in out.getvalue()


def test_text_progress_defaults_to_stderr(capsys):
    """text_progress() writes to sys.stderr, not stdout."""
    text_progress()(ProgressEvent("unlearn", 1, 1))
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("\runlearn [") and captured.err.endswith("\n")


def test_format_seconds():
    """Seconds print as m:ss or h:mm:ss; unknown as '?'."""
    assert [format_seconds(s) for s in (7, 754, 3723, float("nan"))] == ["0:07", "12:34", "1:02:03", "?"]


def test_combine_calls_in_order_and_skips_none():
    """combine() calls its callbacks in the given order, skipping None; with none it is null_progress."""
    calls = []
    cb = combine(lambda e: calls.append(("a", e.step)), None, lambda e: calls.append(("b", e.step)))
    cb(ProgressEvent("unlearn", 1, 2))
    cb(ProgressEvent("unlearn", 2, 2))
    assert calls == [("a", 1), ("b", 1), ("a", 2), ("b", 2)]
    assert combine() is null_progress and combine(None) is null_progress


def test_exception_from_a_callback_propagates_and_stops_the_chain():
    """A host's own interrupt exception passes through combine() unchanged; later callbacks are not called."""

    class InterruptProcessingException(Exception):  # what ComfyUI raises
        pass

    def host(event):
        raise InterruptProcessingException()

    later = []
    cb = combine(host, lambda e: later.append(e))
    with pytest.raises(InterruptProcessingException):
        cb(ProgressEvent("unlearn", 3, 10))
    assert later == []


def test_stop_flag_callback_raises_interrupted_once_set():
    """stop_flag_callback does nothing until its flag is set, then raises Interrupted naming the stage."""
    flag = threading.Event()
    cb = stop_flag_callback(flag)
    cb(ProgressEvent("unlearn", 1, 10))
    flag.set()
    with pytest.raises(Interrupted, match=r"stopped by the user \(during unlearn, step 2/10\)"):
        cb(ProgressEvent("unlearn", 2, 10))


def test_event_finished():
    """An event is finished at its stage's last step; unknown totals never finish."""
    assert ProgressEvent("a", 5, 5).finished and not ProgressEvent("a", 4, 5).finished
    assert not ProgressEvent("a", 9, 0).finished


def _model_and_optimizer(lr: float = 0.1):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD([{"params": [model.weight]}, {"params": [model.bias], "lr": 0.2}], lr=lr)
    return model, optimizer


def _step(model, optimizer, guard, x, step=None) -> bool:
    loss = model(x).pow(2).mean()
    loss.backward()
    ok = guard.check(loss, model.parameters())
    if ok:
        optimizer.step()
    else:
        guard.on_bad_step(optimizer, step)
    optimizer.zero_grad()
    return ok


def test_nan_guard_passes_finite_steps():
    """Finite loss and gradients: check() is True and nothing is counted or changed."""
    model, optimizer = _model_and_optimizer()
    guard = NanGuard()
    assert _step(model, optimizer, guard, torch.ones(4, 3))
    assert guard.bad_steps == 0 and guard.messages == [] and optimizer.param_groups[0]["lr"] == 0.1
    assert guard.summary() == "no non-finite steps"


def test_nan_guard_skips_bad_step_and_halves_lr():
    """A NaN loss skips the step (weights unchanged), halves every group's lr and records a message."""
    model, optimizer = _model_and_optimizer()
    guard = NanGuard()
    before = [p.detach().clone() for p in model.parameters()]
    x = torch.ones(4, 3)
    x[0, 0] = float("nan")
    assert not _step(model, optimizer, guard, x, step=7)
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters()))
    assert [g["lr"] for g in optimizer.param_groups] == [0.05, 0.1]
    assert guard.bad_steps == 1 and guard.consecutive == 1
    assert guard.messages == [
        "step 7: non-finite loss and gradients; step skipped, learning rate 0.1, 0.2 -> 0.05, 0.1"
    ]
    assert "1 non-finite step(s) skipped" in guard.summary()


def test_nan_guard_checks_gradients_and_plain_grad_tensors():
    """An Inf gradient with a finite loss is caught, whether parameters or gradient tensors are passed."""
    guard = NanGuard()
    param = torch.nn.Parameter(torch.zeros(2))
    param.grad = torch.tensor([1.0, float("inf")])
    assert not guard.check(torch.tensor(0.5), [param])
    assert not guard.check(0.5, [param.grad, None])
    assert guard.check(0.5, [torch.zeros(2), None])
    assert not guard.check(float("inf"))


def test_nan_guard_good_step_resets_consecutive_count():
    """A good step between bad ones resets the run of consecutive bad steps, not the total."""
    model, optimizer = _model_and_optimizer()
    guard = NanGuard(max_consecutive=2)
    bad = torch.full((4, 3), float("nan"))
    _step(model, optimizer, guard, bad)
    _step(model, optimizer, guard, torch.ones(4, 3))
    _step(model, optimizer, guard, bad)
    assert guard.bad_steps == 2 and guard.consecutive == 1


def test_nan_guard_raises_diverged_after_max_consecutive():
    """After max_consecutive bad steps in a row it raises DivergedError telling the user to lower lr or beta."""
    model, optimizer = _model_and_optimizer()
    guard = NanGuard(max_consecutive=3, lr_factor=0.5)
    bad = torch.full((4, 3), float("nan"))
    _step(model, optimizer, guard, bad)
    _step(model, optimizer, guard, bad)
    with pytest.raises(DivergedError) as info:
        _step(model, optimizer, guard, bad)
    message = str(info.value)
    assert "3 steps in a row" in message and "Lower the learning rate" in message and "beta" in message
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**3)
    assert isinstance(info.value, RuntimeError) and guard.bad_steps == 3


def test_nan_guard_rejects_bad_settings():
    """lr_factor outside (0, 1] and max_consecutive < 1 are refused."""
    with pytest.raises(ValueError, match="lr_factor"):
        NanGuard(lr_factor=0.0)
    with pytest.raises(ValueError, match="max_consecutive"):
        NanGuard(max_consecutive=0)
