"""TrainConfig (salf.config): checked once when made, errors that name the field (the CLI
names the flag), run.json as it is, and old run.json files that still resume."""

import dataclasses
import json

import pytest

from salf.config import TrainConfig
from salf.errors import ConfigError, SalfError


@pytest.mark.parametrize("kwargs, says, flag_says", [
    ({"batch_size": 0}, "batch_size must be at least 1, got 0", "--batch-size must be at least 1, got 0"),
    ({"max_steps": 0}, "max_steps must be at least 1, got 0", "--max-steps must be at least 1"),
    ({"lr": float("nan")}, "lr must be a number above 0, got nan", "--lr must be a number above 0"),
    ({"epochs": 0}, "epochs must be a number above 0", "--epochs must be"),
    ({"seed": 2**32}, "seed must be at most 4294967295", "--seed must be at most"),
    ({"loss": "focal"}, "loss must be one of label, lm, not 'focal'", "--loss must be one of"),
    ({"report_to": "wandb"}, "report_to must be one of none, tensorboard, csv", "--report-to must be"),
    ({"batch_size": "8"}, "batch_size must be an integer, got '8'", "--batch-size must be an integer"),
    ({"weight_decay": -1.0}, "weight_decay must be at least 0", "--weight-decay must be"),
    ({"cache_prefix": True, "loss": "lm"}, "cache_prefix supports the label/SFT loss",
     "--cache-prefix supports the label/SFT loss"),
])
def test_a_bad_option_is_one_error_naming_the_field(kwargs, says, flag_says):
    with pytest.raises(ConfigError) as err:
        TrainConfig(**kwargs)
    assert says in str(err.value) and isinstance(err.value, SalfError)
    assert err.value.cli_message().startswith(flag_says)


def test_the_config_is_recorded_as_it_is():
    config = TrainConfig(max_steps=30, batch_size=4, lora={"r": 4})
    assert config.lora.r == 4 and config.learning_rate == 2e-4 and TrainConfig().learning_rate == 5e-5
    record = config.record()
    assert record["lr"] == 2e-4 and record["lora"]["r"] == 4 and record["max_steps"] == 30
    assert not {"resume", "progress", "base_spec", "allow_different_weights"} & set(record)
    json.dumps(record)
    again = TrainConfig.from_dict(json.loads(json.dumps({**record, "n_train": 8})))
    assert again == dataclasses.replace(config, lr=2e-4)
    assert {"lr", "lora", "seed", "batch_size", "max_steps", "weight_decay"} <= set(TrainConfig.resume_fields())
    assert "save_steps" not in TrainConfig.resume_fields()


def test_a_run_json_written_before_weight_decay_was_recorded_still_resumes(tmp_path):
    from salf.train.loop import RESUME_KEYS, check_resume, run_settings

    now = run_settings({"eof": 2, "num_layers": 4, "head": "frozen"}, TrainConfig(), [], n_train=8, n_eval=0)
    old = {k: v for k, v in now.items()
           if k not in ("weight_decay", "warmup_steps", "report_to", "save_total_limit")}
    run_json = tmp_path / "run.json"
    run_json.write_text(json.dumps({**old, "epochs": 1.0}))       # the CLI's 1.0, the library's 1
    check_resume(run_json, now, RESUME_KEYS)
    run_json.write_text(json.dumps({**old, "weight_decay": 0.1}))
    with pytest.raises(SalfError, match=r"weight_decay 0\.1 \(now 0\.0\)"):
        check_resume(run_json, now, RESUME_KEYS)
