"""jdiff/cli/host_memory.py in fresh processes: a worker thread's large blocks are reused instead of faulted in again."""
import os
import subprocess
import sys

import pytest

from jdiff.cli import host_memory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A worker thread, as XLA's are, allocates, writes and frees a 256 MiB block three times (a training step's
# temporaries, three steps); prints the page faults each round took.
ROUNDS = """
import ctypes, resource, sys, threading
from jdiff.cli.host_memory import keep_freed_memory
print(keep_freed_memory() if sys.argv[1] == "keep" else False)
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
size = 256 << 20
def rounds():
  for _ in range(3):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = libc.malloc(size)
    ctypes.memset(block, 1, size)
    libc.free(block)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
worker = threading.Thread(target=rounds)
worker.start()
worker.join()
"""


def fault_rounds(mode: str) -> tuple[str, list[int]]:
  env = dict(os.environ, PYTHONPATH=ROOT)
  out = subprocess.run([sys.executable, "-c", ROUNDS, mode], env=env, capture_output=True, text=True,
                       check=True).stdout
  tuned, *faults = out.split()
  return tuned, [int(f) for f in faults]


@pytest.mark.skipif(not host_memory.is_glibc(), reason="tunes glibc's malloc")
def test_freed_blocks_are_reused_without_page_faults():
  tuned, faults = fault_rounds("keep")
  assert tuned == "True"
  assert faults[0] > 60_000  # the first round maps 65,536 pages of 4 KiB
  assert faults[1] < 100 and faults[2] < 100, faults


@pytest.mark.skipif(not host_memory.is_glibc(), reason="tunes glibc's malloc")
def test_untuned_every_round_faults_again():
  tuned, faults = fault_rounds("plain")
  assert tuned == "False"
  assert min(faults) > 60_000, faults
