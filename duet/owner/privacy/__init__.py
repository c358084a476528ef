"""Differential privacy on the owner: sensitivity from declared facts, vetted mechanisms, a ledger.

- `facts`: what is known of a value from the asset's declared bounds alone (never from the data).
- `mechanisms`: noise from OpenDP on integers, after clamping and gridding on the owner.
- `ledger`: each scientist identity's budget and spends, composed with dp-accounting, on disk.
- `privacy`: the owner's facade (`owner.privacy`).
"""
