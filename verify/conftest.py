"""At the end of a run: one line naming the (device, backend, precision) combinations ``verify/test_fast_path.py``
certified on this machine and those not available here."""

from __future__ import annotations

import re

_RESULTS: dict[tuple[str, str, str], set] = {}
_PATTERN = re.compile(r"test_fast_path_(equals_the_reference_in_float64|low_precision_error_is_at_most_twice_the_torch_backends)"
                      r"\[(?:(f32|bf16)-)?(\w+)-(\w+)\]")


def pytest_runtest_logreport(report):
    m = _PATTERN.search(report.nodeid)
    if m is None or report.when != "call" and not (report.when == "setup" and report.outcome != "passed"):
        return
    precision = "f64" if m.group(1).startswith("equals") else m.group(2)
    _RESULTS.setdefault((m.group(3), m.group(4), precision), set()).add(report.outcome)


def pytest_terminal_summary(terminalreporter):
    if not _RESULTS:
        return
    import torch

    certified, failed = {}, []
    for (device, backend, precision), outcomes in sorted(_RESULTS.items()):
        if "failed" in outcomes:
            failed.append(f"{device}/{backend} {precision}")
        elif "passed" in outcomes:
            certified.setdefault(f"{device}/{backend}", []).append(precision)
    line = "certified: " + (", ".join(f"{k} {' '.join(v)}" for k, v in certified.items()) or "nothing")
    if failed:
        line += "; FAILED: " + ", ".join(failed)
    if not torch.cuda.is_available():
        line += "; not available here: cuda"
    terminalreporter.write_line(line)
