"""Loading, normalizing and indexing an ONNX graph.

`load_model` reads and validates a model; `normalize` returns a copy in which every node has a
unique name, every constant (initializer, `Constant` node, or a subgraph computed only from
constants, such as the `pads` chains torch's exporter writes) is an initializer, and shapes are
inferred. Initializers also listed as graph inputs (the IR-3 convention of old exporters) are
constants by default; `initializer_inputs="input"` keeps them overridable instead.
`GraphIndex` answers the questions the analysis asks: who produces a tensor, who
consumes it, its static shape, and its constant value.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
from onnx import helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from onnx_spectral.errors import GraphError, ModelError
from onnx_spectral.graph import external_tensors
from onnx_spectral.graph.subgraphs import IMPLICIT_POSITION, outer_scope_names, used_names

Dim = int | None
"""A static dimension, or None when it is symbolic or unknown."""

_NONDETERMINISTIC_OPS = frozenset(
    {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial",
     "Bernoulli"}
)
_UNFOLDED_OPS = frozenset({"DequantizeLinear"})
"""Ops never folded on constant inputs: a dequantized weight must stay visibly quantized (the
analysis keeps quantized layers whole) rather than silently become a float weight."""
_MAX_FOLDED_ELEMENTS = 1 << 26

InitializerInputs = Literal["constant", "input"]
"""How initializers listed as graph inputs are read: as constant weights, or as inputs a user
may override at run time (their layers are then kept whole)."""
INITIALIZER_INPUTS: tuple[InitializerInputs, ...] = ("constant", "input")


def load_model(source: str | Path | onnx.ModelProto) -> onnx.ModelProto:
    """Read a model from a path (or copy a ModelProto) and run the ONNX checker on it."""
    if isinstance(source, onnx.ModelProto):
        model = onnx.ModelProto()
        model.CopyFrom(source)
    else:
        path = Path(source)
        if not path.is_file():
            raise ModelError(f"model file '{path}' does not exist (expected an .onnx file)")
        try:
            model = external_tensors.load(path)
        except Exception as exc:  # onnx raises DecodeError, OSError, ...
            raise ModelError(f"model file '{path}' is not a readable ONNX model: {exc}") from exc
    try:
        if isinstance(source, onnx.ModelProto):
            external_tensors.check_model(model)
        else:  # by path: works past 2 GB and checks the external data files
            onnx.checker.check_model(str(source))
    except Exception as exc:  # ValidationError, or protobuf errors on a damaged model
        raise ModelError(f"the input model fails the ONNX checker: {exc}") from exc
    check_opset(model)
    return model


MIN_OPSET = 9
"""Oldest default-domain opset accepted (the handlers read Pad/Resize/Split/Slice/Upsample from
their opset 9 forms on; older forms are not supported)."""
MAX_OPSET = onnx.defs.onnx_opset_version()
"""Newest opset the installed onnx package knows (its checker and shape inference)."""


def check_opset(model: onnx.ModelProto) -> None:
    """Raise ModelError unless the model's default-domain opset is in [MIN_OPSET, MAX_OPSET]."""
    version = opset_version(model)
    if not MIN_OPSET <= version <= MAX_OPSET:
        raise ModelError(f"the model imports opset {version}; accepted: opsets {MIN_OPSET} to "
                         f"{MAX_OPSET} (convert it with onnx.version_converter)")


def opset_version(model: onnx.ModelProto) -> int:
    """The default-domain opset the model imports."""
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    raise ModelError("the model imports no default-domain (ai.onnx) opset")


def normalize(model: onnx.ModelProto, initializer_inputs: InitializerInputs = "constant"
              ) -> onnx.ModelProto:
    """Copy of `model` with named nodes, constants folded into initializers and shapes inferred.

    `initializer_inputs="constant"` removes the graph.input entries of initializers (they are
    weights), so the copy and every model rewritten from it hold them as plain constants. The
    IR version is raised to 4 at least, the first that allows an initializer outside
    graph.input (folded constants are such initializers). The caller's model is not modified.
    """
    if initializer_inputs not in INITIALIZER_INPUTS:
        raise ModelError(f"initializer_inputs={initializer_inputs!r}; accepted: "
                         f"{', '.join(INITIALIZER_INPUTS)}")
    work = onnx.ModelProto()
    work.CopyFrom(model)
    work.ir_version = max(work.ir_version, 4)
    if initializer_inputs == "constant":
        _unlist_initializer_inputs(work)
    _name_nodes(work.graph)
    _dynamic_negative_dims(work.graph)
    _fold_constants(work)
    return infer_shapes(work)


