"""Plans on the owner: a validated list of actions over placeholders, replayed through the Executor.

A ``plan_def`` message holds ``inputs`` (how many placeholders: ids 0..n-1),
``actions`` (each ``{"rid", "kind", "name", "args", "kwargs"}`` like a "call"
message, with ``Ref`` ids local to the plan) and ``outputs`` (local ids).
Local ids must be defined before use and unique. A ``plan_run`` names the real
objects for the inputs and the ids for the outputs; each action runs through
``Executor.run`` with the same allowlist, limit and lineage rules as a single
"call", on temporary ids that are freed afterwards.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Set

from .. import allowlist, containers
from ..errors import NotAllowed
from ..text import clean as clean_text
from ..wire import Ref
from .executor import ACTION_ARG_DEPTH, Executor, arguments_too_deep, collect_refs
from .footprint import python_nbytes

MAX_PLANS = 1_000
MAX_ACTIONS = 10_000
MAX_INPUTS = 1_000
ACTION_KINDS = ("func", "method", "attr", "call")


@dataclass
class Plan:
    pid: int
    name: str
    n_inputs: int
    actions: List[Dict[str, Any]]
    outputs: List[int]
    ops: List[str]
    approved_lineage: Optional[Set[str]] = None  # strict mode: what the owner approved it for
    uses: int = field(default=0)
    nbytes: int = 0

    @property
    def chain(self) -> List[str]:
        """What running this plan records as operations: all its actions, then its name (static)."""
        return list(dict.fromkeys(self.ops)) + [f"plan {self.name}"]


def remap(obj: Any, mapping: Dict[int, int]) -> Any:
    """Replace plan-local references by the ids of this run (in arguments `validate` checked)."""
    return containers.map_leaves(obj, lambda v: Ref(mapping[v.id]) if isinstance(v, Ref) else v,
                                 max_depth=ACTION_ARG_DEPTH, too_deep=arguments_too_deep)


def validate(msg: Dict[str, Any]) -> Plan:
    """Check a plan definition's structure; every action is checked again when it runs."""
    pid, n_inputs, actions, outputs = msg.get("pid"), msg.get("inputs"), msg.get("actions"), msg.get("outputs")
    if type(pid) is not int or type(n_inputs) is not int or not isinstance(actions, list) or not isinstance(outputs, list):
        raise NotAllowed("malformed plan definition")
    if not 0 <= n_inputs <= MAX_INPUTS or len(actions) > MAX_ACTIONS or len(outputs) > MAX_ACTIONS:
        raise NotAllowed("the plan is too large")
    defined: Set[int] = set(range(n_inputs))
    clean: List[Dict[str, Any]] = []
    ops: List[str] = []
    for i, act in enumerate(actions):
        if not isinstance(act, dict):
            raise NotAllowed(f"plan action #{i} is malformed")
        rid, kind, name = act.get("rid"), act.get("kind"), act.get("name")
        args, kwargs = act.get("args", []), act.get("kwargs", {})
        if kind not in ACTION_KINDS or not isinstance(name, str) or not isinstance(args, list) or not isinstance(kwargs, dict):
            raise NotAllowed(f"plan action #{i} is malformed")
        if not _known(kind, name):  # the owner is shown these names when approving: only ones Duet knows
            raise NotAllowed(f"plan action #{i}, {clean_text(name, limit=80)}, is not on the owner's allowlist")
        used: List[int] = []
        collect_refs(args, used)
        collect_refs(kwargs, used)
        for r in used:
            if r not in defined:
                raise NotAllowed(f"plan action #{i} uses a value before it is computed")
        if rid is not None:
            if type(rid) is not int or rid in defined or rid < 0:
                raise NotAllowed(f"plan action #{i} has a bad result id")
            defined.add(rid)
        clean.append({"rid": rid, "kind": kind, "name": name, "args": args, "kwargs": kwargs})
        ops.append(name if kind == "func" else (("forward" if name == "forward" else f"model.{name}")
                                                if kind == "call" else f".{name}"))
    for o in outputs:
        if type(o) is not int or o not in defined:
            raise NotAllowed("a plan output is not computed by the plan")
    name = clean_text(msg.get("name") if isinstance(msg.get("name"), str) else "plan", limit=80)
    return Plan(pid=pid, name=name, n_inputs=n_inputs, actions=clean, outputs=list(outputs), ops=ops)


_METHOD_NAMES = allowlist.all_method_names()
_ATTRIBUTE_NAMES = allowlist.all_attribute_names()


def is_method_name(name: str) -> bool:
    """What a sent model's method may be called: a public identifier (shown to the owner as model.<name>)."""
    import keyword

    return name.isidentifier() and not keyword.iskeyword(name) and not name.startswith("_") and len(name) <= 64


def _known(kind: str, name: str) -> bool:
    if kind == "func":
        return name in allowlist.FUNCTIONS
    if kind == "method":
        return name in _METHOD_NAMES
    if kind == "attr":
        return name in _ATTRIBUTE_NAMES
    # a sent model's forward, or another of its methods (whether the model has it is checked when it runs)
    return name == "forward" or is_method_name(name)


class PlanRunner:
    """One scientist's plans, replayed on their object table."""

    def __init__(self, executor: Executor) -> None:
        self.executor = executor
        self.table = executor.table
        self.plans: Dict[int, Plan] = {}
        self._tmp = itertools.count(1)

    def define(self, msg: Dict[str, Any]) -> Plan:
        if len(self.plans) >= MAX_PLANS:
            raise NotAllowed(f"at most {MAX_PLANS} plans per scientist")
        plan = validate(msg)
        plan.nbytes = python_nbytes(plan.actions)  # literals in a plan are memory the scientist holds
        self.table.check_room(plan.nbytes)
        old = self.plans.pop(plan.pid, None)
        if old is not None:
            self.table.hold(-old.nbytes)
        self.table.hold(plan.nbytes)
        self.plans[plan.pid] = plan
        return plan

    def get(self, pid: Any) -> Plan:
        plan = self.plans.get(pid) if type(pid) is int else None
        if plan is None:
            raise NotAllowed("this plan was never defined (or its definition was refused)")
        return plan

    def run(self, plan: Plan, arg_ids: List[int], out_ids: List[int], on_action: Any = None, rng: Any = None) -> None:
        """Replay; raises the first action's error, labelled, after freeing the temporaries."""
        if len(arg_ids) != plan.n_inputs or len(out_ids) != len(plan.outputs):
            raise NotAllowed(f"plan {plan.name} takes {plan.n_inputs} remote arguments and has {len(plan.outputs)} results")
        mapping: Dict[int, int] = {i: rid for i, rid in enumerate(arg_ids)}
        temps: List[int] = []
        try:
            for index, act in enumerate(plan.actions):
                rid = act["rid"]
                real: Optional[int] = None
                if rid is not None:
                    real = -next(self._tmp)  # ids the scientist can never name (theirs are >= 0)
                    mapping[rid] = real
                    temps.append(real)
                args = remap(act["args"], mapping)
                kwargs = remap(act["kwargs"], mapping)
                if on_action is not None:
                    on_action(act)
                self.executor.run(real, act["kind"], act["name"], args, kwargs,
                                  rng=rng.child(index) if rng is not None else None, chain=plan.chain)
            for local, out in zip(plan.outputs, out_ids):
                src = self.table.get(mapping[local])
                self.table.put(out, src.value, lineage=src.group.lineage, ops=(), meta=src.meta, alias_of=[mapping[local]],
                               fp=src.footprint)
            plan.uses += 1
        finally:
            for t in temps:
                self.table.free(t)
