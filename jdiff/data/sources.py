"""Finding and preparing TFDS datasets, failing fast and clearly when one cannot be had offline.

A dataset that is not prepared in the data dir is built: `sklearn_digits` from what scikit-learn ships, `shapes` by
drawing it, any other by TFDS's own download. TFDS retries a failing download for minutes (about 200 s with no DNS),
so before that this module checks in a few seconds that the internet (TFDS's storage host, or the configured HTTPS
proxy) is reachable, and raises `DatasetUnavailableError` with the fix when it is not.
"""
from __future__ import annotations

import os
import socket
import urllib.parse
import urllib.request

import tensorflow_datasets as tfds
from absl import logging

from jdiff.data import digits, shapes  # noqa: F401  (importing them registers `sklearn_digits` and `shapes`)
from jdiff.data.tf_import import tensorflow

OFFLINE_DATASETS = ("sklearn_digits", "shapes")
PROBE_HOST = ("storage.googleapis.com", 443)
PROBE_TIMEOUT_S = 3.0


class DatasetUnavailableError(RuntimeError):
  """A dataset that is unknown, or not prepared here and not downloadable now; the message says how to fix it."""


def get_builder(name: str, data_dir: str | None) -> tfds.core.DatasetBuilder:
  """The TFDS builder for `name` (e.g. 'mnist', 'cifar10', 'sklearn_digits') in `data_dir` (None: TFDS's default).

  Reads and downloads nothing: its `info.features` describe the data even where the data is not prepared.
  """
  try:
    return tfds.builder(name, data_dir=os.path.expanduser(data_dir) if data_dir else None)
  except tfds.core.registered.DatasetNotFoundError as error:
    raise DatasetUnavailableError(
        f"Unknown dataset {name!r}: TFDS has no builder of that name. Use 'sklearn_digits' (works offline) or a "
        "TFDS image dataset with 'image' and 'label' features, such as 'mnist', 'fashion_mnist' or 'cifar10'."
    ) from error


def prepare(builder: tfds.core.DatasetBuilder) -> None:
  """Makes sure `builder`'s data is in its data dir, building or downloading it if needed."""
  tensorflow()  # Before TFDS first touches TF, which building and reading do.
  if builder.is_prepared():
    return
  if builder.name in OFFLINE_DATASETS:
    logging.info("building the offline dataset %s in %s (once)", builder.name, builder.data_dir)
    tfds.display_progress_bar(False)
    try:
      builder.download_and_prepare()
    finally:
      tfds.display_progress_bar(True)
    return
  if not internet_reachable():
    raise DatasetUnavailableError(unavailable_message(builder, "the network is unreachable"))
  try:
    builder.download_and_prepare()
  except Exception as error:  # A download or build failure of any kind gets the same fix.
    raise DatasetUnavailableError(unavailable_message(builder, f"preparing it failed: {error}")) from error


def internet_reachable() -> bool:
  """Whether a TCP connection to TFDS's storage host (or to the HTTPS proxy, if one is set) opens within seconds."""
  proxy = urllib.request.getproxies().get("https")
  address = PROBE_HOST
  if proxy:
    parsed = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    address = (parsed.hostname, parsed.port or 80)
  try:
    socket.create_connection(address, timeout=PROBE_TIMEOUT_S).close()
    return True
  except OSError:
    return False


def unavailable_message(builder: tfds.core.DatasetBuilder, reason: str) -> str:
  """How to fix a dataset that is not prepared in its data dir and cannot be downloaded here."""
  name, data_dir = builder.name, str(builder.data_dir_root)
  return (
      f"Dataset {name!r} is not prepared in data_dir {data_dir!r} and cannot be downloaded here ({reason}).\n"
      "To fix it, on a machine with network access run\n"
      f"  tfds build {name} --data_dir {data_dir}\n"
      "or\n"
      f"  python -c \"import tensorflow_datasets as tfds; tfds.builder('{name}', data_dir='{data_dir}')"
      ".download_and_prepare()\"\n"
      f"then copy {data_dir} to this machine and pass --config.data.data_dir={data_dir}.\n"
      "Or train on the offline default: --config.data.name=sklearn_digits."
  )
