"""What each aggregation method is, torch-free: the facts callers ask about a method, in one table.

The server core, local training, evaluation, the workspace and Flower used to test ``method == "ffa"``
and the like wherever a method behaves differently. Those differences are properties of the method, so
they live here, once; :mod:`.methods` binds each name to its fusing function. Importing this module costs
no torch, so checking a name in a config file stays fast. No ``method.name ==`` outside this module.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from uniflow_cli.errors import ConfigError


@dataclass(frozen=True)
class MethodSpec:
    name: str
    summary: str
    uploads: tuple[str, ...] = ("A", "B")  # the LoRA factors a client sends (non-LoRA tensors always go)
    frozen_A: bool = False  # A stays at the round-0 value on every client (FFA): never trained, never re-sent
    stacks_ranks: bool = False  # the global's rank is Σ r_k (FLoRA): clients are not zero-padded to r_max
    merges_into_base: bool = False  # every published global is merged into W0 before the next round (FLoRA)
    residual: bool = False  # the global carries a dense residual that clients fold into W0 (FedEx)
    private_B: bool = False  # each client keeps its own B between rounds (FedSA): the global has no B
    line_up: bool = True  # the replies line up with the global array by array (Flower's DP wrappers need it)

    @property
    def needs_A(self) -> bool:
        """Every client must upload A."""
        return "A" in self.uploads

    @property
    def needs_B(self) -> bool:
        """Every client must upload B."""
        return "B" in self.uploads

    @property
    def pads(self) -> bool:
        """Heterogeneous ranks are zero-padded to the largest (every method but FLoRA's stacking)."""
        return not self.stacks_ranks

    @property
    def folds_history(self) -> bool:
        """Clients fold earlier published globals into their base (FedEx residuals, FLoRA merges)."""
        return self.residual or self.merges_into_base

    @property
    def keeps_client_state(self) -> bool:
        """A client keeps private state between rounds (FedSA's B)."""
        return self.private_B

    def shares(self, key: str) -> bool:
        """Whether a client uploads the tensor ``key`` (PEFT key names)."""
        if key.endswith(".lora_A.weight"):
            return self.needs_A
        if key.endswith(".lora_B.weight"):
            return self.needs_B
        return True

    @property
    def sharing(self) -> str:
        """What a client uploads, in words (status lines, docs)."""
        factors = " and ".join(self.uploads)
        kept = " (B stays on the client)" if self.private_B else " (A is frozen)" if self.frozen_A else ""
        return f"{factors} and non-LoRA tensors{kept}"


SPECS: dict[str, MethodSpec] = {
    s.name: s
    for s in (
        MethodSpec("fedit", "FedIT: average A and B separately (the 'LoRA' baseline)"),
        MethodSpec("ffa", "FFA-LoRA: A frozen at its initial value, average B", uploads=("B",), frozen_A=True, line_up=False),
        MethodSpec("fedsa", "FedSA-LoRA: share and average A; each client keeps its B", uploads=("A",), private_B=True, line_up=False),
        MethodSpec("fedex", "FedEx-LoRA: average A, B + dense residual folded into W0", residual=True, line_up=False),
        MethodSpec("fedA2", "FedA²-LoRA: average A, solve B analytically (Eq. 13)"),
        MethodSpec("svd", "best rank-r approximation of Σ w_k B_k A_k (reference optimum)"),
        MethodSpec("flora", "FLoRA: stack the factors (rank Σ r_k), merge into the base", stacks_ranks=True, merges_into_base=True, line_up=False),
    )
}
METHOD_NAMES: tuple[str, ...] = tuple(SPECS)
DEFAULT_METHOD = "fedA2"


def method_spec(name: object, *, field: str = "method") -> MethodSpec:
    """The spec of ``name``, or a ConfigError naming the known methods (and the closest, for a typo)."""
    if isinstance(name, str) and name in SPECS:
        return SPECS[name]
    close = difflib.get_close_matches(str(name), METHOD_NAMES, n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    raise ConfigError.invalid(field, name, f"is not one of {', '.join(METHOD_NAMES)}{hint}", example=close[0] if close else DEFAULT_METHOD)


def as_spec(method: str | MethodSpec | object) -> MethodSpec:
    """A spec from a method's name, or the spec (or ``Method``) itself."""
    if isinstance(method, MethodSpec):
        return method
    spec = getattr(method, "spec", None)
    return spec if isinstance(spec, MethodSpec) else method_spec(method)
