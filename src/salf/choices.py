"""Every named choice salf offers, each defined once: one registry per family.

    CUT_POLICIES        how `salf analyze/plan/finetune --policy` picks a static cut
    BASELINE_SELECTORS  simpler rules to compare with it (docs/selectors.md)
    DYNAMIC_POLICIES    how `--dynamic` moves the cut while training (docs/method.md)

An entry gives its name, one line of help, the function that runs it ("module:function",
imported on first use, so `salf --help` lists every family without loading torch), what it
needs, and its kind. The CLI's choices and help, the sweep and the checks read these
registries: adding a policy is one `register(...)` here plus its function.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from .errors import SalfError


@dataclass(frozen=True)
class Choice:
    name: str                  # as typed (a parametric one adds "=VALUE": budget=0.4)
    help: str
    impl: str = ""             # "module:function" that runs it
    kind: str = ""             # what the family says it is (a selector: "prefix" cut or layer "set")
    needs: frozenset = frozenset()
    param: str | None = None   # the value after "=", shown as name=PARAM (budget=B)
    options: Mapping = field(default_factory=lambda: MappingProxyType({}))  # fixed arguments
    in_sweep: bool = True      # offered as a `salf sweep --selectors` name

    @property
    def label(self) -> str:
        return f"{self.name}={self.param}" if self.param else self.name

    @property
    def function(self):
        module, _, attr = self.impl.partition(":")
        return getattr(importlib.import_module(module), attr)


class Registry:
    """The choices of one family, in the order registered (the order help lists them)."""

    def __init__(self, noun: str):
        self.noun = noun
        self._choices: dict[str, Choice] = {}

    def register(self, name: str, help: str, **fields) -> Choice:
        if name in self._choices:
            raise ValueError(f"{self.noun} {name!r} is registered twice")
        choice = Choice(name, help, **{k: (frozenset(v) if k == "needs" else
                                           MappingProxyType(dict(v)) if k == "options" else v)
                                       for k, v in fields.items()})
        self._choices[name] = choice
        return choice

    def __iter__(self) -> Iterator[Choice]:
        return iter(self._choices.values())

    def __contains__(self, name: str) -> bool:
        return self.find(name) is not None

    def find(self, text: str) -> tuple[Choice, str | None] | None:
        """(choice, the value after '=' or None) for a name as typed; None if unknown."""
        if text in self._choices and not self._choices[text].param:
            return self._choices[text], None
        name, sep, value = text.partition("=")
        choice = self._choices.get(name.strip())
        if sep and choice is not None and choice.param:
            return choice, value.strip()
        return None

    def get(self, text: str) -> tuple[Choice, str | None]:
        found = self.find(text)
        if found is None:
            raise SalfError(f"unknown {self.noun} {text!r}; choose from {', '.join(self.labels())}")
        return found

    def names(self, *, kind: str | None = None, sweep: bool = False) -> list[str]:
        return [c.name for c in self if (kind is None or c.kind == kind) and (c.in_sweep or not sweep)]

    def labels(self, *, sweep: bool = False) -> list[str]:
        return [c.label for c in self if c.in_sweep or not sweep]


# ---------------------------------------------------------------- static cut policies
# kind: the rule of salf.analysis.gains.choose_cut that runs it; options: that rule's settings
CUT_POLICIES = Registry("policy")
_reg = CUT_POLICIES.register
_reg("max-gain-e0", "the cut of largest predicted benefit with the fine-tuned floor E = 0 "
     "(the default)", kind="max-gain", options={"floor": 0.0, "variant": "e0"})
_reg("max-gain", "the cut of largest predicted benefit, E = the pretrained trace's minimum",
     kind="max-gain")
_reg("paper", "the layer of largest inference gain (the paper's rule)", kind="paper")
_reg("onset", "the layer before the semantic transition starts", kind="onset")
_reg("knee", "the knee of the benefit-cost frontier", kind="knee", needs={"cost"})
_reg("budget", "the best benefit among cuts costing at most B x full fine-tuning", kind="budget",
     needs={"cost"}, param="B")

# ---------------------------------------------------------------- baseline selectors
# kind "prefix": picks a cut (trains everything above it); "set": picks a layer set
BASELINE_SELECTORS = Registry("selector")
_reg = BASELINE_SELECTORS.register
_reg("full", "full fine-tuning (nothing frozen)", impl="salf.selectors.simple:select_full",
     in_sweep=False)
_reg("lora", "LoRA on every layer", impl="salf.selectors.simple:select_lora", in_sweep=False)
_reg("freeze-half", "freeze the lower half", impl="salf.selectors.simple:select_freeze_half",
     kind="prefix")
_reg("freeze-first-k", "freeze the first k layers",
     impl="salf.selectors.simple:select_freeze_first_k", kind="prefix", in_sweep=False)
_reg("random", "a seeded random cut", impl="salf.selectors.simple:select_random", kind="prefix")
_reg("spectrum", "the layers of highest signal-to-noise ratio (Spectrum)",
     impl="salf.selectors.spectrum:select_spectrum", kind="set")
_reg("block-influence", "the layers that change their input most (ShortGPT BI)",
     impl="salf.selectors.influence:select_block_influence", kind="set", needs={"data"})
_reg("block-influence-cut", "the cut below most of the block influence",
     impl="salf.selectors.influence:select_block_influence_cut", kind="prefix", needs={"data"})
_reg("grad-norm", "the cut below most of the gradient norm",
     impl="salf.selectors.gradnorm:select_grad_norm", kind="prefix", needs={"data"})

# ---------------------------------------------------------------- dynamic policies
# needs: what a check measures for it (the probe costs a forward pass; gradient norms are
# read from the gradients training computes anyway)
DYNAMIC_POLICIES = Registry("dynamic policy")
_reg = DYNAMIC_POLICIES.register
_reg("salf-budget", "freeze what the rest of the run can spare: the loss a move gives up of the "
     "improvement ahead within a budget, a FLOPs floor, probes on demand, an undo guard "
     "(docs/method.md)", impl="salf.dynamic.budget:decide_salf_budget",
     needs={"probe", "probe_on_demand", "train_loss"})
_reg("salf", "freeze the settled prefix once the step law is past its knee (the first "
     "controller; docs/method.md)", impl="salf.dynamic.policies:decide_salf", needs={"probe"})
_reg("autofreeze", "freeze layers whose gradient norm stopped changing (AutoFreeze)",
     impl="salf.dynamic.policies:decide_autofreeze", needs={"grad_norms"})
_reg("linear", "freeze linearly up to the deepest cut from a start (Composer)",
     impl="salf.dynamic.policies:decide_linear")
_reg("freezeout", "FreezeOut's cubic schedule", impl="salf.dynamic.policies:decide_freezeout")
_reg("static", "hold the cut (probes as salf does: a control)",
     impl="salf.dynamic.policies:decide_static", needs={"probe"})
del _reg
