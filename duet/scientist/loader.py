"""Remote batches: iterate a dataset the owner published, without any sample leaving the owner.

    loader = scientist.loader("mnist-train", batch_size=64, shuffle=True)
    for x, y in loader:          # one epoch, with a progress bar
        loss = train_step(remote, opt, x, y)

Each iteration is one epoch; each step sends one small "batch" message (no
round trip) and yields pointers. To keep the progress bar honest and the
owner's queue short, a ping rides along every ``window`` batches and the loop
waits only when more than two windows are unacknowledged; the bar counts
batches the owner has reached. The epoch ends when the owner has caught up.

Loss values are private. ``loader.track(loss)`` asks the owner for the value
every ``track_every`` batches, without waiting; approved values (e.g. by the
owner's rule for scalars of this dataset) show in the progress bar.
"""
from __future__ import annotations

import collections
from typing import TYPE_CHECKING, Any, Deque, Iterator, List, Optional, Tuple

from ..errors import DuetError
from ..protocol import Msg, RequestKind
from .pointer import Pointer

if TYPE_CHECKING:
    from .client import Scientist

DEFAULT_TIMEOUT = 300.0


class RemoteLoader:
    """Batches of a remote dataset; `len()` is the number of batches per epoch."""

    def __init__(
        self,
        client: "Scientist",
        name: str,
        batch_size: int = 64,
        shuffle: bool = False,
        drop_last: bool = False,
        seed: Optional[int] = None,
        progress: bool = True,
        window: int = 8,
        timeout: float = DEFAULT_TIMEOUT,
        track_every: int = 50,
    ) -> None:
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError("batch_size must be a positive int")
        self._client = client
        self.name = name
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.progress = progress
        self.window = max(1, int(window))
        self.timeout = timeout
        self.track_every = max(1, int(track_every))
        self.epoch = 0
        self._lid = client._new_rid()
        info = client.session.call(
            {"kind": RequestKind.LOADER, "lid": self._lid, "name": name, "batch_size": batch_size, "shuffle": bool(shuffle),
             "drop_last": bool(drop_last), "seed": seed},
            30.0,
            f"opening a loader on {name!r}",
        )
        self._batches = int(info["batches"])
        self.size = int(info["size"])
        self._fields = int(info["fields"])
        self._single = bool(info["single"])
        self._bar: Any = None
        self._tracked: Deque[Any] = collections.deque()
        self._step = 0
        self.last_loss: Optional[float] = None

    def __len__(self) -> int:
        return self._batches

    def __iter__(self) -> Iterator[Any]:
        client = self._client
        session = client.session
        self.epoch += 1
        session.send({"t": Msg.EPOCH, "loader": self._lid})
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=self._batches, desc=f"{self.name} epoch {self.epoch}", unit="batch", leave=True)
        self._bar = bar
        acks: Deque[Tuple[int, Any]] = collections.deque()
        done = 0
        try:
            for i in range(self._batches):
                rids = [client._new_rid() for _ in range(self._fields)]
                session.send({"t": Msg.BATCH, "loader": self._lid, "rids": rids})
                ptrs: List[Pointer] = [Pointer(client, r, f"{self.name} batch {i}" + ("" if self._single else f"[{k}]")) for k, r in enumerate(rids)]
                if (i + 1) % self.window == 0:
                    acks.append((i, session.request({"kind": RequestKind.PING})))
                while len(acks) > 2 or (acks and acks[0][1].done()):
                    idx, fut = acks.popleft()
                    fut.result(self.timeout)
                    done = self._advance(bar, done, idx)
                self._poll_tracked()
                self._step = i
                yield ptrs[0] if self._single else tuple(ptrs)
                del ptrs
            fut = session.request({"kind": RequestKind.PING})
            while acks:
                idx, f = acks.popleft()
                f.result(self.timeout)
                done = self._advance(bar, done, idx)
            fut.result(self.timeout)
            done = self._advance(bar, done, self._batches - 1)
            self._poll_tracked(final=True)
        finally:
            if bar is not None:
                bar.close()
            self._bar = None

    @staticmethod
    def _advance(bar: Any, done: int, idx: int) -> int:
        if bar is not None and idx + 1 > done:
            bar.update(idx + 1 - done)
        return max(done, idx + 1)

    def track(self, loss: Pointer, reason: str = "training loss") -> None:
        """Every `track_every` steps, ask (without waiting) for this scalar; approved values show in the bar."""
        if self._step % self.track_every != 0:
            return
        self._tracked.append(loss.request(reason))

    def _poll_tracked(self, final: bool = False) -> None:
        while self._tracked and (self._tracked[0].done() or final):
            handle = self._tracked.popleft()
            try:
                value = handle.wait(0 if not final else 5.0)
                self.last_loss = float(value)
            except DuetError:
                continue
            if self._bar is not None and self.last_loss is not None:
                self._bar.set_postfix(loss=f"{self.last_loss:.4f}", refresh=False)

    def __repr__(self) -> str:
        return (
            f"<RemoteLoader {self.name!r}: {self.size} samples, batch_size={self.batch_size}, "
            f"shuffle={self.shuffle}, {self._batches} batches per epoch>"
        )
