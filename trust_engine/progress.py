"""The one progress / interrupt protocol the CLI, ComfyUI and AUTOMATIC1111 plug into, and a NaN/Inf step guard.
The engine calls a ProgressCallback with a ProgressEvent; a host stops a run by raising from that callback.

Interruption: a callback may raise ANY exception (ComfyUI raises its own InterruptProcessingException from
`throw_exception_if_processing_interrupted()`); the engine cleans up (the host model stays bit-identical) and lets
it propagate unchanged. Hosts without an exception of their own raise `Interrupted`, e.g. via `stop_flag_callback`.
"""

from __future__ import annotations

import math
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TextIO

import torch


@dataclass(frozen=True)
class ProgressEvent:
    """One report from the engine: `step` of `total` in `stage` done, with the latest metrics."""

    stage: str  # "saliency", "unlearn", "evaluate", ...
    step: int  # steps done so far in this stage, 0..total
    total: int  # steps in this stage; 0 = unknown
    metrics: dict[str, float] = field(default_factory=dict)  # e.g. {"loss": 0.12, "lr": 1e-5}
    message: str = ""

    @property
    def finished(self) -> bool:
        """True when this event reports the last step of its stage."""
        return self.total > 0 and self.step >= self.total


ProgressCallback = Callable[[ProgressEvent], None]


class Interrupted(Exception):
    """The user stopped the run; raised by a progress callback of a host that has no interrupt exception of its own."""


def null_progress(event: ProgressEvent) -> None:
    """A callback that ignores every event."""


def combine(*callbacks: ProgressCallback | None) -> ProgressCallback:
    """One callback calling each given one in order (None entries skipped); an exception stops the chain and propagates."""
    chain = tuple(c for c in callbacks if c is not None)
    if not chain:
        return null_progress
    if len(chain) == 1:
        return chain[0]

    def combined(event: ProgressEvent) -> None:
        for callback in chain:
            callback(event)

    return combined


def stop_flag_callback(flag: threading.Event, message: str = "stopped by the user") -> ProgressCallback:
    """A callback that raises `Interrupted(message)` once `flag` is set (e.g. by a Stop button on another thread)."""

    def check(event: ProgressEvent) -> None:
        if flag.is_set():
            raise Interrupted(f"{message} (during {event.stage}, step {event.step}/{event.total})")

    return check


def format_seconds(seconds: float) -> str:
    """'0:07', '12:34' or '1:02:03'."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    whole = int(round(seconds))
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def format_metrics(metrics: Mapping[str, float]) -> str:
    """'loss=0.1235 lr=1e-05': four significant digits, in the engine's order."""
    return " ".join(f"{name}={value:.4g}" for name, value in metrics.items())


class TextProgress:
    """A single-line, carriage-return-updated progress bar for a terminal; see `text_progress`."""

    def __init__(self, stream: TextIO | None = None, width: int = 20, clock: Callable[[], float] = time.monotonic):
        self.stream = stream  # None = sys.stderr at the time of writing (so redirection and test capture work)
        self.width = width
        self.clock = clock
        self._stage: str | None = None
        self._start = 0.0
        self._last_len = 0
        self._open = False  # a line is on screen without its final newline

    def __call__(self, event: ProgressEvent) -> None:
        stream = self.stream or sys.stderr
        now = self.clock()
        if event.stage != self._stage:
            if self._open:
                stream.write("\n")  # the previous stage ended without a final event: keep its last line
            self._stage, self._start, self._last_len, self._open = event.stage, now, 0, False
        line = self.render(event, now - self._start)
        stream.write("\r" + line + " " * max(0, self._last_len - len(line)))  # pad to erase a longer previous line
        self._last_len = len(line)
        self._open = True
        if event.finished:
            stream.write("\n")
            self._stage, self._open = None, False
        stream.flush()

    def render(self, event: ProgressEvent, elapsed: float) -> str:
        """The line for one event, without the leading carriage return."""
        parts = [event.stage]
        if event.total > 0:
            done = min(max(event.step, 0), event.total)
            filled = round(self.width * done / event.total)
            parts.append("[" + "#" * filled + "." * (self.width - filled) + "]")
            parts.append(f"{event.step}/{event.total}")
            remaining = elapsed / event.step * (event.total - event.step) if event.step > 0 else float("nan")
            parts.append(f"{format_seconds(elapsed)} eta {format_seconds(remaining)}")
        else:
            parts.append(f"{event.step}")
            parts.append(format_seconds(elapsed))
        if event.metrics:
            parts.append(format_metrics(event.metrics))
        if event.message:
            parts.append(event.message)
        return " ".join(parts)


