"""Additive secret sharing across owners (a ring of 2^64, fixed point): the arithmetic (`ring`)
and one party's side of a computation (`party`). The owner's handler is duet.owner.smpc, the
scientist's API duet.scientist.smpc (`duet.smpc`)."""
