"""The typed builder of the Serve application (``build_app(args: AppArgs) -> Application``).

It resolves the arm table (a file, or a dataset's offline split), sizes the embedder (GPU with a
CPU fallback), makes each deployment's spec and binds the graph::

    HTTP -> Ingress --embed--> Embedder (N replicas, @serve.batch; embedder.mode: deployment)
               |  \\--feedback--> Posterior (1 replica: the only writer of FGTS.CDB)
               \\---- long-poll: new posterior samples after each background refresh

With ``embedder.mode: inline`` there is no Embedder: each Ingress replica encodes in-process
(:mod:`ray_router.serve.inline`) and gets the embedder's resources (``embedder_resources``).

Serve configs reference it as ``import_path: ray_router.serve.app:build_app``. No ``from
__future__ import annotations``: Serve reads the real annotation of ``args`` to validate them.
"""

import logging
from typing import Any

from ray import serve

from ray_router.serve.arms import ArmTable
from ray_router.serve.config import AppArgs
from ray_router.serve.embedder import Embedder
from ray_router.serve.ingress import Ingress
from ray_router.serve.inline import InlineEncoderSpec
from ray_router.serve.posterior import Posterior
from ray_router.serve.specs import IngressSpec, PosteriorSpec

logger = logging.getLogger("ray.serve")


def embedder_resources(args: AppArgs) -> dict[str, Any]:
    """``ray_actor_options`` of an embedder replica (of an Ingress replica with ``embedder.mode:
    inline``): its CPUs, its custom resources (placement), and its GPU only when the config asks for
    one and (with ``gpu: auto``) the cluster has one."""
    spec = args.embedder
    opts: dict[str, Any] = {"num_cpus": spec.num_cpus}
    if spec.resources:
        opts["resources"] = dict(spec.resources)
    if spec.gpu == "never" or spec.num_gpus <= 0 or args.encoder.remote:  # a remote encoder computes nothing here
        return opts
    if spec.gpu == "require":
        return {**opts, "num_gpus": spec.num_gpus}
    import ray

    gpus = float(ray.cluster_resources().get("GPU", 0)) if ray.is_initialized() else 0.0
    if gpus > 0:
        return {**opts, "num_gpus": spec.num_gpus}
    logger.warning("embedder: the cluster has no GPU; serving the encoder on CPU (embedder.gpu: auto)")
    return opts


def posterior_spec(args: AppArgs, table: ArmTable, state_dir: str) -> PosteriorSpec:
    st = args.state
    return PosteriorSpec(
        arm_ids=table.ids,
        prices=tuple(float(p) for p in table.prices),
        arm_embeddings=table.embeddings,
        encoder_identity=table.encoder_identity,
        state_dir=state_dir,
        policy_config=dict(args.policy.config),
        policy_seed=args.policy.seed,
        decision_ttl_s=args.auth.decision_ttl_s,
        snapshot_every_n=st.snapshot_every_n,
        snapshot_every_s=st.snapshot_every_s,
        fsync=st.fsync,
        lock_timeout_s=st.lock_timeout_s,
        offline_prior=table.offline_prior,
        hmac_key_env=args.auth.hmac_key_env,
        cold_start=table.cold_start,
        sample_pool=st.sample_pool,
        judge_weight=args.judge.weight if args.judge is not None else 1.0,
        keep_queries=st.keep_queries,
        encoder=args.encoder,
    )


def ingress_spec(args: AppArgs, table: ArmTable, state_dir: str) -> IngressSpec:
    return IngressSpec(
        arm_ids=table.ids,
        prices=tuple(float(p) for p in table.prices),
        arm_embeddings=table.embeddings,
        policy_config=dict(args.policy.config),
        offline_prior=table.offline_prior,
        upstreams=tuple(table.upstreams),
        state_dir=state_dir,
        auth=args.auth,
        limits=args.limits,
        service=args.service,
        resilience=args.resilience,
        judge=args.judge,
        retired=args.retired,
        keep_queries=args.state.keep_queries,
    )


def build_app(args: AppArgs) -> serve.Application:
    """Typed builder referenced by ``import_path: ray_router.serve.app:build_app``."""
    from ray_router.serve.arms import resolve_arm_table

    if isinstance(args, dict):  # called directly rather than by Serve
        args = AppArgs.model_validate(args)
    table = resolve_arm_table(args)
    state_dir = str(args.state_dir().resolve())
    # @serve.deployment turns each class into a Deployment (.options, .bind), but Ray's stubs keep
    # the decorated name typed as the plain class: hence the three attr-defined ignores below
    emb = args.embedder
    ingress = Ingress
    embedder: Any
    if emb.mode == "inline":  # the Ingress encodes: it takes the embedder's resources, no Embedder deployment
        embedder = InlineEncoderSpec(
            args.encoder, table.encoder_identity, emb.max_batch_size, emb.batch_wait_timeout_s, emb.single_on_loop
        )
        ingress = Ingress.options(ray_actor_options=embedder_resources(args))  # type: ignore[attr-defined]
    else:
        embedder = Embedder.options(ray_actor_options=embedder_resources(args)).bind(  # type: ignore[attr-defined]
            args.encoder, table.encoder_identity, emb.max_batch_size, emb.batch_wait_timeout_s
        )
    posterior = Posterior.bind(  # type: ignore[attr-defined]
        posterior_spec(args, table, state_dir), args.state.refresh_min_interval_s
    )
    logger.info(
        f"ray-router: {table.n_arms} arms, embeddings from {table.source}; encoder {emb.mode}; state in {state_dir}"
    )
    return ingress.bind(embedder, posterior, ingress_spec(args, table, state_dir))  # type: ignore[attr-defined]
