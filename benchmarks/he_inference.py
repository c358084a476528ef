"""Encrypted inference (CKKS, TenSEAL) over Duet next to plain inference, in one run.

The owner is a child process: it fits a Linear(784, 10) on MNIST training images (seeded, full
batch), publishes it as "risk-model" and releases what derives from it by rule (a benchmark:
nobody at the queue). The scientist, this process, joins over WebRTC on 127.0.0.1, makes a CKKS
context (the ~34 MiB public part goes to the owner once) and classifies MNIST test images three
ways, image by image, interleaved so all three see the same state of the machine:

  encrypted     he.encrypt(x), send, call the published model, .get(), he.decrypt
  plain remote  the same published model on a plain pointer to x, .get()
  local         the same model (fitted here from the same seed) called in this process

Printed: seconds per inference for each and their ratios, the encrypted path's parts (encrypt;
send + evaluate + get; decrypt; and the owner's evaluation and serialization alone, timed here on
the same ciphertexts), bytes moved per inference (ciphertext in and out vs float32 in and out),
the one-time context (size, key generation, sending), and the error of the decrypted logits
against the plain ones, with how often their argmax agrees.

    python benchmarks/he_inference.py                          # 20 images x 3 rounds
    python benchmarks/he_inference.py --images 5 --repeat 1    # quick check
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Dict, List

try:
    from . import _util
except ImportError:  # run as a script
    import _util  # type: ignore[no-redef]

_util.ensure_path()

import torch  # noqa: E402

import duet  # noqa: E402
import duet.scientist.he  # noqa: E402
from duet.datasets import MNIST  # noqa: E402


def fit_linear(seed: int, limit: int, steps: int) -> torch.nn.Linear:
    """Linear(784, 10) by full-batch SGD on the first `limit` training images: the same in every process."""
    torch.manual_seed(seed)
    data = MNIST(train=True, limit=limit)
    model = torch.nn.Linear(784, 10)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    x, y = data.data.reshape(len(data.data), -1), data.targets
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model


def owner_child(seed: int, limit: int, steps: int) -> None:
    owner = duet.launch(name="bench-owner", local_only=True, display=False)
    owner.store.add(fit_linear(seed, limit, steps), name="risk-model", description="a linear model on 28x28 images")
    owner.requests.add_handler(action="accept", kind="release", datasets=["risk-model"])
    print(json.dumps({"code": owner.code}), flush=True)
    sys.stdin.read()
    owner.close()


def keygen_seconds(he: "duet.scientist.he.HEContext") -> float:
    """What scientist.he.context() spends before sending: keys, Galois keys, the public part serialized."""
    import tenseal as ts

    start = time.perf_counter()
    ctx = ts.context(ts.SCHEME_TYPE.CKKS, poly_modulus_degree=he.poly_modulus, coeff_mod_bit_sizes=list(he.coeff_bits))
    ctx.global_scale = 2 ** he.scale_bits
    ctx.generate_galois_keys()
    public = ctx.copy()
    public.make_context_public()
    public.serialize(save_public_key=True, save_secret_key=False, save_galois_keys=True, save_relin_keys=True)
    return time.perf_counter() - start


def owner_side_seconds(he: "duet.scientist.he.HEContext", model: torch.nn.Module, inputs: List) -> Dict[str, float]:
    """The owner's work alone, in this process on the same ciphertexts: read them, evaluate, serialize."""
    from duet.ciphertext import CONTEXT, Ciphertext
    from duet.owner import he as owner_he

    public = he._context.copy()
    public.make_context_public()
    raw = public.serialize(save_public_key=True, save_secret_key=False, save_galois_keys=True, save_relin_keys=True)
    ctx = owner_he.HEContext(Ciphertext(CONTEXT, hashlib.sha256(raw).digest(), (raw,)))
    ctx.digest = he.digest  # the same keys; this copy's bytes differ from the one sent (fresh serialization)
    read, evaluate, serialize = [], [], []
    with torch.no_grad():
        for c in inputs:
            t0 = time.perf_counter()
            x = owner_he.Encrypted.from_wire(c, ctx)
            t1 = time.perf_counter()
            y = owner_he.evaluate(model, x)
            t2 = time.perf_counter()
            y.to_wire()
            t3 = time.perf_counter()
            read.append(t1 - t0)
            evaluate.append(t2 - t1)
            serialize.append(t3 - t2)
    return {"read": statistics.median(read), "evaluate": statistics.median(evaluate),
            "serialize": statistics.median(serialize)}


