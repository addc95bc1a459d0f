"""Quality measures of generated images: the Fréchet and kernel distances (fid.py) on the FID Inception network's
features (inception.py) or a network trained on jdiff's own datasets (features.py), sample quality of a trained
model (quality.py), likelihood in bits per dimension (likelihood.py), a digit classifier (digits.py) and the
shapes detector (shapes.py). Inference never imports them."""
