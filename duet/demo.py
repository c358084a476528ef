"""`make demo`: the main job end to end, in one command."""
from __future__ import annotations

import sys

import torch

import duet


def main() -> int:
    owner, scientist = duet.local_pair(owner_name="St. Mary's", scientist_name="Dr. Lee")
    owner.store.add(torch.tensor([31.0, 45.0, 52.0, 29.0]), name="ages", description="patient ages")
    owner.requests.add_handler(action="accept", datasets=["ages"], max_elements=1)
    print(scientist.store)
    ages = scientist.store["ages"]
    mean = (ages * 2 + 1).mean()
    print("remote result:", mean)
    value = mean.get(reason="mean age for the paper", timeout=30)
    print("released after approval:", value)
    owner.close()
    return 0 if abs(float(value) - 79.5) < 1e-6 else 1


if __name__ == "__main__":
    sys.exit(main())
