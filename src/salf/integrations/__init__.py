"""salf inside other trainers: `salf.integrations.axolotl.SalfPlugin` (docs/integrations.md).

TRL needs no module of its own: `salf.freeze` and `salf.MovingCut` work on its SFTTrainer as on
any Hugging Face Trainer (docs/api.md)."""
