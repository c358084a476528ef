"""DP-SGD on MNIST over Duet vs the same model trained locally without privacy, in one run.

The owner runs in its own process (MNIST published with privacy_unit="item", a budget of
epsilon 3 at delta 1e-5, served over WebRTC on 127.0.0.1). The scientist, in this process, sends
a small CNN (the tanh network of Papernot et al., "Tempered Sigmoid Activations for Deep Learning
with Differential Privacy") and calls scientist.dp.train with a target epsilon: the owner runs
Opacus with Poisson sampling, charges the ledger and returns the trained copy as a DP release.
The same model from the same initial weights is trained locally with plain SGD (no clipping, no
noise, shuffled batches of the same size) as the baseline. Printed: seconds per epoch of each,
their ratio, epsilon spent, and test accuracy of both on the MNIST test set.

    python benchmarks/dp_mnist.py                       # 15 epochs at epsilon <= 3
    python benchmarks/dp_mnist.py --epochs 1 --limit 4096   # quick check
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
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
    """Two convolutions and two linear layers with tanh: small, and kind to clipped gradients."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 8, 2, padding=3)
        self.conv2 = nn.Conv2d(16, 32, 4, 2)
        self.fc1 = nn.Linear(32 * 4 * 4, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x):
        x = F.max_pool2d(torch.tanh(self.conv1(x)), 2, 1)
        x = F.max_pool2d(torch.tanh(self.conv2(x)), 2, 1)
        x = torch.tanh(self.fc1(x.view(-1, 32 * 4 * 4)))
        return F.log_softmax(self.fc2(x), dim=1)


def owner_main(limit: int | None, epsilon: float, delta: float) -> int:
    owner = duet.launch(name="MNIST owner", local_only=True, display=False)
    owner.store.add(MNIST(train=True, limit=limit), name="mnist-train", description="MNIST training set",
                    privacy_unit="item")
    owner.privacy.budget(epsilon=epsilon, delta=delta)
    print(json.dumps({"code": owner.code}), flush=True)
    sys.stdin.read()
    owner.close()
    return 0


def local_epochs(model: nn.Module, opt: torch.optim.Optimizer, train: MNIST, batch_size: int, epochs: int,
                 seed: int) -> float:
    """Plain SGD on shuffled batches, in a worker thread like the owner's; seconds per epoch."""
    import threading

    gen = torch.Generator().manual_seed(seed)
    x_all, y_all = train.tensors
    times: list = []

    def run() -> None:
        for _ in range(epochs):
            start = time.perf_counter()
            order = torch.randperm(len(train), generator=gen)
            for i in range(0, len(train), batch_size):
                idx = order[i:i + batch_size]
                opt.zero_grad()
                F.nll_loss(model(x_all[idx]), y_all[idx]).backward()
                opt.step()
            times.append(time.perf_counter() - start)

    t = threading.Thread(target=run)
    t.start()
    t.join()
    return sum(times) / len(times)


def accuracy(model: nn.Module, test: MNIST) -> float:
    x, y = test.tensors
    with torch.no_grad():
        return sum(int(model(x[i:i + 1000]).argmax(1).eq(y[i:i + 1000]).sum()) for i in range(0, len(test), 1000)) / len(test)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--role", choices=["scientist", "owner"], default="scientist")
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--limit", type=int, default=None, help="use only the first N training images")
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--lr", type=float, default=4.0, help="DP-SGD learning rate (the baseline uses --local-lr)")
    ap.add_argument("--local-lr", type=float, default=0.1)
    ap.add_argument("--epsilon", type=float, default=3.0, help="target epsilon of the run (also the owner's budget)")
    ap.add_argument("--delta", type=float, default=1e-5)
    ap.add_argument("--max-grad-norm", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.role == "owner":
        return owner_main(args.limit, args.epsilon, args.delta)

    cmd = [sys.executable, str(Path(__file__).resolve()), "--role", "owner", "--epsilon", str(args.epsilon),
           "--delta", str(args.delta)] + (["--limit", str(args.limit)] if args.limit else [])
    # Fresh identities and ledgers each run: an earlier run's spending would count against this one.
    fresh = tempfile.mkdtemp(prefix="duet-bench-dp-")
    env = {**os.environ, "DUET_CONFIG_DIR": os.path.join(fresh, "owner")}
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=str(ROOT))
    try:
        code = json.loads(proc.stdout.readline() if proc.stdout else "")["code"]
        os.environ["DUET_CONFIG_DIR"] = os.path.join(fresh, "scientist")
        scientist = duet.join(code, name="benchmark", local_only=True)
        train, test = MNIST(train=True, limit=args.limit), MNIST(train=False)
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {len(train)} training images, "
              f"batch {args.batch_size}, {args.epochs} epoch(s), target epsilon {args.epsilon} at delta {args.delta}",
              flush=True)
        torch.manual_seed(args.seed)
        initial = Net()
        remote = scientist.send(initial)
        opt = scientist.torch.optim.SGD(remote.parameters(), lr=args.lr)
        start = time.perf_counter()
        trained = scientist.dp.train(remote, opt, "mnist-train", epochs=args.epochs, batch_size=args.batch_size,
                                     target_epsilon=args.epsilon, max_grad_norm=args.max_grad_norm)
        elapsed = time.perf_counter() - start
        info = scientist.dp.last_training
        model = trained.get(timeout=120)  # a DP release: no approval
        dp_acc = accuracy(model, test)

        local = copy.deepcopy(initial)
        local_opt = torch.optim.SGD(local.parameters(), lr=args.local_lr, momentum=0.9)
        t_local = local_epochs(local, local_opt, train, args.batch_size, args.epochs, args.seed)
        local_acc = accuracy(local, test)

        t_dp = elapsed / args.epochs
        print()
        print(f"DP-SGD over Duet: epsilon {info['epsilon']:.3f} at delta {info['delta']:g}, noise multiplier "
              f"{info['noise_multiplier']:.3f}, sampling rate {info['sampling_rate']:.5f}, {info['steps']} steps")
        print(f"seconds per epoch: DP-SGD on the owner {t_dp:.1f} s, plain SGD locally {t_local:.1f} s, "
              f"ratio {t_dp / t_local:.2f}x")
        print(f"test accuracy: DP-SGD {dp_acc:.4f}, non-private baseline {local_acc:.4f}")
        print(f"budget after: {scientist.privacy.spent:.3f} spent of {scientist.privacy.budget:g}")
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
