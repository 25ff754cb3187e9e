"""What an ONNX file asks of its runtime, read from the protobuf bytes without the `onnx` package.

The serve-only install has onnxruntime but not `onnx`, and the bundle gate must work there too. A
ModelProto is a protobuf message; this reader walks just the fields that matter for safety and
skips everything else by its length (weights are never copied):

- operator domains: the model's and its local functions' `opset_import`, and the `domain` of every
  node - in the main graph, in nested subgraphs (If / Loop / Scan bodies, any graph-valued
  attribute) and in model-local function bodies;
- the domains the model defines itself (its local functions: composites of other ops, not code);
- tensors stored outside the file (`data_location = EXTERNAL` or `external_data` entries), which
  would make onnxruntime open other paths - wherever a TensorProto can sit: graph initializers
  (dense and sparse), node attributes (`t`, `tensors`, `sparse_tensor(s)`), the default values of
  a local function's attributes (`FunctionProto.attribute_proto`), and the graphs of
  `ModelProto.training_info` (initialization and algorithm), in every nested subgraph of these.

Field numbers are those of onnx/onnx.proto3 (stable since IR version 3).
"""

from __future__ import annotations

from dataclasses import dataclass, field


class OnnxScanError(ValueError):
    """The bytes are not a well-formed ONNX ModelProto."""


@dataclass
class OnnxScan:
    opset_domains: set[str] = field(default_factory=set)
    node_domains: set[str] = field(default_factory=set)
    function_domains: set[str] = field(default_factory=set)
    external_tensors: list[str] = field(default_factory=list)
    nodes: int = 0


# Field numbers (onnx.proto3).
_MODEL_GRAPH, _MODEL_OPSET, _MODEL_TRAINING_INFO, _MODEL_FUNCTIONS = 7, 8, 20, 25
_TRAINING_INITIALIZATION, _TRAINING_ALGORITHM = 1, 2
_GRAPH_NODE, _GRAPH_INITIALIZER, _GRAPH_SPARSE_INITIALIZER = 1, 5, 15
_NODE_ATTRIBUTE, _NODE_DOMAIN = 5, 7
_ATTR_T, _ATTR_G, _ATTR_TENSORS, _ATTR_GRAPHS, _ATTR_SPARSE, _ATTR_SPARSES = 5, 6, 10, 11, 22, 23
_TENSOR_NAME, _TENSOR_EXTERNAL_DATA, _TENSOR_DATA_LOCATION = 8, 13, 14
_SPARSE_VALUES, _SPARSE_INDICES = 1, 2
_FUNCTION_NODE, _FUNCTION_OPSET, _FUNCTION_DOMAIN, _FUNCTION_ATTRIBUTE_PROTO = 7, 9, 10, 11
_OPSET_DOMAIN = 1
_EXTERNAL = 1  # TensorProto.DataLocation.EXTERNAL
_MAX_DEPTH = 64  # nested subgraphs; a deeper file is refused rather than recursed into


def scan_onnx(data: bytes) -> OnnxScan:
    """Scan a serialized ModelProto. Raises OnnxScanError on malformed bytes."""
    scan = OnnxScan()
    view = memoryview(data)
    for num, value in _fields(view):
        if num == _MODEL_GRAPH:
            _graph(_message(value), scan, 0)
        elif num == _MODEL_OPSET:
            scan.opset_domains.add(_opset_domain(_message(value)))
        elif num == _MODEL_FUNCTIONS:
            _function(_message(value), scan)
        elif num == _MODEL_TRAINING_INFO:
            for sub, graph in _fields(_message(value)):
                if sub in (_TRAINING_INITIALIZATION, _TRAINING_ALGORITHM):
                    _graph(_message(graph), scan, 1)
    return scan


# -- messages ---------------------------------------------------------------------------------------


