"""Forward hooks as context managers that always remove themselves.

``capture`` reads module inputs/outputs; ``edit_output`` rewrites them.  Both accept modules that
return a plain tensor or a tuple whose first element is the hidden state (which depends on the
family and the transformers release: :mod:`rome_edit.models.compat`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from rome_edit.models.architectures import get_module
from rome_edit.models.compat import first_tensor, replace_first

EditFn = Callable[[torch.Tensor, str], torch.Tensor | None]
IOEditFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class StopForward(Exception):
    """Raised inside a hook to end a forward pass early (e.g. at the edit layer)."""


@dataclass
class Captured:
    """What ``capture`` recorded, by module name (the latest call wins)."""

    inputs: dict[str, torch.Tensor] = field(default_factory=dict)
    outputs: dict[str, torch.Tensor] = field(default_factory=dict)


@contextmanager
def capture(
    model: nn.Module,
    names: Sequence[str],
    inputs: bool = False,
    outputs: bool = True,
    detach: bool = True,
    stop_after: str | None = None,
) -> Iterator[Captured]:
    """Record the first positional input and/or the output of each named module.

    With ``stop_after`` the forward pass ends (``StopForward``, swallowed by
    :func:`run_until`) once that module has run, so statistics never pay for later layers.
    """
    record = Captured()
    handles = []

    def make_hook(name: str):
        def hook(module: nn.Module, args: tuple, output):
            if inputs:
                record.inputs[name] = args[0].detach() if detach else args[0]
            if outputs:
                out = first_tensor(output)
                record.outputs[name] = out.detach() if detach else out
            if name == stop_after:
                raise StopForward

        return hook

    try:
        for name in dict.fromkeys([*names, *([stop_after] if stop_after else [])]):
            handles.append(get_module(model, name).register_forward_hook(make_hook(name)))
        yield record
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def edit_output(model: nn.Module, edits: dict[str, EditFn]) -> Iterator[None]:
    """Pass each named module's output hidden state through ``fn(hidden, name)``.

    ``fn`` may modify the tensor in place and return ``None``, or return a replacement.
    """
    handles = []

    def make_hook(name: str, fn: EditFn):
        def hook(module: nn.Module, args: tuple, output):
            hidden = first_tensor(output)
            new = fn(hidden, name)
            return None if new is None else replace_first(output, new)

        return hook

    try:
        for name, fn in edits.items():
            handles.append(get_module(model, name).register_forward_hook(make_hook(name, fn)))
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def edit_from_input(model: nn.Module, edits: dict[str, IOEditFn]) -> Iterator[None]:
    """Replace each named module's output hidden state by ``fn(first_input, hidden)``."""
    handles = []

    def make_hook(fn: IOEditFn):
        def hook(module: nn.Module, args: tuple, output):
            return replace_first(output, fn(args[0], first_tensor(output)))

        return hook

    try:
        for name, fn in edits.items():
            handles.append(get_module(model, name).register_forward_hook(make_hook(fn)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def run_until(model: nn.Module, **inputs: torch.Tensor) -> None:
    """Run a forward pass that a ``stop_after`` hook may end early."""
    try:
        model(**inputs)
    except StopForward:
        pass
