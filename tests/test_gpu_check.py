"""benchmarks/gpu_check.sh and its closing line (benchmarks/gpu_summary.py), as a CPU-only machine runs them."""

import os
import subprocess

import pytest

from benchmarks import gpu_summary

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _junit(path, cases):
    rows = "".join(f'<testcase classname="{c}" name="{n}">{"<failure/>" if s == "failed" else "<skipped/>" if s == "skipped" else ""}'
                   f"</testcase>" for c, n, s in cases)
    path.write_text(f'<?xml version="1.0"?><testsuites><testsuite>{rows}</testsuite></testsuites>')
    return str(path)


def test_closing_line_certifies_only_backends_whose_own_tests_all_passed(tmp_path):
    """A backend is certified when it runs and its tests passed; a failure, no test, or no kernel say why not."""
    xml = _junit(tmp_path / "a.xml", [
        ("verify.test_fast_path", "test_fast_path_equals_the_reference_in_float64[cuda-triton-0]", "passed"),
        ("tests.test_cuda_model", "test_cuda_model_in_float64_equals_the_reference[stm-{}-triton]", "passed"),
        ("tests.test_cuda_model", "test_cuda_model_in_float64_equals_the_reference[stm-{}-torch]", "failed"),
        ("tests.test_cuda_model", "test_cuda_model_in_float64_equals_the_reference[stm-{}-mamba_ssm]", "skipped")])
    status = {"triton": (True, ""), "torch": (True, ""), "mamba_ssm": (False, "mamba-ssm is not installed")}
    line = gpu_summary.closing_line(*gpu_summary.verdicts(gpu_summary.outcomes([xml, str(tmp_path / "missing.xml")]),
                                                          status, True))
    assert line == ("certified: cuda/triton (2 tests); uncertified: cuda/torch (1 test(s) failed), "
                    "cuda/mamba_ssm (mamba-ssm is not installed)")
    line = gpu_summary.closing_line(*gpu_summary.verdicts({}, status, True))
    assert "cuda/triton (no test of it ran" in line and line.startswith("certified: nothing on CUDA")


@pytest.mark.slow
def test_gpu_check_runs_to_its_closing_line_on_a_cpu_only_machine(tmp_path):
    """The whole script on this CPU-only machine: at most 8 files, every step's exit recorded, the backends
    step exits 0, and the last line names what was not certified (~1 min)."""
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    env.update(OUT=str(out), CUDA_VISIBLE_DEVICES="")
    subprocess.run(["bash", "benchmarks/gpu_check.sh"], cwd=ROOT, env=env, timeout=600, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    files = [os.path.join(d, f) for d, _, fs in os.walk(out) for f in fs]
    assert 2 <= len(files) <= 8
    steps = (out / "steps.log").read_text().splitlines()
    names = [line.split()[1] for line in steps if line.startswith("== ")]
    exits = {line.split()[0]: int(line.split()[-1]) for line in steps if " exit " in line}
    assert names and set(names) == set(exits) and exits["backends"] == 0
    assert steps[-1].startswith("certified: nothing on CUDA; uncertified: cuda/triton (no CUDA device)")