def initializer_input_names(model: onnx.ModelProto) -> tuple[str, ...]:
    """Graph inputs that are also initializers (the IR-3 convention), in graph order."""
    initializers = {tensor.name for tensor in model.graph.initializer}
    return tuple(value.name for value in model.graph.input if value.name in initializers)


def initializer_inputs_note(model: onnx.ModelProto,
                            initializer_inputs: InitializerInputs = "constant") -> str | None:
    """A line for the report on initializers listed as graph inputs; None when there are none."""
    count = len(initializer_input_names(model))
    if not count:
        return None
    if initializer_inputs == "constant":
        return (f"{count} initializers listed as graph inputs are treated as constants (weights "
                "no caller overrides); the output lists them as initializers only")
    return (f"{count} initializers listed as graph inputs are kept as inputs a caller may "
            "override: the layers that read them are kept whole")


def _unlist_initializer_inputs(model: onnx.ModelProto) -> None:
    names = set(initializer_input_names(model))
    if not names:
        return
    kept = [value for value in model.graph.input if value.name not in names]
    del model.graph.input[:]
    model.graph.input.extend(kept)


def _dynamic_negative_dims(graph: onnx.GraphProto) -> None:
    """Some exporters (Paddle) write dim_value -1 for a dynamic dimension: make it symbolic."""
    for value in (*graph.input, *graph.output):
        for index, dim in enumerate(value.type.tensor_type.shape.dim):
            if dim.HasField("dim_value") and dim.dim_value < 0:
                dim.dim_param = f"{value.name}_dim{index}"


def infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Drop stale value_info and rerun strict ONNX shape inference with data propagation.

    The graph outputs keep their declared types (the interface); where inference tells more
    about an output, that goes to value_info.
    """
    del model.graph.value_info[:]
    declared = [onnx.ValueInfoProto() for _ in model.graph.output]
    for copy, value in zip(declared, model.graph.output, strict=True):
        copy.CopyFrom(value)
    try:
        inferred = external_tensors.infer_shapes(model, strict_mode=True, data_prop=True)
    except Exception as exc:
        # A declared output shape that the graph contradicts (ddddocr's OCR model declares
        # [1, seqlen] for a Reshape to rank 3; ONNX Runtime ignores it): infer without them.
        for value in model.graph.output:
            value.type.tensor_type.ClearField("shape")
        try:
            inferred = external_tensors.infer_shapes(model, strict_mode=True, data_prop=True)
        except Exception:
            raise ModelError(f"ONNX shape inference fails on the model: {exc}") from exc
    for value, before in zip(inferred.graph.output, declared, strict=True):
        if value != before:
            inferred.graph.value_info.append(value)
            value.CopyFrom(before)
    return inferred


def _name_nodes(graph: onnx.GraphProto) -> None:
    seen: set[str] = set()
    for index, node in enumerate(graph.node):
        name = node.name or f"{node.op_type}_{index}"
        while name in seen:
            name = f"{name}_{index}"
        node.name = name
        seen.add(name)


def _fold_constants(model: onnx.ModelProto) -> None:
    """Evaluate every node computed only from constants; its outputs become initializers."""
    graph = model.graph
    opset = opset_version(model)
    graph_inputs = {value.name for value in graph.input}
    constants = external_tensors.constants(graph.initializer, graph_inputs)
    static_shapes = _static_shapes(model)
    kept_nodes = []
    for node in graph.node:
        values = _evaluate_if_constant(node, constants, static_shapes, opset)
        if values is None:
            kept_nodes.append(node)
            continue
        for name, value in zip(node.output, values, strict=True):
            constants[name] = value
            graph.initializer.append(numpy_helper.from_array(value, name))
    del graph.node[:]
    graph.node.extend(kept_nodes)
    _drop_unused_initializers(graph)


def _static_shapes(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    """Fully static shapes of the tensors shape inference can tell, for folding `Shape` nodes."""
    try:
        inferred = external_tensors.infer_shapes(model)
    except Exception:  # folding Shape is an optimisation: without inference, skip it
        return {}
    shapes = {}
    for value in list(inferred.graph.value_info) + list(inferred.graph.input):
        dims = tensor_dims(value)
        if dims is not None and all(d is not None for d in dims):
            shapes[value.name] = tuple(int(d) for d in dims if d is not None)
    return shapes


def _evaluate_if_constant(
    node: onnx.NodeProto,
    constants: Mapping[str, np.ndarray],
    static_shapes: Mapping[str, tuple[int, ...]],
    opset: int,
) -> list[np.ndarray] | None:
    if (node.domain not in ("", "ai.onnx") or node.op_type in _NONDETERMINISTIC_OPS
            or node.op_type in _UNFOLDED_OPS):
        return None
    if any(attr.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
           for attr in node.attribute):
        return None
    if node.op_type == "Shape" and node.input[0] in static_shapes:
        return [_shape_value(node, static_shapes[node.input[0]])]
    inputs = [name for name in node.input if name]
    if not all(name in constants for name in inputs):
        return None
    feeds = {name: constants[name] for name in inputs}
    if sum(value.size for value in feeds.values()) > _MAX_FOLDED_ELEMENTS:
        return None
    results = run_node(node, feeds, opset)
    if results is None or any(value.size > _MAX_FOLDED_ELEMENTS for value in results):
        return None
    return results


def run_node(node: onnx.NodeProto, feeds: Mapping[str, np.ndarray], opset: int
             ) -> list[np.ndarray] | None:
    """Outputs of one node on constant inputs (onnx.reference), None if it cannot run."""
    try:
        evaluator = ReferenceEvaluator(_single_node_model(node, feeds, opset))
        return [np.asarray(value) for value in evaluator.run(None, dict(feeds))]
    except Exception:  # an op the reference cannot run is left to the caller to refuse
        return None


def _shape_value(node: onnx.NodeProto, shape: tuple[int, ...]) -> np.ndarray:
    attrs = {attr.name: helper.get_attribute_value(attr) for attr in node.attribute}
    start = int(attrs.get("start", 0))
    end = attrs.get("end")
    return np.array(shape[start:None if end is None else int(end)], dtype=np.int64)


def _single_node_model(
    node: onnx.NodeProto, feeds: Mapping[str, np.ndarray], opset: int
) -> onnx.ModelProto:
    inputs = [
        helper.make_tensor_value_info(
            name, helper.np_dtype_to_tensor_dtype(value.dtype), value.shape
        )
        for name, value in feeds.items()
    ]
    outputs = [helper.make_empty_tensor_value_info(name) for name in node.output if name]
    graph = helper.make_graph([node], "fold", inputs, outputs)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _drop_unused_initializers(graph: onnx.GraphProto) -> None:
    used = used_names(graph)
    kept = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)


def tensor_dims(value: onnx.ValueInfoProto) -> tuple[Dim, ...] | None:
    """Dimensions of a tensor value_info, None entries for symbolic dims; None if rank unknown."""
    if not value.type.HasField("tensor_type"):
        return None
    tensor_type = value.type.tensor_type
    if not tensor_type.HasField("shape"):
        return None
    return tuple(
        int(dim.dim_value) if dim.HasField("dim_value") and dim.dim_value >= 0 else None
        for dim in tensor_type.shape.dim  # Paddle writes -1 for a dynamic dimension
    )


@dataclass
class GraphIndex:
    """Read-only index over a normalized model (see `normalize`)."""

    model: onnx.ModelProto
    constants: MutableMapping[str, np.ndarray] = field(init=False)
    producers: dict[str, onnx.NodeProto] = field(init=False)
    consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = field(init=False)
    """Readers of each tensor with the input position; IMPLICIT_POSITION (-1) for a node whose
    subgraph reads the tensor."""
    shapes: dict[str, tuple[Dim, ...]] = field(init=False)
    nodes_by_name: dict[str, onnx.NodeProto] = field(init=False)
    graph_outputs: frozenset[str] = field(init=False)
    overridable: frozenset[str] = field(init=False)
    """Initializers listed as graph inputs, which a caller may feed: `constants` holds their
    default values, and the analysis keeps whole every group a node reading them touches."""

    def __post_init__(self) -> None:
        graph = self.model.graph
        graph_inputs = {value.name for value in graph.input}
        self.overridable = frozenset(initializer_input_names(self.model))
        self.constants = external_tensors.constants(graph.initializer,
                                                    graph_inputs - self.overridable)
        self.producers = {}
        self.consumers = {}
        self.nodes_by_name = {}
        for node in graph.node:
            self.nodes_by_name[node.name] = node
            for name in node.output:
                if name:
                    self.producers[name] = node
            for position, name in enumerate(node.input):
                if name:
                    self.consumers.setdefault(name, []).append((node, position))
            for name in outer_scope_names(node):
                self.consumers.setdefault(name, []).append((node, IMPLICIT_POSITION))
        self.shapes = {}
        for value in list(graph.input) + list(graph.output) + list(graph.value_info):
            dims = tensor_dims(value)
            if dims is not None:
                self.shapes[value.name] = dims
        self.graph_outputs = frozenset(value.name for value in graph.output)

    @property
    def nodes(self) -> list[onnx.NodeProto]:
        """Nodes in the model's (topological) order."""
        return list(self.model.graph.node)

    def constant(self, name: str) -> np.ndarray | None:
        """The value of a constant tensor, None for an activation or an absent optional input."""
        if not name:
            return None
        return self.constants.get(name)

    def input_constant(self, node: onnx.NodeProto, position: int) -> np.ndarray | None:
        """Constant value of a node's input at `position`, None if absent or not constant."""
        if position >= len(node.input):
            return None
        return self.constant(node.input[position])

    def rank(self, tensor: str) -> int | None:
        dims = self.shapes.get(tensor)
        return None if dims is None else len(dims)

    def static_shape(self, tensor: str, node: str | None = None) -> tuple[Dim, ...]:
        """Shape of `tensor`; raises GraphError when shape inference could not tell its rank."""
        dims = self.shapes.get(tensor)
        if dims is None:
            raise GraphError("shape inference gives no shape for this tensor; calibration data "
                             "gives the shapes (compress with --calib DATA; from Python, "
                             "analyze(model, shape_feeds=DATA))", node=node, tensor=tensor)
        return dims


