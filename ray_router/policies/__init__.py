"""Dueling-bandit policies (numpy only, no Ray): FGTS.CDB and baselines, behind one protocol."""

from ray_router.policies.base import (
    Duel,
    Policy,
    PolicyEnv,
    get_entry,
    make_policy,
    policy_names,
    register_policy,
)
from ray_router.policies.baselines import BestFixedArm, HindsightConfig, UniformConfig, UniformPolicy
from ray_router.policies.dueling_ucb import CoLSTIM, CoLSTIMConfig, MaxInP, MaxInPConfig
from ray_router.policies.features import FEATURE_MAPS, make_feature_map
from ray_router.policies.fgts_cdb import FGTSCDB, FGTSConfig
from ray_router.policies.knn import KNNConfig, KNNRouter
from ray_router.policies.laplace_ts import LaplaceTS, LaplaceTSConfig
from ray_router.policies.offline_prior import OfflinePrior, fit_offline_prior
from ray_router.policies.offline_static import OfflineStaticConfig, OfflineStaticRouter
from ray_router.policies.reachability import unreachable_arms
from ray_router.policies.references import REFERENCES

__all__ = [
    "FEATURE_MAPS",
    "FGTSCDB",
    "REFERENCES",
    "BestFixedArm",
    "CoLSTIM",
    "CoLSTIMConfig",
    "Duel",
    "FGTSConfig",
    "HindsightConfig",
    "KNNConfig",
    "KNNRouter",
    "LaplaceTS",
    "LaplaceTSConfig",
    "MaxInP",
    "MaxInPConfig",
    "OfflinePrior",
    "OfflineStaticConfig",
    "OfflineStaticRouter",
    "Policy",
    "PolicyEnv",
    "UniformConfig",
    "UniformPolicy",
    "fit_offline_prior",
    "get_entry",
    "make_feature_map",
    "make_policy",
    "policy_names",
    "register_policy",
    "unreachable_arms",
]
