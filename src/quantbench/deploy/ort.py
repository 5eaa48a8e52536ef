"""ONNX Runtime sessions and what its graph optimizer made of an exported model (which ops run in int8)."""

from __future__ import annotations

import tempfile
from collections import Counter
from pathlib import Path

import onnx

from quantbench.deploy.errors import RuntimeUnavailableError
from quantbench.deploy.onnx_graph import Graph, op_counts
from quantbench.deploy.runtimes.base import OpReport

X64_PRECISION_KEY = "session.x64quantprecision"
INT8_KERNELS = frozenset({
    "QLinearConv", "QLinearMatMul", "QLinearAdd", "QLinearMul", "QLinearGlobalAveragePool", "QLinearAveragePool",
    "QLinearConcat", "QLinearSigmoid", "QLinearLeakyRelu", "QLinearSoftmax", "QLinearReduceMean", "QLinearWhere",
    "QGemm", "ConvInteger", "MatMulInteger", "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "QAttention",
})
FLOAT_COMPUTE = frozenset({
    "Conv", "FusedConv", "ConvTranspose", "Gemm", "FusedGemm", "MatMul", "FusedMatMul", "Add", "Sub", "Mul", "Div",
    "GlobalAveragePool", "AveragePool", "GlobalMaxPool", "Relu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish",
    "LeakyRelu", "Softmax", "ReduceMean", "BatchNormalization", "Sum", "Mean", "Gelu", "Tanh", "Erf",
})
LAYOUT_OPS = frozenset({"Transpose", "Reshape", "ReorderInput", "ReorderOutput", "Flatten", "Squeeze", "Unsqueeze"})


def _ort():
    try:
        import onnxruntime
    except ImportError as exc:  # pragma: no cover - a dependency
        raise RuntimeUnavailableError("onnxruntime is not installed: pip install onnxruntime") from exc
    return onnxruntime


def ort_version() -> str:
    return _ort().__version__


def session_options(x64_quant_precision: bool = False, threads: int | None = None,
                    optimized_model: str | Path | None = None):
    """SessionOptions with the knobs quantbench uses (all graph optimizations on, as deployed)."""
    ort = _ort()
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if x64_quant_precision:
        so.add_session_config_entry(X64_PRECISION_KEY, "1")
    if threads:
        so.intra_op_num_threads = threads
    if optimized_model is not None:
        so.optimized_model_filepath = str(optimized_model)
    return so


def make_session(path: str | Path, x64_quant_precision: bool = False, threads: int | None = None,
                 optimized_model: str | Path | None = None):
    """A CPU InferenceSession for ``path``."""
    ort = _ort()
    return ort.InferenceSession(str(path), session_options(x64_quant_precision, threads, optimized_model),
                                providers=["CPUExecutionProvider"])


KEPT_ACTIVATION = ("ORT folds a Relu into QuantizeLinear only when the zero-point is the container minimum (0 for "
                   "uint8, -128 for int8) and a Clip only when the quantized range lies inside it")


def _activation(node: onnx.NodeProto) -> str | None:
    for a in node.attribute:
        if a.name == "activation":
            return a.s.decode()
    return None


def _reason(g: Graph, node: onnx.NodeProto) -> str:
    """Why ORT left a compute op in float (read from the optimized graph)."""
    def origin(name: str) -> onnx.NodeProto | None:
        n = g.producer.get(name)
        while n is not None and n.op_type in LAYOUT_OPS:
            n = g.producer.get(n.input[0])
        return n

    if node.op_type in ("Relu", "Clip"):
        return f"kept in float before QuantizeLinear: {KEPT_ACTIVATION}"
    for i in node.input:
        if not i or g.constant(i) is not None:
            continue
        src = origin(i)
        if src is None or src.op_type != "DequantizeLinear":
            what = "the model input" if src is None else f"{src.op_type} {src.name!r}"
            return f"input {i!r} comes from {what}, not straight from DequantizeLinear, so no int8 kernel fuses it"
    users = list(g.consumers.get(node.output[0], []))
    while len(users) == 1 and users[0].op_type in LAYOUT_OPS:
        users = list(g.consumers.get(users[0].output[0], []))
    if not users:
        return "its output is a float model output (not quantized); ORT has no int8 kernel with float output for it"
    kinds = sorted({u.op_type for u in users})
    act = _activation(node)
    if kinds == ["QuantizeLinear"] and act:
        return f"its {act} stays between it and QuantizeLinear (fused in float): {KEPT_ACTIVATION}"
    if kinds == ["QuantizeLinear"]:
        return f"ONNX Runtime has no int8 kernel for {node.op_type} in this pattern"
    if set(kinds) <= {"Relu", "Clip"}:
        return f"a {kinds[0]} follows it before QuantizeLinear and stays: {KEPT_ACTIVATION}"
    return f"its output feeds {kinds}, not only QuantizeLinear, so no int8 kernel fuses it"


def report_from_optimized(model: onnx.ModelProto) -> OpReport:
    """Which ops of an ORT-optimized graph are int8 kernels, and why the remaining compute ops are float."""
    g = Graph(model)
    int8 = dict(sorted(Counter(n.op_type for n in model.graph.node if n.op_type in INT8_KERNELS).items()))
    floats = [{"op": n.op_type, "node": n.name, "reason": _reason(g, n)}
              for n in model.graph.node if n.op_type in FLOAT_COMPUTE]
    return OpReport(int8, floats, op_counts(model.graph.node))


def session_with_report(path: str | Path, x64_quant_precision: bool = False, threads: int | None = None):
    """A session for ``path`` and the report of the graph ORT optimized for it (one graph optimization)."""
    with tempfile.TemporaryDirectory() as tmp:
        opt = Path(tmp) / "optimized.onnx"
        sess = make_session(path, x64_quant_precision, threads, optimized_model=opt)
        model = onnx.load(str(opt))
    return sess, report_from_optimized(model)


def constant_folded(path: str | Path) -> onnx.ModelProto:
    """The ONNX model at ``path`` with its constant subgraphs folded by ONNX Runtime's basic graph optimizations
    (nothing quantized changes: the folded subgraphs compute shapes and pad sizes). Runtimes whose importers refuse
    computed ``Pad`` sizes (TVM's Relax frontend) or that interpret the graph node by node (the PyTorch engines)
    read this form."""
    ort = _ort()
    with tempfile.TemporaryDirectory() as tmp:
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        so.optimized_model_filepath = str(Path(tmp) / "folded.onnx")
        so.log_severity_level = 3
        ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        return onnx.load(str(Path(tmp) / "folded.onnx"))
