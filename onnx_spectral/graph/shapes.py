"""Tensor shapes that ONNX shape inference cannot tell, taken from ONNX Runtime runs.

Some exporters (Paddle2ONNX) write graphs whose shapes inference loses (computed `Reshape`
targets, dims named "?"), while ONNX Runtime runs them. `fill_missing_shapes` completes the
value_info of such a model from runs on one calibration sample; `concrete_shapes` gives the
static shape of every tensor at a given input size (for costs at the deployment shape).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import onnx
from onnx import helper

from onnx_spectral.errors import DataError
from onnx_spectral.graph import external_tensors
from onnx_spectral.graph.executor import Run, batching_problem
from onnx_spectral.graph.sessions import open_session

Feeds = Mapping[str, np.ndarray]
"""Model input name -> array with samples on axis 0."""
InputShapes = Mapping[str, tuple[int, ...]]
"""Model input name -> its full static shape, samples first."""

BATCH_DIM = "batch"
"""dim_param written for a filled dimension that follows the batch size."""
_UNKNOWN_PREFIX = "unk__"
"""Prefix of the dim_params ONNX shape inference invents for sizes it cannot tell."""


def observed_shapes(model: onnx.ModelProto, feeds: Feeds,
                    tensors: Iterable[str] | None = None) -> dict[str, tuple[int, ...]]:
    """Shapes of `tensors` (default: every node output of the main graph) in one ONNX Runtime
    run of `model` on `feeds` (CPU)."""
    return {name: tuple(int(d) for d in np.shape(value))
            for name, value in _run(model, feeds, tensors).items()}


def _run(model: onnx.ModelProto, feeds: Feeds, tensors: Iterable[str] | None
         ) -> dict[str, np.ndarray]:
    names = list(dict.fromkeys(
        tensors if tensors is not None
        else (name for node in model.graph.node for name in node.output if name)))
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    declared = {value.name for value in probe.graph.output}
    probe.graph.output.extend(onnx.ValueInfoProto(name=name) for name in names
                              if name not in declared)
    try:
        session = open_session(probe, "cpu")
        results = session.run(names, dict(feeds))
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidArgument types
        raise DataError(f"ONNX Runtime cannot run the model on the first calibration sample "
                        f"(to read tensors {names[:3]}): {exc}") from exc
    return dict(zip(names, (np.asarray(value) for value in results), strict=True))


def declared_dims(value: onnx.ValueInfoProto) -> tuple[int | None, ...]:
    """A tensor's declared dims, None for one left open (symbolic, unknown or negative)."""
    return tuple(dim.dim_value if dim.HasField("dim_value") and dim.dim_value >= 0 else None
                 for dim in value.type.tensor_type.shape.dim)


def declared_input_shapes(model: onnx.ModelProto) -> dict[str, tuple[int | None, ...]]:
    """The declared dims of each graph input that is not an initializer; an input of unknown
    rank is left out."""
    initializers = {tensor.name for tensor in model.graph.initializer}
    return {value.name: declared_dims(value) for value in model.graph.input
            if value.name not in initializers and value.type.tensor_type.HasField("shape")}


def missing_shapes(model: onnx.ModelProto) -> tuple[str, ...]:
    """Node outputs of the main graph (graph outputs excepted) whose value_info is absent, has
    no rank, or has a dimension with neither a size nor a name, or with a name that shape
    inference invented for an unknown size ("unk__0")."""
    known = {value.name: value for value in model.graph.value_info}
    outputs = {value.name for value in model.graph.output}
    missing = []
    for node in model.graph.node:
        for name in node.output:
            if name and name not in outputs and not _complete(known.get(name)):
                missing.append(name)
    return tuple(missing)


def _complete(value: onnx.ValueInfoProto | None) -> bool:
    if value is None or not value.type.HasField("tensor_type"):
        return False
    tensor = value.type.tensor_type
    return tensor.HasField("shape") and all(_told(dim) for dim in tensor.shape.dim)


def _told(dim: onnx.TensorShapeProto.Dimension) -> bool:
    """Whether a dimension has a size or a name of its own (not one invented by inference)."""
    if dim.HasField("dim_value"):
        return dim.dim_value >= 0
    return dim.HasField("dim_param") and not dim.dim_param.startswith(_UNKNOWN_PREFIX)


def fill_missing_shapes(model: onnx.ModelProto, feeds: Feeds) -> tuple[str, ...]:
    """Complete, in place, the value_info of the tensors `missing_shapes` lists from runs on
    the first sample of `feeds`; returns their names.

    Dimensions inference names or sizes are kept; the others take the observed size, except
    those that change when the sample is fed twice (dynamic batch inputs), which become the
    symbolic `BATCH_DIM`.
    """
    missing = missing_shapes(model)
    if not missing:
        return ()
    single = first_sample(model, feeds)
    doubled = None if single is feeds else _doubled(model, single)
    observed = _run(model, single, missing)
    twice = observed_shapes(model, doubled, missing) if doubled is not None else {}
    known = {value.name: value for value in model.graph.value_info}
    for name in missing:
        value = observed[name]
        batch_axes = {axis for axis, (one, two) in enumerate(zip(
            value.shape, twice.get(name, value.shape), strict=False)) if one != two}
        filled = _filled(name, value, batch_axes, known.get(name))
        if name in known:
            known[name].CopyFrom(filled)
        else:
            model.graph.value_info.append(filled)
    return missing


