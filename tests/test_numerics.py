"""Numerical-mode pinning (romer.core.numerics): the environment pins, their guard, the exact fit."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from romer.core.numerics import PINS, cpu_info, lstsq_exact, polyval_increasing

CLEAN_ENV = {k: v for k, v in os.environ.items() if k not in PINS and k != "ROMER_NUMERICS"}


def _py(code, **env):
    r = subprocess.run([sys.executable, "-c", code], env=CLEAN_ENV | env, capture_output=True, text=True, timeout=120)
    return r


def test_import_romer_sets_the_pins_but_keeps_the_users_values():
    code = "import os, json, romer; print(json.dumps({k: os.environ.get(k) for k in romer.core.numerics.PINS}))"
    got = json.loads(_py(code).stdout)
    assert got == PINS
    got = json.loads(_py(code, MKL_CBWR="AVX2").stdout)  # a user's own value wins over the pin (COMPATIBLE)
    assert got["MKL_CBWR"] == "AVX2" and got["ATEN_CPU_CAPABILITY"] == "avx2"
    got = json.loads(_py(code, ROMER_NUMERICS="native").stdout)
    assert all(v is None for v in got.values())


@pytest.mark.skipif("avx512f" not in cpu_info()["flags"], reason="needs a CPU with AVX-512 (torch would pick AVX2 anyway)")
def test_a_stage_refuses_to_run_when_torch_chose_its_kernels_first():
    ok = _py("import romer, torch; from romer.core.numerics import set_determinism; set_determinism(1); "
             "print(torch.backends.cpu.get_cpu_capability())")
    assert ok.returncode == 0 and ok.stdout.strip() == "AVX2"
    late = _py("import torch; torch.ones(3).sum(); import romer; from romer.core.numerics import set_determinism; "
               "set_determinism(1)")
    assert late.returncode != 0 and "numerical pins not in force" in late.stderr and "AVX512" in late.stderr


def test_lstsq_exact_is_the_least_squares_solution_and_order_free():
    rng = np.random.default_rng(0)
    x = rng.random(40)
    A = np.vander(x, 4, increasing=True)
    b = 0.3 + 2 * x - x**2 + 0.01 * rng.standard_normal(40)
    coef = lstsq_exact(A, b)
    assert np.allclose(coef, np.linalg.lstsq(A, b, rcond=None)[0], rtol=1e-9, atol=1e-12)
    perm = rng.permutation(40)  # exact sums: the row order cannot change a single bit
    assert lstsq_exact(A[perm], b[perm]).tobytes() == coef.tobytes()
    assert np.allclose(polyval_increasing(coef, x), A @ coef, rtol=1e-12)


def test_lstsq_exact_refuses_a_rank_deficient_system():
    A = np.vander(np.array([0.5, 0.5, 0.5]), 2, increasing=True)
    with pytest.raises(np.linalg.LinAlgError, match="rank-deficient"):
        lstsq_exact(A, np.array([1.0, 2.0, 3.0]))