def _graph(view: memoryview, scan: OnnxScan, depth: int) -> None:
    if depth > _MAX_DEPTH:
        raise OnnxScanError(f"subgraphs nested more than {_MAX_DEPTH} deep")
    for num, value in _fields(view):
        if num == _GRAPH_NODE:
            _node(_message(value), scan, depth)
        elif num == _GRAPH_INITIALIZER:
            _tensor(_message(value), scan)
        elif num == _GRAPH_SPARSE_INITIALIZER:
            _sparse_tensor(_message(value), scan)


def _node(view: memoryview, scan: OnnxScan, depth: int) -> None:
    scan.nodes += 1
    domain = ""
    for num, value in _fields(view):
        if num == _NODE_DOMAIN:
            domain = _text(value)
        elif num == _NODE_ATTRIBUTE:
            _attribute(_message(value), scan, depth)
    scan.node_domains.add(domain)


def _attribute(view: memoryview, scan: OnnxScan, depth: int) -> None:
    for num, value in _fields(view):
        if num in (_ATTR_G, _ATTR_GRAPHS):
            _graph(_message(value), scan, depth + 1)
        elif num in (_ATTR_T, _ATTR_TENSORS):
            _tensor(_message(value), scan)
        elif num in (_ATTR_SPARSE, _ATTR_SPARSES):
            _sparse_tensor(_message(value), scan)


def _function(view: memoryview, scan: OnnxScan) -> None:
    for num, value in _fields(view):
        if num == _FUNCTION_NODE:
            _node(_message(value), scan, 1)
        elif num == _FUNCTION_OPSET:
            scan.opset_domains.add(_opset_domain(_message(value)))
        elif num == _FUNCTION_DOMAIN:
            scan.function_domains.add(_text(value))
        elif num == _FUNCTION_ATTRIBUTE_PROTO:  # an attribute's default value: may hold tensors and graphs
            _attribute(_message(value), scan, 1)


def _tensor(view: memoryview, scan: OnnxScan) -> None:
    name, external = "", False
    for num, value in _fields(view):
        if num == _TENSOR_NAME:
            name = _text(value)
        elif num == _TENSOR_EXTERNAL_DATA:
            external = True
        elif num == _TENSOR_DATA_LOCATION and value == _EXTERNAL:
            external = True
    if external:
        scan.external_tensors.append(name)


def _sparse_tensor(view: memoryview, scan: OnnxScan) -> None:
    for num, value in _fields(view):
        if num in (_SPARSE_VALUES, _SPARSE_INDICES):
            _tensor(_message(value), scan)


def _opset_domain(view: memoryview) -> str:
    domain = ""
    for num, value in _fields(view):
        if num == _OPSET_DOMAIN:
            domain = _text(value)
    return domain


# -- wire format ----------------------------------------------------------------------------------


def _message(value) -> memoryview:
    if not isinstance(value, memoryview):
        raise OnnxScanError("expected an embedded message, found a scalar")
    return value


def _text(value) -> str:
    try:
        return bytes(_message(value)).decode("utf-8")
    except UnicodeDecodeError:
        raise OnnxScanError("a string field is not UTF-8") from None


def _varint(view: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(view):
            raise OnnxScanError("truncated varint")
        byte = view[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise OnnxScanError("varint longer than 10 bytes")


def _fields(view: memoryview):
    """(field number, value) pairs: an int for varints, a memoryview for length-delimited fields."""
    pos, end = 0, len(view)
    while pos < end:
        key, pos = _varint(view, pos)
        num, wire = key >> 3, key & 7
        if num == 0:
            raise OnnxScanError("field number 0")
        if wire == 0:
            value, pos = _varint(view, pos)
        elif wire == 2:
            length, pos = _varint(view, pos)
            if pos + length > end:
                raise OnnxScanError("length-delimited field runs past the end of its message")
            value, pos = view[pos : pos + length], pos + length
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            if pos + size > end:
                raise OnnxScanError("truncated fixed-size field")
            value, pos = None, pos + size
        else:  # 3/4: groups, never used by ONNX; 6/7: invalid
            raise OnnxScanError(f"unsupported wire type {wire}")
        yield num, value
