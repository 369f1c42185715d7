"""What each aggregation method is, torch-free: the facts callers ask about a method, in one table.

The server core, local training, evaluation, the workspace and Flower used to test ``method == "ffa"``
and the like wherever a method behaves differently. Those differences are properties of the method, so
they live here, once; :mod:`.methods` binds each name to its fusing function (:mod:`.vera` for VeRA adapters,
where ``vera_undefined`` says why a method has no VeRA form). Importing this module costs
no torch, so checking a name in a config file stays fast. No ``method.name ==`` outside this module.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, replace

from uniflow_cli.errors import ConfigError
from uniflow_cli.peft_keys import ADAPTER_FAMILIES, factor_side


@dataclass(frozen=True)
class MethodSpec:
    name: str
    summary: str
    uploads: tuple[str, ...] = ("A", "B")  # the LoRA factors a client sends (non-LoRA tensors always go)
    # A stays at the A of the global the client started from: never trained, never re-sent (FFA: the round-0 A,
    # which every FFA global repeats; FedSVD: the orthonormal A the server re-factorised last round).
    frozen_A: bool = False
    # B stays at the B of the global the client started from: never trained, never re-sent (RoLoRA's A rounds).
    frozen_B: bool = False
    # The method alternates per round (RoLoRA): odd rounds train and send only B (A frozen, as FFA), even rounds
    # only A (B frozen); either way Σ w_k B_k A_k is a product of one sum and one shared factor, so the
    # aggregation is exact and each upload is half the bytes. ``at_round(t)`` is the spec of round t.
    alternates: bool = False
    phase: str | None = None  # the factor a round of an alternating method trains and sends ("A" | "B"), else None
    stacks_ranks: bool = False  # the global's rank is Σ r_k (FLoRA): clients are not zero-padded to r_max
    merges_into_base: bool = False  # every published global is merged into W0 before the next round (FLoRA)
    residual: bool = False  # the global carries a dense residual that clients fold into W0 (FedEx)
    private_B: bool = False  # each client keeps its own B between rounds (FedSA): the global has no B
    # Each client trains a second, local adapter beside the global one, both active in its forward, and keeps
    # it between rounds (FedDPA): the global adapter is fused as FedIT's, the local one never leaves the client.
    local_adapter: bool = False
    line_up: bool = True  # the replies line up with the global array by array (Flower's DP wrappers need it)
    # Why the method has no VeRA form (None: it has one, aggregation/vera.py). On VeRA, d plays A and b plays
    # B, so every fact above about A is about d, and about B is about b (docs/aggregation.md, "VeRA").
    vera_undefined: str | None = None
    # Why ``--robust`` (a coordinate-wise median / trimmed mean in place of every weighted sum the method takes,
    # aggregation/robust.py) has no meaning for the method (None: it has one).
    robust_undefined: str | None = None
    # Masked-sum exchanges per round under Flower's SecAgg+ (flower/secagg.py): 0 = the method needs individual
    # client adapters; 1 = its global is the weighted sums of what clients upload (FedIT, FFA, RoLoRA); 2 = FedA²: Σ w_k A_k,
    # then, with Ā broadcast, Σ w_k B_k (A_k Āᵀ), from which the server solves B (Eq. 13).
    secagg_exchanges: int = 0

    def at_round(self, round_: int) -> MethodSpec:
        """The spec of round ``round_`` (1 = the first trained round): itself, or for an alternating method the
        phase that round is in — B first, since the round-0 B is zero and A's gradient is zero with it."""
        return self.in_phase("B" if round_ % 2 == 1 else "A") if self.alternates else self

    def in_phase(self, phase: str) -> MethodSpec:
        """An alternating method's spec in one phase: it trains and sends only ``phase`` (the other factor frozen)."""
        if not self.alternates:
            return self
        if phase == "B":
            return replace(self, uploads=("B",), frozen_A=True, alternates=False, phase="B")
        return replace(self, uploads=("A",), frozen_B=True, alternates=False, phase="A")

    # One method for every module; a per-module spec (``encoders=fedsa,llm=fedA2``: :mod:`.per_module`) answers
    # these per module, and its whole-adapter facts above are what its parts imply together.
    @property
    def per_module(self) -> bool:
        return False

    @property
    def methods(self) -> tuple[MethodSpec, ...]:
        """The distinct methods it is made of (itself; a per-module spec: its parts')."""
        return (self,)

    def for_module(self, module: str) -> MethodSpec:
        """The method fusing ``module`` (a PEFT module name)."""
        return self

    def for_key(self, key: str) -> MethodSpec | None:
        """The method of the module a tensor or parameter name belongs to."""
        return self

    def check_modules(self, modules: object) -> None:
        """Every module has a method and every pattern matches one (a single method: always)."""

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
    def truncates_to_client_rank(self) -> bool:
        """A client whose rank r_k is below the global's starts from the global's first r_k components and trains
        at r_k (``[lora] client_ranks``; aggregation/truncate.py): every padding method. For FlexLoRA's SVD
        factors that is the best rank-r_k approximation, for HetLoRA its definition, for the others the inverse
        of zero-padding. FLoRA stacks: its clients start from a fresh LoRA of their own rank anyway."""
        return self.pads

    @property
    def solves_under_secagg(self) -> bool:
        """FedA²'s second exchange: the server solves B from Σ w_k B_k (A_k Āᵀ) instead of averaging B."""
        return self.secagg_exchanges == 2

    @property
    def folds_history(self) -> bool:
        """Clients fold earlier published globals into their base (FedEx residuals, FLoRA merges)."""
        return self.residual or self.merges_into_base

    @property
    def keeps_client_state(self) -> bool:
        """A client keeps private state between rounds (FedSA's B, FedDPA's local adapter)."""
        return self.private_B or self.local_adapter

    @property
    def on_vera(self) -> bool:
        """The method is defined on VeRA adapters."""
        return self.vera_undefined is None

    def shares(self, key: str) -> bool:
        """Whether a client uploads the tensor ``key`` (PEFT key names): LoRA's A and VeRA's d when the method
        needs A, B and b when it needs B, never VeRA's shared projections (every global carries them)."""
        side = factor_side(key)
        if side == "in":
            return self.needs_A
        if side == "out":
            return self.needs_B
        return side != "projection"

    @property
    def sharing(self) -> str:
        """What a client uploads, in words (status lines, docs)."""
        if self.alternates:
            return "B in odd rounds (A frozen), A in even rounds (B frozen), and non-LoRA tensors"
        factors = " and ".join(self.uploads)
        kept = (" (B stays on the client)" if self.private_B else " (A is frozen)" if self.frozen_A
                else " (a local adapter stays on the client)" if self.local_adapter else "")
        return f"{factors} and non-LoRA tensors{kept}"


