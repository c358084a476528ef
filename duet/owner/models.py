"""Models that arrive as data: validated, then rebuilt by the owner as a torch.fx GraphModule.

A model message carries (format "duet.fx/1"):

- ``modules``: list of ``{"cls": "torch.nn.Conv2d", "kwargs": {...}}``; entry i
  becomes the owner's submodule ``m{i}``. The class must be in
  ``allowlist.NN_MODULES`` (containers excluded), the kwargs plain data.
- ``attrs``: list of ``{"kind": "parameter"|"buffer"}``; entry i becomes ``a{i}``.
- ``state``: ``{owner key: tensor}``, exactly the keys of the rebuilt skeleton.
- ``nodes``: list of ``[op, target, args, kwargs]`` in graph order; a reference
  to an earlier node's value is ``{"$node": j}``.

Every node is checked: ``call_function`` targets are dotted names of allowlisted
torch / torch.nn.functional / operator functions (no factories, no autograd, no
setitem), resolved from the owner's own table; ``call_method`` names are
allowlisted Tensor methods (not ``backward``); ``call_module`` targets are
indices into ``modules``; ``get_attr`` targets are keys of the rebuilt
skeleton's state. Anything else is refused with a message naming it.

Codegen: ``GraphModule`` turns the graph into Python source with its own code
generator and compiles it. Here that source is built only from what the owner
chose: placeholder names ``x0, x1, ...``, submodule names ``m{i}``/``a{i}``,
node names derived by torch.fx from the owner-resolved targets, method and
attribute names that are allowlist keys (identifiers), keyword names checked
to be identifiers, and constants of plain types (ints, floats, bools, None,
short strings, dtypes, slices, tuples/lists of these) which the code generator
writes with ``repr``. No string the scientist wrote is executed as code.

Weights are never allocated from the scientist's sizes: the skeleton is built
on the ``meta`` device, and the received tensors (already in memory, bounded
by the wire limits) are assigned into it after their shapes are compared.
"""
from __future__ import annotations

import builtins
import keyword
from typing import Any, Callable, Dict, List

import torch

from .. import allowlist, containers
from ..errors import NotAllowed
from .executor import resolve
from .plans import is_method_name

FORMAT = "duet.fx/1"
MAX_NODES = 20_000
MAX_MODULES = 2_000
MAX_METHODS = 32
MAX_STR = 256
_CONTAINERS = {"torch.nn.Sequential", "torch.nn.ModuleList"}


_GRAPH_FUNCTIONS = allowlist.GRAPH_FUNCTIONS


class DuetModel(torch.fx.GraphModule):
    """A scientist's model as rebuilt by the owner from validated nodes."""

    __duet_graph_module__ = True
    duet_methods: Dict[str, torch.fx.GraphModule] = {}

    def train(self, mode: bool = True) -> "DuetModel":
        """Train/eval mode for the methods too (they share the layers, but have their own flag)."""
        super().train(mode)
        for method in self.__dict__.get("duet_methods", {}).values():
            method.train(mode)
        return self


class DuetMethod(torch.fx.GraphModule):
    """Another method of a scientist's model (`decode`), rebuilt on the same layers as its forward."""

    __duet_graph_module__ = True


# Layer constructor arguments (kernel_size=(3, 3), normalized_shape=[4]) need no deeper nesting;
# the scientist's side (duet.scientist.models) sends only what passes the same limit.
PLAIN_DEPTH = 4


def _plain(value: Any) -> bool:
    """None, bools, numbers and short strings, in exact tuples and lists at most PLAIN_DEPTH deep."""
    try:
        return all(_plain_leaf(v) for v in containers.leaves(value, max_depth=PLAIN_DEPTH, is_mapping=containers.never,
                                                            is_sequence=lambda v: type(v) in (tuple, list)))
    except containers.TooDeep:
        return False


def _plain_leaf(value: Any) -> bool:
    if value is None or type(value) in (bool, int, float):
        return True
    if type(value) is str:
        return len(value) <= MAX_STR
    return False


def _build_module(i: int, spec: Any) -> torch.nn.Module:
    if not isinstance(spec, dict) or not isinstance(spec.get("cls"), str) or not isinstance(spec.get("kwargs", {}), dict):
        raise NotAllowed(f"model submodule #{i} is malformed")
    cls_name, kwargs = spec["cls"], spec.get("kwargs", {})
    if cls_name not in allowlist.NN_MODULES or cls_name in _CONTAINERS:
        raise NotAllowed(f"model uses {cls_name}, which is not on the allowlist")
    for k, v in kwargs.items():
        if not isinstance(k, str) or not k.isidentifier() or k in ("device", "dtype") or not _plain(v):
            raise NotAllowed(f"model submodule {cls_name} has an argument that is not allowed")
    cls = resolve(cls_name)
    try:
        with torch.device("meta"):
            return cls(**kwargs)
    except Exception as exc:
        raise NotAllowed(f"model submodule {cls_name} could not be built ({type(exc).__name__})") from None


