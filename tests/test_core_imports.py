"""The pure core never imports Ray (Ray lives in ray_router.serve and ray_router.tune only)."""

import subprocess
import sys


def test_importing_the_core_does_not_import_ray():
    code = (
        "import sys, ray_router, ray_router.data, ray_router.embeddings, ray_router.policies, "
        "ray_router.evaluation, ray_router.cli\n"
        "bad = sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.'))\n"
        "assert not bad, bad\n"
        "heavy = [m for m in ('torch', 'sentence_transformers') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
