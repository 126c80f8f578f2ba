"""The input shapes a model's MACs are counted at: the user's `input_shape`, completed from the
calibration data."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from onnx_spectral.calibration.inputs import (
    InputSpec,
    SampleStream,
    batching_problem,
    fixed_batch_size,
)
from onnx_spectral.errors import OptionsError
from onnx_spectral.graph.shapes import Feeds, InputShapes

NamedShapes = Sequence[tuple[str, tuple[int, ...]]]
"""(input name, shape) pairs; the name "" stands for a single-input model's input."""

def deployment_inputs(specs: Sequence[InputSpec], input_shape: NamedShapes,
                      stream: SampleStream | None) -> Feeds | InputShapes | None:
    """What the MACs are counted at: the `input_shape` option's shapes, completed from one
    sample (one batch for a fixed batch size) of the calibration data; that sample itself when
    the option is not given; without data, the declared shapes where they are all fixed, else
    None (the declared shapes, batch 1).

    Raises:
        OptionsError: `input_shape` names an input the model lacks, gives one a rank or a
            fixed dim other than the model's, or leaves an input out with no data to fill it.
    """
    given = _named_input_shapes(specs, input_shape)
    batch = fixed_batch_size(specs) or 1
    if stream is not None and not given:  # real values: a scalar input may choose a branch
        return stream.peek(batch)
    runs = batching_problem(specs) is not None
    for spec in specs:  # inputs whose dims past the batch (a run's: all) are fixed need no data
        fixed = [dim for dim in spec.shape[0 if runs else 1:] if dim is not None]
        if spec.name not in given and len(fixed) == len(spec.shape) - (0 if runs else 1):
            given[spec.name] = tuple(fixed) if runs else (batch, *fixed)
    missing = [spec.name for spec in specs if spec.name not in given]
    if not missing:
        return given
    if stream is None:
        if not given:
            return None
        raise OptionsError(f"--input-shape gives no shape for the model inputs {missing}; "
                           "give one for each input (or calibration data)")
    sample = stream.peek(batch)
    return {**given, **{name: tuple(np.shape(sample[name])) for name in missing}}


def _named_input_shapes(specs: Sequence[InputSpec], input_shape: NamedShapes
                        ) -> dict[str, tuple[int, ...]]:
    """The `input_shape` option by input name, checked against the model's inputs."""
    names = [spec.name for spec in specs]
    given = dict(input_shape)
    if "" in given:  # a shape without a name: the single input's
        if len(specs) != 1:
            raise OptionsError(f"--input-shape {','.join(map(str, given['']))} has no input "
                               f"name and the model has {len(specs)} inputs {names}; write "
                               "NAME:D0,D1,...")
        given[specs[0].name] = given.pop("")
    for name, shape in given.items():
        spec = next((spec for spec in specs if spec.name == name), None)
        if spec is None:
            raise OptionsError(f"--input-shape names '{name}', not an input of the model; its "
                               f"inputs: {names}")
        if len(shape) != len(spec.shape) or any(
                dim is not None and dim != size
                for dim, size in zip(spec.shape, shape, strict=False)):
            declared = ["?" if dim is None else dim for dim in spec.shape]
            raise OptionsError(f"--input-shape {name}:{','.join(map(str, shape))} does not fit "
                               f"the model's input '{name}' {declared} ('?': any size)")
    return given
