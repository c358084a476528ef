"""`owner.privacy`: set budgets, read the ledger."""
from __future__ import annotations

import html
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from ...tables import html_table, text_table
from .ledger import DEFAULT_KEY, Budget, Ledger


class Privacy:
    """The owner's privacy budgets and ledger (per scientist identity key fingerprint)."""

    def __init__(self, path: Optional[Path | str], audit: Any = None) -> None:
        self.ledger = Ledger(path, audit)
        self.names: Dict[str, str] = {}  # fingerprint -> the name a scientist last joined with (for display)

    def subscribe(self, callback: Callable[[], None]) -> None:
        """Call back (any thread, no arguments) whenever a budget is set or a spend changes."""
        self.ledger.listeners.append(callback)

    @property
    def active(self) -> bool:
        """Whether anything is set or spent (otherwise views leave the section out)."""
        return bool(self.ledger.budget_of(DEFAULT_KEY) or self.ledger.scientists())

    def budget(self, scientist: Optional[str] = None, *, epsilon: float, delta: float = 0.0) -> Budget:
        """Set a budget: `budget(epsilon=3.0, delta=1e-6)` for everyone, or `budget("SHA256:...", epsilon=5)`.

        A scientist with no budget (and no default) gets no differentially private releases.
        """
        if scientist is not None and (not isinstance(scientist, str) or not scientist.startswith("SHA256:")):
            raise ValueError("scientist must be a key fingerprint as shown in the queue (\"SHA256:...\")")
        b = Budget(float(epsilon), float(delta))
        self.ledger.set_budget(scientist or DEFAULT_KEY, b)
        return b

    def summary(self, scientist: str) -> Dict[str, Any]:
        """What one scientist has spent and has left, and each release (also sent to that scientist)."""
        budget = self.ledger.budget_of(scientist)
        eps, delta = self.ledger.spent(scientist)
        return {
            "budget_epsilon": budget.epsilon if budget else 0.0,
            "budget_delta": budget.delta if budget else 0.0,
            "spent_epsilon": eps,
            "spent_delta": delta,
            "left_epsilon": self.ledger.left(scientist),
            "releases": [{"what": e.what, "charge": e.spend.describe(), "state": e.state, "at": e.at}
                         for e in self.ledger.spends_of(scientist)],
        }

    def rows(self) -> List[List[str]]:
        out = []
        for key in self.ledger.scientists():
            s = self.summary(key)
            who = f"{self.names[key]} ({key[:19]})" if key in self.names else key
            out.append([who, f"{s['spent_epsilon']:.4g}", f"{s['left_epsilon']:.4g}",
                        f"{s['budget_epsilon']:g}" + (f" (delta {s['budget_delta']:g})" if s["budget_delta"] else ""),
                        str(len(s["releases"]))])
        return out

    def __repr__(self) -> str:
        default = self.ledger.budget_of(DEFAULT_KEY)
        head = f"Privacy ledger: default budget {'epsilon %g' % default.epsilon if default else 'none'}"
        if default and default.delta:
            head += f", delta {default.delta:g}"
        rows = self.rows()
        if not rows:
            return head + "; no scientist has spent anything"
        return head + "\n" + text_table(PRIVACY_HEADERS, rows)

    def head(self) -> str:
        return repr(self).splitlines()[0]

    def _repr_html_(self) -> str:
        return f"<p>{html.escape(self.head())}</p>" + html_table(PRIVACY_HEADERS, self.rows())


PRIVACY_HEADERS = ["scientist", "spent ε", "left ε", "budget", "releases"]
