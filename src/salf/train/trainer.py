"""The Hugging Face `Trainer` as salf runs it.

    SalfTrainer           salf's loss and evaluation, atomic quiet checkpoints, rotation
    training_arguments()  the TrainingArguments of a run (from its run.json settings)
    build_trainer()       the one place a run's Trainer is made: the model, its data,
                          the callbacks and the prefix cache
    check_engine()        the engine the launcher asked for is the one the Trainer runs

The optimizer stays the Trainer's own (`trainer.optimizer`, created when training
starts). See docs/training.md.
"""

from __future__ import annotations

import dataclasses
import time

import torch
from transformers import Trainer, TrainingArguments
from transformers.trainer_callback import PrinterCallback, ProgressCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .. import distributed
from ..errors import SalfError
from .checkpoints import rotate, staged_checkpoint
from .evaluate import batch_loss, batch_tokens
from .progress import quiet_saves

_ARG_FIELDS = {f.name for f in dataclasses.fields(TrainingArguments)}


class Examples(torch.utils.data.Dataset):
    def __init__(self, examples: list[dict]):
        self.examples = list(examples)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict:
        return dict(self.examples[i], salf_index=i)  # the prefix cache finds its rows by index


class Collator:
    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, examples: list[dict]) -> dict:
        from ..data import collate

        batch = collate(examples, self.pad_id)
        if "salf_index" in examples[0]:
            batch["example_index"] = torch.tensor([e["salf_index"] for e in examples])
        return batch


def tied_aliases(model) -> set[str]:
    """Parameter names that are the very tensor of another (a tied head): a checkpoint
    stores such a tensor once, under its source's name."""
    aliases = set()
    for target, source in (getattr(model, "all_tied_weights_keys", None) or {}).items():
        try:
            if model.get_parameter(target) is model.get_parameter(source):
                aliases.add(target)
        except AttributeError:
            continue
    return aliases


