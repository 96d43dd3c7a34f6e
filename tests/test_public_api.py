"""Guards the public names: removing or renaming one must be a deliberate change here."""

import importlib

import pytest

import fedlora_jax

PUBLIC = {
    "fedlora_jax": {"Aggregator", "ClientSpec", "LoraFactors", "LoraTree", "MaskTree", "ServerState", "__version__",
                    "aggregation", "algorithms", "data", "devices", "driver", "federated", "get_aggregator",
                    "importance", "kernels", "linalg", "lora", "make_round", "models", "testing"},
    "fedlora_jax.lora": {"LoraFactors", "apply", "apply_merged", "apply_stacked", "merge", "unmerge", "init", "rank_mask",
                         "rank_masks", "count_params", "count_bytes", "apply_masks", "delta"},
    "fedlora_jax.linalg": {"SVDResult", "lowrank_svd", "stacked_lowrank_svd", "dense_svd", "randomized_svd",
                           "svd_safe", "truncate_to_factors"},
    "fedlora_jax.importance": {"sensitivity", "ema_init", "ema_update", "element_scores", "triplet_scores",
                               "budget_schedule", "topk_masks", "per_client_topk"},
    "fedlora_jax.aggregation": {"Aggregator", "get_aggregator", "fedit", "zero_padding", "replication_padding",
                                "rank1_adaptive", "flexlora", "flora", "fedex_lora", "ffa_lora", "fedsa_lora",
                                "fedara", "comm_params", "comm_bytes", "round_bytes"},
    "fedlora_jax.federated": {"ClientSpec", "ServerState", "Task", "client_update", "make_round", "make_spec",
                              "init_server_state", "round_key", "effective_base", "RoundFn"},
    "fedlora_jax.algorithms": {"build_algorithm", "AlgoContext", "lcd_plan", "rank_ramp", "fedara_allocate",
                               "hafl_update_masks", "hafl_truncation_masks", "orth_regularizer", "Algorithm",
                               "ClientPlan", "ClientOptions", "ClientStateRule", "RoundOutputs", "RoundReport",
                               "BUILDERS", "canonical_name"},
    "fedlora_jax.driver": {"ExperimentConfig", "run_experiment", "load_config", "evaluate_run", "export_run_peft"},
    "fedlora_jax.devices": {"DeviceProfile", "PROFILES", "ModelShape", "client_flops", "client_time",
                            "client_energy", "client_memory", "round_time", "load_profiles"},
    "fedlora_jax.plan": {"plan_round", "format_plan", "plan_json", "build_round", "parse_mesh", "make_mesh",
                         "base_partition_spec", "analytic_flops_per_token", "roofline", "topology_devices", "count",
                         "HloCounts", "CHIPS", "Chip", "chip_of_topology", "SHAPES", "BASE_SHARDINGS",
                         "TPU_PLAN_INSTALL"},
    "fedlora_jax.testing": {"float64_enabled", "ALL_CHECKS", "DEFAULT_SHAPES", "Case", "assert_trees_close", "check_aggregator",
                            "check_all_zero_weights_keep_global", "check_contract", "check_distribute",
                            "check_grad_matches_finite_differences", "check_identical_clients",
                            "check_jit_matches_eager", "check_masked_slots_do_not_leak",
                            "check_permutation_invariance", "check_shapes_and_dtypes", "check_vmap_over_rounds",
                            "check_weight_scale_invariance", "check_zero_weight_clients", "default_ranks",
                            "make_case"},
}


@pytest.mark.parametrize("module", sorted(PUBLIC))
def test_public_names_exist_and_are_exported(module):
    mod = importlib.import_module(module)
    exported = set(getattr(mod, "__all__", ()))
    missing = PUBLIC[module] - exported
    assert not missing, f"{module}.__all__ lost {sorted(missing)}"
    for name in PUBLIC[module]:
        assert getattr(mod, name) is not None


def test_top_level_all_is_exact():
    assert set(fedlora_jax.__all__) == PUBLIC["fedlora_jax"]


def test_lazy_subpackages_resolve():
    assert fedlora_jax.models.from_pretrained is not None
    assert fedlora_jax.data.dirichlet_partition is not None
    assert fedlora_jax.testing.check_aggregator is not None
