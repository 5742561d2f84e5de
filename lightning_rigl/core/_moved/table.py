"""Old module path -> its public names of release 0.1.0 -> where each lives now (module path and name)."""

# Every public name each moved module of the core defined in 0.1.0 (generated from those sources). The root
# modules that moved are in lightning_rigl._moved: the core names nothing of the adapters, not even in a string.

_CORE = "lightning_rigl.core"

#: Old module path -> its public names -> where each lives now (module path and name).
MOVED: dict[str, dict[str, str]] = {
    f"{_CORE}.candidates": {
        "DEFAULT_CHUNK": f"{_CORE}.topology.candidates.DEFAULT_CHUNK",
        "GrowCandidates": f"{_CORE}.topology.candidates.GrowCandidates",
        "drop_grow_from_candidates": f"{_CORE}.topology.drop_grow.select_drop_grow",
        "grow_candidates": f"{_CORE}.topology.candidates.grow_candidates",
        "score_chunks": f"{_CORE}.topology.candidates.score_chunks",
        "smallest_active": f"{_CORE}.topology.drop_grow.smallest_active",
    },
    f"{_CORE}.distributed": {
        "all_finite": f"{_CORE}.parallel.collectives.all_finite",
        "all_ranks_sum": f"{_CORE}.parallel.collectives.all_ranks_sum",
        "all_ranks_true": f"{_CORE}.parallel.collectives.all_ranks_true",
        "broadcast_from_rank_zero": f"{_CORE}.parallel.collectives.broadcast_from_rank_zero",
        "check_masks_agree_across_ranks": f"{_CORE}.parallel.collectives.check_masks_agree_across_ranks",
    },
    f"{_CORE}.distribution": {
        "DISTRIBUTIONS": f"{_CORE}.sparsity.distributions.DISTRIBUTIONS",
        "Distribution": f"{_CORE}.sparsity.distributions.Distribution",
        "achieved_sparsity": f"{_CORE}.sparsity.distributions.achieved_sparsity",
        "budget_layers": f"{_CORE}.sparsity.distributions.budget_layers",
        "layer_sparsities": f"{_CORE}.sparsity.distributions.layer_sparsities",
        "raw_density": f"{_CORE}.sparsity.distributions.raw_density",
        "resolve_sparsities": f"{_CORE}.sparsity.distributions.resolve_sparsities",
    },
    f"{_CORE}.export": {
        "FORMAT": f"{_CORE}.state.export.FORMAT",
        "load_sparse": f"{_CORE}.state.export.load_sparse",
        "save_sparse": f"{_CORE}.state.export.save_sparse",
    },
    f"{_CORE}.flop_counter": {
        "FlopsByWeight": f"{_CORE}.flops.per_weight.FlopsByWeight",
        "count_by_weight": f"{_CORE}.flops.per_weight.count_by_weight",
    },
    f"{_CORE}.flops": {
        "FlopsCount": f"{_CORE}.flops.count.FlopsCount",
        "LayerFlops": f"{_CORE}.flops.count.LayerFlops",
        "count_active": f"{_CORE}.flops.count.count_active",
        "count_flops": f"{_CORE}.flops.count.count_flops",
        "training_flops_per_sample": f"{_CORE}.flops.count.training_flops_per_sample",
        "uncounted_warning": f"{_CORE}.flops.count.uncounted_warning",
    },
    f"{_CORE}.kernel_choice": {
        "KERNELS": f"{_CORE}.kernels.choice.KERNELS",
        "TokenProbe": f"{_CORE}.kernels.choice.TokenProbe",
        "can_compute_sparse": f"{_CORE}.kernels.choice.can_compute_sparse",
        "choose_kernel": f"{_CORE}.kernels.choice.choose_kernel",
        "choose_kernels": f"{_CORE}.kernels.choice.choose_kernels",
    },
    f"{_CORE}.kernels": {
        "SparseKernels": f"{_CORE}.kernels.sparse_kernels.SparseKernels",
        "can_serve": f"{_CORE}.kernels.served_layers.can_serve",
        "linear_layers": f"{_CORE}.kernels.served_layers.linear_layers",
        "logical_shape": f"{_CORE}.kernels.served_layers.logical_shape",
        "weight_in_out": f"{_CORE}.kernels.served_layers.weight_in_out",
    },
    f"{_CORE}.layer_kernels": {
        "LayerKernels": f"{_CORE}.kernels.layer_kernels.LayerKernels",
    },
    f"{_CORE}.layer_update": {
        "drop_and_grow_layer": f"{_CORE}.topology.layer_update.update_layer",
        "is_full": f"{_CORE}.topology.layer_update.is_full",
        "read_grow_scores": f"{_CORE}.topology.layer_update.read_grow_scores",
    },
    f"{_CORE}.linear_types": {
        "linear_kind": f"{_CORE}.sparsity.linear_types.linear_kind",
        "qualified_name": f"{_CORE}.sparsity.linear_types.qualified_name",
        "register_linear": f"{_CORE}.sparsity.linear_types.register_linear",
    },
    f"{_CORE}.masked_gradients": {
        "GradientStamp": f"{_CORE}.kernels.masked_gradients.GradientStamp",
    },
    f"{_CORE}.masking": {
        "fill_positions": f"{_CORE}.topology.masking.fill_positions",
        "multiply_by_masks": f"{_CORE}.topology.masking.multiply_by_masks",
        "nonzero_where_inactive": f"{_CORE}.topology.masking.nonzero_where_inactive",
    },
    f"{_CORE}.masks": {
        "LayerMasks": f"{_CORE}.topology.masks.LayerMasks",
    },
    f"{_CORE}.methods": {
        "CurrentGradient": f"{_CORE}.topology.methods.CurrentGradient",
        "DenseGradient": f"{_CORE}.topology.methods.DenseGradient",
        "GradientMovingAverage": f"{_CORE}.topology.methods.GradientMovingAverage",
        "GrowSignal": f"{_CORE}.topology.methods.GrowSignal",
        "METHODS": f"{_CORE}.topology.methods.METHODS",
        "METHODS_BY_NAME": f"{_CORE}.topology.methods.METHODS_BY_NAME",
        "Method": f"{_CORE}.topology.methods.Method",
        "MethodName": f"{_CORE}.topology.methods.MethodName",
        "ScoreFn": f"{_CORE}.topology.methods.ScoreFn",
        "get_method": f"{_CORE}.topology.methods.get_method",
        "gradient_magnitude": f"{_CORE}.topology.methods.gradient_magnitude",
        "uniform_random": f"{_CORE}.topology.methods.uniform_random",
    },
    f"{_CORE}.optim_state": {
        "check_restartable": f"{_CORE}.topology.optim_state.check_restartable",
        "fresh_state": f"{_CORE}.topology.optim_state.fresh_state",
        "reset_optimizer_state": f"{_CORE}.topology.optim_state.reset_optimizer_state",
        "unwrap_optimizer": f"{_CORE}.topology.optim_state.unwrap_optimizer",
    },
    f"{_CORE}.packing": {
        "pack_bits": f"{_CORE}.state.packing.pack_bits",
        "unpack_bits": f"{_CORE}.state.packing.unpack_bits",
    },
    f"{_CORE}.sampling": {
        "ChunkScores": f"{_CORE}.topology.sampling.ChunkScores",
        "ONE_PASS_SHARE": f"{_CORE}.topology.sampling.ONE_PASS_SHARE",
        "WORDS_SHARE": f"{_CORE}.topology.sampling.WORDS_SHARE",
        "active_flags": f"{_CORE}.topology.sampling.active_flags",
        "flat_index": f"{_CORE}.topology.sampling.flat_index",
        "one_pass": f"{_CORE}.topology.sampling.one_pass",
        "sampled_hint": f"{_CORE}.topology.sampling.sampled_hint",
    },
    f"{_CORE}.saved_state": {
        "STATE_VERSION": f"{_CORE}.state.saved_state.STATE_VERSION",
        "check_same_run": f"{_CORE}.state.saved_state.check_same_run",
        "check_saved_shapes": f"{_CORE}.state.saved_state.check_saved_shapes",
        "migrate_state": f"{_CORE}.state.saved_state.migrate_state",
    },
    f"{_CORE}.schedule": {
        "DECAYS": f"{_CORE}.topology.schedule.DECAYS",
        "Decay": f"{_CORE}.topology.schedule.Decay",
        "UpdateSchedule": f"{_CORE}.topology.schedule.UpdateSchedule",
        "check_schedule": f"{_CORE}.topology.schedule.check_schedule",
        "check_steps_per_batch": f"{_CORE}.topology.schedule.check_steps_per_batch",
        "resolve_t_end": f"{_CORE}.topology.schedule.resolve_t_end",
    },
    f"{_CORE}.selection": {
        "MASKED_MODULES": f"{_CORE}.sparsity.selection.MASKED_MODULES",
        "default_parameter_names": f"{_CORE}.sparsity.selection.default_parameter_names",
        "frozen_default_weights": f"{_CORE}.sparsity.selection.frozen_default_weights",
        "is_masked_module": f"{_CORE}.sparsity.selection.is_masked_module",
        "parameter_aliases": f"{_CORE}.sparsity.selection.parameter_aliases",
        "resolve_custom_sparsity": f"{_CORE}.sparsity.distributions.resolve_custom_sparsity",
        "select_parameters": f"{_CORE}.sparsity.selection.select_parameters",
    },
    f"{_CORE}.sharding": {
        "distribute_like_param": f"{_CORE}.parallel.sharding.distribute_like_param",
        "full_like_param": f"{_CORE}.parallel.sharding.full_like_param",
        "gather_full": f"{_CORE}.parallel.sharding.gather_full",
        "is_sharded": f"{_CORE}.parallel.sharding.is_sharded",
        "local_shard": f"{_CORE}.parallel.sharding.local_shard",
        "wrap_like_param": f"{_CORE}.parallel.sharding.wrap_like_param",
    },
    f"{_CORE}.sparse_linear": {
        "GradientGate": f"{_CORE}.kernels.sparse_linear.GradientGate",
        "SPARSE_DTYPES": f"{_CORE}.kernels.sparse_linear.SPARSE_DTYPES",
        "SparseStructure": f"{_CORE}.kernels.sparse_linear.SparseStructure",
        "active_values": f"{_CORE}.kernels.sparse_linear.active_values",
        "sparse_linear": f"{_CORE}.kernels.sparse_linear.sparse_linear",
    },
    f"{_CORE}.sparse_ops": {},
    f"{_CORE}.top_k": {
        "RunningTopK": f"{_CORE}.topology.running_top_k.RunningTopK",
        "could_enter": f"{_CORE}.topology.running_top_k.could_enter",
        "index_dtype": f"{_CORE}.topology.top_k.index_dtype",
        "reaches": f"{_CORE}.topology.top_k.reaches",
        "top_k_indices": f"{_CORE}.topology.top_k.top_k_indices",
        "where_true": f"{_CORE}.topology.top_k.where_true",
        "worst_kept": f"{_CORE}.topology.running_top_k.worst_kept",
    },
    f"{_CORE}.topology": {
        "active_in_mask": f"{_CORE}._moved.dense_scores.active_in_mask",
        "drop_and_grow": f"{_CORE}._moved.dense_scores.drop_and_grow",
        "drop_grow_indices": f"{_CORE}._moved.dense_scores.drop_grow_indices",
        "num_active": f"{_CORE}.topology.initial_masks.num_active",
        "random_mask": f"{_CORE}.topology.initial_masks.random_mask",
    },
    f"{_CORE}.weight_writes": {
        "watch_writes": f"{_CORE}.kernels.weight_writes.watch_writes",
    },
    f"{_CORE}.zero_guard": {
        "Optimizer": f"{_CORE}.topology.zero_guard.Optimizer",
        "ZERO_PRESERVING_OPTIMIZERS": f"{_CORE}.topology.zero_guard.ZERO_PRESERVING_OPTIMIZERS",
        "ZeroGuard": f"{_CORE}.topology.zero_guard.ZeroGuard",
        "keeps_zeros": f"{_CORE}.topology.zero_guard.keeps_zeros",
    },
    _CORE: {"drop_and_grow": f"{_CORE}._moved.dense_scores.drop_and_grow"},
}
