"""Ray's private names that ray_router.raycompat relies on still exist with the shape it uses.

A Ray upgrade that renames or reshapes one fails here, by name, instead of at run time in a sweep
or a deployment (no cluster is started: these are import-level and signature checks)."""

import importlib
import inspect
import os

from ray_router import raycompat


def test_every_private_name_still_exists():
    missing = []
    for module, attr in raycompat.PRIVATE_APIS:
        try:
            obj = importlib.import_module(module)
            for part in attr.split("."):
                obj = getattr(obj, part)
        except (ImportError, AttributeError) as e:
            missing.append(f"{module}.{attr}: {e}")
    assert not missing, "Ray moved private APIs that ray_router.raycompat uses:\n" + "\n".join(missing)


def test_serve_start_takes_the_arguments_passed():
    from ray.serve._private import api

    params = inspect.signature(api.serve_start).parameters
    assert {"http_options", "grpc_options", "proxy_location", "global_logging_config"} <= set(params)


def test_ray_init_takes_the_private_arguments_passed():
    import ray

    source = inspect.getsource(ray.init)  # they arrive through **kwargs, popped by name
    for name in ("_metrics_export_port", "_system_config", "_temp_dir"):
        assert f'"{name}"' in source, f"ray.init no longer reads {name}"


def test_serve_client_reaches_the_controller_instance_details():
    from ray.serve._private.client import ServeControllerClient
    from ray.serve._private.controller import ServeController

    assert "_controller" in inspect.getsource(ServeControllerClient.__init__)
    assert callable(getattr(ServeController, "get_serve_instance_details", None))


def test_asha_keeps_its_trial_table_and_forget_empties_it():
    from ray.tune.schedulers import AsyncHyperBandScheduler

    sched = AsyncHyperBandScheduler(metric="m", mode="min", time_attr="t", max_t=10)
    assert isinstance(sched._trial_info, dict)
    sched._trial_info["t1"] = object()
    assert raycompat.asha_knows(sched, "t1")
    raycompat.asha_forget(sched, "t1")
    assert not raycompat.asha_knows(sched, "t1")
    raycompat.asha_forget(sched, "t1")  # forgetting twice is fine


def test_env_defaults_never_override_the_operator(monkeypatch):
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "1")
    monkeypatch.delenv("TOKENIZERS_PARALLELISM", raising=False)
    raycompat.apply_env_defaults({"EXTRA_SETTING_FOR_TEST": "x"})
    assert os.environ["RAY_USAGE_STATS_ENABLED"] == "1"
    assert os.environ["TOKENIZERS_PARALLELISM"] == "false"
    assert os.environ.pop("EXTRA_SETTING_FOR_TEST") == "x"


def test_importing_the_adapter_does_not_import_ray():
    import subprocess
    import sys

    code = "import sys, ray_router.raycompat; print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
