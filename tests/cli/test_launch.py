"""The launchers (launch/*), the accelerator installs and the README commands that use them.

No cluster here: gcloud, srun and the workers' Python are stand-ins that run the command lines the
scripts build (so quoting is checked end to end) and record what they were given."""

import os
import re
import shutil
import subprocess

import pytest

from markovian_jax.runtime import host_allocator
from tests import helpers

LAUNCH = helpers.REPO / "launch"
SCRIPTS = sorted(p for p in LAUNCH.iterdir() if p.suffix in (".sh", ".sbatch"))
README = (helpers.REPO / "README.md").read_text()


def test_every_launcher_is_there():
  assert [p.name for p in SCRIPTS] == ["gpu_multinode.sh", "gpu_slurm.sbatch", "tpu_pod.sh"]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bash_syntax(script):
  result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
  assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_shellcheck(script):
  if shutil.which("shellcheck") is None:
    helpers.missing("shellcheck is not installed (apt-get install shellcheck; .ci/run does)")
  result = subprocess.run(
    ["shellcheck", "--shell=bash", str(script)], capture_output=True, text=True
  )
  assert result.returncode == 0, result.stdout


def _stub(path, body: str):
  path.write_text("#!/usr/bin/env bash\n" + body)
  path.chmod(0o755)


@pytest.fixture
def fake_tpu(tmp_path):
  """A PATH whose `gcloud` runs `--command` in a fake worker home (hostname w0) and copies scp
  sources there; the worker's Python records its argv one argument per line."""
  home, bin_dir = tmp_path / "home", tmp_path / "bin"
  home.mkdir()
  bin_dir.mkdir()
  _stub(
    bin_dir / "gcloud",
    f"""call="$*"; echo "${{call//$'\\n'/ }}" >> {tmp_path}/gcloud.calls
if [ "$4" = scp ]; then cp "$5" "{home}/${{6#*:}}"; exit; fi
while [ $# -gt 0 ]; do
  if [ "$1" = --command ]; then cd {home} && exec bash -c "$2"; fi
  shift
done
""",
  )
  _stub(bin_dir / "hostname", "echo w0\n")
  # The workers' python3: `-m venv DIR` makes a venv whose pip and python record their argv.
  _stub(
    bin_dir / "fakepython",
    """[ "$1 $2" = "-m venv" ] || exit 3
mkdir -p "$3/bin"
printf '#!/usr/bin/env bash\\nprintf "%%s\\\\n" "$@" > "$PWD/pip.args"\\n' > "$3/bin/pip"
printf '#!/usr/bin/env bash\\nprintf "%%s\\\\n" "$@" > "$PWD/python.args"; echo trained\\n' \\
  > "$3/bin/python"
chmod +x "$3/bin/pip" "$3/bin/python"
""",
  )
  env = dict(
    os.environ,
    PATH=f"{bin_dir}:{os.environ['PATH']}",
    HOME=str(home),
    PYTHON="fakepython",
    REPO_DIR="repo",
    HF_TOKEN="hf_secret",
  )
  return home, env, tmp_path


