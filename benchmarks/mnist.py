"""MNIST over Duet vs the same loop locally, in one run.

The owner runs in its own process (MNIST published, served over WebRTC on
127.0.0.1); the scientist, in this process, sends the classic CNN, trains it
remotely with a plan and a remote loader, and gets the weights back. The same
model from the same initial weights is trained locally with the same code, batch
size and optimiser. Printed: seconds per epoch for each, their ratio, and the
test accuracy of both models (the Duet one evaluated remotely on the owner's
test set, the count released by an owner rule for scalars).

    python benchmarks/mnist.py                 # 1 epoch: the time ratio
    python benchmarks/mnist.py --epochs 10     # the accuracy figure
    python benchmarks/mnist.py --limit 2048    # quick check

Local baselines: "local DataLoader" is the usual torch loop
(``DataLoader(dataset, batch_size=64, shuffle=True)``); "local indexed" batches
by indexing the tensors with a permutation, as the owner does. The ratio is
reported against both; the goal (<= 1.15x) is judged against the faster.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import duet  # noqa: E402
from duet.datasets import MNIST  # noqa: E402


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 20, 5, 1)
        self.conv2 = nn.Conv2d(20, 50, 5, 1)
        self.fc1 = nn.Linear(4 * 4 * 50, 500)
        self.fc2 = nn.Linear(500, 10)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(x, 2, 2)
        x = F.relu(self.conv2(x))
        x = F.max_pool2d(x, 2, 2)
        x = x.view(-1, 4 * 4 * 50)
        x = F.relu(self.fc1(x))
        x = self.fc2(x)
        return F.log_softmax(x, dim=1)


@duet.plan
def train_step(model, opt, x, y):
    opt.zero_grad()
    loss = F.nll_loss(model(x), y)
    loss.backward()
    opt.step()
    return loss


@duet.plan
def correct_count(model, x, y):
    return model(x).argmax(dim=1).eq(y).sum()


# -- the owner process ----------------------------------------------------------------
def owner_main(limit: int | None) -> int:
    owner = duet.launch(name="MNIST owner", local_only=True, display=False)
    owner.store.add(MNIST(train=True, limit=limit), name="mnist-train", description="MNIST training set")
    owner.store.add(MNIST(train=False), name="mnist-test", description="MNIST test set")
    # Scalars (losses, the accuracy count) are released by rule; so are the trained
    # weights, because this is a benchmark and nobody sits at the queue.
    owner.requests.add_handler(action="accept", datasets=["mnist-train", "mnist-test"], kind="release")
    print(json.dumps({"code": owner.code}), flush=True)
    sys.stdin.read()
    owner.close()
    return 0


# -- the scientist (this process) -----------------------------------------------------
def local_epoch(model, opt, dataset, batch_size, gen, indexed: bool, thread: str = "worker") -> float:
    """One local epoch. In a worker thread by default, like the owner's training: on this
    machine the main thread runs the same step 3-7x slower (glibc's main-arena heap is
    grown and trimmed around every step's large buffers), which would flatter Duet."""
    if thread == "worker":
        import threading

        out: list = []
        t = threading.Thread(target=lambda: out.append(local_epoch(model, opt, dataset, batch_size, gen, indexed, "main")))
        t.start()
        t.join()
        return out[0]
    start = time.perf_counter()
    if indexed:
        x_all, y_all = dataset.tensors
        order = torch.randperm(len(dataset), generator=gen)
        for i in range(0, len(dataset), batch_size):
            idx = order[i:i + batch_size]
            train_step(model, opt, x_all[idx], y_all[idx])
    else:
        for x, y in torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=gen):
            train_step(model, opt, x, y)
    return time.perf_counter() - start