def first_sample(model: onnx.ModelProto, feeds: Feeds) -> Feeds:
    """The first sample of each batched feed ([1, ...]); `feeds` itself when it is a run (no
    sample axis to take one sample from: see `graph.executor.Run`)."""
    if isinstance(feeds, Run) or batching_problem(declared_input_shapes(model)) is not None:
        return feeds
    return {name: _first_sample(np.asarray(value)) for name, value in feeds.items()}


def tensor_values(model: onnx.ModelProto, feeds: Feeds, tensors: Iterable[str]
                  ) -> dict[str, np.ndarray]:
    """Values of main-graph `tensors` in one ONNX Runtime run of `model` on `feeds` (CPU)."""
    return _run(model, feeds, tensors)


def _first_sample(value: np.ndarray) -> np.ndarray:
    """The first sample of a batched feed ([1, ...]); a scalar feed (rank 0) as it is."""
    return value[:1] if value.ndim else value


def _doubled(model: onnx.ModelProto, single: Feeds) -> dict[str, np.ndarray] | None:
    """`single` with its sample repeated on the inputs whose axis 0 is dynamic; None when no
    input has a dynamic axis 0 (nothing then follows the batch size)."""
    dynamic = set()
    for value in model.graph.input:
        dims = value.type.tensor_type.shape.dim
        if value.name in single and dims and not (dims[0].HasField("dim_value")
                                                  and dims[0].dim_value > 0):
            dynamic.add(value.name)
    if not dynamic:
        return None
    return {name: np.concatenate([array, array]) if name in dynamic else array
            for name, array in single.items()}


def _filled(name: str, value: np.ndarray, batch_axes: set[int],
            declared: onnx.ValueInfoProto | None) -> onnx.ValueInfoProto:
    old = None
    if declared is not None and declared.type.tensor_type.HasField("shape"):
        old = list(declared.type.tensor_type.shape.dim)
        if len(old) != value.ndim:
            old = None
    dims: list[int | str] = []
    for axis, size in enumerate(value.shape):
        previous = None if old is None else old[axis]
        if previous is not None and _told(previous):
            dims.append(previous.dim_param or int(previous.dim_value))
        else:
            dims.append(BATCH_DIM if axis in batch_axes else int(size))
    elem_type = (declared.type.tensor_type.elem_type if declared is not None
                 and declared.type.tensor_type.elem_type else
                 helper.np_dtype_to_tensor_dtype(value.dtype))
    return helper.make_tensor_value_info(name, elem_type, dims)


def concrete_shapes(model: onnx.ModelProto, inputs: Feeds | InputShapes
                    ) -> dict[str, tuple[int, ...]]:
    """Static shape of every tensor of the main graph (inputs, initializers, node outputs) when
    the graph inputs have the given shapes.

    `inputs` maps each graph input (initializers listed as inputs excepted) to an array or to
    its full shape, samples first. The symbolic input dims are fixed to those sizes and shape
    inference runs with data propagation; what it still cannot tell comes from an ONNX Runtime
    run on the given arrays, or, when only shapes are given, on zeros of those shapes.
    """
    shapes = {name: tuple(int(d) for d in (value if isinstance(value, tuple)
                                             else np.shape(value)))
              for name, value in inputs.items()}
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    _fix_inputs(fixed, shapes)
    del fixed.graph.value_info[:]
    try:
        inferred = external_tensors.infer_shapes(fixed, data_prop=True)
    except Exception:  # inference refuses the graph: every shape then comes from the run
        inferred = fixed
    result = {tensor.name: tuple(int(d) for d in tensor.dims)
              for tensor in inferred.graph.initializer}
    for value in (*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output):
        if _static(value):
            result[value.name] = tuple(int(d.dim_value)
                                       for d in value.type.tensor_type.shape.dim)
    unknown = [name for node in model.graph.node for name in node.output
               if name and name not in result]
    if unknown:  # run on the model as declared: static input dims can make ONNX Runtime's
        # inference of an If branch not taken fail (Silero VAD's 8 kHz branch at 16 kHz sizes)
        result.update(observed_shapes(model, _run_feeds(fixed, inputs), unknown))
    return result


def _fix_inputs(model: onnx.ModelProto, shapes: Mapping[str, tuple[int, ...]]) -> None:
    initializers = {tensor.name for tensor in model.graph.initializer}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        if value.name not in shapes:
            raise DataError(f"no shape given for model input '{value.name}'; given: "
                            f"{sorted(shapes)}")
        dims = value.type.tensor_type.shape.dim
        shape = shapes[value.name]
        if len(dims) != len(shape):
            raise DataError(f"model input '{value.name}' has rank {len(dims)}, the given shape "
                            f"{shape} has rank {len(shape)}")
        for dim, size in zip(dims, shape, strict=True):
            dim.Clear()
            dim.dim_value = size


def _static(value: onnx.ValueInfoProto) -> bool:
    tensor = value.type.tensor_type
    return (value.type.HasField("tensor_type") and tensor.HasField("shape")
            and all(dim.HasField("dim_value") and dim.dim_value >= 0 for dim in tensor.shape.dim))


def _run_feeds(model: onnx.ModelProto, inputs: Feeds | InputShapes) -> dict[str, np.ndarray]:
    """The given arrays, or zeros of the given shapes in each input's element type."""
    feeds = {}
    for value in model.graph.input:
        given = inputs.get(value.name)
        if given is None:
            continue
        if isinstance(given, tuple):
            dtype = helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)
            feeds[value.name] = np.zeros(given, dtype)
        else:
            feeds[value.name] = np.asarray(given)
    return feeds
