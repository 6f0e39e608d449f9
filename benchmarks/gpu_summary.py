"""The closing line of ``benchmarks/gpu_check.sh``: which CUDA scan backends this machine certified, and which
not and why. ``python -m benchmarks.gpu_summary JUNIT_XML...``

A CUDA backend is certified when it runs here (``stm_fast.ssm.backend_status``) and every test of the
script's pytest steps that names it (``cuda-<backend>`` in verify/, ``[...-<backend>]`` or ``<backend>-`` in
the ids of tests/) passed, at least one of them. Otherwise it is uncertified, with the reason: no CUDA
device, not installed or not working (the probe's words), a failed test, or no test that ran (a step that
timed out). Prints one line, ``certified: ...; uncertified: ...``; exits 0 whatever it says.
"""

from __future__ import annotations

import re
import sys
import xml.etree.ElementTree as ET

CUDA_BACKENDS = ("triton", "torch", "mamba_ssm")


def outcomes(paths) -> dict[str, str]:
    """{test id: passed | failed | skipped} from pytest's JUnit XML files (missing or broken files ignored)."""
    out = {}
    for path in paths:
        try:
            root = ET.parse(path).getroot()
        except (OSError, ET.ParseError):
            continue
        for case in root.iter("testcase"):
            state = "passed"
            if case.find("failure") is not None or case.find("error") is not None:
                state = "failed"
            elif case.find("skipped") is not None:
                state = "skipped"
            out[f"{case.get('classname')}::{case.get('name')}"] = state
    return out


def _names(test_id: str, backend: str) -> bool:
    """Whether a test id is about ``backend`` on CUDA."""
    if f"cuda-{backend}" in test_id:
        return True
    if "test_cuda" not in test_id and "cuda" not in test_id.split("::")[-1]:
        return False
    params = re.search(r"\[(.*)\]$", test_id)
    return params is not None and backend in re.split(r"[-\[\]]", params.group(1))


def verdicts(results: dict[str, str], status: dict[str, tuple[bool, str]], has_cuda: bool) -> tuple[list, list]:
    """(certified backends, [(backend, why not)])."""
    certified, not_certified = [], []
    for b in CUDA_BACKENDS:
        works, why = status.get(b, (False, "unknown backend"))
        mine = [state for tid, state in results.items() if _names(tid, b)]
        if not has_cuda:
            not_certified.append((b, "no CUDA device"))
        elif not works:
            not_certified.append((b, why or "does not run here"))
        elif "failed" in mine:
            not_certified.append((b, f"{mine.count('failed')} test(s) failed"))
        elif "passed" not in mine:
            not_certified.append((b, "no test of it ran (a step timed out?)"))
        else:
            certified.append(f"cuda/{b} ({mine.count('passed')} tests)")
    return certified, not_certified


def closing_line(certified, not_certified) -> str:
    line = "certified: " + (", ".join(certified) or "nothing on CUDA")
    if not_certified:
        line += "; uncertified: " + ", ".join(f"cuda/{b} ({why})" for b, why in not_certified)
    return line


def main(argv=None) -> int:
    import torch

    from stm_fast.ssm import backend_status

    has_cuda = torch.cuda.is_available()
    status = {name: (ok, why) for name, ok, why in backend_status("cuda")} if has_cuda else {}
    print(closing_line(*verdicts(outcomes(argv if argv is not None else sys.argv[1:]), status, has_cuda)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
