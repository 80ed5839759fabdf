"""Test environment: offline hubs, 8 fake CPU devices, fp32 defaults.

Must run before jax is imported anywhere, hence module-level environment edits.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8").strip()

import pytest  # noqa: E402

from tests import helpers  # noqa: E402


@pytest.fixture(scope="session")
def tiny_config():
  return helpers.tiny_config()


@pytest.fixture(scope="session")
def smollm2_path():
  return helpers.smollm2_gguf_path()


@pytest.fixture(scope="session")
def shared_data():
  return helpers.shared_data_dir()
