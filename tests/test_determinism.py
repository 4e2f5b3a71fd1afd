"""Byte-identical results across CPU settings (scripts/check_determinism.py, docs/reproducibility.md).

The six stages run on a tiny config three times: with the project's numerical pins; with the pins on a
simulated older CPU (no AVX-512; MKL told SSE4.2 only); and without the pins (control). The first two
must give the same bytes in every DVC output. Where the CPU has AVX-512 the control must differ from
them, or the check could not see a kernel change at all. With the reference's library
versions, the pinned run must also reproduce the committed reference hashes, made on another machine
or session, where the reference lists this CPU's vendor in `verified_vendors` (otherwise that part is
skipped with the reason: an Intel and an AMD CPU do not yet give the same bytes, docs/reproducibility.md).
"""

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO / "benchmarks" / "results" / "determinism.json"
sys.path.insert(0, str(REPO / "scripts"))

import check_determinism as cd  # noqa: E402

from romer.core.numerics import cpu_info  # noqa: E402


@pytest.mark.slow
def test_outputs_do_not_depend_on_the_cpu(tmp_path):
    out = tmp_path / "det.json"
    assert cd.main(["--json", str(out)]) == 0
    res = json.loads(out.read_text())
    s = res["settings"]
    assert s["pinned"]["cpu_capability"] == s["older-cpu"]["cpu_capability"] == "AVX2"
    assert s["older-cpu"]["differing_files"] == []
    assert len(res["reference"]) >= 15 and "models/model/model.safetensors" in res["reference"]
    if s["native"]["cpu_capability"] == "AVX512":
        assert s["native"]["differing_files"], "unpinned AVX-512 kernels gave the same bytes: the check is blind"
    committed = json.loads(REFERENCE.read_text())
    vendor = cpu_info()["vendor"]
    made_on = committed.get("vendor", "GenuineIntel")
    if vendor not in committed.get("verified_vendors", [made_on]):
        checked = committed.get("checked_vendors", {}).get(vendor)
        pytest.skip(f"CPU vendor {vendor}: the reference was made on {made_on}, and "
                    + (f"on {checked['date']} a {vendor} CPU did not reproduce it ({len(checked['differing_files'])} "
                       "files differ): docs/reproducibility.md, 'Checked on AMD'" if checked else
                       "no CPU of this vendor has been checked against it; run `python scripts/check_determinism.py`"))
    if committed["versions"] != res["versions"]:
        pytest.skip(f"library versions {res['versions']} differ from the reference's {committed['versions']}")
    # Every file the reference holds (it may hold a subset: see its "note") must match.
    differ = sorted(k for k in committed["reference"] if committed["reference"][k] != res["reference"].get(k))
    assert not differ, (f"the pinned run on {res['cpu']} differs from the reference made on {committed['cpu']} in "
                        f"{differ}; if a code change moved the figures on purpose, regenerate it: "
                        f"python scripts/check_determinism.py --json {REFERENCE.relative_to(REPO)}")

