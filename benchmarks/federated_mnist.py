"""Federated averaging of the MNIST CNN across three owner processes, with secure aggregation and
without it, in one run.

Each owner runs in its own process with its own identity and publishes a disjoint third of the
MNIST training set (images k, k+3, k+6, ...); the scientist, in this process, joins all three over
WebRTC on 127.0.0.1 and runs `duet.Federation.train`: every round each owner trains a copy of the
global model for one local epoch (SGD as a plan, one message per batch), then the updates are
averaged weighted by shard size. With secure aggregation the weighted models are summed with
`secure_sum` (each owner's vector masked, only the sum unmasked); without it, each owner releases
its model (an owner rule) and the scientist averages. Both start from the same initial weights
with the same seeds. Printed per mode: seconds per round, rounds per minute, bytes each owner
sends per round for the aggregation, and test accuracy of the global model after every round.

    python benchmarks/federated_mnist.py                  # 5 rounds each
    python benchmarks/federated_mnist.py --rounds 1 --limit 6000   # quick check
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402

import duet  # noqa: E402
from duet.datasets import MNIST  # noqa: E402
from mnist import Net  # noqa: E402  (the classic CNN of benchmarks/mnist.py)


def owner_main(shard: int, owners: int, limit: int | None) -> int:
    full = MNIST(train=True, limit=limit)
    owner = duet.launch(name=f"hospital {shard + 1}", local_only=True, display=False)
    owner.store.add(torch.utils.data.TensorDataset(full.data[shard::owners], full.targets[shard::owners]),
                    name="mnist-train", description=f"a third of MNIST (shard {shard + 1} of {owners})")
    owner.pin_federation(min_owners=owners, exact=True)  # exact sums of model weights: trusts the scientist's program
    owner.requests.add_handler(action="accept", secure_sum=True, min_owners=owners)
    # Plain FedAvg, for comparison: each owner releases its trained model (a benchmark: nobody at the queue).
    owner.requests.add_handler(action="accept", kind="release", datasets=["mnist-train"])
    print(json.dumps({"code": owner.code}), flush=True)
    sys.stdin.read()
    owner.close()
    return 0


def accuracy(model: torch.nn.Module, test: MNIST) -> float:
    with torch.no_grad():
        return sum(int(model(test.data[i:i + 1000]).argmax(1).eq(test.targets[i:i + 1000]).sum())
                   for i in range(0, len(test), 1000)) / len(test)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--role", choices=["scientist", "owner"], default="scientist")
    ap.add_argument("--shard", type=int, default=0)
    ap.add_argument("--owners", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--limit", type=int, default=None, help="use only the first N training images (split among owners)")
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--momentum", type=float, default=0.5)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    if args.role == "owner":
        return owner_main(args.shard, args.owners, args.limit)

    procs = []
    fresh = tempfile.mkdtemp(prefix="duet-bench-fed-")  # fresh identities and logs each run
    try:
        codes = []
        for k in range(args.owners):
            cmd = [sys.executable, str(Path(__file__).resolve()), "--role", "owner", "--shard", str(k),
                   "--owners", str(args.owners)] + (["--limit", str(args.limit)] if args.limit else [])
            env = {**os.environ, "DUET_CONFIG_DIR": os.path.join(fresh, f"owner-{k}")}
            proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=str(ROOT))
            procs.append(proc)
            codes.append(json.loads(proc.stdout.readline() if proc.stdout else "")["code"])
        os.environ["DUET_CONFIG_DIR"] = os.path.join(fresh, "scientist")
        scientists = [duet.join(code, name="benchmark", local_only=True) for code in codes]
        test = MNIST(train=False)
        torch.manual_seed(args.seed)
        initial = Net()
        params = sum(p.numel() for p in initial.parameters())
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.owners} owner processes, "
              f"{len(MNIST(train=True, limit=args.limit))} training images in all, {params} parameters; "
              f"{args.rounds} rounds of 1 local epoch, batch {args.batch_size}, SGD lr {args.lr} momentum {args.momentum}",
              flush=True)
        # One discarded round first: the first plan recordings, model traces and imports of a session
        # would otherwise count against whichever mode ran first.
        duet.Federation(scientists, min_owners=args.owners).train(initial, "mnist-train", rounds=1, lr=args.lr,
                                                                   batch_size=args.batch_size, progress=False)
        results = {}
        for secure in (True, False):
            fed = duet.Federation(scientists, min_owners=args.owners)
            label = "secure aggregation" if secure else "plain FedAvg (each model released)"
            print(f"\n{label}:", flush=True)
            fed.train(initial, "mnist-train", rounds=args.rounds, lr=args.lr, momentum=args.momentum,
                      batch_size=args.batch_size, secure=secure, seed=args.seed, test=lambda m: accuracy(m, test),
                      reason="benchmark")
            results[secure] = fed.history
        print()
        for secure in (True, False):
            h = results[secure]
            per_round = sum(e["seconds"] for e in h) / len(h)
            agg = sum(e["aggregate_seconds"] for e in h) / len(h)
            sent = h[0].get("bytes_per_owner", 4 * params)  # plain: each owner releases float32 weights
            print(f"{'secure' if secure else 'plain '}: {per_round:.1f} s per round ({60 / per_round:.2f} rounds/min), "
                  f"aggregation {agg:.2f} s, {sent / 2**20:.2f} MiB sent per owner per round, "
                  f"accuracy after {len(h)} rounds {h[-1]['test']:.4f}")
        s_acc, p_acc = results[True][-1]["test"], results[False][-1]["test"]
        s_round = sum(e["seconds"] for e in results[True]) / args.rounds
        p_round = sum(e["seconds"] for e in results[False]) / args.rounds
        print(f"secure vs plain: round time ratio {s_round / p_round:.3f}x, accuracy difference "
              f"{100 * (s_acc - p_acc):+.2f} points (goal: >= 98.5% and within 0.3 points)")
        for s in scientists:
            s.close()
    finally:
        for proc in procs:
            if proc.stdin:
                proc.stdin.close()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
