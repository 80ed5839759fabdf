"""Test environment: offline hubs, 8 fake CPU devices, fp32 defaults.

Must run before jax is imported anywhere, hence module-level environment edits.
"""

import os
import pathlib
import re
import shutil
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The PyTorch references run on one thread: beside XLA's thread pool and another worker on the same
# cores, torch's OpenMP threads spin-wait for each other (transformers' greedy SmolLM2 decode took
# 44 s on two threads, 9 s on one, on this 2-core machine). Set before torch is imported, which
# reads it once. Subprocesses inherit it; XLA sizes its own thread pool and ignores it.
os.environ.setdefault("OMP_NUM_THREADS", "1")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
  ).strip()
# Compiling is most of what the tests spend (about 70% of the model tests' CPU time), and LLVM's
# optimisation about a third of that, so the tests compile without it. That is not the program a
# user runs: matmuls call the same Eigen kernels at any level, but only an optimising build fuses
# a*b+c into one multiply-add (one rounding, not two), so elementwise values can differ in the last
# bits. Tolerances between two programs are therefore stated in float32 ulps, and `make test` runs
# the numerics references once more at XLA's default level (MARKOVIAN_XLA_OPT=default), so the
# code users run is the code tested. Subprocesses inherit the flag.
if (
  os.environ.get("MARKOVIAN_XLA_OPT", "0") != "default"
  and "xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]
):
  os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"

# One persistent compilation cache for the whole run, inherited by every subprocess a test starts
# (CLI runs, multi-process jobs): the demo's sampler, scoring and update programs are compiled once,
# not once per process. A run of its own: a warm cache from an earlier run would hide compile costs.
_XLA_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _XLA_CACHE = os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="markovian-xla-")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

import pytest  # noqa: E402

# The shared modules' asserts report their operands as a test module's do; registered before any
# of them is imported.
pytest.register_assert_rewrite("tests.helpers", "tests.step_reference", "tests.family_cases")

from tests import helpers  # noqa: E402

# Fixture modules, registered once for every test module: tests request their fixtures by name
# and import none (an imported fixture would also be one instance per importing module).
pytest_plugins = ["tests.run_fixtures"]


@pytest.fixture(scope="session")
def tiny_config():
  return helpers.tiny_config()


@pytest.fixture(scope="session")
def smollm2_path():
  return helpers.smollm2_gguf_path()


@pytest.fixture(scope="session")
def smollm2_model(smollm2_path):
  """(config, params) of SmolLM2-135M in float32, loaded once per test run."""
  from markovian_jax.models import load_checkpoint

  return load_checkpoint(smollm2_path)


@pytest.fixture(scope="session")
def shared_data():
  return helpers.shared_data_dir()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm2_path):
  """A tiny random Llama with SmolLM2's tokenizer, written as an HF directory."""
  import jax

  from markovian_jax.models import hf, init_params, load_tokenizer

  tok = load_tokenizer(smollm2_path)
  config = helpers.tiny_config(
    vocab_size=len(tok),
    bos_token_id=tok.bos_token_id,
    eos_token_ids=(tok.eos_token_id,),
    rope_scaling=None,
  )
  params = init_params(config, jax.random.PRNGKey(0))
  d = str(tmp_path_factory.mktemp("tiny_llama"))
  hf.save_hf(config, params, d, tokenizer=tok)
  return d


# Workers (pytest-xdist, `make test`): one module per work unit, so a module-scoped fixture (a
# multi-process job, a trained run) is built once. The modules that read the session's trained
# `demo_runs` are one unit together, so those runs are trained by one worker, not by each.
SHARED_RUNS_SCOPE = "demo_runs"


def _modules_sharing_demo_runs(tests_dir: str) -> set:
  """The node ids ("tests/<sub>/test_x.py") of the test modules under `tests_dir` with a test or
  fixture that takes `demo_runs` as an argument."""
  root = pathlib.Path(tests_dir)
  takes = re.compile(rf"def \w+\(([^)]*\W)?{SHARED_RUNS_SCOPE}\b")
  return {
    f"tests/{path.relative_to(root).as_posix()}"
    for path in sorted(root.rglob("test_*.py"))
    if takes.search(path.read_text())
  }


