"""Fail when a test was skipped for any reason but a missing GPU: ``python .ci/skips.py junit.xml [WHERE]``.

A fresh clone has everything the tests read (tests/data/, tests/specs/) and the extras CI installs, so a skip
means a test that did not run. Only a skip whose reason names CUDA or a GPU is allowed (this machine has none).
Used by .ci/run and .ci/lowest.
"""

import re
import sys
import xml.etree.ElementTree as ET

skipped = [
    f"{case.get('classname')}.{case.get('name')}: {skip.get('message')}"
    for case in ET.parse(sys.argv[1]).iter("testcase")
    if (skip := case.find("skipped")) is not None
]
gpu_only = [s for s in skipped if re.search(r"\b(cuda|gpu)\b", s, re.I)]
others = [s for s in skipped if s not in gpu_only]
where = sys.argv[2] if len(sys.argv) > 2 else "in this run"
print(f"skips: {len(gpu_only)} GPU-only, {len(others)} other")
if others:
    sys.exit(f"tests skipped {where} (only GPU-only ones may be):\n  " + "\n  ".join(others))
