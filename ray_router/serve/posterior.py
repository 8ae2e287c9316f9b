"""The ``Posterior`` deployment: one replica, the only writer of the FGTS.CDB state (or, while
another process holds the state's lock, a standby that follows it and takes over; see
:mod:`ray_router.serve.posterior_service`).

Its body is :class:`~ray_router.serve.posterior_service.PosteriorService` (free of Ray, tested on
its own); this class adds Serve's settings, Ray's metrics and the graceful-shutdown hook.
"""

from ray import serve

from ray_router.serve.posterior_service import PosteriorService
from ray_router.serve.specs import PosteriorSpec


@serve.deployment(
    name="Posterior",
    num_replicas=1,
    max_ongoing_requests=1024,
    ray_actor_options={"num_cpus": 0},
    health_check_period_s=2,
    health_check_timeout_s=30,
    graceful_shutdown_timeout_s=10,
    graceful_shutdown_wait_loop_s=0.1,
)
class Posterior(PosteriorService):
    # Serve awaits an async constructor of a deployment class; mypy only knows plain classes
    async def __init__(self, spec: PosteriorSpec, refresh_min_interval_s: float = 0.02):  # type: ignore[misc]
        from ray_router.serve.judge import AgreementMetrics
        from ray_router.serve.metrics import PosteriorMetrics

        super().__init__(spec, refresh_min_interval_s, PosteriorMetrics(), judge_metrics=AgreementMetrics())
        await self.start()

    def __del__(self) -> None:
        """Serve calls this on a graceful shutdown: a last snapshot, then release the lock."""
        if getattr(self, "state", None) is not None:
            self.close()