SPECS: dict[str, MethodSpec] = {
    s.name: s
    for s in (
        MethodSpec("fedit", "FedIT: average A and B separately (the 'LoRA' baseline)", secagg_exchanges=1),
        MethodSpec("ffa", "FFA-LoRA: A frozen at its initial value, average B", uploads=("B",), frozen_A=True, line_up=False, secagg_exchanges=1),
        MethodSpec("fedsa", "FedSA-LoRA: share and average A; each client keeps its B", uploads=("A",), private_B=True, line_up=False),
        MethodSpec("feddpa", "FedDPA: average the global adapter's A and B (as FedIT); each client also trains a local adapter it keeps",
                   local_adapter=True),
        MethodSpec("fedex", "FedEx-LoRA: average A, B + dense residual folded into W0", residual=True, line_up=False,
                   robust_undefined="its residual is the dense Σ w_k B_k A_k − B̄Ā, a sum of products no robust sum of the factors reaches"),
        MethodSpec("fedA2", "FedA²-LoRA: average A, solve B analytically (Eq. 13)", secagg_exchanges=2),
        MethodSpec("svd", "best rank-r approximation of Σ w_k B_k A_k (reference optimum)",
                   robust_undefined="its top-r factors come from an SVD of Σ w_k B_k A_k, a sum of products no robust sum of the factors reaches",
                   vera_undefined="its top-r factors of U are arbitrary matrices, not Λ_b B and Λ_d A over the shared projections"),
        MethodSpec("flora", "FLoRA: stack the factors (rank Σ r_k), merge into the base", stacks_ranks=True, merges_into_base=True, line_up=False,
                   robust_undefined="it stacks the clients' factors side by side: there is no sum to make robust",
                   vera_undefined="stacking gives rank Σ r_k factors with one b per client; a VeRA layer has one A, B of rank r and one b"),
        MethodSpec("lora-fair", "LoRA-FAIR: average A and B, then correct B toward U: B̄ + (U − B̄Ā)Āᵀ(ĀĀᵀ + λI)⁻¹"),
        MethodSpec("flexlora", "FlexLoRA: rank-r_max SVD optimum of U; each client starts from its own rank-r_k truncation",
                   line_up=False, robust_undefined="its top-r_max factors come from an SVD of Σ w_k B_k A_k, a sum of products no robust sum of the factors reaches",
                   vera_undefined="its SVD factors of U are arbitrary matrices, and a VeRA federation has one rank (one pair of projections)"),
        MethodSpec("hetlora", "HetLoRA: zero-pad, average A and B with weights ∝ w_k‖s_k B_k A_k‖_F; each client truncates to its rank",
                   line_up=False,
                   vera_undefined="heterogeneous ranks are its point, and a VeRA federation has one rank (one pair of projections)"),
        MethodSpec("fedsvd", "FedSVD: A frozen at the global's, average B, re-factorise B̄A by SVD (orthonormal A, B = UΣ)",
                   uploads=("B",), frozen_A=True, line_up=False,
                   vera_undefined="its A is the right singular vectors of B̄A, an arbitrary orthonormal matrix, not Λ_d A over the shared projection"),
        MethodSpec("rolora", "RoLoRA: alternate rounds — odd rounds train and average B (A frozen), even rounds A (B frozen): exact, half the bytes",
                   alternates=True, line_up=False, secagg_exchanges=1,
                   vera_undefined="uniflow alternates LoRA's A and B; the alternation of VeRA's d and b is not implemented (use ffa, or fedA2)"),
    )
}
METHOD_NAMES: tuple[str, ...] = tuple(SPECS)
DEFAULT_METHOD = "fedA2"
VERA_METHODS: tuple[str, ...] = tuple(name for name, spec in SPECS.items() if spec.on_vera)
UNDEFINED_FOR_VERA: dict[str, str] = {name: spec.vera_undefined for name, spec in SPECS.items() if spec.vera_undefined is not None}