@pytest.hookimpl(optionalhook=True)  # a plain `pytest` run has no xdist
def pytest_xdist_make_scheduler(config, log):
  from xdist.scheduler import LoadScopeScheduling

  shared = _modules_sharing_demo_runs(os.path.dirname(os.path.abspath(__file__)))

  class ModuleScheduling(LoadScopeScheduling):
    def _split_scope(self, nodeid):
      module = nodeid.split("::", 1)[0]
      return SHARED_RUNS_SCOPE if module in shared else module

  return ModuleScheduling(config, log)


# The numerics references: the float64 step reference, the model families against transformers,
# bfloat16 (their CLI and refusal tests aside, which test no arithmetic). `make test` runs them
# once, in a second pass at XLA's default optimisation level (the programs users run), and leaves
# them out of its first pass at level 0; `--numerics=all` (a plain `pytest`) runs them in place.
NUMERICS_MODULES = (
  "tests/training/test_step_reference.py",
  "tests/models/test_families.py",
  "tests/training/test_bf16.py",
  "tests/sampling/test_bf16_sampler.py",
)
NOT_NUMERICS_WORDS = ("cli", "refuses")


def is_numerics(nodeid: str) -> bool:
  """Whether the test `nodeid` ("tests/<sub>/test_x.py::test_y[param]") is a numerics
  reference."""
  module, _, name = nodeid.partition("::")
  return module in NUMERICS_MODULES and not any(w in name.lower() for w in NOT_NUMERICS_WORDS)


def pytest_addoption(parser):
  parser.addoption(
    "--numerics",
    choices=("all", "only", "exclude"),
    default="all",
    help="the numerics references (tests/conftest.py NUMERICS_MODULES): run them with the rest "
    "(all), alone (only; with MARKOVIAN_XLA_OPT=default, as `make test` does) or not (exclude)",
  )


def pytest_ignore_collect(collection_path, config):
  """With --numerics=only, the other test modules are not even imported (collecting the whole
  tree costs each worker ~13 s)."""
  if (
    config.getoption("--numerics") == "only"
    and collection_path.suffix == ".py"
    and collection_path.name.startswith("test_")
  ):
    rel = collection_path.resolve().relative_to(pathlib.Path(config.rootpath).resolve())
    return True if rel.as_posix() not in NUMERICS_MODULES else None
  return None


def pytest_collection_modifyitems(config, items):
  mode = config.getoption("--numerics")
  if mode == "all":
    return
  keep, drop = [], []
  for item in items:
    (keep if is_numerics(item.nodeid) == (mode == "only") else drop).append(item)
  if drop:
    config.hook.pytest_deselected(items=drop)
    items[:] = keep


# Under MARKOVIAN_STRICT_TESTS (CI) a skipped test is a failed run: CI checks everything or says
# what it did not. Read on the controller, where pytest-xdist's workers send every report.
_SKIPPED = []


def _record_skip(report):
  if report.skipped and helpers.STRICT:
    reason = (
      f"xfail: {report.wasxfail}"
      if hasattr(report, "wasxfail")
      else report.longrepr[-1]
      if isinstance(report.longrepr, tuple)
      else str(report.longrepr)
    )
    _SKIPPED.append(f"{report.nodeid}: {reason}")


def pytest_runtest_logreport(report):
  _record_skip(report)


def pytest_collectreport(report):
  _record_skip(report)


def pytest_sessionfinish(session, exitstatus):
  del exitstatus
  if _SKIPPED and not hasattr(session.config, "workerinput"):
    session.exitstatus = pytest.ExitCode.TESTS_FAILED
  if _XLA_CACHE:
    shutil.rmtree(_XLA_CACHE, ignore_errors=True)


def pytest_terminal_summary(terminalreporter):
  if _SKIPPED:
    terminalreporter.section("MARKOVIAN_STRICT_TESTS=1: skipped tests fail the run", red=True)
    for line in _SKIPPED:
      terminalreporter.line(line)