def attributes(node: onnx.NodeProto) -> dict[str, object]:
    """A node's attributes as plain Python values."""
    return {attr.name: helper.get_attribute_value(attr) for attr in node.attribute}


_SHAPE_EXPRESSION_OPS = frozenset(
    {"Gather", "Unsqueeze", "Squeeze", "Concat", "Slice", "Cast", "Reshape", "Mul", "Add",
     "Sub", "Div", "Identity"}
)


def evaluate_shape_expression(graph: GraphIndex, tensor: str, samples: int) -> np.ndarray | None:
    """Value of a computed shape tensor (e.g. `Concat(Unsqueeze(Gather(Shape(x), 0)), [-1])`)
    when the dynamic sample axis of every tensor has size `samples`.

    Only `Shape` of tensors whose other dimensions are static, constants and the small integer
    ops exporters use for shapes are followed; anything else gives None.
    """
    constant = graph.constant(tensor)
    if constant is not None:
        return constant
    node = graph.producers.get(tensor)
    if node is None:
        return None
    if node.op_type == "Shape":
        dims = graph.shapes.get(node.input[0])
        if dims is None or any(d is None for d in dims[1:]):
            return None
        shape = tuple(samples if d is None else int(d) for d in dims)
        return _shape_value(node, shape)
    if node.op_type not in _SHAPE_EXPRESSION_OPS:
        return None
    feeds = {}
    for name in node.input:
        if name:
            value = evaluate_shape_expression(graph, name, samples)
            if value is None:
                return None
            feeds[name] = value
    results = run_node(node, feeds, opset_version(graph.model))
    return None if results is None else results[list(node.output).index(tensor)]


def stamp(compressed: onnx.ModelProto, original: onnx.ModelProto, how: str) -> None:
    """Give `compressed` the original's producer and metadata, plus an "onnx_spectral" entry
    recording `how` it was made."""
    compressed.producer_name = original.producer_name
    compressed.producer_version = original.producer_version
    del compressed.metadata_props[:]
    compressed.metadata_props.extend(original.metadata_props)
    entry = compressed.metadata_props.add()
    entry.key = "onnx_spectral"
    entry.value = how
