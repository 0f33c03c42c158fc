"""Run the test suite against the next Keras (keras-nightly and
keras-hub-nightly) in a virtual environment of its own.

The package pins the Keras and keras-hub it is tested with; this canary
shows early what the next ones break. It builds the environment at `VENV`
(or reuses it when it exists, `--upgrade` refreshes the nightlies), prints
the versions it runs, and runs this checkout's tests in it, with
`PYTHONPATH` set to the checkout so that its `keras_lora` is the one
imported (child processes too): all three backends through
`tests/run_all_backends.py`, or one with `--backend`. It is not part of
`.ci/run`; a failure here is news about Keras, not a broken build.

TensorFlow depends on `keras` and installs keras 3.15 into the same
`keras/` folder as keras-nightly, so the nightlies are reinstalled over it
last. `torch==2.13.0` is the CPU build where pip's configuration offers it
(on a CUDA machine, add the CPU index to pip's configuration first).

Usage:
    python tests/run_canary.py VENV [--backend NAME] [--upgrade] [pytest args]

Exits with the test run's status.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
NIGHTLIES = ["keras-nightly", "keras-hub-nightly"]
# The rest of the test environment, as the pinned one has it.
REQUIREMENTS = [
    "tensorflow==2.21.*",
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "torch==2.13.0",
    "safetensors",
    "tokenizers",
    "numpy",
    "matplotlib",
    "tensorflow-datasets",
    "transformers>=5,<6",
    "peft>=0.21,<0.22",
    "trl>=1.16,<2",
    "jinja2>=3.1.6",
    "psutil",
    "nbclient",
    "nbformat",
    "ipykernel",
    "pytest",
]
VERSIONS = (
    "import keras, keras_hub, jax, tensorflow, torch;"
    "print('keras', keras.__version__, '| keras-hub', keras_hub.__version__,"
    " '| jax', jax.__version__, '| tensorflow', tensorflow.__version__,"
    " '| torch', torch.__version__)"
)


def run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    print("+", " ".join(command), flush=True)
    return subprocess.run(command, check=True, **kwargs)


def build(venv: pathlib.Path, upgrade: bool) -> pathlib.Path:
    """The environment's python, with every requirement and the nightlies.

    Requirements the environment lacks are installed; the nightlies are
    then reinstalled over whatever `keras/` the requirements brought.

    Args:
        venv: where the environment is (or goes).
        upgrade: fetch the newest nightlies instead of keeping the ones
            installed.
    """
    python = venv / "bin" / "python"
    pip = [str(python), "-m", "pip", "install"]
    created = not python.exists()
    if created:
        run([sys.executable, "-m", "venv", str(venv)])
    run(pip + REQUIREMENTS)
    wanted = NIGHTLIES if created or upgrade else _installed(python, NIGHTLIES)
    run(pip + ["--pre", "--force-reinstall", "--no-deps"] + wanted)
    return python


def _installed(python: pathlib.Path, names: list[str]) -> list[str]:
    """`name==version` of each installed distribution, `name` if absent."""
    script = (
        "import importlib.metadata as m, sys\n"
        "for n in sys.argv[1:]:\n"
        "    try: print(f'{n}=={m.version(n)}')\n"
        "    except m.PackageNotFoundError: print(n)"
    )
    out = subprocess.run(
        [str(python), "-c", script, *names], check=True, capture_output=True, text=True
    )
    return out.stdout.split()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("venv", type=pathlib.Path)
    parser.add_argument("--backend", choices=("tensorflow", "jax", "torch"))
    parser.add_argument("--upgrade", action="store_true")
    args, pytest_args = parser.parse_known_args(argv)
    python = build(args.venv.resolve(), args.upgrade)
    env = dict(os.environ, PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="2")
    env.setdefault("KERAS_BACKEND", args.backend or "jax")
    run([str(python), "-c", VERSIONS], env=env, cwd=ROOT)
    if args.backend:
        env["KERAS_BACKEND"] = args.backend
        command = [str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    else:
        command = [str(python), str(ROOT / "tests" / "run_all_backends.py")]
    print("+", " ".join(command + pytest_args), flush=True)
    return subprocess.run(command + pytest_args, env=env, cwd=ROOT).returncode


if __name__ == "__main__":
    sys.exit(main())