class SalfTrainer(Trainer):
    """`Trainer` with salf's loss, salf's evaluation and atomic, quiet, rotated checkpoints.

    `salf_keep`: how many complete checkpoints to keep (None: all); `salf_protect`: the
    checkpoint this run resumed from, never rotated away.
    """

    loss_is_scaled_for_ga = False  # compute_loss returns a per-batch mean

    def __init__(self, *args, salf_loss: str = "label", salf_eval=None, salf_cache=None,
                 salf_keep: int | None = None, salf_protect: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.salf_cache = salf_cache    # a PrefixCache, or None
        self.salf_loss = salf_loss
        self.salf_eval = salf_eval      # callable(model) -> dict, or None
        self.salf_keep = salf_keep
        self.salf_protect = salf_protect
        self.salf_tokens = 0
        self._salf_staging: str | None = None
        # our loss is a per-batch mean: let every transformers version divide it by the
        # accumulation steps (older ones skip that when the model "accepts loss kwargs")
        self.model_accepts_loss_kwargs = False

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        index = inputs.pop("example_index", None)
        if self.salf_cache is not None and index is not None:
            self.salf_cache.ensure(inputs, index)
            self.salf_cache.set_batch(index, inputs["attention_mask"])
        try:
            loss = batch_loss(model, inputs, self.salf_loss)
        finally:
            if self.salf_cache is not None:
                self.salf_cache.set_batch(None, None)
        self.salf_tokens += batch_tokens(inputs)
        return (loss, None) if return_outputs else loss

    def create_optimizer(self, model=None):
        """The Trainer's optimizer (only parameters that require grad) without an empty group:
        a cut can leave its weight-decay or its no-decay group empty, and DeepSpeed's ZeRO
        optimizers fail on an empty group (IndexError). One process keeps the Trainer's two
        groups, which the checkpoints of earlier runs hold."""
        optimizer = super().create_optimizer(model)
        if distributed.world_size() > 1:
            optimizer.param_groups[:] = [g for g in optimizer.param_groups if g["params"]]
        return optimizer

    def _run_epoch(self, *args, **kwargs):
        """The Trainer's epoch, unless the run is already at its last step: resumed from the
        checkpoint of that step it would still train one more (it looks for the end only after
        a step), at learning rate 0, and save a checkpoint of it."""
        if self.state.global_step >= self.state.max_steps:
            self.control.should_training_stop = True
            return
        super()._run_epoch(*args, **kwargs)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict:
        if self.salf_eval is None:
            return {}
        start = time.perf_counter()
        result = self.salf_eval(self.model)
        metrics = {f"{metric_key_prefix}_{k}": v for k, v in result.items() if isinstance(v, (int, float))}
        metrics[f"{metric_key_prefix}_runtime"] = round(time.perf_counter() - start, 4)
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    # -- checkpoints: the Trainer writes into tmp-checkpoint-N/checkpoint-N (staged_checkpoint),
    #    which becomes checkpoint-N only once everything, callback states included, is on disk.
    def _get_output_dir(self, trial) -> str:
        if self._salf_staging is not None:
            return self._salf_staging
        return super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        run_dir = super()._get_output_dir(trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        with staged_checkpoint(run_dir, name, self.callback_handler.callbacks) as staging:
            self._salf_staging = staging
            try:
                with quiet_saves():
                    super()._save_checkpoint(model, trial)
            finally:
                self._salf_staging = None
        distributed.on_main(lambda: rotate(run_dir, self.salf_keep, protect=self.salf_protect))

    def _issue_warnings_after_load(self, load_result) -> None:
        # A tied head is saved once, under its source (lm_head.weight is embed_tokens.weight);
        # this transformers version still looks for it in `_keys_to_ignore_on_save` and warns
        # that it is missing. Loading the source has loaded it: it is not missing.
        aliases = tied_aliases(self.model)
        missing = [k for k in load_result.missing_keys if k not in aliases]
        super()._issue_warnings_after_load(load_result._replace(missing_keys=missing))


def training_arguments(ckpt_dir, run: dict, *, do_eval: bool, moving_cut: bool = False) -> TrainingArguments:
    """TrainingArguments for `run` (run.json's settings). Progress output, rotation and
    activation checkpointing are salf's, so the Trainer's are off.

    Several processes on CPUs need `use_cpu` (accelerate's MULTI_CPU, gloo): without it
    accelerate finds no accelerator for torchrun's LOCAL_RANK and every process trains alone.
    No parameter that requires grad is ever unused (the frozen ones do not require it), so
    DDP does not look for unused ones (the Trainer's default would walk the graph every step)
    -- unless the cut moves (`moving_cut`: a callback says `moves_cut`): parameters frozen
    after DDP built its buckets get no gradient, and DDP must find them unused at every step
    instead of waiting for them."""
    bf16 = run["bf16"]
    cpu = not torch.cuda.is_available()
    return TrainingArguments(
        output_dir=str(ckpt_dir),
        per_device_train_batch_size=run["batch_size"],
        per_device_eval_batch_size=run["batch_size"],
        gradient_accumulation_steps=run["grad_accum"],
        num_train_epochs=float(run["epochs"]),
        max_steps=int(run["max_steps"]) if run["max_steps"] else -1,
        learning_rate=float(run["lr"]),
        weight_decay=float(run["weight_decay"]),
        warmup_steps=int(run["warmup_steps"]),
        lr_scheduler_type="linear",
        optim="adamw_torch",
        bf16=bf16,
        # bf16 without an accelerator must say so explicitly (CPU autocast), else TrainingArguments refuses
        use_cpu=cpu and (bf16 or distributed.world_size() > 1),
        ddp_find_unused_parameters=moving_cut,
        seed=run["seed"],
        data_seed=run["seed"],
        logging_strategy="steps",
        logging_steps=1,
        eval_strategy="steps" if do_eval else "no",
        eval_steps=int(run["eval_steps"]) if do_eval else None,
        save_strategy="steps" if run["save_steps"] else "no",
        save_steps=int(run["save_steps"]) if run["save_steps"] else 500,
        save_total_limit=None,          # SalfTrainer rotates (complete checkpoints only)
        report_to=["tensorboard"] if run["report_to"] == "tensorboard" else [],
        disable_tqdm=True,              # salf.train.progress draws the bars
        remove_unused_columns=False,
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
        # apply_plan owns checkpointing (trainable layers only); older transformers call it gradient_*
        **({"activation_checkpointing": False} if "activation_checkpointing" in _ARG_FIELDS
           else {"gradient_checkpointing": False}),
    )


@dataclasses.dataclass
class Data:
    """A run's encoded examples, the tokenizer's pad id and (classification) the label ids."""
    train: list[dict]
    eval: list[dict]
    pad_id: int
    label_ids: list[int] | None


def build_trainer(model, args: TrainingArguments, data: Data, run: dict, *, evaluate=None, cache=None,
                  callbacks=(), resumed_from: str | None = None) -> SalfTrainer:
    """The Trainer of the run whose run.json settings are `run` (its loss, the checkpoints it
    keeps): `callbacks` in order, no console printer of its own; `cache` is the PrefixCache
    (or None) that compute_loss consults."""
    trainer = SalfTrainer(
        model=model, args=args, train_dataset=Examples(data.train),
        eval_dataset=Examples(data.eval) if args.eval_strategy != "no" else None,
        data_collator=Collator(data.pad_id), salf_loss=run["loss"], salf_eval=evaluate, salf_cache=cache,
        salf_keep=run["save_total_limit"], salf_protect=resumed_from, callbacks=list(callbacks),
    )
    trainer.remove_callback(PrinterCallback)    # per-step dicts: salf writes them to train_log.jsonl
    trainer.remove_callback(ProgressCallback)
    return trainer


def check_engine(trainer: SalfTrainer) -> None:
    """Refuse a run whose launcher asked for FSDP or DeepSpeed that the Trainer does not run:
    accelerate falls back to plain data parallelism without a word where it cannot (CPUs)."""
    wanted = distributed.engine()
    running = {"fsdp": trainer.is_fsdp_enabled, "deepspeed": trainer.is_deepspeed_enabled}
    if wanted in running and not running[wanted]:
        name = distributed.ENGINE_NAMES[wanted]
        raise SalfError(f"{name}: accelerate runs {name} on GPUs (and other accelerators) only; here it "
                        f"would train with plain DDP instead. Run on GPUs, or launch without {name}")
