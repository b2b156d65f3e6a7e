"""An Axolotl plugin: salf's cut, analysis and moving cut from an Axolotl YAML config.

    plugins:
      - salf.integrations.axolotl.SalfPlugin
    salf_plan: runs/a/plan.json      # or an int cut: 20 (freeze embeddings + layers 1-20)
    salf_analyze: {samples: 64}      # or: analyse the training set and cut there (full weights)
    salf_dynamic: {checks: 10}       # optional: move the cut while training (probe: the eval set)

It uses Axolotl's own plugin hooks, the way its Spectrum plugin (config keys read in
`pre_model_load`) and its LISA callback (a TrainerCallback added to the trainer) do:

- `get_input_args`: `SalfArgs`, the three keys, merged into Axolotl's config schema;
- `pre_model_load`: refuses combinations that cannot work (one SalfError line);
- `post_model_build`: applies `salf_plan` to the model before any adapter (`salf.freeze`:
  requires_grad, the input-gradient hooks, the detach at the cut, checkpointing above it);
  with `adapter: lora` it also sets `peft_layers_to_transform` / `peft_layers_pattern`, so
  Axolotl's own LoRA adapts only the layers above the cut;
- `post_model_load`: re-checks the truncation once the adapters are in;
- `add_callbacks_post_trainer`: `salf.MovingCut` for `salf_dynamic`, its probe a sample of
  the trainer's own tokenized eval set, collated by the trainer's data collator;
- `post_trainer_create`: `salf_analyze` runs `salf.analyze` on a sample of the trainer's own
  tokenized training set and freezes the model at the chosen cut (before the optimizer
  exists), writing plan.json into `output_dir`.

Axolotl imports this module by name; salf does not depend on Axolotl: without it the plugin
is a plain class (the tests drive its hooks with stand-ins for Axolotl's arguments).
"""

from __future__ import annotations

from pathlib import Path

from ..errors import SalfError

KEYS = ("salf_plan", "salf_analyze", "salf_dynamic")

try:      # Axolotl's base class where Axolotl is installed
    from axolotl.integrations.base import BasePlugin
except ImportError:  # pragma: no cover - depends on the environment
    BasePlugin = object

try:
    from pydantic import BaseModel

    class SalfArgs(BaseModel):
        """The plugin's config keys (Axolotl merges them into its config schema)."""

        salf_plan: str | int | None = None
        salf_analyze: bool | dict | None = None
        salf_dynamic: bool | dict | None = None
except ImportError:  # pragma: no cover - Axolotl always has pydantic
    SalfArgs = None


def _options(value, what: str) -> dict:
    """`true` -> {}, a mapping -> its keys; anything else is refused."""
    if value is True:
        return {}
    if isinstance(value, dict):
        return dict(value)
    raise SalfError(f"{what} must be true or a mapping of settings, got {value!r}")


def check_config(cfg) -> None:
    """One SalfError line for a config the plugin cannot honour."""
    plan, analyze, dynamic = (cfg.get(k) for k in KEYS)
    if plan is None and not analyze and not dynamic:
        return
    if plan is not None and analyze:
        raise SalfError("salf_plan and salf_analyze both choose the cut: keep one")
    if dynamic and plan is None and not analyze:
        raise SalfError("salf_dynamic moves a cut: give the starting one with salf_plan or salf_analyze")
    for other in ("unfrozen_parameters", "lisa_n_layers", "lisa_step_interval"):
        if cfg.get(other):
            raise SalfError(f"{other} freezes layers too: remove it, salf chooses what trains")
    if analyze and cfg.get("adapter"):
        raise SalfError("salf_analyze cuts after the adapters exist; with an adapter, run `salf analyze` "
                        "first and give its plan as salf_plan")
    if cfg.get("adapter") not in (None, "lora", "qlora"):
        raise SalfError(f"salf works with full weights or adapter: lora/qlora, not {cfg.get('adapter')!r}")
    if dynamic and (cfg.get("fsdp") or cfg.get("fsdp_config") or cfg.get("deepspeed")):
        raise SalfError("salf_dynamic runs in one process or under DDP, not FSDP/DeepSpeed; use a static salf_plan")
    if analyze:
        _options(analyze, "salf_analyze")
    if dynamic:
        _options(dynamic, "salf_dynamic")


class SalfPlugin(BasePlugin):
    """salf's cut in Axolotl (module docstring). Example config::

        base_model: HuggingFaceTB/SmolLM2-135M
        plugins: [salf.integrations.axolotl.SalfPlugin]
        salf_plan: 20
        salf_dynamic: {checks: 10}
    """

    def get_input_args(self):
        return "salf.integrations.axolotl.SalfArgs"

    def pre_model_load(self, cfg):
        check_config(cfg)

    def post_model_build(self, cfg, model):
        if cfg.get("salf_plan") is None:
            return
        from ..api import freeze
        from ..models.anatomy import anatomy
        from ..train.freeze import freeze_state

        plan = cfg.get("salf_plan")
        freeze(model, int(plan) if isinstance(plan, str) and plan.strip().isdigit() else plan)
        state = freeze_state(model)
        if cfg.get("adapter"):
            if state.head != "frozen":
                raise SalfError(f"salf_plan trains the head ({state.head}); with an Axolotl adapter the head "
                                "stays frozen: use a plan with head 'frozen'")
            cfg["peft_layers_to_transform"] = list(state.trainable_layers)
            cfg["peft_layers_pattern"] = [anatomy(model).layers_path.rsplit(".", 1)[-1]]

    def post_model_load(self, cfg, model):
        if cfg.get("salf_plan") is not None:
            from ..train.freeze import assert_truncated

            assert_truncated(model)

    def add_callbacks_post_trainer(self, cfg, trainer):
        if not cfg.get("salf_dynamic"):
            return []
        from ..api import MovingCut

        settings = _options(cfg.get("salf_dynamic"), "salf_dynamic")
        return [MovingCut(trainer.eval_dataset, collator=trainer.data_collator,
                          out_dir=cfg.get("output_dir"), **settings)]

    def post_trainer_create(self, cfg, trainer):
        if not cfg.get("salf_analyze"):
            return
        from ..api import analyze, freeze

        options = _options(cfg.get("salf_analyze"), "salf_analyze")
        out = Path(cfg.get("output_dir") or ".") / "salf"
        analysis = analyze(trainer.model, trainer.train_dataset, collator=trainer.data_collator,
                           out_dir=out, **options)
        freeze(trainer.model, analysis.plan)
