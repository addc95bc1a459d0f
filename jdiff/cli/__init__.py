"""The command-line programs jdiff-train and jdiff-sample (train.py and sample.py run them)."""
