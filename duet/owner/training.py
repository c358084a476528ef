"""Owner-side handlers for training: model uploads, plans, remote loaders.

Messages (all pipelined, handled in order by the scientist's worker thread):

- ``{"t": "model", "rid", "graph"}``: a model as data (duet.owner.models).
- ``{"t": "plan_def", "pid", "inputs", "actions", "outputs", "name"}``.
- ``{"t": "plan_run", "pid", "args": [Ref], "out": [rid]}``: one per call.
- ``{"t": "epoch", "loader"}``: start a new epoch (a new order).
- ``{"t": "batch", "loader", "rids": [rid per field]}``: the next batch.
- request ``{"kind": "loader", "lid", "name", "batch_size", "shuffle", "drop_last", "seed"}``
  (a round trip, once per loader): replies with the number of batches.

Strict mode (``approve="everything"``): a plan asks the owner once, as a
"compute" request whose operations are the plan's recorded actions and whose
lineage is that of the first run's inputs; later runs on the same or fewer
assets go ahead without asking again, a run on other assets asks again.
Loaders and model uploads need no approval: batches stay on the owner and a
model is the scientist's own data.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Callable, Dict, List

from ..errors import DuetError, NotAllowed, RemoteError
from ..protocol import Msg
from ..wire import Ref
from .datasets import MAX_LOADERS, OwnerLoader
from .models import build_model
from .plans import PlanRunner

if TYPE_CHECKING:
    from .host import ScientistConnection

log = logging.getLogger("duet.owner")

class TrainingHandlers:
    """Per scientist: their plans and loaders."""

    def __init__(self, conn: "ScientistConnection") -> None:
        self.conn = conn
        self.plans = PlanRunner(conn.executor)
        self.loaders: Dict[int, OwnerLoader] = {}

    # -- messages ------------------------------------------------------------------
    def handlers(self) -> Dict[str, Callable[[Dict[str, Any]], None]]:
        """The training messages this side handles, for the connection's dispatch table."""
        return {Msg.MODEL: self._model, Msg.PLAN_DEF: self._plan_def, Msg.PLAN_RUN: self._plan_run,
                Msg.EPOCH: self._epoch, Msg.BATCH: self._batch}

    def _plan_def(self, msg: Dict[str, Any]) -> None:
        try:
            self.plans.define(msg)
        except DuetError as exc:
            log.warning("refused a plan definition: %s", exc)
            pid = msg.get("pid")
            self.conn._fail(pid if type(pid) is int else None, exc, "plan definition")

    def _epoch(self, msg: Dict[str, Any]) -> None:
        loader = self.loaders.get(msg.get("loader"))  # type: ignore[arg-type]
        if loader is not None:
            loader.start_epoch()

    def _model(self, msg: Dict[str, Any]) -> None:
        rid = msg.get("rid")
        if type(rid) is not int:
            return
        try:
            model = build_model(msg.get("graph"))
            self.conn.objects.put(rid, model, lineage=(), ops=["model upload"])
        except DuetError as exc:
            log.warning("refused a model: %s", exc)
            self.conn._fail(rid, exc, "model upload")
        except Exception as exc:
            log.warning("model upload failed", exc_info=True)
            self.conn._fail(rid, exc, "model upload")

    def _fail_all(self, rids: List[Any], exc: BaseException, op: str) -> None:
        for r in rids:
            if type(r) is int:
                self.conn._fail(r, exc, op)

    def _plan_run(self, msg: Dict[str, Any]) -> None:
        out = msg.get("out")
        args = msg.get("args")
        if not isinstance(out, list) or not isinstance(args, list) or not all(isinstance(a, Ref) for a in args):
            return
        conn = self.conn
        label = "plan"
        rng = conn.executor.randomness.for_action()  # one step per plan run, however far it gets
        try:
            pid = msg.get("pid")
            plan = None if (type(pid) is int and pid in conn.failures) else self.plans.get(pid)
            label = f"plan {plan.name}" if plan else "plan"
            arg_ids = [a.id for a in args]
            for rid in ([pid] if plan is None else []) + arg_ids:
                if rid in conn.failures:
                    for r in out:
                        if type(r) is int:
                            conn.failures[r] = conn.failures[rid]
                            conn.session.send({"t": Msg.FAILED, "rid": r, "error": conn.failures[rid]})
                    return
            assert plan is not None  # a plan that failed to be defined returned above
            if any(type(r) is not int or r < 0 for r in out):
                raise NotAllowed("malformed plan run")
            if conn.owner.approve == "everything":
                self._approve(plan, arg_ids)
            current = {"label": label}

            def on_action(act: Dict[str, Any]) -> None:
                kind, name = act["kind"], act["name"]
                what = name if kind == "func" else (name if kind == "call" else f".{name}")
                current["label"] = f"{plan.name}: {what}"

            try:
                self.plans.run(plan, arg_ids, out, on_action=on_action, rng=rng)
            except Exception as exc:
                if not isinstance(exc, DuetError):
                    log.warning("%s failed", current["label"], exc_info=True)
                if conn.executor.lineage_of([a for a in arg_ids if a in conn.objects])[0]:
                    # Which action failed, and which ran before it, may depend on private data.
                    conn.executor.taint_reachable(arg_ids, label, chain=plan.chain)
                    exc = RemoteError(label, "Error", "the details are withheld because the plan's inputs derive "
                                                      "from private data; the owner's log has them")
                    self._fail_all(out, exc, label)
                else:
                    self._fail_all(out, exc, current["label"])
        except DuetError as exc:
            self._fail_all(out, exc, label)

    def _approve(self, plan: Any, arg_ids: List[int]) -> None:
        conn = self.conn
        lineage, _ops, _ = conn.executor.lineage_of(arg_ids)
        if plan.approved_lineage is not None and lineage <= plan.approved_lineage:
            return
        conn.await_approval(
            {"kind": "compute", "lineage": tuple(sorted(lineage)), "ops": tuple(plan.ops),
             "type_name": f"plan {plan.name} ({len(plan.ops)} actions)"},
            denied="the owner did not approve this plan")
        plan.approved_lineage = set(lineage) | (plan.approved_lineage or set())

    def _batch(self, msg: Dict[str, Any]) -> None:
        rids = msg.get("rids")
        if not isinstance(rids, list) or not all(type(r) is int and r >= 0 for r in rids):
            return
        loader = self.loaders.get(msg.get("loader"))  # type: ignore[arg-type]
        try:
            if loader is None:
                raise NotAllowed("this loader was never opened")
            if len(rids) != loader.fields:
                raise NotAllowed(f"a batch of {loader.name!r} has {loader.fields} parts")
            values = loader.next_batch()
            # A TensorDataset's batches have shapes fixed by its tensors; another dataset's samples may
            # differ in shape, so the shapes of its batches are private like its values.
            meta = () if loader.tensors is not None else {loader.name}
            for rid, value in zip(rids, values):
                self.conn.objects.put(rid, value, lineage={loader.name}, ops=[loader.name, "batch"], meta=meta)
        except DuetError as exc:
            self._fail_all(rids, exc, "loader batch")
        except Exception:
            log.warning("loader batch failed", exc_info=True)
            self._fail_all(rids, RemoteError("loader batch", "Error", "the details are withheld: the dataset is private"),
                           "loader batch")

    # -- requests --------------------------------------------------------------------
    def open_loader(self, msg: Dict[str, Any]) -> Dict[str, Any]:
        lid, name = msg.get("lid"), msg.get("name")
        if type(lid) is not int or not isinstance(name, str):
            raise NotAllowed("malformed loader request")
        if name not in self.conn.owner.store:
            raise NotAllowed(f"no asset named {name!r} is published")
        if len(self.loaders) >= MAX_LOADERS and lid not in self.loaders:
            raise NotAllowed(f"at most {MAX_LOADERS} loaders per scientist")
        asset = self.conn.owner.store.get(name)
        dataset = asset.value
        import torch

        if isinstance(dataset, torch.Tensor):
            dataset = torch.utils.data.TensorDataset(dataset)
        if not isinstance(dataset, torch.utils.data.Dataset) or not hasattr(dataset, "__len__"):
            raise NotAllowed(f"asset {name!r} cannot be loaded in batches")
        loader = OwnerLoader(
            name, dataset, msg.get("batch_size"), bool(msg.get("shuffle")), bool(msg.get("drop_last")), msg.get("seed")  # type: ignore[arg-type]  # OwnerLoader checks them
        )
        self.loaders[lid] = loader
        return loader.info()
