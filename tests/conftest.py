"""Test session settings shared by every test module."""

import os

# Two cores run the tests, the server's stubs and sometimes a second process at once: one thread each
# avoids oversubscription (which slows torch several-fold) and keeps fp32 results reproducible.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