def local_accuracy(model, test) -> float:
    x, y = test.tensors
    with torch.no_grad():
        correct = sum(int(model(x[i:i + 1000]).argmax(1).eq(y[i:i + 1000]).sum()) for i in range(0, len(test), 1000))
    return correct / len(test)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--role", choices=["scientist", "owner"], default="scientist")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--limit", type=int, default=None, help="use only the first N training images")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--momentum", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--local-thread", choices=["worker", "main"], default="worker",
                    help="where the local baseline runs (default: a worker thread, as on the owner)")
    ap.add_argument("--dataloader", action="store_true", help="also time the torch DataLoader baseline")
    args = ap.parse_args()
    if args.role == "owner":
        return owner_main(args.limit)

    cmd = [sys.executable, str(Path(__file__).resolve()), "--role", "owner"]
    if args.limit:
        cmd += ["--limit", str(args.limit)]
    env = {**os.environ, "DUET_CONFIG_DIR": os.environ.get("DUET_CONFIG_DIR", "/tmp/duet-bench-owner")}
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=str(ROOT))
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        code = json.loads(line)["code"]
        os.environ.setdefault("DUET_CONFIG_DIR", "/tmp/duet-bench-scientist")
        scientist = duet.join(code, name="benchmark", local_only=True)
        train = MNIST(train=True, limit=args.limit)
        test = MNIST(train=False)
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {len(train)} training images, "
              f"batch {args.batch_size}, {args.epochs} epoch(s)", flush=True)

        torch.manual_seed(args.seed)
        initial = Net()
        remote = scientist.send(initial)
        opt = scientist.torch.optim.SGD(remote.parameters(), lr=args.lr, momentum=args.momentum)
        loader = scientist.loader("mnist-train", batch_size=args.batch_size, shuffle=True, seed=args.seed,
                                  progress=not args.no_progress)

        local_dl = copy.deepcopy(initial)
        opt_dl = torch.optim.SGD(local_dl.parameters(), lr=args.lr, momentum=args.momentum)
        local_ix = copy.deepcopy(initial)
        opt_ix = torch.optim.SGD(local_ix.parameters(), lr=args.lr, momentum=args.momentum)
        gen_dl = torch.Generator().manual_seed(args.seed)
        gen_ix = torch.Generator().manual_seed(args.seed)

        t_duet, t_dl, t_ix = [], [], []
        for epoch in range(1, args.epochs + 1):
            t_ix.append(local_epoch(local_ix, opt_ix, train, args.batch_size, gen_ix, True, args.local_thread))
            start = time.perf_counter()
            for x, y in loader:  # ends when the owner has run every step of the epoch
                loss = train_step(remote, opt, x, y)
            t_duet.append(time.perf_counter() - start)
            if args.dataloader:
                t_dl.append(local_epoch(local_dl, opt_dl, train, args.batch_size, gen_dl, False, args.local_thread))
            last = float(loss.get(reason="last loss of the epoch", timeout=60))
            dl_text = f", local DataLoader {t_dl[-1]:.2f} s" if t_dl else ""
            print(f"epoch {epoch}: duet {t_duet[-1]:.2f} s, local indexed {t_ix[-1]:.2f} s{dl_text}; "
                  f"last loss {last:.4f}", flush=True)

        # remote evaluation on the owner's test set: only the count comes back
        total = None
        for x, y in scientist.loader("mnist-test", batch_size=1000, progress=False):
            c = correct_count(remote, x, y)
            total = c if total is None else total + c
        remote_acc = int(total.get(reason="test accuracy", timeout=120)) / len(test)
        trained = remote.get(reason="trained weights", timeout=120)
        released_acc = local_accuracy(trained, test)

        mean = lambda v: sum(v) / len(v)  # noqa: E731
        d, ix = mean(t_duet), mean(t_ix)
        best = ix
        print()
        print(f"epoch time over Duet (2 processes, WebRTC on 127.0.0.1): {d:.2f} s")
        print(f"epoch time locally ({args.local_thread} thread), indexed batches: {ix:.2f} s   ratio {d / ix:.3f}x")
        if t_dl:
            dl = mean(t_dl)
            best = min(ix, dl)
            print(f"epoch time locally ({args.local_thread} thread), torch DataLoader: {dl:.2f} s   ratio {d / dl:.3f}x")
        print(f"overhead vs the faster local loop: {d / best:.3f}x (goal <= 1.15x)")
        print(f"test accuracy after {args.epochs} epoch(s): Duet model {remote_acc:.4f} (remote evaluation), "
              f"released weights {released_acc:.4f}, local model {local_accuracy(local_ix, test):.4f}")
        scientist.close()
    finally:
        if proc.stdin:
            proc.stdin.close()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
