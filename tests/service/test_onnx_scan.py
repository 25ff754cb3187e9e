"""The bundle gate's ONNX check reads operator domains and external data without the `onnx` package.

`onnx_scan` walks the ModelProto protobuf itself, so the check in `verify_bundle` is the same in
the serve-only install (onnxruntime, no onnx) as in the dev install: a graph that asks for a
custom-op domain - at the top level, inside an If/Loop body, or inside a local function - or that
stores tensors in external files is refused with check "onnx" before onnxruntime parses it.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from oodguard.service.bundle import BundleError, verify_bundle, write_manifest
from oodguard.service.manifest import MODEL_FILE, load_manifest
from oodguard.service.onnx_scan import OnnxScanError, scan_onnx

from .bundle_factory import build_tiny_onnx, make_tiny_bundle

_X = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, 8, 8])
_Y = helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 3, 8, 8])


def _model(nodes, opsets=(("", 17),), initializers=(), functions=()) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", [_X], [_Y], initializer=list(initializers))
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets], functions=list(functions)
    )
    model.ir_version = 8
    return model


def _scan(model: onnx.ModelProto):
    return scan_onnx(model.SerializeToString())


def _if_with_body(body_node) -> onnx.NodeProto:
    branch_out = helper.make_tensor_value_info("out", TensorProto.FLOAT, None)
    then_g = helper.make_graph([body_node], "then", [], [branch_out])
    else_g = helper.make_graph([helper.make_node("Identity", ["image"], ["out"])], "else", [], [branch_out])
    return helper.make_node("If", ["cond"], ["out"], then_branch=then_g, else_branch=else_g)


def test_the_tiny_model_scans_like_onnx_reads_it():
    model = build_tiny_onnx(poison=True)
    scan = _scan(model)
    assert scan.opset_domains == {""} and scan.node_domains == {""}
    assert scan.nodes == len(model.graph.node) and not scan.external_tensors and not scan.function_domains


def test_custom_domain_at_the_top_level():
    model = _model([helper.make_node("Evil", ["image"], ["out"], domain="com.evil")], opsets=(("", 17), ("com.evil", 1)))
    scan = _scan(model)
    assert scan.opset_domains == {"", "com.evil"} and scan.node_domains == {"com.evil"}


def test_custom_domain_hidden_in_a_subgraph():
    node = _if_with_body(helper.make_node("Evil", ["image"], ["out"], domain="com.hidden"))
    scan = _scan(_model([node]))
    assert "com.hidden" in scan.node_domains and scan.nodes == 3  # If + both branch bodies


def test_local_functions_are_model_defined_domains():
    fn = helper.make_function(
        "local.fn", "Twice", ["x"], ["y"], [helper.make_node("Add", ["x", "x"], ["y"])], [helper.make_opsetid("", 17)]
    )
    model = _model([helper.make_node("Twice", ["image"], ["out"], domain="local.fn")],
                   opsets=(("", 17), ("local.fn", 1)), functions=[fn])
    scan = _scan(model)
    assert scan.function_domains == {"local.fn"} and scan.node_domains == {"", "local.fn"}

    evil_fn = helper.make_function(
        "local.fn", "Twice", ["x"], ["y"], [helper.make_node("Evil", ["x"], ["y"], domain="com.evil")],
        [helper.make_opsetid("", 17), helper.make_opsetid("com.evil", 1)],
    )
    model.functions[0].CopyFrom(evil_fn)
    assert "com.evil" in _scan(model).node_domains


def test_external_data_is_found_in_initializers_and_attributes():
    weight = numpy_helper.from_array(np.ones((1,), np.float32), "w")
    weight.data_location = TensorProto.EXTERNAL
    entry = weight.external_data.add()
    entry.key, entry.value = "location", "../../etc/passwd"
    weight.ClearField("raw_data")
    scan = _scan(_model([helper.make_node("Identity", ["image"], ["out"])], initializers=[weight]))
    assert scan.external_tensors == ["w"]

    const = numpy_helper.from_array(np.ones((1,), np.float32), "c")
    const.data_location = TensorProto.EXTERNAL
    node = helper.make_node("Constant", [], ["k"], value=const)
    assert _scan(_model([node, helper.make_node("Identity", ["image"], ["out"])])).external_tensors == ["c"]


def _external(name: str) -> onnx.TensorProto:
    tensor = numpy_helper.from_array(np.ones((1,), np.float32), name)
    tensor.data_location = TensorProto.EXTERNAL
    entry = tensor.external_data.add()
    entry.key, entry.value = "location", "/etc/passwd"
    tensor.ClearField("raw_data")
    return tensor


def test_external_data_in_a_local_function_attribute_default():
    # issue 18 #8: FunctionProto.attribute_proto (an attribute's default value) was not scanned.
    fn = helper.make_function(
        "local.fn", "F", ["x"], ["y"], [helper.make_node("Identity", ["x"], ["y"])], [helper.make_opsetid("", 17)]
    )
    fn.attribute_proto.append(helper.make_attribute("w", _external("fn_default")))
    model = _model([helper.make_node("F", ["image"], ["out"], domain="local.fn")],
                   opsets=(("", 17), ("local.fn", 1)), functions=[fn])
    assert _scan(model).external_tensors == ["fn_default"]
    # ... also a graph-valued default whose body holds the tensor
    body = helper.make_graph([helper.make_node("Constant", [], ["k"], value=_external("in_graph_default"))], "b", [], [])
    fn.ClearField("attribute_proto")
    fn.attribute_proto.append(helper.make_attribute("g", body))
    model.functions[0].CopyFrom(fn)
    assert _scan(model).external_tensors == ["in_graph_default"]


def test_external_data_in_training_info_graphs():
    model = _model([helper.make_node("Identity", ["image"], ["out"])])
    info = model.training_info.add()
    info.initialization.CopyFrom(helper.make_graph([], "init", [], [], initializer=[_external("init_w")]))
    info.algorithm.CopyFrom(helper.make_graph([helper.make_node("Constant", [], ["k"], value=_external("algo_c"))], "algo", [], []))
    assert sorted(_scan(model).external_tensors) == ["algo_c", "init_w"]


def test_verify_refuses_external_data_in_a_function_attribute(tmp_path):
    fn = helper.make_function(
        "local.fn", "F", ["x"], ["y"], [helper.make_node("Identity", ["x"], ["y"])], [helper.make_opsetid("", 17)]
    )
    fn.attribute_proto.append(helper.make_attribute("w", _external("fn_default")))
    model = build_tiny_onnx()
    model.functions.append(fn)
    model.opset_import.append(helper.make_opsetid("local.fn", 1))
    with pytest.raises(BundleError) as err:
        verify_bundle(_bundle_with_model(tmp_path, model))
    assert err.value.check == "onnx" and "external data" in err.value.message


@pytest.mark.parametrize(
    "data, message",
    [
        (b"\x08", "truncated varint"),
        (b"\x3a\x10abc", "runs past the end"),
        (b"\x0b", "wire type 3"),
        (b"\x00", "field number 0"),
        (b"\x3a\x02\x0a\xff", "truncated varint"),  # a graph whose node's length is cut
    ],
)
def test_malformed_bytes_raise_scan_errors(data, message):
    with pytest.raises(OnnxScanError, match=message):
        scan_onnx(data)


@settings(max_examples=400, deadline=None, derandomize=True, database=None)
@given(st.binary(max_size=512) | st.builds(lambda cut: build_tiny_onnx().SerializeToString()[:cut], st.integers(0, 2000)))
def test_any_bytes_scan_or_raise_a_scan_error(data):
    try:
        scan_onnx(data)
    except OnnxScanError:
        pass


# -- through the bundle gate ------------------------------------------------------------------------


def _bundle_with_model(tmp_path, model: onnx.ModelProto):
    root = make_tiny_bundle(tmp_path / "b", "tiny", "9")
    (root / MODEL_FILE).write_bytes(model.SerializeToString())  # as is: onnx.save would move external data
    write_manifest(root, load_manifest(root))  # re-pin the hashes: only the onnx check can refuse it now
    return root


def _custom_domain_tiny() -> onnx.ModelProto:
    model = build_tiny_onnx()
    node = next(n for n in model.graph.node if n.op_type == "Softmax")
    node.domain = "com.attacker"
    model.opset_import.append(helper.make_opsetid("com.attacker", 1))
    return model


def test_verify_refuses_a_custom_domain_with_a_clear_onnx_message(tmp_path):
    root = _bundle_with_model(tmp_path, _custom_domain_tiny())
    with pytest.raises(BundleError) as err:
        verify_bundle(root)
    assert err.value.check == "onnx"
    assert "com.attacker" in err.value.message and "custom ops are not allowed" in err.value.message


def test_verify_refuses_external_data(tmp_path):
    model = build_tiny_onnx()
    model.graph.initializer[0].data_location = TensorProto.EXTERNAL
    root = _bundle_with_model(tmp_path, model)
    with pytest.raises(BundleError) as err:
        verify_bundle(root)
    assert err.value.check == "onnx" and "external data" in err.value.message


def test_the_check_works_without_the_onnx_package(tmp_path):
    """In the serve-only install `import onnx` fails: the gate must refuse the same bundle, the same way."""
    root = _bundle_with_model(tmp_path, _custom_domain_tiny())
    code = textwrap.dedent(
        f"""
        import sys
        sys.modules["onnx"] = None  # `import onnx` now raises ImportError, as without the package
        from oodguard.service.bundle import BundleError, verify_bundle
        try:
            verify_bundle({str(root)!r})
        except BundleError as exc:
            print(exc.check, "|", exc.message)
        else:
            print("accepted")
        assert "onnx" not in {{k for k, v in sys.modules.items() if v is not None}}
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    check, _, message = out.stdout.strip().partition(" | ")
    assert check == "onnx" and "com.attacker" in message and "custom ops are not allowed" in message, out.stdout


def test_a_valid_bundle_still_verifies(tmp_path):
    root = make_tiny_bundle(tmp_path / "ok", "tiny", "1", poison=True)
    assert "onnx" in verify_bundle(root).checks