def _arg(value: Any, env: List[torch.fx.Node]) -> Any:
    """A graph argument as sent, with {"$node": j} replaced by the j-th node built so far."""

    def visit(value: Any, inner: Callable[[Any], Any]) -> Any:
        if isinstance(value, dict):
            if set(value) != {"$node"} or type(value["$node"]) is not int:
                raise NotAllowed("model graph arguments may not hold dicts")
            j = value["$node"]
            if not 0 <= j < len(env) or env[j] is None:
                raise NotAllowed("model graph refers to a node that does not come before it")
            return env[j]
        if isinstance(value, tuple):
            return tuple(inner(v) for v in value)
        if isinstance(value, list):
            return [inner(v) for v in value]
        if isinstance(value, slice):  # its parts count one level deeper
            return slice(inner(value.start), inner(value.stop), inner(value.step))
        return _constant(value)

    return containers.walk(value, visit, too_deep=lambda: NotAllowed("model graph arguments are nested too deeply"))


def _constant(value: Any) -> Any:
    """A constant in a graph argument: None, numbers, a dtype, Ellipsis or a short string."""
    if value is None or type(value) in (bool, int, float, complex) or isinstance(value, torch.dtype) or value is Ellipsis:
        return value
    if type(value) is str:
        if len(value) > MAX_STR:
            raise NotAllowed("model graph holds a string constant that is too long")
        return value
    raise NotAllowed(f"model graph holds a constant of type {type(value).__name__}")


def _kwargs(kwargs: Any, env: List[torch.fx.Node]) -> Dict[str, Any]:
    if not isinstance(kwargs, dict):
        raise NotAllowed("model graph node has malformed keyword arguments")
    out = {}
    for k, v in kwargs.items():
        if not isinstance(k, str) or not k.isidentifier() or keyword.iskeyword(k):
            raise NotAllowed("model graph node has a keyword argument name that is not an identifier")
        if k in allowlist.FORBIDDEN_KWARGS:
            raise NotAllowed(f"keyword argument {k!r} is not allowed")
        out[k] = _arg(v, env)
    return out


def build_model(desc: Any) -> DuetModel:
    """Validate a model description and rebuild it; NotAllowed names whatever is refused."""
    if not isinstance(desc, dict) or desc.get("format") != FORMAT:
        raise NotAllowed(f"a model must be sent as a {FORMAT} graph")
    modules, attrs, state, nodes = desc.get("modules"), desc.get("attrs"), desc.get("state"), desc.get("nodes")
    if not isinstance(modules, list) or not isinstance(attrs, list) or not isinstance(state, dict) or not isinstance(nodes, list):
        raise NotAllowed("the model description is malformed")
    if len(nodes) > MAX_NODES or len(modules) + len(attrs) > MAX_MODULES:
        raise NotAllowed("the model is too large (too many nodes or submodules)")

    root = torch.nn.Module()
    for i, spec in enumerate(modules):
        root.add_module(f"m{i}", _build_module(i, spec))
    for i, spec in enumerate(attrs):
        if not isinstance(spec, dict) or spec.get("kind") not in ("parameter", "buffer"):
            raise NotAllowed(f"model attribute #{i} is malformed")
        value = state.get(f"a{i}")
        if not isinstance(value, torch.Tensor):
            raise NotAllowed(f"model attribute a{i} has no tensor")
        if spec["kind"] == "parameter":
            if not (value.is_floating_point() or value.is_complex()):
                raise NotAllowed(f"model parameter a{i} must be floating point")
            root.register_parameter(f"a{i}", torch.nn.Parameter(value.detach(), requires_grad=bool(spec.get("requires_grad", True))))
        else:
            root.register_buffer(f"a{i}", value.detach())

    # Weights: the skeleton's keys, shapes and dtypes must match what was sent, exactly.
    expected = root.state_dict(keep_vars=True)
    if set(expected) != set(state):
        extra = sorted(set(state) - set(expected))
        missing = sorted(set(expected) - set(state))
        raise NotAllowed(f"the model's weights do not match its layers (extra {extra[:3]}, missing {missing[:3]})")
    for key, ref in expected.items():
        got = state[key]
        if not isinstance(got, torch.Tensor) or tuple(got.shape) != tuple(ref.shape):
            raise NotAllowed(f"weight {key} has the wrong shape")
        if got.dtype != ref.dtype and not key.startswith("a"):
            raise NotAllowed(f"weight {key} has dtype {got.dtype}, expected {ref.dtype}")
    root.load_state_dict({k: v.detach() for k, v in state.items()}, strict=True, assign=True)
    for name, t in list(root.named_parameters()) + list(root.named_buffers()):
        if t.is_meta:
            raise NotAllowed(f"model layer state {name} was not sent")
    attr_keys = set(expected)
    forward = _build_graph(nodes, modules, attr_keys)
    methods = desc.get("methods", {})
    if not isinstance(methods, dict) or len(methods) > MAX_METHODS:
        raise NotAllowed("the model's methods are malformed or too many")
    if sum(len(m) for m in methods.values() if isinstance(m, list)) + len(nodes) > MAX_NODES:
        raise NotAllowed("the model is too large (too many nodes)")
    built: Dict[str, torch.fx.GraphModule] = {}
    for name, method_nodes in methods.items():
        if not isinstance(name, str) or not is_method_name(name) or name == "forward" or not isinstance(method_nodes, list):
            raise NotAllowed("a model method has a name that is not allowed")
        built[name] = DuetMethod(root, _build_graph(method_nodes, modules, attr_keys), class_name="DuetMethod")
    model = DuetModel(root, forward, class_name="DuetModel")
    # Layers only another method uses belong to the model too: its parameters, state_dict, footprint.
    for name, sub in root.named_children():
        if not hasattr(model, name):
            model.add_module(name, sub)
    for name, param in root.named_parameters(recurse=False):
        if not hasattr(model, name):
            model.register_parameter(name, param)
    for name, buf in root.named_buffers(recurse=False):
        if not hasattr(model, name):
            model.register_buffer(name, buf)
    model.duet_methods = built  # a plain dict: the methods share the model's layers (registered above)
    model.train(bool(desc.get("training", True)))
    return model


