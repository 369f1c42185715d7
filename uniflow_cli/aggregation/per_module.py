"""Per-module methods, torch-free: ``--method "encoders=fedsa,llm=fedA2"`` — module-name patterns → method.

The paper's own argument is that encoders and the LLM behave differently; this lets one federation fuse
them differently. A spec is comma-separated entries ``PATTERN=METHOD``, plus at most one bare ``METHOD``:
the default for every module no pattern matches. A module (its PEFT name without ``base_model.model.``,
e.g. ``encoders.image.encoder.layer.0.attention.query`` or ``llm.model.layers.3.self_attn.q_proj``) takes the
method of the **first** entry whose pattern matches it: the pattern is the module's name, a dotted prefix of
it (``encoders``, ``encoders.image``, ``llm``) or an ``fnmatch`` glob (``*.q_proj``, ``llm.model.layers.1?.*``).

The parsed spec is a :class:`ModuleMethods`, a :class:`~.registry.MethodSpec` whose whole-adapter facts are
what its parts imply together (a client keeps state if any part's does; replies line up if every part's do),
and whose per-tensor questions (``shares``, ``for_module``, ``for_key``) are answered by the module's own
method. Only methods that fuse each layer on its own mix: not FLoRA (it stacks ranks and merges the whole
adapter into the base), FedEx (its residual history is folded model-wide), FedDPA (a second adapter on every
layer) or RoLoRA (one phase a round for the whole adapter).
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from collections.abc import Iterable
from dataclasses import dataclass

from uniflow_cli.aggregation.registry import METHOD_NAMES, SPECS, MethodSpec
from uniflow_cli.errors import ConfigError
from uniflow_cli.peft_keys import PEFT_PREFIX

_PATTERN = re.compile(r"^[A-Za-z0-9_.*?\[\]-]{1,200}$")
MAX_SPEC = 2000  # characters: a spec travels in another party's uniflow.json
EXAMPLE = "encoders=fedsa,llm=fedA2"
_FACTOR_KEY = re.compile(r"^(?P<module>.+?)\.lora_(?:A|B)(?:\.[A-Za-z0-9_-]+)?\.weight$")


def is_per_module(text: object) -> bool:
    """Whether a method setting is a per-module spec (it has an entry ``PATTERN=METHOD`` or several entries)."""
    return isinstance(text, str) and ("=" in text or "," in text)


def module_name(key: str) -> str:
    """A module's name as patterns see it: without PEFT's ``base_model.model.`` prefix."""
    return key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key


def matches(pattern: str, module: str) -> bool:
    """The module is the pattern, lies under it (a dotted prefix) or matches it as an fnmatch glob."""
    return module == pattern or module.startswith(pattern + ".") or fnmatch.fnmatchcase(module, pattern)


def why_not_mixed(spec: object) -> str | None:
    """Why a method cannot be one part of a per-module spec (None: it can)."""
    if getattr(spec, "stacks_ranks", False) or getattr(spec, "merges_into_base", False):
        return "it stacks the clients' ranks and merges the whole adapter into the base each round"
    if getattr(spec, "residual", False):
        return "its dense residuals are folded into the base for the whole model, round after round"
    if getattr(spec, "local_adapter", False):
        return "it trains a second, local adapter on every layer"
    if getattr(spec, "alternates", False):
        return "it trains one factor a round for the whole adapter"
    return None


def parse_module_methods(text: str, *, field: str = "method") -> MethodSpec:
    """The per-module spec ``text`` (module docstring), validated: a :class:`ModuleMethods`, or the method
    itself where the spec names only a default."""
    def bad(rule: str) -> ConfigError:
        return ConfigError.invalid(field, text if len(text) <= 200 else text[:200] + "…", rule, example=EXAMPLE)

    if len(text) > MAX_SPEC:
        raise bad(f"is {len(text)} characters long (at most {MAX_SPEC})")
    parts: list[tuple[str, MethodSpec]] = []
    default: MethodSpec | None = None
    for raw in text.split(","):
        entry = raw.strip()
        if not entry:
            raise bad("has an empty entry (write PATTERN=METHOD entries and at most one METHOD, separated by commas)")
        pattern, _, name = entry.rpartition("=")
        pattern, name = pattern.strip(), name.strip()
        if name not in SPECS:
            close = difflib.get_close_matches(name, METHOD_NAMES, n=1)
            raise bad(f"names the method {name!r}, not one of {', '.join(METHOD_NAMES)}" + (f" (did you mean {close[0]}?)" if close else ""))
        spec = SPECS[name]
        reason = why_not_mixed(spec)
        if reason is not None:
            raise bad(f"mixes {name} with other methods, and {name} cannot be mixed: {reason}")
        if "=" not in entry:
            if default is not None:
                raise bad(f"names two defaults ({default.name} and {name}); give every other method a module pattern")
            default = spec
            continue
        if not _PATTERN.match(pattern):
            raise bad(f"has the module pattern {pattern!r}: a module name, a dotted prefix or an fnmatch glob of letters, digits, . _ - * ? [ ]")
        if pattern in (p for p, _ in parts):
            raise bad(f"names the module pattern {pattern!r} twice")
        parts.append((pattern, spec))
    if not parts:
        return default  # type: ignore[return-value] - the loop saw at least one entry
    return ModuleMethods.of(",".join(f"{p}={s.name}" for p, s in parts) + (f",{default.name}" if default else ""), tuple(parts), default)


@dataclass(frozen=True)
class ModuleMethods(MethodSpec):
    """A per-module spec: each module's method, and the facts of the whole adapter (module docstring)."""

    parts: tuple = ()  # ((pattern, MethodSpec), ...) in the order written: the first match wins
    default: object = None  # the MethodSpec of every module no pattern matches (None: every module must match)

    @classmethod
    def of(cls, name: str, parts: tuple, default: MethodSpec | None) -> ModuleMethods:
        specs = [s for _, s in parts] + ([default] if default is not None else [])
        return cls(
            name=name,
            summary="per module: " + ", ".join(f"{p} → {s.name}" for p, s in parts) + (f", every other module → {default.name}" if default else ""),
            uploads=tuple(f for f in ("A", "B") if all(f in s.uploads for s in specs)),
            frozen_A=any(s.frozen_A for s in specs),
            frozen_B=any(s.frozen_B for s in specs),
            private_B=any(s.private_B for s in specs),
            line_up=all(s.line_up for s in specs),
            vera_undefined="a per-module spec is implemented for LoRA adapters; a VeRA federation takes one method",
            robust_undefined=next((f"its part {s.name}: {s.robust_undefined}" for s in specs if s.robust_undefined), None),
            secagg_exchanges=0,
            parts=parts,
            default=default,
        )

    @property
    def per_module(self) -> bool:
        return True

    @property
    def methods(self) -> tuple:
        """The distinct methods of the parts, in order."""
        seen: dict[str, object] = {}
        for spec in [s for _, s in self.parts] + ([self.default] if self.default is not None else []):
            seen.setdefault(spec.name, spec)
        return tuple(seen.values())

    def for_module(self, module: str):
        """The method of ``module`` (a PEFT module name, with or without ``base_model.model.``)."""
        name = module_name(module)
        for pattern, spec in self.parts:
            if matches(pattern, name):
                return spec
        if self.default is None:
            raise ConfigError.invalid("method", self.name, f"leaves the module {name} without a method", example=f"{self.name},fedA2")
        return self.default

    def for_key(self, key: str):
        """The method of the module a tensor or parameter belongs to (``…q_proj.lora_A.weight``,
        ``…q_proj.lora_A.default.weight``); None for a non-LoRA tensor (projectors, heads: always shared)."""
        found = _FACTOR_KEY.match(key)
        return self.for_module(found.group("module")) if found else None

    def shares(self, key: str) -> bool:
        spec = self.for_key(key)
        return True if spec is None else spec.shares(key)

    @property
    def sharing(self) -> str:
        return "; ".join(f"{p}: {s.sharing}" for p, s in self.parts) + (f"; other modules: {self.default.sharing}" if self.default else "")

    def check_modules(self, modules: Iterable[str]) -> None:
        """Every pattern matches a module and every module has a method (one line naming the first that does not)."""
        names = sorted({module_name(m) for m in modules})
        for pattern, _ in self.parts:
            if not any(matches(pattern, n) for n in names):
                shown = ", ".join(sorted({n.split(".", 2)[0] + ("." + n.split(".")[1] if n.count(".") else "") for n in names})[:6])
                raise ConfigError.invalid("method", self.name, f"has the pattern {pattern!r}, which matches none of the {len(names)} LoRA "
                                          f"modules (they lie under {shown})", example=EXAMPLE)
        if self.default is None:
            missing = [n for n in names if not any(matches(p, n) for p, _ in self.parts)]
            if missing:
                more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
                raise ConfigError.invalid("method", self.name, f"leaves the module {missing[0]}{more} without a method (add a default)",
                                          example=f"{self.name},fedA2")
