"""The optimiser flags of the training binaries, one definition (fpe_sweep's binaries, ncen).

--optimizer, --learning_rate, --weight_decay, --schedule, --schedule_boundaries and
--schedule_decay mean train.make_optimizer's and train.make_schedule's arguments.
"""

from __future__ import annotations

from absl import flags

from experiments import common
from fpe_jax import train

# The flags belong to the binary that calls `define`, not to this module: absl skips
# disclaimed modules when it looks for a flag's owner (so --help and flags.txt list them).
flags.disclaim_key_flags()

DEFAULTS = {"optimizer": "adam", "learning_rate": 1e-3, "weight_decay": 0.0,
            "schedule": "constant", "schedule_boundaries": [], "schedule_decay": 0.1}


def define(schedule_help: str = "", **defaults) -> None:
  """Defines --optimizer, --learning_rate, --weight_decay, --schedule,
  --schedule_boundaries and --schedule_decay (train.make_optimizer / make_schedule), with
  their single-flag checks; `defaults` overrides DEFAULTS by name, and
  `schedule_help` says what a schedule's steps count in this binary."""
  unknown = sorted(set(defaults) - set(DEFAULTS))
  if unknown:
    raise TypeError(f"optimizer_flags.define: no flag named {', '.join(unknown)}")
  d = {**DEFAULTS, **defaults}
  flags.DEFINE_enum("optimizer", d["optimizer"], train.OPTIMIZERS, "Optimiser.")
  flags.DEFINE_float("learning_rate", d["learning_rate"], "(Initial) learning rate.")
  flags.DEFINE_float("weight_decay", d["weight_decay"], "Weight decay: L2 for adam and sgd "
                     "(torch's weight_decay, the peers'), decoupled for adamw "
                     "(train.make_optimizer); 0: none.")
  flags.DEFINE_enum("schedule", d["schedule"], train.SCHEDULES,
                    "Learning-rate schedule" + (f" ({schedule_help})" if schedule_help else "")
                    + ".")
  flags.DEFINE_list("schedule_boundaries", d["schedule_boundaries"],
                    "--schedule=step: the steps at which the rate is multiplied by "
                    "--schedule_decay.")
  flags.DEFINE_float("schedule_decay", d["schedule_decay"],
                     "--schedule=step: the factor, in (0, 1].")
  common.flag_validator("learning_rate", lambda v: 0 < v < float("inf"),
                        "must be a finite number > 0")
  common.flag_validator("weight_decay", lambda v: 0 <= v < float("inf"),
                        "must be a finite number >= 0")
  common.flag_validator("schedule_boundaries", lambda v: (x := common.int_list(v)) is not None
                        and x == sorted(set(x)) and all(b >= 1 for b in x),
                        "a comma list of increasing steps >= 1, e.g. 1000,2000")
  common.flag_validator("schedule_decay", lambda v: 0 < v <= 1, "must be in (0, 1]")


def schedule_boundaries(values) -> tuple[int, ...]:
  """--schedule_boundaries as steps, checked against --schedule (needed by step only)."""
  boundaries = tuple(common.int_list(values.schedule_boundaries))
  common.validate("schedule_boundaries", bool(boundaries) == (values.schedule == "step"),
                  "needed by --schedule=step, and only by it")
  return boundaries
