"""Shape inference for the com.microsoft fused ops that ONNX Runtime's extended graph
optimizations write (FusedConv, FusedGemm, FusedMatMul).

ONNX shape inference knows no com.microsoft op, so their outputs would have no shape and the
analysis and the calibration taps could not use them. `register_schemas` adds a schema for each
to ONNX's registry (once per process, only where none is registered): its output shape is that
of the default-domain op it fuses (Conv, Gemm, MatMul), inferred by that op's own schema; the
element-wise activation keeps the shape.
"""

from __future__ import annotations

from collections.abc import Callable

import onnx
from onnx import defs, helper, shape_inference

MICROSOFT = "com.microsoft"
"""Domain of the contrib ops ONNX Runtime's extended graph optimizations write."""

_AttrType = defs.OpSchema.AttrType
_ACTIVATION = {"activation": _AttrType.STRING, "activation_params": _AttrType.FLOATS,
               "activation_alpha": _AttrType.FLOAT, "activation_beta": _AttrType.FLOAT,
               "activation_gamma": _AttrType.FLOAT}
_FUSED: dict[str, tuple[str, int, dict[str, defs.OpSchema.AttrType]]] = {
    "FusedConv": ("Conv", 3, {"auto_pad": _AttrType.STRING, "dilations": _AttrType.INTS,
                              "group": _AttrType.INT, "kernel_shape": _AttrType.INTS,
                              "pads": _AttrType.INTS, "strides": _AttrType.INTS}),
    "FusedGemm": ("Gemm", 3, {"transA": _AttrType.INT, "transB": _AttrType.INT,
                              "alpha": _AttrType.FLOAT, "beta": _AttrType.FLOAT}),
    "FusedMatMul": ("MatMul", 2, {"transA": _AttrType.INT, "transB": _AttrType.INT,
                                  "transBatchA": _AttrType.INT, "transBatchB": _AttrType.INT,
                                  "alpha": _AttrType.FLOAT}),
}
"""Fused op -> (the default-domain op it computes, its inputs read, its own attributes)."""

_OPSET = 17
"""Default-domain opset whose Conv, Gemm and MatMul schemas infer the shapes."""


def _transposed_last(value: onnx.TypeProto) -> onnx.TypeProto:
    """The tensor type with its last two dimensions swapped (FusedMatMul's transA/transB)."""
    swapped = onnx.TypeProto()
    swapped.CopyFrom(value)
    dims = swapped.tensor_type.shape.dim
    if len(dims) >= 2:
        last, before = onnx.TensorShapeProto.Dimension(), onnx.TensorShapeProto.Dimension()
        last.CopyFrom(dims[-1])
        before.CopyFrom(dims[-2])
        dims[-2].CopyFrom(last)
        dims[-1].CopyFrom(before)
    return swapped


def _inference(fused: str) -> Callable[[shape_inference.InferenceContext], None]:
    """The shape inference of `fused`: that of its default-domain op."""
    standard, reads, own = _FUSED[fused]

    def infer(ctx: shape_inference.InferenceContext) -> None:
        attributes = {}
        for name in own:
            attribute = ctx.get_attribute(name)
            if attribute is not None:
                attributes[name] = helper.get_attribute_value(attribute)
        names = [f"in{i}" for i in range(min(reads, ctx.get_num_inputs()))
                 if ctx.has_input(i)]
        types = {name: ctx.get_input_type(i) for i, name in enumerate(names)}
        if standard == "MatMul":
            if attributes.pop("transBatchA", 0) or attributes.pop("transBatchB", 0):
                return
            for flag, name in (("transA", "in0"), ("transB", "in1")):
                if attributes.pop(flag, 0):
                    types[name] = _transposed_last(types[name])
            attributes.pop("alpha", None)
        node = helper.make_node(standard, names, ["out"], **attributes)
        schema = defs.get_schema(standard, _OPSET)
        outputs = shape_inference.infer_node_outputs(
            schema, node, types, opset_imports=[helper.make_opsetid("", _OPSET)])
        if "out" in outputs:
            ctx.set_output_type(0, outputs["out"])

    return infer