def local_seconds(model: torch.nn.Module, x: torch.Tensor, reps: int = 2000) -> float:
    with torch.no_grad():
        model(x)
        start = time.perf_counter()
        for _ in range(reps):
            model(x)
        return (time.perf_counter() - start) / reps


def fast_received(scientist: duet.Scientist) -> int:
    transport = getattr(scientist.session, "transport", None)
    stats = getattr(transport, "stats", None)
    return int(stats().get("fast_received", 0)) if callable(stats) else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--owner", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--images", type=int, default=20, help="MNIST test images per round")
    ap.add_argument("--repeat", type=int, default=3, help="rounds over the images (and contexts made)")
    ap.add_argument("--limit", type=int, default=10000, help="training images the owner fits its model on")
    ap.add_argument("--steps", type=int, default=50, help="full-batch SGD steps of that fit")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.owner:
        owner_child(args.seed, args.limit, args.steps)
        return 0

    here = os.path.abspath(__file__)
    with tempfile.TemporaryDirectory(prefix="duet-bench-he-") as fresh:
        os.environ["DUET_CONFIG_DIR"] = os.path.join(fresh, "owner")  # the child inherits it
        proc = _util.spawn([here, "--owner", "--seed", str(args.seed), "--limit", str(args.limit),
                            "--steps", str(args.steps)])
        try:
            hello = _util.read_json(proc.stdout, 300, "the owner's join code")
            os.environ["DUET_CONFIG_DIR"] = os.path.join(fresh, "scientist")
            scientist = duet.join(hello["code"], name="bench", local_only=True)
            try:
                run(scientist, args)
            finally:
                scientist.close()
        finally:
            _util.stop(proc)
    return 0