def method_spec(name: object, *, field: str = "method") -> MethodSpec:
    """The spec of ``name`` — a method, or a per-module spec such as ``encoders=fedsa,llm=fedA2``
    (:mod:`.per_module`) — or a ConfigError naming the known methods (and the closest, for a typo)."""
    if isinstance(name, str) and name in SPECS:
        return SPECS[name]
    from uniflow_cli.aggregation.per_module import is_per_module, parse_module_methods

    if is_per_module(name):
        return parse_module_methods(name, field=field)  # type: ignore[arg-type]
    close = difflib.get_close_matches(str(name), METHOD_NAMES, n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    raise ConfigError.invalid(field, name, f"is not one of {', '.join(METHOD_NAMES)}{hint}", example=close[0] if close else DEFAULT_METHOD)


def as_spec(method: str | MethodSpec | object) -> MethodSpec:
    """A spec from a method's name, or the spec (or ``Method``) itself."""
    if isinstance(method, MethodSpec):
        return method
    spec = getattr(method, "spec", None)
    return spec if isinstance(spec, MethodSpec) else method_spec(method)


def check_family(method: str | MethodSpec | object, family: str, *, field: str = "method") -> MethodSpec:
    """The spec of ``method`` if it is defined on the adapter ``family`` (``lora`` | ``vera``), else one
    ConfigError naming why and the methods that are defined (where the method and the adapter meet first:
    ``init``, ``local-train``, ``aggregate``, Flower)."""
    spec = method_spec(method, field=field) if isinstance(method, str) else as_spec(method)
    if family not in ADAPTER_FAMILIES:
        raise ConfigError.invalid("adapter", family, f"is not one of {', '.join(ADAPTER_FAMILIES)}", example="lora")
    if family == "vera" and not spec.on_vera:
        raise ConfigError.invalid(field, spec.name, f"is not defined for VeRA ({spec.vera_undefined}); defined: {', '.join(VERA_METHODS)}",
                                  example="fedA2")
    return spec
