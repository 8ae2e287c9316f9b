"""Calling another deployment from the ingress: retried while its replica is dead or restarting.

A :class:`~ray_router.errors.RouterError` raised by the callee (e.g. a duplicate feedback) reaches
the client as it is; any other failure, or a restart that outlasts ``retry_s``, is a 503.
"""

import asyncio
import logging
import time
from typing import Any

from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, RequestCancelledError
from ray.serve.handle import DeploymentHandle

from ray_router.errors import RouterError
from ray_router.serve.errors import ServiceUnavailable

logger = logging.getLogger("ray.serve")

RETRYABLE = (RayActorError, DeploymentUnavailableError, BackPressureError)


async def call(handle: DeploymentHandle, method: str, *args: Any, retry_s: float) -> Any:
    """``handle.method.remote(*args)``; keep retrying (backing off to 0.5 s) for ``retry_s``."""
    deadline = time.monotonic() + retry_s
    delay = 0.05
    while True:
        try:
            return await getattr(handle, method).remote(*args)
        except RayTaskError as e:
            cause = getattr(e, "cause", None)
            if isinstance(cause, RouterError):
                raise cause from None
            if not isinstance(cause, RETRYABLE) or time.monotonic() >= deadline:
                # e.g. the feedback log could not be written: nothing was acknowledged, retry later
                logger.error(f"{method} failed: {e!r}")
                raise ServiceUnavailable(f"{method} failed: {type(cause).__name__}: {cause}") from None
        except RouterError:
            raise
        except RETRYABLE as e:
            if time.monotonic() >= deadline:
                raise ServiceUnavailable(f"{method}: the service is restarting ({type(e).__name__}); retry") from None
        except RequestCancelledError:
            raise
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.5)
