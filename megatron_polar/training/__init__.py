"""Training POLAR reward models (docs/training.md).

- `trainer`: `Trainer`, the run top to bottom (set up, resume, step, log, evaluate,
  checkpoint, stop on SIGTERM), and `main`, behind `python -m megatron_polar.train`;
- `arguments`: Megatron-style flags: `build_train_parser` / `parse_train_args` (a `--config`
  YAML through `yaml_defaults`), and `add_model_args` / `run_config_from_args`, the model and
  parallel flags the other tools share;
- `step`: one training step through megatron's schedules with the pairwise loss
  (`train_step`; `guarded_optimizer_step` skips non-finite steps), `build_optimizer`,
  `evaluate_pairs`, TE userbuffers for TP communication overlap;
- `objective`: `pairwise_loss`, -log sigmoid(r+ - r-) under megatron's per-token-loss
  contract with pairs as the unit, and the pair metrics (`PairMetrics`);
- `checkpointing`: training checkpoints in Megatron-LM's `iter_N` layout (`CheckpointWriter`,
  `load_checkpoint`, `training_state_dict`: model, optimizer, scheduler, sampler, RNG);
- `hparams`: the paper's LR and batch laws (`polar_hparams`, for `--auto-hparams`);
- `flops`: model FLOPs of a step and GPU peaks, for TFLOP/s and MFU;
- `reporting`: `Reporter`: stdout, JSON lines, TensorBoard, Weights & Biases, from rank 0;
- `gpu_check`: `make gpu-check`, the checks to run first on a new GPU node.
"""
