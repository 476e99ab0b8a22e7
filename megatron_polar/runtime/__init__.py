"""What every package that runs the model needs: one device, process groups, model chunks,
megatron's schedules and checkpoint files (docs/architecture.md, layer 3).

- `device`: the device, chosen once at the entry point (`select_device`, called by
  `initialize_parallel`), asked for everywhere else (`compute_device`, `on_gpu`);
- `cpu_backend`: megatron-core on CPU with gloo (development machines and CI):
  `enable_cpu_backend`, `cpu_backend_thread` for server threads;
- `parallel`: `ParallelContext` (this rank's TP x PP x DP place and process groups),
  `initialize_parallel`, `parallel_context` (join an existing state of the same layout),
  `seed_everything`, `any_rank`, `destroy_parallel`, `ParallelLayoutError`;
- `chunks`: `build_model_chunks` (this rank's reward-model chunks in Float16Module and
  megatron DDP), `unwrap`;
- `schedules`: `run_schedule` (megatron's forward-backward function with the caller's
  forward step), `forward_scores`, `sync_params`, `evaluating`, and forward-only scoring
  (`score_packed` at any PP/VPP, `score_padded`);
- `checkpoints`: checkpoint directories (`resolve_checkpoint_dir`, `latest_iteration`),
  weights at any TP/PP (`save_model_weights`, `load_model_weights`, parts), and the manifest
  (`model.json`, `tokenizer/`): `write_manifest`, `read_manifest` -> `CheckpointManifest`
  with `preset_for` / `tokenizer_for`, one set of rules for the trainer, exporter and scorer.
"""
