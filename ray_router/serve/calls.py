"""Calling another deployment from the ingress: retried while its replica is dead or restarting,
shed at once when it is saturated.

A :class:`~ray_router.errors.RouterError` raised by the callee (e.g. a duplicate feedback) reaches
the client as it is. Serve's ``BackPressureError`` (the callee's queue is full: its deployment's
``max_queued_requests``) is never retried: the client gets a 503 ``overloaded`` with
``Retry-After`` at once. A dead or restarting callee is retried for ``retry_s`` (0 on the route
path: it never waits), then a 503 ``unavailable``. The client's message names no internals; the
replica's log has the cause.
"""

import asyncio
import logging
import time
from typing import Any

from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, RequestCancelledError
from ray.serve.handle import DeploymentHandle

from ray_router.errors import RouterError
from ray_router.serve.errors import Overloaded, ServiceUnavailable

logger = logging.getLogger("ray.serve")

RETRYABLE = (RayActorError, DeploymentUnavailableError)


def _shed(method: str) -> Overloaded:
    return Overloaded(f"{method}: the service is at capacity; retry after the Retry-After delay")


async def call(handle: DeploymentHandle, method: str, *args: Any, retry_s: float) -> Any:
    """``handle.method.remote(*args)``; keep retrying a restarting callee (backing off to 0.5 s)
    for ``retry_s``; a saturated one raises :class:`Overloaded` at once."""
    deadline = time.monotonic() + retry_s
    delay = 0.05
    while True:
        try:
            return await getattr(handle, method).remote(*args)
        except RayTaskError as e:
            cause = getattr(e, "cause", None)
            if isinstance(cause, RouterError):
                raise cause from None
            if isinstance(cause, BackPressureError):
                raise _shed(method) from None
            if not isinstance(cause, RETRYABLE) or time.monotonic() >= deadline:
                # e.g. the feedback log could not be written: nothing was acknowledged, retry later
                logger.error(f"{method} failed: {e!r}")
                raise ServiceUnavailable(f"{method} failed; retry later") from None
        except RouterError:
            raise
        except BackPressureError:
            raise _shed(method) from None
        except RETRYABLE as e:
            if time.monotonic() >= deadline:
                logger.warning(f"{method}: callee unavailable after {retry_s:.1f}s: {e!r}")
                raise ServiceUnavailable(f"{method}: the service is restarting; retry") from None
        except RequestCancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - the callee failed: with gRPC between deployments (the
            # shipped configs) its exception arrives as it is, not as a RayTaskError
            logger.error(f"{method} failed: {e!r}")
            raise ServiceUnavailable(f"{method} failed; retry later") from None
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.5)
