"""A wheel of this checkout, installed into a fresh virtual environment, carries everything the package needs
outside the checkout: the fused kernel's C++ sources and headers (it compiles there), the shipped models
and the Fashion-MNIST test split."""

import os
import shutil
import subprocess
import sys
import venv

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PROBE = """
import os, torch
import stm_fast
from stm_fast import digits, ssm
assert not stm_fast.__file__.startswith(os.environ["CHECKOUT"]), stm_fast.__file__
print("package:", stm_fast.__file__)
print("backends:", ssm.available_backends("cpu"))
x, y = digits.load_test_split("fashion-mnist")
print("fashion-mnist test images:", len(x))
print("shipped digits models:", len(digits.shipped_checkpoints("digits")))
"""


@pytest.mark.slow
def test_a_wheel_installed_elsewhere_builds_the_fused_kernel_and_finds_its_data(tmp_path):
    """pip wheel . -> a fresh venv (torch from the system site-packages) -> import from the venv: the fused
    kernel compiles from the packaged sources (a cold cache), the data files are there (~1-2 min)."""
    src = tmp_path / "src"  # the files a clone holds, and nothing a previous build left in the checkout
    for name in subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                               check=True, capture_output=True, text=True).stdout.splitlines():
        if os.path.isfile(os.path.join(ROOT, name)):
            os.makedirs(os.path.dirname(src / name), exist_ok=True)
            shutil.copy2(os.path.join(ROOT, name), src / name)
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels),
                    str(src)], check=True, timeout=300)
    wheel = next(wheels.glob("stm_vim-*.whl"))
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(system_site_packages=True, with_pip=False).create(env_dir)
    py = str(env_dir / "bin" / "python")
    site = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], check=True,
                          capture_output=True, text=True).stdout.strip()
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", site, str(wheel)],
                   check=True, timeout=300)
    env = {**os.environ, "STM_CACHE_DIR": str(tmp_path / "cache"), "CHECKOUT": ROOT, "OMP_NUM_THREADS": "1"}
    env.pop("STM_FUSED_BUILD_DIR", None)
    out = subprocess.run([py, "-c", PROBE], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "building the fused CPU scan kernel" in out.stderr, out.stderr[-2000:]
    assert "'fused'" in out.stdout and "fashion-mnist test images: 10000" in out.stdout
    assert "shipped digits models: 3" in out.stdout and site in out.stdout
