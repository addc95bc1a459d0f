"""Real damage to a checkpoint's files, as disks, copies and bit rot do it, for the reliability tests."""
import glob
import os

import tensorstore as ts


def data_files(step_dir) -> list[str]:
  """The files holding a checkpoint's array data (orbax's OCDBT store, one process)."""
  return glob.glob(os.path.join(step_dir, "state", "ocdbt.process_0", "d", "*"))


def truncate_state_files(step_dir) -> None:
  """The way a half-copied or disk-full checkpoint is damaged: its array data files cut in half."""
  for path in data_files(step_dir):
    with open(path, "r+b") as f:
      f.truncate(os.path.getsize(path) // 2)


def invert(path: str, offset: int, count: int) -> None:
  """Inverts `count` bytes of the file at `offset`, keeping its size."""
  with open(path, "r+b") as f:
    f.seek(offset)
    data = f.read(count)
    f.seek(offset)
    f.write(bytes(b ^ 0xFF for b in data))


def flip_middle_of_largest_data_file(step_dir, count: int = 64) -> None:
  """Damage no file system reports: `count` bytes in the middle of the largest data file inverted."""
  path = max(data_files(step_dir), key=os.path.getsize)
  invert(path, os.path.getsize(path) // 2 - count // 2, count)


def flip_stored_array(step_dir, prefix: str, count: int = 16) -> str:
  """Inverts `count` bytes in the middle of where the data files hold the first array (by name) whose name starts
  with `prefix` ("ema_params/") and that is stored out of line (over 1 KB), found from the OCDBT store's own index.
  Returns the array's name ("ema_params/down0_res0/conv1/kernel")."""
  state = os.path.join(step_dir, "state") + os.sep
  store = ts.KvStore.open(f"file://{state}").result()
  version = ts.ocdbt.dump(store).result()["versions"][-1]
  assert version["root_height"] == 0, "a one-node index (a small state) is expected"
  entries = ts.ocdbt.dump(store, version["root"]["location"]).result()["entries"]
  for entry in sorted(entries, key=lambda e: e["key"]):
    name = entry["key"].decode().split("/")[0].replace(".", "/")
    if name.startswith(prefix) and "indirect_value" in entry:
      _, directory, path, offset, length = entry["indirect_value"].split(":")  # value:DIR:FILE:OFFSET:LENGTH
      invert(os.path.join(state, directory, path), int(offset) + int(length) // 2 - count // 2, count)
      return name
  raise AssertionError(f"no array {prefix}* is stored out of line")
