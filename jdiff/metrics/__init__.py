"""Quality measures of generated images: a digit classifier (metrics/digits.py) and the shapes detector
(metrics/shapes.py)."""
