"""One process of test_multihost.py's job: python -m tests.multihost_worker PORT PROCESS_ID NUM_PROCESSES WORKDIR

Trains the tiny config with fsdp over every device of the job to step 4 (checkpoints at 2 and 4), then calls
train_and_evaluate again to step 6, which resumes from the step-4 checkpoint the processes wrote together.
"""
import sys

from absl import logging

from jdiff.cli import runtime
from jdiff.configs import tiny
from jdiff.train import train_and_evaluate


def job_config(**parallel):
  """The tiny config with a one-level U-Net (it compiles in half the time), checkpoints every 2 steps, fsdp=4."""
  raw = tiny.get_config()
  raw.model.update(channel_mults=(1,), attention_resolutions=())
  raw.training.checkpoint_every = 2
  raw.parallel.update(fsdp=4, **parallel)
  return raw


def main(port: str, process_id: str, num_processes: str, workdir: str) -> None:
  logging.set_verbosity(logging.INFO)  # the test reads "resuming from checkpoint at step 4" in the log
  runtime.enable_compilation_cache()
  raw = job_config(coordinator_address=f"localhost:{port}", num_processes=int(num_processes),
                   process_id=int(process_id))
  for num_steps in (4, 6):
    raw.training.num_steps = num_steps
    train_and_evaluate(raw, workdir)


if __name__ == "__main__":
  main(*sys.argv[1:])
