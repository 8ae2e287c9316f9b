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
from ray_router.policies.features import FEATURE_MAPS, make_feature_map
from ray_router.policies.fgts_cdb import FGTSCDB, FGTSConfig
from ray_router.policies.dueling_ucb import CoLSTIM, CoLSTIMConfig, MaxInP, MaxInPConfig
from ray_router.policies.knn import KNNConfig, KNNRouter
from ray_router.policies.laplace_ts import LaplaceTS, LaplaceTSConfig
from ray_router.policies.offline_prior import OfflinePrior, fit_offline_prior
from ray_router.policies.offline_static import OfflineStaticConfig, OfflineStaticRouter
from ray_router.policies.references import REFERENCES
from ray_router.policies.reachability import unreachable_arms

__all__ = [
    "Duel", "Policy", "PolicyEnv", "make_policy", "policy_names", "register_policy", "get_entry",
    "FGTSCDB", "FGTSConfig", "UniformPolicy", "UniformConfig", "BestFixedArm", "HindsightConfig",
    "FEATURE_MAPS", "make_feature_map",
    "OfflinePrior", "fit_offline_prior", "OfflineStaticConfig", "OfflineStaticRouter", "REFERENCES",
    "unreachable_arms",
    "MaxInP", "MaxInPConfig", "CoLSTIM", "CoLSTIMConfig", "LaplaceTS", "LaplaceTSConfig", "KNNRouter", "KNNConfig",
]