def _build_graph(nodes: List[Any], modules: List[Any], attr_keys: set) -> torch.fx.Graph:
    """One graph from validated nodes (forward, or another method of the model)."""
    graph = torch.fx.Graph()
    env: List[Any] = []
    n_inputs = 0
    has_output = False
    for i, node in enumerate(nodes):
        if not isinstance(node, (list, tuple)) or len(node) != 4 or has_output:
            raise NotAllowed(f"model graph node #{i} is malformed")
        op, target, args, kwargs = node
        if not isinstance(args, (list, tuple)):
            raise NotAllowed(f"model graph node #{i} is malformed")
        if op == "placeholder":
            if kwargs or len(args) > 1 or (args and not _plain(args[0])):
                raise NotAllowed("model inputs may only have plain default values")
            if args:
                new = graph.placeholder(f"x{n_inputs}", default_value=args[0])
            else:
                new = graph.placeholder(f"x{n_inputs}")
            n_inputs += 1
        elif op == "call_module":
            if type(target) is not int or not 0 <= target < len(modules):
                raise NotAllowed("model graph calls a submodule that was not sent")
            new = graph.call_module(f"m{target}", tuple(_arg(list(args), env)), _kwargs(kwargs, env))
        elif op == "get_attr":
            if not isinstance(target, str) or target not in attr_keys:
                raise NotAllowed("model graph reads an attribute that was not sent")
            new = graph.get_attr(target)
        elif op == "call_function":
            if not isinstance(target, str):
                raise NotAllowed("model graph node has a malformed function name")
            a = tuple(_arg(list(args), env))
            if target == "builtins.getattr":
                if len(a) != 2 or not isinstance(a[0], torch.fx.Node) or a[1] not in allowlist.TENSOR_ATTRIBUTES or kwargs:
                    what = repr(a[1])[:60] if len(a) == 2 else "?"
                    raise NotAllowed(f"model reads attribute {what} (builtins.getattr), which is not on the allowlist")
                new = graph.call_function(builtins.getattr, a, {})
            else:
                if target not in _GRAPH_FUNCTIONS:
                    raise NotAllowed(f"model uses {target[:120]}, which is not on the allowlist")
                new = graph.call_function(resolve(target), a, _kwargs(kwargs, env))
        elif op == "call_method":
            if not isinstance(target, str) or target not in allowlist.GRAPH_METHODS:
                raise NotAllowed(f"model uses Tensor.{str(target)[:60]}, which is not allowed in a model")
            target = "new_zeros" if target == "new_empty" else target  # never uninitialised memory
            a = tuple(_arg(list(args), env))
            if not a or not isinstance(a[0], torch.fx.Node):
                raise NotAllowed(f"model calls Tensor.{target} on something that is not a value of the graph")
            new = graph.call_method(target, a, _kwargs(kwargs, env))
        elif op == "output":
            if len(args) != 1:
                raise NotAllowed("model graph output is malformed")
            new = graph.output(_arg(args[0], env))
            has_output = True
        else:
            raise NotAllowed(f"model graph has a node of kind {str(op)[:40]!r}")
        env.append(new)
    if not has_output:
        raise NotAllowed("model graph has no output")
    try:
        graph.lint()
    except Exception as exc:
        raise NotAllowed(f"model graph is inconsistent ({type(exc).__name__})") from None
    return graph