def text_progress(stream: TextIO | None = None, width: int = 20) -> ProgressCallback:
    """The CLI's progress bar: `unlearn [########............] 8/20 0:16 eta 0:24 loss=0.1235 lr=1e-05`.

    One line per stage, rewritten in place with '\\r' (elapsed time, then the ETA); a newline ends a finished stage.
    `stream` defaults to sys.stderr.
    """
    return TextProgress(stream, width)


class DivergedError(RuntimeError):
    """Training produced non-finite values too many steps in a row; the message says what to change."""


@dataclass
class NanGuard:
    """Skips training steps whose loss or gradients are NaN/Inf and backs the learning rate off.

    In the training loop, after backward():

        if guard.check(loss, params):      # True: all finite
            optimizer.step()
        else:
            guard.on_bad_step(optimizer, step)   # skip, lr *= lr_factor; raises DivergedError when it keeps happening
        optimizer.zero_grad()

    `messages` collects one line per skipped step for the run's report.
    """

    lr_factor: float = 0.5  # the learning rate is multiplied by this after each bad step
    max_consecutive: int = 5  # this many bad steps in a row raise DivergedError
    bad_steps: int = 0  # bad steps in the whole run
    consecutive: int = 0  # bad steps since the last good one
    messages: list[str] = field(default_factory=list)
    _what: str = field(default="", repr=False)  # what the last failed check found non-finite

    def __post_init__(self) -> None:
        if not 0.0 < self.lr_factor <= 1.0:
            raise ValueError(f"lr_factor must be in (0, 1], got {self.lr_factor}")
        if self.max_consecutive < 1:
            raise ValueError(f"max_consecutive must be at least 1, got {self.max_consecutive}")

    def check(self, loss: torch.Tensor | float, tensors: Iterable[torch.Tensor | None] = ()) -> bool:
        """True if the loss and every tensor (and the .grad of any tensor that has one) are finite; False = skip.

        Pass parameters (their values and gradients are checked) or gradients directly; None entries are ignored.
        A True result resets the count of consecutive bad steps.
        """
        problems = []
        if isinstance(loss, torch.Tensor):
            finite_loss = bool(torch.isfinite(loss.detach()).all())
        else:
            finite_loss = math.isfinite(float(loss))
        if not finite_loss:
            problems.append("loss")
        given = [t for t in tensors if t is not None]  # a generator (model.parameters()) is read once
        values = [t.detach() for t in given]
        grads = [t.grad.detach() for t in given if t.grad is not None]
        # one device sync for all tensors, not one per tensor
        if values and not bool(torch.stack([torch.isfinite(v).all() for v in values]).all()):
            problems.append("parameters" if any(t.requires_grad for t in given) else "gradients")
        if grads and not bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()):
            problems.append("gradients")
        if problems:
            self._what = " and ".join(dict.fromkeys(problems))
            return False
        self.consecutive = 0
        return True

    def on_bad_step(self, optimizer: torch.optim.Optimizer, step: int | None = None) -> None:
        """Count a skipped step, multiply every parameter group's learning rate by `lr_factor`, note it.

        Raises DivergedError after `max_consecutive` bad steps in a row.
        """
        self.bad_steps += 1
        self.consecutive += 1
        old = [float(group["lr"]) for group in optimizer.param_groups]
        for group in optimizer.param_groups:
            group["lr"] = float(group["lr"]) * self.lr_factor
        new = [float(group["lr"]) for group in optimizer.param_groups]
        where = f"step {step}" if step is not None else f"bad step {self.bad_steps}"
        what = self._what or "loss or gradients"
        self.messages.append(f"{where}: non-finite {what}; step skipped, learning rate {_lrs(old)} -> {_lrs(new)}")
        self._what = ""
        if self.consecutive >= self.max_consecutive:
            raise DivergedError(
                f"training diverged: {self.consecutive} steps in a row gave non-finite {what} although the learning "
                f"rate was cut to {_lrs(new)}. Lower the learning rate (e.g. 10x) or the regularisation weight "
                "beta and run again; if the model runs in float16, try float32 (or bfloat16)."
            )

    def summary(self) -> str:
        """One line for the run's report."""
        if not self.bad_steps:
            return "no non-finite steps"
        return f"{self.bad_steps} non-finite step(s) skipped; last: {self.messages[-1]}"


def _lrs(values: list[float]) -> str:
    distinct = list(dict.fromkeys(values))
    return ", ".join(f"{v:.3g}" for v in distinct)