def test_tpu_pod_setup_copies_the_checkout_and_installs_on_every_worker(fake_tpu):
  home, env, tmp = fake_tpu
  result = subprocess.run(
    ["bash", str(LAUNCH / "tpu_pod.sh"), "setup", "pod", "zone-a"],
    env=env,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert result.returncode == 0, result.stderr
  repo = home / "repo"
  assert (
    repo / "markovian_jax" / "runtime" / "distributed.py"
  ).is_file()  # the working tree arrived
  assert (repo / "pip.args").read_text().split() == [
    "install",
    "-q",
    "-r",
    "requirements.txt",
    "-r",
    "requirements-tpu.txt",
  ]
  assert (home / ".cache" / "huggingface" / "token").read_text() == "hf_secret"
  calls = (tmp / "gcloud.calls").read_text()
  assert "hf_secret" not in calls  # the token travelled as a file, never on a command line
  assert all("--worker=all" in line and "--zone zone-a" in line for line in calls.splitlines())


def test_tpu_pod_train_runs_on_all_workers_with_arguments_quoted_and_a_log_each(fake_tpu):
  home, env, _ = fake_tpu
  (home / "repo" / ".venv" / "bin").mkdir(parents=True)
  subprocess.run(
    ["fakepython", "-m", "venv", str(home / "repo" / ".venv")],
    env=env,
    check=True,
    cwd=home / "repo",
  )
  args = [
    "--config.workdir=gs://bucket/run",
    "--config.model.path=/models/my llama",
    "--config.lora.targets=('q', 'v')",
    "--config.note=$HOME;`x`",
  ]
  result = subprocess.run(
    ["bash", str(LAUNCH / "tpu_pod.sh"), "train", "pod", "zone-a", "configs/gsm8k.py", *args],
    env=env,
    capture_output=True,
    text=True,
    timeout=60,
  )
  assert result.returncode == 0, result.stderr
  assert "warning" not in result.stderr  # a gs:// workdir was given
  argv = (home / "repo" / "python.args").read_text().splitlines()
  assert argv == ["-m", "markovian_jax.train", "--config=configs/gsm8k.py", *args]
  assert (home / "repo" / "logs" / "train-w0.log").read_text() == "trained\n"


def test_gpu_multinode_exports_the_jax_variables(tmp_path):
  _stub(tmp_path / "python", 'env | grep -E "^JAX_(COORD|NUM|PROC)" | sort; printf "%s\\n" "$@"\n')
  env = dict(
    os.environ, COORDINATOR="node0:1234", NNODES="2", NODE_RANK="1", PYTHON=str(tmp_path / "python")
  )
  out = subprocess.run(
    [
      "bash",
      str(LAUNCH / "gpu_multinode.sh"),
      "evaluate",
      "configs/svamp.py",
      "--checkpoint_dir=/shared/run/checkpoints",
    ],
    env=env,
    capture_output=True,
    text=True,
    check=True,
  ).stdout.splitlines()
  assert out == [
    "JAX_COORDINATOR_ADDRESS=node0:1234",
    "JAX_NUM_PROCESSES=2",
    "JAX_PROCESS_ID=1",
    "-m",
    "markovian_jax.evaluate",
    "--config=configs/svamp.py",
    "--checkpoint_dir=/shared/run/checkpoints",
  ]
  del env["NODE_RANK"]
  missing = subprocess.run(
    ["bash", str(LAUNCH / "gpu_multinode.sh"), "configs/svamp.py"],
    env=env,
    capture_output=True,
    text=True,
  )
  assert missing.returncode != 0 and "NODE_RANK" in missing.stderr


@pytest.mark.parametrize("tasks_per_node,device_ids", [("1", "0,1,2,3,4,5,6,7"), ("8", None)])
def test_gpu_slurm_runs_srun_with_one_process_per_node_or_per_gpu(
  tmp_path, tasks_per_node, device_ids
):
  _stub(
    tmp_path / "srun",
    'echo "JAX_LOCAL_DEVICE_IDS=${JAX_LOCAL_DEVICE_IDS:-unset}"\nprintf "%s\\n" "$@"\n',
  )
  env = dict(
    os.environ,
    PATH=f"{tmp_path}:{os.environ['PATH']}",
    SLURM_GPUS_ON_NODE="8",
    SLURM_NTASKS_PER_NODE=tasks_per_node,
  )
  out = subprocess.run(
    [
      "bash",
      str(LAUNCH / "gpu_slurm.sbatch"),
      "configs/gsm8k.py",
      "--config.workdir=/shared/gsm8k",
    ],
    env=env,
    cwd=tmp_path,
    capture_output=True,
    text=True,
    check=True,
  ).stdout.splitlines()
  assert out == [
    f"JAX_LOCAL_DEVICE_IDS={device_ids or 'unset'}",
    "--kill-on-bad-exit=1",
    "--output=logs/%x-%j-%t.log",
    ".venv/bin/python",
    "-m",
    "markovian_jax.train",
    "--config=configs/gsm8k.py",
    "--config.workdir=/shared/gsm8k",
  ]


# ------------------------------------------------------------------ README and installs
def _readme_section(title: str) -> str:
  return README.split(f"## {title}", 1)[1].split("\n## ", 1)[0]


def test_readme_uses_the_launchers_as_they_are():
  section = _readme_section("Running on GPUs and TPU pods")
  pod = re.findall(r"launch/tpu_pod\.sh (\w+)", section)
  assert set(pod) == {"setup", "train", "evaluate"}
  for cmd in re.findall(r"launch/gpu_(?:slurm\.sbatch|multinode\.sh) (\w+)", section):
    assert cmd in ("train", "evaluate"), cmd
  assert "COORDINATOR=" in section and "NNODES=" in section and "NODE_RANK=" in section
  # The install commands are the ones tpu_pod.sh runs on the workers, and the files they name.
  script = (LAUNCH / "tpu_pod.sh").read_text()
  tpu_install = re.search(r'INSTALL_TPU="\$PYTHON (.*) -q (.*)"', script).groups()
  assert f"python3 {tpu_install[0]} {tpu_install[1]}" in section
  assert (
    "python3 -m venv .venv && .venv/bin/pip install -r requirements.txt -r requirements-gpu.txt"
  ) in section
  # The training example runs from a clone: no data directory that only the authors have.
  assert "../shared" not in _readme_section("Training and evaluation")


@pytest.mark.parametrize(
  "name,extra", [("requirements-gpu.txt", "cuda13"), ("requirements-tpu.txt", "tpu")]
)
def test_accelerator_requirements_parse_and_pin_the_cpu_jax(name, extra):
  import importlib.metadata

  from packaging.requirements import Requirement

  lines = [
    ln.strip()
    for ln in (helpers.REPO / name).read_text().splitlines()
    if ln.strip() and not ln.startswith("#")
  ]
  # Only what the accelerator adds: pyproject.toml's extras read these files, which cannot hold -r.
  reqs = {r.name: r for r in map(Requirement, lines)}
  pins = dict(
    ln.split("==") for ln in (helpers.REPO / "requirements.txt").read_text().split() if "==" in ln
  )
  assert reqs["jax"].extras == {extra}
  assert str(reqs["jax"].specifier) == f"=={pins['jax']}"  # the same jax as requirements.txt
  assert extra in importlib.metadata.metadata("jax").get_all("Provides-Extra")


# ------------------------------------------------------------------ the host allocator
@pytest.mark.parametrize(
  "environ,nodes,expected",
  [
    ({"JAX_PLATFORMS": "cpu"}, ["nvidia0"], None),
    ({"JAX_PLATFORMS": "cuda,cpu"}, [], "JAX_PLATFORMS=cuda,cpu"),
    ({"JAX_PLATFORMS": "tpu"}, [], "JAX_PLATFORMS=tpu"),
    ({}, ["nvidia0"], "nvidia0"),
    ({}, ["accel0"], "accel0"),
    ({}, [], None),
  ],
)
def test_accelerator_hosts_are_told_apart_without_starting_jax(tmp_path, environ, nodes, expected):
  for name in nodes:
    (tmp_path / name).touch()
  patterns = (str(tmp_path / "nvidia[0-9]*"), str(tmp_path / "accel[0-9]*"))
  found = host_allocator.accelerator_host(environ, patterns)
  assert found == (expected if expected is None or "=" in expected else str(tmp_path / expected))


def test_no_allocator_restart_or_warning_on_accelerator_hosts(monkeypatch):
  monkeypatch.setenv("JAX_PLATFORMS", "cuda")
  monkeypatch.setattr(os, "execve", lambda *a: pytest.fail("restarted on an accelerator host"))
  line, ok = host_allocator._decide("tcmalloc")
  assert ok and "accelerator host (JAX_PLATFORMS=cuda)" in line
