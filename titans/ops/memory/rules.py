"""Named memory rules: the settings of ``NeuralMemory`` (and ``TitansConfig``'s ``memory_*``
fields) that make each rule of the papers, on the one interface every path shares.

A rule here is a choice of attentional bias (``objective``: the loss each write descends),
retention (the forget gate, ``retention_q`` and ``retention_kl``), inner optimiser (``momentum``,
``muon_steps``: ATLAS's Muon) and what a write looks at (``window``: the Omega rule;
``feature_degree``: polynomial keys). ``rule_settings(name)``
gives the settings; ``NeuralMemory.from_rule`` and ``TitansConfig.with_memory_rule`` apply them,
refusing an explicit setting that contradicts the rule.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["MEMORY_RULES", "MemoryRule", "rule_settings"]


@dataclass(frozen=True)
class MemoryRule:
    name: str
    settings: dict  # NeuralMemory keyword arguments
    source: str  # the paper and equations it comes from


MEMORY_RULES = {
    rule.name: rule
    for rule in (
        MemoryRule("titans", {"objective": "l2", "momentum": True, "retention_q": None, "retention_kl": None, "window": 1,
                              "muon_steps": None},
                   "Titans (Behrouz, Zhong, Mirrokni 2025) eqs. 13-14: l2 loss, momentum, weight decay"),
        MemoryRule("moneta", {"objective": "lp", "objective_p": 3.0, "retention_q": 4.0, "momentum": False},
                   "MIRAS (Behrouz et al. 2025) eqs. 10-11 (l_p bias, p = 3) and 24 (l_q retention, q = 4)"),
        MemoryRule("yaad", {"objective": "huber", "momentum": False},
                   "MIRAS eqs. 16 (Huber bias with a learned threshold) and 26"),
        MemoryRule("memora", {"objective": "l2", "retention_kl": 1.0, "retention_q": None, "momentum": False, "window": 1,
                              "muon_steps": None},
                   "MIRAS eqs. 19-21 (KL retention, rows on the simplex of sum c = 1) and 27 (Memora), with the "
                   "chunk approximation of eqs. 30-32"),
        MemoryRule("omega", {"window": 8},
                   "ATLAS (Behrouz et al. 2025) eqs. 9-10: the loss of the 8 latest tokens, gated"),
        MemoryRule("atlas", {"objective": "l2", "window": 8, "feature_degree": 2, "momentum": True, "muon_steps": 5,
                             "retention_q": None, "retention_kl": None},
                   "ATLAS (Behrouz et al. 2025) eqs. 9-10 (the Omega rule over the 8 latest tokens), section 3.1 "
                   "(polynomial keys, degree 2) and eqs. 32-33 (Muon: the momentum orthogonalised by 5 Newton-Schulz "
                   "steps), each token's momentum orthogonalised inside a chunk (section 5.1, eqs. 39-41)"),
    )
}
# Rules of the papers not here yet, named (rule -> what it needs) so that asking for one says so.
PENDING: dict[str, str] = {}


def rule_settings(name: str) -> dict:
    """The ``NeuralMemory`` settings of rule ``name`` (a copy)."""
    if not isinstance(name, str):
        raise ValueError(f"a memory rule is named by a string (one of {', '.join(MEMORY_RULES)}), got {name!r}")
    if name in PENDING:
        raise ValueError(f"memory rule {name!r} needs {PENDING[name]}, which is not implemented yet; "
                         f"available: {', '.join(MEMORY_RULES)}")  # fmt: skip
    if name not in MEMORY_RULES:
        raise ValueError(f"unknown memory rule {name!r}; available: {', '.join(MEMORY_RULES)}")
    return dict(MEMORY_RULES[name].settings)


def merge_rule(name: str, given: dict, rename=lambda key: key) -> dict:
    """``given`` settings with rule ``name``'s added; a given setting that the rule fixes to
    another value is refused. ``rename`` maps a NeuralMemory keyword to the caller's field name."""
    merged = dict(given)
    for key, value in rule_settings(name).items():
        field = rename(key)
        if field in given and given[field] != value:
            raise ValueError(f"memory rule {name!r} sets {field}={value!r}; the settings also ask for {field}={given[field]!r}")
        merged[field] = value
    return merged
