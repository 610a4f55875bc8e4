"""Checks of values that live on the device, without making the host wait for it.

A training step must never wait for the GPU: a host sync makes the host idle until the whole
network's forward has run before it can queue the backward, and it makes the step impossible to
capture in a CUDA graph. So the checks of the Triton backend's values (labels outside [0, C), a
given recall outside [0, 1]) are *deferred*: the kernel records what it found in a small device
tensor, which is copied to pinned host memory asynchronously with an event behind it; the first
fused call after that step's device work has completed (an event query, never a wait: in practice
one or two steps later) raises the ``ValueError``, naming the value. :func:`check_deferred` raises
at once, waiting for the device. Until then a step with bad labels treats them as ignored.

Where no Python runs when the work runs — inside ``torch.compile`` graphs and CUDA-graph capture —
the check is a device assertion instead (``torch._assert_async``: a ``RuntimeError`` that cannot
name the value). The Triton backend defers on every device (the interpreter's CPU tensors too, so
the mechanism runs in the CPU test suite); on CPU the "event" is complete at once. The C++ backend
and the reference check immediately: on the CPU that costs nothing.
"""

import collections

import torch

__all__ = ["check_deferred", "labels", "flag", "poll", "pending"]

_queue = (
    collections.deque()
)  # (message, None) done at once, or (numpy view of a pinned slot, event, describe, slot)
_free_slots = {}  # device -> pinned (2,) int64 host tensors to reuse, with their numpy views


def _now():
    """True where the check must be a device assertion: a graph being traced or captured."""
    return torch.compiler.is_compiling()


def _capturing(t):
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def _submit(values, describe):
    """Queue the (2,) int64 tensor ``values`` for ``describe`` once the device has written it. Queued
    entries hold numpy views of host memory, so that reading them later needs no torch call (a later
    call may run under torch.func, where torch calls see wrapped tensors)."""
    if not values.is_cuda:
        # the interpreter's CPU tensors: computed already, read now (only a failed check is queued)
        message = describe(values.numpy())
        if message is not None:
            _queue.append((message, None))
        return
    free = _free_slots.setdefault(values.device, [])
    if free:
        slot, view = free.pop()
    else:
        slot = torch.empty(2, dtype=torch.int64, pin_memory=True)
        view = slot.numpy()
    slot.copy_(values, non_blocking=True)
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(values.device))
    _queue.append((view, event, describe, slot, values.device))


def _label_message(C, ignore_index):
    def describe(v):
        n, value = int(v[0]), int(v[1])
        if n == 0:
            return None
        return (
            f"target contains label {value} outside [0, {C}) ({n} such label{'s' if n != 1 else ''}, the "
            f"largest shown; ignore_index={ignore_index}); found by the check of an earlier call's labels, "
            f"which treated them as ignored"
        )

    return describe


def labels(bad, C, ignore_index):
    """Check the forward op's ``bad`` (2,) int64 (count, largest) of the Triton backend: deferred, or a
    device assertion in a traced graph or a CUDA-graph capture."""
    if _now() or _capturing(bad):
        torch._assert_async(bad[0] == 0, "target contains a label outside [0, C) that is not ignore_index")
        return
    _submit(bad, _label_message(C, ignore_index))


def flag(ok, message):
    """Check a boolean 0-dim device tensor ``ok``: a ``ValueError(message)`` when it is False, deferred
    as :func:`labels` (CPU tensors are the caller's to check at once)."""
    if _now() or _capturing(ok):
        torch._assert_async(ok, message)
        return
    values = torch.stack([ok.to(torch.int64), ok.new_zeros((), dtype=torch.int64)])
    _submit(values, lambda v: None if int(v[0]) else message)


def _finish(entry):
    """Release an entry's slot and return its error message (None when the check passed)."""
    if entry[1] is None:
        return entry[0]
    view, _, describe, slot, device = entry
    message = describe(view)
    _free_slots.setdefault(device, []).append((slot, view))
    return message


def poll():
    """Raise the first failed check whose device work has completed; never waits. Every fused call
    runs it first (not while a CUDA graph is captured: no event may be queried then)."""
    if not _queue or (torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing()):
        return
    while _queue:
        entry = _queue[0]
        if entry[1] is not None and not entry[1].query():
            return
        _queue.popleft()
        message = _finish(entry)
        if message is not None:
            raise ValueError(message)


def check_deferred():
    """Wait for the device work of every fused call so far and raise the ``ValueError`` of the first
    one whose values failed a deferred check (a label outside [0, C) that is not ``ignore_index``, a
    recall outside [0, 1]). Call it where a step may wait — at the end of an epoch, before saving a
    checkpoint, in a test — to learn at once what a training loop learns a step or two later."""
    while _queue:
        entry = _queue.popleft()
        if entry[1] is not None:
            entry[1].synchronize()
        message = _finish(entry)
        if message is not None:
            raise ValueError(message)


def pending():
    """How many deferred checks have not been made yet."""
    return len(_queue)
