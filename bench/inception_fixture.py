"""Regenerates tests/fixtures/inception_random.npz: pytorch-fid's InceptionV3 (the FID graph) on random weights.

The weights are not stored: `random_state` draws each tensor from a numpy generator seeded by the tensor's name,
so tests/test_inception.py draws the very same weights without torch. What is stored is small: the state dict's
names and shapes, a few uint8 input images, pytorch-fid's 2048-d features of them (its own resizing to 299 and
scaling to [-1, 1] included), and torch's bilinear resize of a small image, to check the resizing on its own.

  pip install --no-deps --target /tmp/fidlib pytorch-fid torchvision   # beside the installed torch
  PYTHONPATH=/tmp/fidlib python bench/inception_fixture.py

Installing pytorch-fid with its dependencies may replace the installed torch; --no-deps --target keeps it apart.
A torchvision whose compiled ops do not match the installed torch still serves: pytorch-fid uses only its Python
modules, so this script skips registering the ops.
"""
import os
import sys
import types
import zlib

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

OUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "fixtures",
                   "inception_random.npz")
SEED = 20151205
IMAGE_SHAPES = ((2, 16, 16, 3), (2, 32, 32, 1), (2, 320, 300, 3))  # upsampled grey and RGB, and downsampled RGB


def random_tensor(name: str, shape: tuple[int, ...]) -> np.ndarray:
  """A tensor of the state dict `name`, drawn so that every layer keeps activations of order one.

  Convolution kernels: He-normal. Batch norm: scale in [0.5, 1.5], bias N(0, 0.2), running mean N(0, 0.2),
  running variance in [0.5, 2]. The generator is seeded by the name, so the order of drawing does not matter.
  """
  rng = np.random.default_rng([SEED, zlib.crc32(name.encode())])
  kind = name.rsplit(".", 1)[1]
  if kind == "weight" and len(shape) == 4:
    return (rng.standard_normal(shape) * np.sqrt(2.0 / np.prod(shape[1:]))).astype(np.float32)
  if kind == "weight":
    return rng.uniform(0.5, 1.5, shape).astype(np.float32)
  if kind == "running_var":
    return rng.uniform(0.5, 2.0, shape).astype(np.float32)
  return (0.2 * rng.standard_normal(shape)).astype(np.float32)  # bias, running_mean


def random_state(shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
  return {name: random_tensor(name, tuple(shape)) for name, shape in shapes.items()}


def input_images() -> list[np.ndarray]:
  rng = np.random.default_rng(SEED)
  return [rng.integers(0, 256, shape, dtype=np.uint8) for shape in IMAGE_SHAPES]


def pytorch_fid_inception():
  """pytorch-fid's InceptionV3 (2048-d pool block) with random weights in place of its download."""
  sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))
  import torch
  from pytorch_fid import inception

  def fid_inception_v3():
    net = inception._inception_v3(num_classes=1008, aux_logits=False, weights=None)
    net.Mixed_5b = inception.FIDInceptionA(192, pool_features=32)
    net.Mixed_5c = inception.FIDInceptionA(256, pool_features=64)
    net.Mixed_5d = inception.FIDInceptionA(288, pool_features=64)
    net.Mixed_6b = inception.FIDInceptionC(768, channels_7x7=128)
    net.Mixed_6c = inception.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6d = inception.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6e = inception.FIDInceptionC(768, channels_7x7=192)
    net.Mixed_7b = inception.FIDInceptionE_1(1280)
    net.Mixed_7c = inception.FIDInceptionE_2(2048)
    state = net.state_dict()
    shapes = {k: tuple(v.shape) for k, v in state.items() if not k.endswith("num_batches_tracked")}
    net.load_state_dict({k: torch.from_numpy(v) for k, v in random_state(shapes).items()}, strict=False)
    fid_inception_v3.shapes = shapes
    return net

  inception.fid_inception_v3 = fid_inception_v3  # what InceptionV3() calls to build and load the network
  model = inception.InceptionV3([inception.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()
  return model, fid_inception_v3.shapes


def main():
  import torch
  import torch.nn.functional as F
  torch.set_num_threads(2)
  model, shapes = pytorch_fid_inception()
  used = {k: v for k, v in shapes.items() if not k.startswith(("fc.", "AuxLogits."))}
  out = {"names": np.array(sorted(used)), "shapes": np.array([str(list(used[k])) for k in sorted(used)])}
  with torch.no_grad():
    for i, images in enumerate(input_images()):
      x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
      x = x.repeat(1, 3, 1, 1) if x.shape[1] == 1 else x  # PIL's convert("RGB") of a grey image
      out[f"features_{i}"] = model(x)[0][:, :, 0, 0].numpy()
    small = torch.from_numpy(input_images()[0][:1]).permute(0, 3, 1, 2).float()
    out["resize_in"] = small[0].permute(1, 2, 0).numpy()
    for size in (7, 23):
      out[f"resize_{size}"] = F.interpolate(small, size=(size, size), mode="bilinear",
                                            align_corners=False)[0].permute(1, 2, 0).numpy()
  os.makedirs(os.path.dirname(OUT), exist_ok=True)
  np.savez_compressed(OUT, **out)
  scale = max(float(np.abs(out[f"features_{i}"]).max()) for i in range(len(IMAGE_SHAPES)))
  print(f"wrote {OUT} ({os.path.getsize(OUT)} bytes): {len(used)} tensors, features up to {scale:.3g}")


if __name__ == "__main__":
  main()