def _schema(fused: str) -> defs.OpSchema:
    standard, reads, own = _FUSED[fused]
    optional = defs.OpSchema.FormalParameterOption.Optional
    inputs = [defs.OpSchema.FormalParameter(f"in{i}", "T") for i in range(2)]
    inputs += [defs.OpSchema.FormalParameter(f"in{i}", "T", param_option=optional)
               for i in range(2, 4 if fused == "FusedConv" else reads)]
    attributes = [defs.OpSchema.Attribute(name, kind, f"as in {standard}", required=False)
                  for name, kind in {**own, **_ACTIVATION}.items()]
    schema = defs.OpSchema(
        fused, MICROSOFT, 1, f"ONNX Runtime's {standard} with a fused activation",
        inputs=inputs, outputs=[defs.OpSchema.FormalParameter("Y", "T")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)", "tensor(double)"],
                           "floating-point tensors")],
        attributes=attributes)
    schema.set_type_and_shape_inference_function(_inference(fused))
    return schema


def register_schemas() -> None:
    """Register a schema for each fused op that has none in ONNX's registry yet."""
    for fused in _FUSED:
        if not defs.has(fused, MICROSOFT):
            defs.register_schema(_schema(fused))
    for op, inputs in _SAME_SHAPE.items():
        if not defs.has(op, MICROSOFT):
            defs.register_schema(_same_shape_schema(op, inputs))


_SAME_SHAPE = {"SkipLayerNormalization": 5, "SkipSimplifiedLayerNormalization": 4,
               "BiasGelu": 2, "FastGelu": 2, "Gelu": 1, "QuickGelu": 1, "Attention": 7}
"""Transformer ops of ONNX Runtime's transformer optimizer -> their input count: output 0 has
the shape of input 0 (for Attention, with the last axis C = the QKV weight's columns / 3)."""


def _same_shape_inference(ctx: shape_inference.InferenceContext) -> None:
    source = ctx.get_input_type(0)
    if source is None:  # input 0's type is not known yet: nothing to infer
        return
    output = onnx.TypeProto()
    output.CopyFrom(source)
    is_attention = ctx.get_attribute("num_heads") is not None
    weight = ctx.get_input_type(1) if is_attention and ctx.has_input(1) else None
    if weight is not None:
        columns = weight.tensor_type.shape.dim
        dims = output.tensor_type.shape.dim
        if len(columns) == 2 and len(dims) == 3 and columns[1].HasField("dim_value"):
            dims[2].Clear()
            dims[2].dim_value = columns[1].dim_value // 3
    ctx.set_output_type(0, output)


def _same_shape_schema(op: str, inputs: int) -> defs.OpSchema:
    option = defs.OpSchema.FormalParameterOption
    formal = [defs.OpSchema.FormalParameter(f"in{i}", f"T{i}",
                                            param_option=option.Optional if i else option.Single)
              for i in range(inputs)]
    outputs = [defs.OpSchema.FormalParameter(f"out{i}", f"U{i}",
                                             param_option=option.Optional if i else option.Single)
               for i in range(4)]
    tensors = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)", "tensor(double)",
               "tensor(int32)", "tensor(int64)", "tensor(bool)"]
    schema = defs.OpSchema(
        op, MICROSOFT, 1, f"ONNX Runtime's {op} (output 0 shaped like input 0)",
        inputs=formal, outputs=outputs,
        type_constraints=[(f"{kind}{i}", tensors, "any tensor") for kind, count in
                          (("T", inputs), ("U", 4)) for i in range(count)],
        attributes=[defs.OpSchema.Attribute(name, kind, "as in ONNX Runtime", required=False)
                    for name, kind in _TRANSFORMER_ATTRIBUTES.items()])
    schema.set_type_and_shape_inference_function(_same_shape_inference)
    return schema


_TRANSFORMER_ATTRIBUTES = {
    "epsilon": _AttrType.FLOAT, "alpha": _AttrType.FLOAT, "num_heads": _AttrType.INT,
    "qkv_hidden_sizes": _AttrType.INTS, "unidirectional": _AttrType.INT,
    "mask_filter_value": _AttrType.FLOAT, "scale": _AttrType.FLOAT,
    "do_rotary": _AttrType.INT, "past_present_share_buffer": _AttrType.INT,
    "rotary_embedding_dim": _AttrType.INT,
}