def run(scientist: duet.Scientist, args: argparse.Namespace) -> None:
    fast = _util.wait_for_fast_path(scientist)
    model = fit_linear(args.seed, args.limit, args.steps)
    model64 = copy.deepcopy(model).double()
    test = MNIST(train=False, limit=args.images)
    images = [x.reshape(-1) for x in test.data]
    remote_model = scientist.store["risk-model"]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; Linear(784, 10) fitted on {args.limit} "
          f"images ({args.steps} steps); {args.images} test images x {args.repeat} round(s); fast path: {fast}",
          flush=True)

    contexts = []
    for _ in range(args.repeat):  # the owner keeps the newest; the last one is used below
        start = time.perf_counter()
        he = scientist.he.context(progress=False)
        contexts.append(time.perf_counter() - start)
    keygen = keygen_seconds(he)

    # Warm up both paths (first-time imports, first touches) outside the figures.
    he.decrypt(remote_model(scientist.send(he.encrypt(images[0]))).get(reason="warm-up", timeout=120))
    remote_model(scientist.send(images[0])).get(reason="warm-up", timeout=60)

    t: Dict[str, List[float]] = {k: [] for k in ("encrypt", "remote", "decrypt", "encrypted", "plain", "local")}
    bytes_in, bytes_out, fast_bytes = [], [], []
    errors, errors64, agree, correct_enc, correct_plain, same_model = [], [], 0, 0, 0, 0.0
    inputs = []
    for _ in range(args.repeat):
        for x, label in zip(images, test.targets):
            t0 = time.perf_counter()
            c = he.encrypt(x)
            t1 = time.perf_counter()
            fast0 = fast_received(scientist)
            r = remote_model(scientist.send(c)).get(reason="benchmark", timeout=120)
            t2 = time.perf_counter()
            got = he.decrypt(r)
            t3 = time.perf_counter()
            fast_bytes.append(fast_received(scientist) - fast0)

            t4 = time.perf_counter()
            plain = remote_model(scientist.send(x)).get(reason="benchmark", timeout=60)
            t5 = time.perf_counter()
            t["local"].append(local_seconds(model, x))

            for k, v in (("encrypt", t1 - t0), ("remote", t2 - t1), ("decrypt", t3 - t2), ("encrypted", t3 - t0),
                         ("plain", t5 - t4)):
                t[k].append(v)
            bytes_in.append(c.nbytes)
            bytes_out.append(r.nbytes)
            inputs.append(c)
            with torch.no_grad():
                reference, reference64 = model(x), model64(x.double())
            same_model = max(same_model, float((plain - reference).abs().max()))
            errors.append(float((got - plain.double()).abs().max()))
            errors64.append(float((got - reference64).abs().max()))
            agree += int(got.argmax()) == int(plain.argmax())
            correct_enc += int(got.argmax()) == int(label)
            correct_plain += int(plain.argmax()) == int(label)
    owner_parts = owner_side_seconds(he, model, inputs[:args.images])

    n = len(t["encrypted"])
    med = {k: statistics.median(v) for k, v in t.items()}
    print()
    print(f"Encrypted inference over Duet: {n} inferences (median seconds each)")
    print(f"  encrypted, end to end     {med['encrypted']:8.4f} s   {_util.fmt_ratio(med['encrypted'], med['plain'])} "
          f"plain remote   {med['encrypted'] / med['local']:9,.0f}x local")
    print(f"    encrypt                 {med['encrypt']:8.4f} s")
    print(f"    send + evaluate + get   {med['remote']:8.4f} s   of which, timed alone on the same ciphertexts: "
          f"read {owner_parts['read']:.4f} s, evaluate {owner_parts['evaluate']:.4f} s, "
          f"serialize {owner_parts['serialize']:.4f} s")
    print(f"    decrypt                 {med['decrypt']:8.4f} s")
    print(f"  plain remote (.get())     {med['plain']:8.4f} s   {med['plain'] / med['local']:9,.0f}x local")
    print(f"  local                     {med['local'] * 1e6:8.1f} us")
    plain_in, plain_out = images[0].numel() * 4, 10 * 4
    mean_in, mean_out = statistics.mean(bytes_in), statistics.mean(bytes_out)
    print(f"bytes per inference: ciphertext in {mean_in:,.0f} B ({mean_in / plain_in:,.0f}x float32 {plain_in:,} B), "
          f"out {mean_out:,.0f} B ({mean_out / plain_out:,.0f}x float32 {plain_out} B); "
          f"{statistics.mean(fast_bytes):,.0f} B of them over the fast path")
    print(f"one-time context: {he.public_bytes:,} B ({he.public_bytes / 2**20:.1f} MiB), {statistics.median(contexts):.2f} s "
          f"(median of {len(contexts)}: key generation {keygen:.2f} s, the rest sending); poly modulus "
          f"{he.poly_modulus}, coefficient moduli {'/'.join(map(str, he.coeff_bits))}, scale 2^{he.scale_bits}")
    print(f"error of the decrypted logits: max {max(errors):.2e}, median {statistics.median(errors):.2e} vs the plain "
          f"remote result (float32); max {max(errors64):.2e} vs float64 (PRECISION {duet.scientist.he.PRECISION:g})")
    print(f"argmax agrees with plain: {agree}/{n}; correct labels: encrypted {correct_enc}/{n}, plain {correct_plain}/{n}; "
          f"plain remote vs local model: max difference {same_model:.1e}")


if __name__ == "__main__":
    sys.exit(main())
